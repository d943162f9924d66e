"""Diffusion components: build a preset's architecture in code, or load a local diffusers folder.

Everything loads from local paths; nothing reaches a hub (`local_files_only=True` everywhere).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cg4ctr_fast.config import Preset
from cg4ctr_fast.errors import InputError

SCHEDULER_NAMES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class DiffusionModules:
    """The torch modules of one SD inpainting stack, plus where they came from."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    model_id: str


def build_modules(preset: Preset, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionModules:
    """Build the preset's architecture with seeded random weights (tests, latency work)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cg4ctr_fast.models.tokenizer import load_clip_tokenizer

    # fork_rng: a built-in preset's weights depend on the seed only, and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**preset.unet.to_kwargs())
        vae = AutoencoderKL(**preset.vae.to_kwargs())
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder.to_kwargs()))
    modules = DiffusionModules(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=load_clip_tokenizer(),
        scheduler=make_scheduler(preset.scheduler, preset.scheduler_kwargs()),
        model_id=f"preset:{preset.name}:random-seed{seed}",
    )
    if dtype != torch.float32:
        for module in (modules.unet, modules.vae, modules.text_encoder):
            module.to(dtype=dtype)
    return modules


def make_scheduler(name: str, config: dict[str, Any] | None = None):
    """A diffusers scheduler by class name or short name (ddim, euler, dpm++, …)."""
    import diffusers

    class_name = SCHEDULER_NAMES.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        known = ", ".join(sorted(SCHEDULER_NAMES))
        raise InputError(f"unknown scheduler {name!r}; short names: {known}, or a diffusers scheduler class name")
    config = dict(config or {})
    if class_name == "DPMSolverMultistepScheduler":
        config.setdefault("algorithm_type", "dpmsolver++")
    if class_name == "PNDMScheduler":
        # SD checkpoints ship PNDM with PLMS only; the Runge-Kutta warm-up steps break strength < 1 indexing.
        config.setdefault("skip_prk_steps", True)
    try:
        return cls.from_config(config)
    except ImportError as exc:  # e.g. LMSDiscreteScheduler needs scipy
        reason = " ".join(str(exc).split())
        raise InputError(f"scheduler {class_name} is unavailable here: {reason}") from None


def swap_scheduler(scheduler, name: str):
    """The same noise schedule under another sampler (the folder's betas and offsets are kept)."""
    return make_scheduler(name, dict(scheduler.config))


def load_modules(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, tokenizer_dir: str | None = None
) -> DiffusionModules:
    """Load unet/, vae/, text_encoder/, tokenizer/ and scheduler/ from a local diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from cg4ctr_fast.models.tokenizer import load_clip_tokenizer

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: model folder not found (expected a diffusers folder with unet/, vae/, ...)")
    missing = [sub for sub in ("unet", "vae", "text_encoder") if not (root / sub / "config.json").is_file()]
    if missing:
        raise InputError(f"{root}: not a diffusers model folder: missing {', '.join(s + '/config.json' for s in missing)}")
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(
            root / "text_encoder", torch_dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{root}: cannot load model weights: {first_line}") from None
    if tokenizer_dir is not None:
        tokenizer = load_clip_tokenizer(tokenizer_dir)
    elif (root / "tokenizer").is_dir():
        tokenizer = load_clip_tokenizer(root / "tokenizer")
    else:
        tokenizer = load_clip_tokenizer()
    scheduler_config_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_config_file.is_file():
        config = json.loads(scheduler_config_file.read_text())
        class_name = config.pop("_class_name", "DDIMScheduler")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        scheduler = make_scheduler(class_name, config)
    else:
        from cg4ctr_fast.config import SD_SCHEDULE

        scheduler = make_scheduler("ddim", {**SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False})
    return DiffusionModules(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        model_id=f"folder:{root.resolve()}",
    )


def diffusers_inpaint_pipeline(modules: DiffusionModules):
    """diffusers' own StableDiffusionInpaintPipeline on the same modules (no copy): the reference we match."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=modules.vae,
        text_encoder=modules.text_encoder,
        tokenizer=modules.tokenizer,
        unet=modules.unet,
        scheduler=modules.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_modules(modules: DiffusionModules, path: str | os.PathLike) -> Path:
    """Write a diffusers folder (safetensors) that diffusers' own StableDiffusionInpaintPipeline loads."""
    from cg4ctr_fast.fileio import atomic_dir

    final = Path(path)
    with atomic_dir(final) as tmp:
        diffusers_inpaint_pipeline(modules).save_pretrained(tmp, safe_serialization=True)
    return final
