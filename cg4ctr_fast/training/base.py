"""The toy generator: the tiny preset's VAE, 9-channel inpainting UNet and CLIP text encoder, trained on
the synthetic ad world's creatives and captions, on a CPU, in minutes.

Stage A trains the VAE to reconstruct creatives (L1 + a 1e-6 KL term, as SD's VAE keeps a near-
deterministic posterior) and sets its `scaling_factor` to 1 / std of the latents, as SD does (0.18215).
Most VAE steps see random `vae_crop`-pixel crops: the VAE is convolutional, and a 32-px crop costs a quarter
of a 64-px image, so the same CPU time buys 4x the steps; the last `vae_full_steps` see whole images, so the
mid-block attention settles on the full latent grid.
Stage B trains the UNet and the text encoder together with diffusers' inpainting conditioning
(noisy latents ⊕ repaint mask ⊕ masked-image latents), the epsilon loss under SD's noise schedule, and
10 % caption dropout so classifier-free guidance has an unconditional branch to push against.

The result is a diffusers folder that `CreativePipeline.from_pretrained` and diffusers load.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BaseTrainConfig:
    seed: int = 0
    n_images: int = 3072
    vae_steps: int = 5000
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_crop: int = 32  # px side of the random crops of all but the last vae_full_steps steps; 0 = whole images
    vae_full_steps: int = 300
    kl_weight: float = 1e-6
    unet_steps: int = 2400
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 3e-4
    caption_dropout: float = 0.1
    # Optional wall-clock caps per stage (seconds): stop early on a slow machine. None = run all steps.
    vae_seconds: Optional[float] = None
    unet_seconds: Optional[float] = None

    def __post_init__(self) -> None:
        check_ranges(self, positive=("n_images", "vae_batch", "unet_batch", "vae_lr", "unet_lr", "text_lr"),
                     non_negative=("seed", "vae_steps", "vae_crop", "vae_full_steps", "unet_steps", "kl_weight"),
                     unit=("caption_dropout",), optional_positive=("vae_seconds", "unet_seconds"))


def check_ranges(config, *, positive=(), non_negative=(), unit=(), optional_positive=()) -> None:
    """Range checks of a training config's numbers (names are its fields): InputError (one line) naming the field
    for a value that is not > 0 (positive), ≥ 0 (non_negative), in [0, 1] (unit), or None or > 0
    (optional_positive). A field annotated `int` must hold an integer (not a bool); any other a finite number."""
    import dataclasses

    from cg4ctr_fast.errors import InputError

    integers = {f.name for f in dataclasses.fields(config) if f.type in (int, "int")}

    def check(name: str, ok, want_int: str, want_float: str) -> None:
        value = getattr(config, name)
        if name in integers:
            good, want = isinstance(value, int) and not isinstance(value, bool) and ok(value), want_int
        else:
            good = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and ok(value))
            want = want_float
        if not good:
            raise InputError(f"{name} must be {want}, got {value!r}")

    for name in positive:
        check(name, lambda v: v > 0, "a positive integer", "a finite number > 0")
    for name in non_negative:
        check(name, lambda v: v >= 0, "an integer ≥ 0", "a finite number ≥ 0")
    for name in unit:
        check(name, lambda v: 0 <= v <= 1, "an integer in [0, 1]", "a number in [0, 1]")
    for name in optional_positive:
        if getattr(config, name) is not None:
            check(name, lambda v: v > 0, "None or a positive integer", "None or a finite number > 0")


@dataclass
class CreativeSet:
    """Training data: creatives in [-1, 1], repaint masks (1 = background), captions."""

    images: torch.Tensor  # [N, 3, H, W] float32 in [-1, 1]
    masks: torch.Tensor  # [N, 1, H, W] float32, 1 = repaint (background), 0 = product
    captions: list[str]


def _cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def train_vae(vae, data: CreativeSet, cfg: BaseTrainConfig, *, progress: bool = True) -> dict[str, float]:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    started = time.perf_counter()
    losses = []
    steps_done = 0
    with _bar(cfg.vae_steps, "train VAE", progress) as bar:
        for step in range(cfg.vae_steps):
            if cfg.vae_seconds is not None and time.perf_counter() - started > cfg.vae_seconds:
                break
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
            idx = torch.randint(0, data.images.shape[0], (cfg.vae_batch,), generator=gen)
            x = data.images[idx]
            side = x.shape[-1]
            if 0 < cfg.vae_crop < side and step < cfg.vae_steps - cfg.vae_full_steps:
                top, left = torch.randint(0, side - cfg.vae_crop + 1, (2,), generator=gen).tolist()
                x = x[:, :, top : top + cfg.vae_crop, left : left + cfg.vae_crop]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            loss = (recon - x).abs().mean() + cfg.kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            steps_done += 1
            bar.update()
            bar.set_postfix(l1=f"{np.mean(losses[-20:]):.4f}")
    vae.eval()
    return {"vae_steps": steps_done, "vae_l1_last20": float(np.mean(losses[-20:])), "vae_seconds": time.perf_counter() - started}


@torch.no_grad()
def vae_reconstruction(vae, data: CreativeSet, batch: int = 64) -> dict[str, float]:
    """How well the VAE gives back `data`'s images through its posterior means.

    Returns "l1": mean |decode(encode(x).mean) − x| with images in [-1, 1] (the training loss's unit; halve it
    for [0, 1]), and "chroma_ratio": the output's mean per-pixel std over the 3 channels divided by the
    input's (1 = colour kept, 0 = grey)."""
    vae.eval()
    total, chroma_in, chroma_out = 0.0, 0.0, 0.0
    for start in range(0, data.images.shape[0], batch):
        x = data.images[start : start + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += float((recon - x).abs().mean(dim=(1, 2, 3)).sum())
        chroma_in += float(x.std(dim=1).mean(dim=(1, 2)).sum())
        chroma_out += float(recon.std(dim=1).mean(dim=(1, 2)).sum())
    n = data.images.shape[0]
    return {"l1": total / n, "chroma_ratio": chroma_out / max(chroma_in, 1e-12), "images": int(n)}


@torch.no_grad()
def encode_set(vae, data: CreativeSet, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means of the creatives and of the masked creatives (product only, background 0 = gray)."""
    latents, masked = [], []
    for start in range(0, data.images.shape[0], batch):
        x = data.images[start : start + batch]
        m = data.masks[start : start + batch]
        latents.append(vae.encode(x).latent_dist.mean)
        masked.append(vae.encode(x * (m < 0.5)).latent_dist.mean)
    return torch.cat(latents), torch.cat(masked)


def noisy_batch(latents: torch.Tensor, alphas_cumprod: torch.Tensor, n_train: int, batch: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training draw under SD's noise schedule: example indices, noise, timesteps, noisy latents."""
    idx = torch.randint(0, latents.shape[0], (batch,), generator=gen)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, n_train, (batch,), generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return idx, noise, t, a.sqrt() * x0 + (1 - a).sqrt() * noise


def train_unet(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    latents: torch.Tensor,
    masked_latents: torch.Tensor,
    masks: torch.Tensor,
    captions: Sequence[str],
    cfg: BaseTrainConfig,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Epsilon loss on latents already multiplied by the VAE's scaling factor."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    params = [
        {"params": unet.parameters(), "lr": cfg.unet_lr},
        {"params": text_encoder.parameters(), "lr": cfg.text_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    unet.train()
    text_encoder.train()
    latent_side = latents.shape[-1]
    mask_latents = F.interpolate(masks, size=(latent_side, latent_side))  # nearest, as the pipeline does
    tokens = tokenizer(
        list(captions) + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_ids = tokens[-1]
    tokens = tokens[:-1]
    alphas_cumprod = scheduler.alphas_cumprod
    n_train = scheduler.config.num_train_timesteps
    started = time.perf_counter()
    losses = []
    steps_done = 0
    with _bar(cfg.unet_steps, "train UNet + text encoder", progress) as bar:
        for step in range(cfg.unet_steps):
            if cfg.unet_seconds is not None and time.perf_counter() - started > cfg.unet_seconds:
                break
            for group, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr)):
                group["lr"] = _cosine_lr(step, cfg.unet_steps, base)
            idx, noise, t, noisy = noisy_batch(latents, alphas_cumprod, n_train, cfg.unet_batch, gen)
            ids = tokens[idx].clone()
            drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
            ids[drop] = empty_ids
            hidden = text_encoder(ids)[0]
            model_in = torch.cat([noisy, mask_latents[idx], masked_latents[idx]], dim=1)
            pred = unet(model_in, t, encoder_hidden_states=hidden).sample
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
            opt.step()
            losses.append(loss.item())
            steps_done += 1
            bar.update()
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.4f}")
    unet.eval()
    text_encoder.eval()
    return {
        "unet_steps": steps_done,
        "unet_mse_last50": float(np.mean(losses[-50:])),
        "unet_seconds": time.perf_counter() - started,
    }


def train_generator(
    data: CreativeSet,
    out_dir: str | Path,
    cfg: BaseTrainConfig = BaseTrainConfig(),
    *,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train the tiny preset's stack on `data` and save a diffusers folder at `out_dir`."""
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.models.diffusion import build_modules, save_modules

    torch.manual_seed(cfg.seed)
    modules = build_modules(get_preset("tiny"), seed=cfg.seed)
    metrics: dict[str, Any] = {"config": asdict(cfg), "n_images": int(data.images.shape[0])}
    metrics.update(train_vae(modules.vae, data, cfg, progress=progress))
    log(f"VAE: {metrics['vae_steps']} steps, L1 {metrics['vae_l1_last20']:.4f}, {metrics['vae_seconds']:.0f} s")
    raw, raw_masked = encode_set(modules.vae, data)
    scaling = float(1.0 / raw.std())
    modules.vae.register_to_config(scaling_factor=scaling)
    metrics["scaling_factor"] = scaling
    metrics.update(
        train_unet(
            modules.unet, modules.text_encoder, modules.tokenizer, modules.scheduler,
            raw * scaling, raw_masked * scaling, data.masks, data.captions, cfg, progress=progress,
        )
    )
    log(f"UNet: {metrics['unet_steps']} steps, MSE {metrics['unet_mse_last50']:.4f}, {metrics['unet_seconds']:.0f} s")
    modules.model_id = f"toy-generator:seed{cfg.seed}"
    out = Path(out_dir)
    save_modules(modules, out)
    atomic_write_bytes(out / "train_metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
