"""Latent consistency distillation of an LCM-LoRA for the 9-channel inpainting UNet (`cg4ctr-train lcm`).

The recipe is diffusers' consistency-distillation one for LoRAs (examples/consistency_distillation,
train_lcm_distill_lora_sd_wds.py; Luo et al. 2023, "LCM-LoRA"), applied to inpainting inputs:

- teacher: the frozen UNet, classifier-free guided with a weight w ~ U[w_min, w_max] drawn per example;
- student: the same UNet plus a peft LoRA on the attention, feed-forward and resnet projections (`conv_in`,
  whose 9 input channels make the UNet an inpainting one, is left alone, as SD1.5 LCM-LoRAs do);
- one teacher step of a DDIM solver skipping k = 1000 / num_ddim_timesteps timesteps (k = 20 for 50), from
  t_{n+k} to t_n, on the grid LCMScheduler samples from (`original_inference_steps` = num_ddim_timesteps);
- the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with LCM's boundary scalings
  (sigma_data 0.5, timestep scaling 10: LCMScheduler's defaults), so f(x, 0) = x;
- target f_student(x_{t_n}, t_n) under no_grad from the student itself (LCM-LoRA uses no EMA target network);
- pseudo-Huber loss sqrt((f - target)² + c²) − c.

Guidance convention: w is the pipeline's `guidance_scale` (eps = eps_u + w (eps_c − eps_u)), so the teacher at
w = 7.5 is exactly the demo's sampler. diffusers' script writes eps_c + w (eps_c − eps_u), i.e. its w is ours − 1.

The UNet's input is diffusers' inpainting one: noisy latents ⊕ latent repaint mask ⊕ masked-image latents, built
by `training.lora.encode_examples` from creatives and masks of the synthetic world
(`training.toy.generator_dataset`, the same builder that trained the toy generator). Captions are encoded
once by the frozen text encoder.

The loss is not a fixed regression target: the student is its own target, so its curve is not monotone. The shipped
toy run (cg4ctr_fast/assets/toy/lcm_lora, 1,100 steps of 16) rose from 0.029 (first 10 steps) to 0.034 (mean of
steps 100-200) while the LoRA began to absorb the guidance, then fell to 0.027 (last 100 steps).

Checkpoints (every `checkpoint_every` steps) go to a work folder next to the output,
`.<out name>.lcm-partial/`: the LoRA (peft keys), AdamW's moments, the batch generator's state (all
safetensors) and state.json (step, losses, config). `resume=True` continues from it when its config equals
this one. The output folder appears at the end, atomically: pytorch_lora_weights.safetensors (diffusers'
LoRA format, `pipe.load_lora_weights` reads it), lcm_config.json and metrics.json (the loss curve).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from cg4ctr_fast.errors import InputError

# The LCM-LoRA recipe's default targets: every linear and conv layer of the attention blocks and resnets, the
# resnets' time projections and the down/up-sampling convs. Matched by name suffix, so conv_in never is.
LCM_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
PARTIAL_SUFFIX = ".lcm-partial"
CONFIG_FILE = "lcm_config.json"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class LcmDistillConfig:
    """Distillation settings. Units: steps = optimizer steps; lr per step; w = guidance_scale (see module doc)."""

    steps: int = 1000
    batch: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 8.0
    # Centred on the demo's 7.5: one LoRA without a w embedding learns about the average guided trajectory.
    w_min: float = 5.0
    w_max: float = 10.0
    num_ddim_timesteps: int = 50
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    images: int = 2048
    seed: int = 0
    max_grad_norm: float = 1.0
    warmup: int = 20
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "rank", "num_ddim_timesteps", "images", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("lr", "alpha", "huber_c", "timestep_scaling", "sigma_data", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(f"{_flag(name)} must be a finite number > 0, got {value!r}")
        for name in ("w_min", "w_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1.0):
                raise InputError(f"{_flag(name)} must be a finite guidance scale ≥ 1, got {value!r}")
        if self.w_min > self.w_max:
            raise InputError(f"--w-min {self.w_min} is above --w-max {self.w_max}")
        if self.num_ddim_timesteps > 1000 or 1000 % self.num_ddim_timesteps:
            # The skip k = 1000 / N must be whole so the solver's grid is LCMScheduler's (its
            # original_inference_steps grid: t = (1..N)·k − 1).
            raise InputError(f"--num-ddim-timesteps must divide 1000 (e.g. 50: skip 20), got {self.num_ddim_timesteps}")
        if self.warmup < 0:
            raise InputError(f"warmup must be ≥ 0, got {self.warmup}")

    @classmethod
    def from_dict(cls, data: dict) -> "LcmDistillConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def load_lcm_config(path: str | os.PathLike) -> LcmDistillConfig:
    """The LcmDistillConfig in the TOML file at `path` (its fields as top-level keys; one left out keeps its
    default): the repository's training/lcm.toml. Raises InputError (one line, naming the file) for a missing
    file, invalid TOML, an unknown key, a wrong type or a value out of range."""
    from cg4ctr_fast.training.recipes import load_recipe

    return load_recipe(LcmDistillConfig, path)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------------------------
# the consistency-distillation pieces
# ------------------------------------------------------------------------------------------------------------


class DDIMSolver:
    """The DDIM grid of `num_ddim_timesteps` points over the training schedule and its one-step update.

    alphas_cumprod: [T] float (T = num_train_timesteps). Grid: t_i = (i + 1)·k − 1, k = T / N, i in [0, N).
    `step(x0, eps, index)` moves every example from t_index to t_index − k (alpha at index − 1; alphas_cumprod[0]
    below the first point), eta = 0.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        total = alphas_cumprod.shape[0]
        self.skip = total // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * self.skip - 1
        alphas = alphas_cumprod.to(torch.float32)
        self.alphas_prev = torch.cat([alphas[:1], alphas[self.timesteps[:-1]]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a_prev = self.alphas_prev[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps


def boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's c_skip(t), c_out(t) ([B, 1, 1, 1] float32), as LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    scaled = timestep_scaling * t.to(torch.float32)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def predicted_x0(eps: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − sqrt(1 − ᾱ_t) eps) / sqrt(ᾱ_t) for an epsilon-prediction UNet."""
    a = alphas_cumprod[t].to(sample.dtype).view(-1, 1, 1, 1)
    return (sample - (1.0 - a).sqrt() * eps) / a.sqrt()


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


@dataclass
class DistillData:
    """Everything a step draws from: scaled latents [N, 4, h, w], masked-image latents [N, 4, h, w], latent
    repaint masks [N, 1, h, w] (1 = background), caption embeddings [N, 77, D] and the empty prompt's [1, 77, D]."""

    latents: torch.Tensor
    masked_latents: torch.Tensor
    masks: torch.Tensor
    embeds: torch.Tensor
    empty: torch.Tensor


@torch.no_grad()
def prepare_data(modules, creatives, *, batch: int = 64) -> DistillData:
    """Encode a `training.base.CreativeSet` once: VAE posterior means (as the toy generator was trained) and
    the frozen text encoder's caption embeddings (each distinct caption once)."""
    from cg4ctr_fast.training.lora import encode_examples

    examples = encode_examples(modules.vae, creatives.images, creatives.masks)
    tok = modules.tokenizer
    distinct = list(dict.fromkeys(creatives.captions))
    ids = tok(distinct + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    hidden = torch.cat([modules.text_encoder(ids[s : s + batch])[0] for s in range(0, len(ids), batch)])
    row = {c: i for i, c in enumerate(distinct)}
    embeds = hidden[torch.tensor([row[c] for c in creatives.captions])]
    return DistillData(examples["latents"], examples["masked_latents"], examples["masks"], embeds, hidden[-1:])


class Distiller:
    """One LCD step at a time on a UNet with a LoRA (`add_lora` from training.lora) and its frozen teacher."""

    def __init__(self, unet, teacher, alphas_cumprod: torch.Tensor, config: LcmDistillConfig):
        self.unet = unet
        self.teacher = teacher
        self.config = config
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.solver = DDIMSolver(self.alphas_cumprod, config.num_ddim_timesteps)

    def draw(self, data: DistillData, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One batch of the recipe's random choices: examples, grid index, noise and w."""
        cfg = self.config
        return {
            "idx": torch.randint(0, data.latents.shape[0], (cfg.batch,), generator=gen),
            "index": torch.randint(0, cfg.num_ddim_timesteps, (cfg.batch,), generator=gen),
            "noise": torch.randn((cfg.batch, *data.latents.shape[1:]), generator=gen),
            "w": cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(cfg.batch, generator=gen),
        }

    def loss(self, data: DistillData, draw: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pseudo-Huber consistency loss of one drawn batch (graph through the LoRA only)."""
        cfg = self.config
        idx, index, noise = draw["idx"], draw["index"], draw["noise"]
        w = draw["w"].view(-1, 1, 1, 1)
        x0 = data.latents[idx]
        cond = torch.cat([data.masks[idx], data.masked_latents[idx]], dim=1)
        embeds = data.embeds[idx]
        t_start = self.solver.timesteps[index]
        t_end = (t_start - self.solver.skip).clamp(min=0)
        a = self.alphas_cumprod[t_start].view(-1, 1, 1, 1)
        x_start = a.sqrt() * x0 + (1.0 - a).sqrt() * noise

        c_skip_start, c_out_start = boundary_scalings(t_start, cfg.sigma_data, cfg.timestep_scaling)
        eps = self.unet(torch.cat([x_start, cond], 1), t_start, encoder_hidden_states=embeds).sample
        student = c_skip_start * x_start + c_out_start * predicted_x0(eps, t_start, x_start, self.alphas_cumprod)

        with torch.no_grad():
            inputs = torch.cat([x_start, cond], 1)
            both = self.teacher(
                torch.cat([inputs, inputs]),
                torch.cat([t_start, t_start]),
                encoder_hidden_states=torch.cat([data.empty.expand_as(embeds), embeds]),
            ).sample
            eps_u, eps_c = both.chunk(2)
            eps_g = eps_u + w * (eps_c - eps_u)
            # x0 is linear in eps, so guiding eps guides x0 alike (the recipe guides both).
            x_prev = self.solver.step(predicted_x0(eps_g, t_start, x_start, self.alphas_cumprod), eps_g, index)
            c_skip, c_out = boundary_scalings(t_end, cfg.sigma_data, cfg.timestep_scaling)
            eps_t = self.unet(torch.cat([x_prev, cond], 1), t_end, encoder_hidden_states=embeds).sample
            target = c_skip * x_prev + c_out * predicted_x0(eps_t, t_end, x_prev, self.alphas_cumprod)
        return pseudo_huber(student, target, cfg.huber_c)


# ------------------------------------------------------------------------------------------------------------
# checkpoints: safetensors + JSON, no pickle
# ------------------------------------------------------------------------------------------------------------


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}"


def _save_checkpoint(work: Path, unet, opt: torch.optim.Optimizer, gen: torch.Generator, state: dict) -> None:
    from safetensors.torch import save_file

    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.training.lora import lora_state

    with atomic_dir(work) as tmp:
        save_file(lora_state(unet), str(tmp / "lora.safetensors"))
        opt_state = opt.state_dict()
        tensors = {}
        for pid, entry in opt_state["state"].items():
            for key, value in entry.items():
                tensors[f"{pid}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"generator": gen.get_state().clone()}, str(tmp / "rng.safetensors"))
        state = dict(state, param_groups=opt_state["param_groups"])
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")


def _load_checkpoint(work: Path, unet, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    from safetensors.torch import load_file

    from cg4ctr_fast.training.lora import load_lora_state

    try:
        state = json.loads((work / "state.json").read_text())
        load_lora_state(unet, load_file(str(work / "lora.safetensors")))
        tensors = load_file(str(work / "optimizer.safetensors"))
        gen.set_state(load_file(str(work / "rng.safetensors"))["generator"])
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{work}: cannot resume from this checkpoint ({type(exc).__name__}: {exc}); "
                         "delete it to start over") from None
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    return state


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------


def distill_lcm_lora(
    modules,
    creatives,
    out: str | Path,
    config: LcmDistillConfig = LcmDistillConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    command: Optional[str] = None,
    extra: Optional[dict[str, Any]] = None,
    log: Callable[[str], Any] = lambda _m: None,
) -> dict[str, Any]:
    """Distil an LCM-LoRA into `modules.unet` (a DiffusionModules; the UNet gains the adapter) and write `out`.

    creatives: a `training.base.CreativeSet` (images [N, 3, H, W] in [-1, 1], masks [N, 1, H, W], captions).
    out: the folder to write atomically (the caller checked it); `resume` continues the checkpoint in
    `partial_dir(out)` (InputError if it is missing or was written with another config).
    Returns the metrics written to metrics.json: `loss` (per step), `loss_first`/`loss_last` (means of the first
    and last 10 % of the steps), seconds, steps.
    """
    from tqdm.auto import tqdm

    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.training.base import _cosine_lr
    from cg4ctr_fast.training.lora import LoraTrainConfig, add_lora, lora_parameters

    out = Path(out)
    work = partial_dir(out)
    unet = modules.unet
    if getattr(unet.config, "prediction_type", None) not in (None, "epsilon") or \
            modules.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise InputError("cg4ctr-train lcm distils epsilon-prediction UNets only")
    if unet.config.in_channels != 9:
        raise InputError(f"cg4ctr-train lcm needs a 9-channel inpainting UNet; this one has {unet.config.in_channels} input channels")
    for module in (modules.vae, modules.text_encoder, unet):
        module.requires_grad_(False)
        module.eval()
    teacher = copy.deepcopy(unet)
    add_lora(unet, LoraTrainConfig(rank=config.rank, alpha=config.alpha, targets=LCM_TARGETS))
    params = lora_parameters(unet)

    log(f"[lcm] encoding {creatives.images.shape[0]} creatives")
    data = prepare_data(modules, creatives)
    distiller = Distiller(unet, teacher, modules.scheduler.alphas_cumprod, config)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    losses: list[float] = []
    seconds_before = 0.0
    if resume:
        if not (work / "state.json").is_file():
            raise InputError(f"--resume: no checkpoint at {work}; run without --resume to start")
        state = _load_checkpoint(work, unet, opt, gen)
        if state.get("config") != asdict(config):
            raise InputError(f"--resume: the checkpoint at {work} was written with other settings "
                             f"({_config_diff(state.get('config') or {}, asdict(config))}); use them or delete it")
        losses = [float(v) for v in state["loss"]]
        seconds_before = float(state.get("seconds", 0.0))
        log(f"[lcm] resuming at step {len(losses)} of {config.steps}")
    elif work.exists():
        shutil.rmtree(work)  # a stale run's own scratch folder; this run starts over

    started = time.perf_counter()
    unet.train()
    with tqdm(total=config.steps, initial=len(losses), desc="LCM distil", disable=not progress) as bar:
        for step in range(len(losses), config.steps):
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, config.steps, config.lr, warmup=config.warmup)
            loss = distiller.loss(data, distiller.draw(data, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            losses.append(float(loss.item()))
            bar.update()
            bar.set_postfix(huber=f"{np.mean(losses[-50:]):.5f}")
            done = step + 1
            if done % config.checkpoint_every == 0 and done < config.steps:
                _save_checkpoint(work, unet, opt, gen, {
                    "step": done, "loss": losses, "config": asdict(config),
                    "seconds": seconds_before + time.perf_counter() - started,
                })
    unet.eval()
    tenth = max(1, len(losses) // 10)
    metrics = {
        "steps": len(losses),
        "loss_first": float(np.mean(losses[:tenth])),
        "loss_last": float(np.mean(losses[-tenth:])),
        "seconds": round(seconds_before + time.perf_counter() - started, 1),
        "loss": losses,
    }
    record = {
        "format": "cg4ctr-lcm-lora",
        "recipe": "latent consistency distillation, LCM-LoRA (diffusers examples/consistency_distillation)",
        "config": asdict(config),
        "targets": list(LCM_TARGETS),
        "guidance_convention": "w = guidance_scale: eps = eps_u + w (eps_c - eps_u)",
        "scheduler": {"class": "LCMScheduler", "original_inference_steps": config.num_ddim_timesteps,
                      "timestep_scaling": config.timestep_scaling, "guidance_scale": 1.0},
        "command": command,
        **(extra or {}),
    }
    with atomic_dir(out) as tmp:
        save_lcm_lora(unet, tmp, {"lcm": {"config": asdict(config), "command": command}})
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
    if work.exists():
        shutil.rmtree(work)
    return metrics


def save_lcm_lora(unet, out_dir: str | Path, extra_metadata: Optional[dict] = None) -> Path:
    """`pytorch_lora_weights.safetensors` in diffusers' LoRA format, keys in peft naming (`unet.….lora_A.weight`),
    as diffusers' LCM-LoRA script saves them, with the adapter config and our `cg4ctr.*` keys in the header
    (`training.lora.save_lora(..., peft_keys=True)`: this LoRA adapts conv and time-projection layers too)."""
    from cg4ctr_fast.training.lora import save_lora

    return save_lora(unet, out_dir, extra_metadata, peft_keys=True)


def _config_diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys[:3]) or "unknown"


def half_lora_file(path: str | Path) -> Path:
    """Rewrite a saved LoRA's tensors as float16 (its header kept); the loaders cast back to the UNet's dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cg4ctr_fast.fileio import atomic_path
    from cg4ctr_fast.training.lora import LORA_WEIGHT_NAME

    file = Path(path)
    if file.is_dir():
        file = file / LORA_WEIGHT_NAME
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k).to(torch.float16).contiguous() for k in handle.keys()}
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return file


def world_creatives(world_dir: str | Path, n_images: int, seed: int):
    """The toy world's training creatives: `generator_dataset` over the logged (training) products of the
    synthetic-world folder `world_dir` (held-out products, ids ≥ HELD_OUT_ITEM_BASE, never appear)."""
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import generator_dataset

    world_dir = Path(world_dir)
    if not (world_dir / "world.json").is_file():
        raise InputError(f"{world_dir}: not a synthetic-world folder (no world.json)")
    dataset = load_dataset(world_dir)
    items = sorted(int(i) for i in dataset.items["item_id"])
    return generator_dataset(dataset.world, n_images, items, seed)
