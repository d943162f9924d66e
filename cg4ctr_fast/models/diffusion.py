"""Diffusion components: build a preset's architecture in code, or load a local diffusers folder.

Everything loads from local paths; nothing reaches a hub (`local_files_only=True` everywhere).
"""
from __future__ import annotations

import importlib.util

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
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
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


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the stack that the loop needs, whatever backend runs it (`Components.info`).

    Read from the modules' configs by `model_info`; an engine folder stores it as model_info.json.
    """

    unet_in_channels: int  # 9: inpainting UNet; 4: masked latent blending
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel along a side (8 for SD)
    scaling_factor: float  # latents = scaling_factor × VAE posterior sample (0.18215 for SD1.x)
    sample_size: int  # UNet latent side the model was trained at
    model_id: str

    @property
    def resolution(self) -> int:
        """The image side in pixels the model was trained at: sample_size × vae_scale_factor."""
        return self.sample_size * self.vae_scale_factor


def model_info(modules: DiffusionModules) -> ModelInfo:
    """The `ModelInfo` of loaded modules, read from their diffusers configs (no weights touched)."""
    vae_config = modules.vae.config
    return ModelInfo(
        unet_in_channels=int(modules.unet.config.in_channels),
        latent_channels=int(vae_config.latent_channels),
        vae_scale_factor=2 ** (len(vae_config.block_out_channels) - 1),
        scaling_factor=float(vae_config.scaling_factor),
        sample_size=int(modules.unet.config.sample_size),
        model_id=modules.model_id,
    )


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
        known = ", ".join(_short_name_label(n) for n in sorted(SCHEDULER_NAMES))
        raise InputError(f"unknown scheduler {name!r}; short names: {known}, or a diffusers scheduler class name")
    config = dict(config or {})
    if class_name == "DPMSolverMultistepScheduler":
        config.setdefault("algorithm_type", "dpmsolver++")
    if class_name == "PNDMScheduler":
        # SD checkpoints ship PNDM with PLMS only; the Runge-Kutta warm-up steps break strength < 1 indexing.
        config.setdefault("skip_prk_steps", True)
    try:
        scheduler = cls.from_config(config)
    except ImportError as exc:  # e.g. LMSDiscreteScheduler needs scipy
        reason = " ".join(str(exc).split())
        raise InputError(f"scheduler {class_name} is unavailable here: {reason}") from None
    except (TypeError, ValueError, KeyError, NotImplementedError) as exc:  # e.g. beta_schedule "foo"
        raise InputError(f"scheduler {class_name} does not accept this config: {_first_line(exc)}") from None
    _trial_step(scheduler)
    return scheduler


def _short_name_label(name: str) -> str:
    # diffusers' LMS scheduler imports scipy when built; the default install has none, so say so up front.
    if SCHEDULER_NAMES[name] == "LMSDiscreteScheduler" and importlib.util.find_spec("scipy") is None:
        return f"{name} (needs scipy)"
    return name


def _trial_step(scheduler) -> None:
    """Two timesteps and one step on zeros: a bad `timestep_spacing` or `prediction_type` fails here, in
    milliseconds, instead of inside the denoising loop after the model loaded."""
    trial = scheduler.__class__.from_config(scheduler.config)
    sample = torch.zeros(1, 1, 2, 2)
    # fork_rng: ancestral samplers draw noise in step(); the caller's RNG stream must not move.
    try:
        with torch.random.fork_rng(devices=[]):
            trial.set_timesteps(2)
            t = trial.timesteps[0]
            trial.step(trial.scale_model_input(sample, t), t, sample)
    except (TypeError, ValueError, KeyError, IndexError, NotImplementedError) as exc:
        raise InputError(f"scheduler {type(scheduler).__name__} cannot run with this config: "
                         f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def swap_scheduler(scheduler, name: str):
    """The same noise schedule under another sampler (the folder's betas and offsets are kept)."""
    return make_scheduler(name, dict(scheduler.config))


# Weight files per component, in the order diffusers and transformers look for them. Only safetensors load:
# a pickle `.bin` can run code on load.
_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
# Pipelines whose unet/vae/text_encoder/tokenizer layout this loader serves (SD 1.x / 2.x, inpainting or not).
_SUPPORTED_PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")


@dataclass
class ModelFolder:
    """What `inspect_model_folder` found: parsed configs, the weights variant per component, the scheduler."""

    root: Path
    configs: dict[str, dict]
    variants: dict[str, str | None]
    scheduler_class: str
    scheduler_config: dict[str, Any]


def _read_json(path: Path, root: Path) -> dict:
    """A JSON object from `path`; InputError naming the file (relative to `root`) when missing or invalid."""
    name = path.relative_to(root) if path.is_relative_to(root) else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{root}: not a supported model folder: missing {name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{root}: cannot read {name}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{root}: {name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{root}: {name} must hold a JSON object, found {type(data).__name__}")
    return data


def _weights_variant(root: Path, component: str) -> str | None:
    """None for the plain weights file, else the one variant present (e.g. "fp16"); InputError otherwise."""
    folder = root / component
    stem = _WEIGHT_NAMES[component]
    if (folder / f"{stem}.safetensors").is_file() or (folder / f"{stem}.safetensors.index.json").is_file():
        return None
    prefix, suffix = f"{stem}.", ".safetensors"
    variants = sorted(
        {f.name[len(prefix):-len(suffix)].split(".")[0] for f in folder.glob(f"{stem}.*{suffix}")}
        | {f.name[len(prefix):].split(".")[0] for f in folder.glob(f"{stem}.*.safetensors.index.json")}
    )
    variants = [v for v in variants if v and not v.startswith("safetensors")]
    if len(variants) == 1:
        return variants[0]
    if len(variants) > 1:
        raise InputError(f"{root}: {component}/ holds weight variants {', '.join(variants)} and no plain "
                         f"{stem}.safetensors; keep one variant")
    pickles = sorted(p.name for p in folder.glob("*.bin"))  # diffusion_pytorch_model.bin, pytorch_model.bin
    if pickles:
        raise InputError(f"{root}: {component}/ has only pickle weights ({pickles[0]}); only .safetensors load "
                         "(a .bin can run code when loaded): convert it with diffusers' save_pretrained("
                         "safe_serialization=True)")
    raise InputError(f"{root}: not a supported model folder: missing {component}/{stem}.safetensors")


def inspect_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Validate a local diffusers folder before any weight loads.

    Checks, in order: the folder; `model_index.json` if present (valid JSON, a Stable Diffusion 1.x/2.x
    pipeline, no second text encoder); `unet/`, `vae/`, `text_encoder/` each with a valid `config.json` and
    one safetensors weights file (plain, sharded, or a single variant such as fp16); the architecture (a
    UNet2DConditionModel with 4 or 9 input channels, no `addition_embed_type`/`encoder_hid_dim_type`,
    `cross_attention_dim` equal to the CLIPTextModel's `hidden_size`, latent channels matching the VAE);
    `tokenizer/` files; and `scheduler/scheduler_config.json` naming a diffusers scheduler class.

    Raises InputError (one line naming the folder and what was found) on the first problem.
    """
    import diffusers

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: model folder not found (expected a diffusers folder with unet/, vae/, ...)")
    index = _read_json(root / "model_index.json", root) if (root / "model_index.json").is_file() else {}
    pipeline_class = index.get("_class_name")
    second = [name for name in ("text_encoder_2", "tokenizer_2") if name in index or (root / name).is_dir()]
    if second:
        raise InputError(f"{root}: unsupported architecture: found {pipeline_class or 'a pipeline'} with two text "
                         f"encoders ({', '.join(n + '/' for n in second)}, as SDXL); supported: Stable Diffusion "
                         "1.x/2.x folders with one CLIP text encoder")
    if pipeline_class is not None and pipeline_class not in _SUPPORTED_PIPELINES:
        raise InputError(f"{root}: unsupported architecture: model_index.json names {pipeline_class}; supported: "
                         f"{', '.join(_SUPPORTED_PIPELINES)}")
    missing = [sub for sub in _WEIGHT_NAMES if not (root / sub).is_dir()]
    if missing:
        raise InputError(f"{root}: not a supported model folder: missing {', '.join(m + '/' for m in missing)}")
    configs = {sub: _read_json(root / sub / "config.json", root) for sub in _WEIGHT_NAMES}
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]

    def refuse(what: str) -> InputError:
        return InputError(f"{root}: unsupported architecture: {what}")

    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise refuse(f"unet/config.json is a {unet['_class_name']}, expected UNet2DConditionModel")
    for key in ("addition_embed_type", "encoder_hid_dim_type"):
        if unet.get(key) is not None:
            raise refuse(f"unet/config.json has {key} = {unet[key]!r} (SDXL-style extra conditioning)")
    architectures = text.get("architectures") or ["CLIPTextModel"]
    if architectures[0] != "CLIPTextModel":
        raise refuse(f"text_encoder/ is a {architectures[0]}, expected CLIPTextModel")
    cross, hidden = unet.get("cross_attention_dim", 1280), text.get("hidden_size")
    if not isinstance(cross, int) or cross != hidden:
        raise refuse(f"the UNet's cross_attention_dim {cross} does not match the text encoder's hidden_size {hidden}")
    latent = vae.get("latent_channels", 4)
    in_channels, out_channels = unet.get("in_channels", 4), unet.get("out_channels", 4)
    # 4 = latents only (masked blending); 9 = latents + mask + masked-image latents (an inpainting UNet).
    if in_channels not in (latent, 2 * latent + 1) or out_channels != latent:
        raise refuse(f"the UNet takes {in_channels} and gives {out_channels} channels; with the VAE's {latent} "
                     f"latent channels it must take {latent} or {2 * latent + 1} and give {latent}")
    variants = {sub: _weights_variant(root, sub) for sub in _WEIGHT_NAMES}

    tokenizer = root / "tokenizer"
    if tokenizer.is_dir():
        # transformers 5 saves tokenizer.json alone; older folders carry vocab.json + merges.txt.
        slow = [f for f in ("vocab.json", "merges.txt") if not (tokenizer / f).is_file()]
        if slow and not (tokenizer / "tokenizer.json").is_file():
            raise InputError(f"{root}: tokenizer/ has neither tokenizer.json nor {' + '.join(slow)}")
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
            if (tokenizer / name).is_file():
                _read_json(tokenizer / name, root)

    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        config = _read_json(scheduler_file, root)
        class_name = config.get("_class_name", "DDIMScheduler")
        cls = getattr(diffusers, str(class_name), None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
            raise InputError(f"{root}: scheduler/scheduler_config.json names {class_name!r}, which is not a "
                             "diffusers scheduler class")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        train_steps = config.get("num_train_timesteps", 1000)
        if not isinstance(train_steps, int) or isinstance(train_steps, bool) or train_steps <= 0:
            raise InputError(f"{root}: scheduler/scheduler_config.json: num_train_timesteps must be a positive "
                             f"integer, got {train_steps!r}")
    else:
        from cg4ctr_fast.config import SD_SCHEDULE

        class_name, config = "DDIMScheduler", {**SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False}
    return ModelFolder(root=root, configs=configs, variants=variants, scheduler_class=str(class_name),
                       scheduler_config=config)


def folder_scheduler(folder: ModelFolder):
    """The folder's scheduler, built from its validated config (InputError if the config does not build)."""
    try:
        return make_scheduler(folder.scheduler_class, folder.scheduler_config)
    except InputError as exc:
        raise InputError(f"{folder.root}: scheduler/scheduler_config.json: {exc}") from None


def max_inference_steps(scheduler) -> int:
    """The most denoising steps `scheduler` supports: every timestep must fall within the trained ones.

    That is `num_train_timesteps` (1000 for SD) for Euler, one less for DDIM/PNDM with `steps_offset` 1
    (their first timestep would be 1000, past the trained range [0, 999]) and for DPM++/UniPC (at 1000 they
    repeat a timestep).
    """
    train = int(scheduler.config.num_train_timesteps)
    if _steps_fit(scheduler, train):
        return train
    low, high = 1, train  # low fits, high does not; the fit is monotone in the step count for diffusers' spacings
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if _steps_fit(scheduler, mid) else (low, mid)
    return low


def _steps_fit(scheduler, steps: int) -> bool:
    trial = scheduler.__class__.from_config(scheduler.config)
    try:
        trial.set_timesteps(steps)
    except (ValueError, IndexError):
        return False
    timesteps = trial.timesteps
    if len(timesteps) == 0 or float(timesteps.max()) >= trial.config.num_train_timesteps or float(timesteps.min()) < 0:
        return False
    # DPM++ and UniPC at 1000 of 1000 steps repeat a timestep (999 distinct): the repeated step has a zero
    # step size and the output turns NaN. PNDM repeats one on purpose (PLMS warm-up) but has `steps` distinct.
    return len(torch.unique(timesteps)) >= steps


def check_steps(scheduler, steps: int, strength: float = 1.0, *, flag: str = "num_inference_steps") -> None:
    """Refuse a step count the scheduler cannot run (InputError), before any model work.

    Steps beyond the trained timesteps would repeat or run past them (diffusers raises IndexError or
    ValueError mid-call); with `strength` < 1 only int(steps × strength) of them run, and at least one must.
    """
    if steps > int(scheduler.config.num_train_timesteps) or not _steps_fit(scheduler, steps):
        most = max_inference_steps(scheduler)
        raise InputError(f"{flag} {steps} is more than {type(scheduler).__name__} supports here: at most {most} "
                         f"(its timesteps must fall within the {scheduler.config.num_train_timesteps} it was "
                         "trained on)")
    if min(int(steps * strength), steps) < 1:
        raise InputError(f"strength {strength} with {steps} steps leaves no denoising step: "
                         f"int(steps × strength) must be ≥ 1")


def load_modules(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, tokenizer_dir: str | None = None
) -> DiffusionModules:
    """Load unet/, vae/, text_encoder/, tokenizer/ and scheduler/ from a local diffusers folder.

    The folder is validated first (`inspect_model_folder`): an unsupported architecture, a missing or
    invalid file, or an unknown scheduler raises InputError naming what was found, before any weight loads.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import SafetensorError
    from transformers import CLIPTextModel

    from cg4ctr_fast.models.tokenizer import load_clip_tokenizer

    folder = inspect_model_folder(path)
    root = folder.root
    scheduler = folder_scheduler(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, local_files_only=True,
                                                    variant=folder.variants["unet"], use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, local_files_only=True,
                                            variant=folder.variants["vae"], use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype, local_files_only=True,
                                                     variant=folder.variants["text_encoder"], use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # damaged file, shapes unlike the config
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise InputError(f"{root}: cannot load model weights: {first_line}") from None
    positions = int(text_encoder.config.max_position_embeddings)
    if tokenizer_dir is not None:
        tokenizer = load_clip_tokenizer(tokenizer_dir, max_positions=positions)
    elif (root / "tokenizer").is_dir():
        tokenizer = load_clip_tokenizer(root / "tokenizer", max_positions=positions)
    else:
        tokenizer = load_clip_tokenizer(max_positions=positions)
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
