"""Distil a tiny preview decoder (diffusers' `AutoencoderTiny`) from a generator's VAE: `cg4ctr-train taesd`.

Data: creatives of the synthetic ad world (`training.toy.generator_dataset`: the world's products on
backgrounds from random captions, 64 px), encoded once by the VAE's encoder. Inputs are the *scaled*
latents the UNet denoises (posterior sample × the VAE's scaling_factor, plus Gaussian noise of a per-image
std drawn from U(0, `latent_noise`), since the latents the pipeline decodes come out of a denoising loop,
not out of the encoder); optionally (`generated`) further latents made by the generator's own 20-step
loop, the distribution previews meet in use. That matters: trained on encoder latents alone, the toy TAESD
was 0.0425 L1 from the full decode on held-out encoder latents but 0.139 on the pipeline's own latents
(bench/results/cpu/preview_agreement_encoder_latents.md). Target: the full VAE decoder's image of those same
latents, clamped to [-1, 1], so the preview learns to agree with the full decode (what ranking needs), not to
beat it. Loss: L1. Only the decoder half trains; AutoencoderTiny's encoder half stays as built (unused).

Output (atomic): a diffusers AutoencoderTiny folder (`config.json` + `diffusion_pytorch_model.safetensors`,
`save_pretrained` layout, float32 or float16 storage) that `AutoencoderTiny.from_pretrained` and
`models.preview.load_preview_decoder` load, plus metrics.json and train_config.json.

Checkpoints: every `checkpoint_every` steps the decoder and AdamW state go to `.{out}.checkpoint/` next to
the output (safetensors + JSON, written atomically); `resume=True` continues from it when its configuration
matches. Every batch and noise draw comes from a generator seeded with (seed, step), so a resumed run takes the
same steps as an uninterrupted one. The checkpoint folder is removed once the output is written.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cg4ctr_fast.errors import InputError

Log = Callable[[str], Any]


@dataclass(frozen=True)
class TaesdTrainConfig:
    seed: int = 0
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    images: int = 2048  # training pool: world creatives, encoded once
    # Further pool latents made by the generator's own denoising loop (random captions on training products,
    # `generated_steps` steps): the latents previews decode in use. Needs --model to be a generator folder.
    generated: int = 0
    generated_steps: int = 20
    eval_images: int = 64  # held-out products' creatives for the metrics
    latent_noise: float = 0.1  # max std of the noise added to the scaled latents (their std is ~1)
    checkpoint_every: int = 200
    save_dtype: str = "float32"  # "float32" or "float16": storage only; loading casts to the caller's dtype
    channels: Optional[int] = None  # decoder width (None: models.preview's default for the scale factor)


def load_vae(model: str | Path):
    """The AutoencoderKL of a generator folder (model/vae/) or of a VAE folder itself; InputError if neither."""
    from diffusers import AutoencoderKL

    root = Path(model)
    if not root.is_dir():
        raise InputError(f"--model {root}: folder not found (a diffusers generator folder with vae/, or a VAE folder)")
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        raise InputError(f"--model {root}: no AutoencoderKL here (expected vae/config.json or config.json of one)")
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        raise InputError(f"--model {root}: no {folder.name}/diffusion_pytorch_model.safetensors (safetensors only)")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, torch_dtype=torch.float32)
    except Exception as exc:  # diffusers: OSError/ValueError/RuntimeError/SafetensorError for a bad file
        raise InputError(f"--model {root}: cannot load the VAE: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    return vae.eval().requires_grad_(False), folder


def default_world(model: str | Path) -> Optional[Path]:
    """The synthetic world next to a generator folder (a toy set's `world/`), when there is one."""
    candidate = Path(model).resolve().parent / "world"
    return candidate if (candidate / "world.json").is_file() else None


@torch.no_grad()
def latent_pool(vae, images: torch.Tensor, *, seed: int, latent_noise: float, batch: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled latents [N, C, h, w], full-decode targets [N, 3, H, W] in [-1, 1]), both float32.

    latents = scaling_factor × posterior sample + N(0, σ²), σ ~ U(0, latent_noise) per image; target = the VAE's
    decode of latents / scaling_factor (the pipeline's vae_decoder contract), clamped to [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    scale = float(vae.config.scaling_factor)
    latents, targets = [], []
    for start in range(0, images.shape[0], batch):
        x = images[start:start + batch]
        z = vae.encode(x).latent_dist.sample(generator=gen) * scale
        sigma = torch.rand((z.shape[0], 1, 1, 1), generator=gen) * latent_noise
        z = z + sigma * torch.randn(z.shape, generator=gen)
        latents.append(z)
        targets.append(vae.decode(z / scale).sample.clamp(-1, 1))
    return torch.cat(latents), torch.cat(targets)


@torch.no_grad()
def generated_latents(model_dir: str | Path, world, items, n: int, *, steps: int, seed: int,
                      per_call: int = 64, images_per_prompt: int = 4) -> torch.Tensor:
    """`n` scaled latents [n, C, h, w] from the generator's denoising loop (CreativePipeline, output_type
    "latent"): training products with `per_call // images_per_prompt` random captions each, default guidance."""
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import caption_text

    pipe = CreativePipeline.from_pretrained(str(model_dir))
    rng = np.random.default_rng([seed, 13])
    out: list[torch.Tensor] = []
    call = 0
    while sum(x.shape[0] for x in out) < n:
        item = int(items[int(rng.integers(len(items)))])
        product = world.product(item)
        prompts = [caption_text(world.random_caption(rng)) for _ in range(per_call // images_per_prompt)]
        creatives = pipe(prompts, product.image, product.mask, num_inference_steps=steps, seed=seed * 100_003 + call,
                         num_images_per_prompt=images_per_prompt, output_type="latent", show_progress=False)
        out.append(torch.stack([c.image.float().cpu() for c in creatives]))
        call += 1
    return torch.cat(out)[:n]


def _lr(step: int, cfg: TaesdTrainConfig) -> float:
    """Linear warm-up, then cosine down to 10 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


def _fingerprint(cfg: TaesdTrainConfig, vae_folder: Path, world: Path) -> str:
    weights = vae_folder / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    text = json.dumps({"config": asdict(cfg), "vae": digest, "world": str(Path(world).resolve())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, model, opt, step: int, losses: list[float], fingerprint: str) -> None:
    from safetensors.torch import save_file

    from cg4ctr_fast.fileio import atomic_dir

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.decoder.state_dict().items()}
    opt_state = opt.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().contiguous()
    meta = {"step": step, "losses": losses, "fingerprint": fingerprint, "param_groups": opt_state["param_groups"]}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta) + "\n")


def _load_checkpoint(path: Path, model, opt, fingerprint: str) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as exc:  # a damaged checkpoint: say so instead of a traceback
        raise InputError(f"{path}: cannot read the checkpoint ({type(exc).__name__}); delete it to start over") from None
    if meta.get("fingerprint") != fingerprint:
        raise InputError(f"{path}: checkpoint of another configuration (options, VAE or world differ); rerun with "
                         "the same options, or without --resume to start over")
    model.decoder.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), list(meta["losses"])


@torch.no_grad()
def preview_metrics(model, vae, images: torch.Tensor) -> dict[str, float]:
    """L1 (mean abs, images in [-1, 1]) of the preview against the full decode and against the image, and of
    the full decode against the image, on posterior-mean latents of `images`."""
    scale = float(vae.config.scaling_factor)
    z = vae.encode(images).latent_dist.mean * scale
    full = vae.decode(z / scale).sample.clamp(-1, 1)
    preview = model.decode(z.to(model.dtype)).sample.float().clamp(-1, 1)
    return {
        "preview_vs_full_l1": float((preview - full).abs().mean()),
        "preview_vs_image_l1": float((preview - images).abs().mean()),
        "full_vs_image_l1": float((full - images).abs().mean()),
    }


def train_taesd(
    model_dir: str | Path,
    world_dir: str | Path,
    out: str | Path,
    cfg: TaesdTrainConfig = TaesdTrainConfig(),
    *,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Distil an AutoencoderTiny decoder from the VAE in `model_dir` on creatives of the world in `world_dir`;
    write it to `out` (atomically). Returns the metrics (also in out/metrics.json): `loss_first` / `loss_last`
    (mean L1 of the first / last 20 % of the steps, images in [-1, 1]), held-out `preview_vs_full_l1`,
    `preview_vs_image_l1`, `full_vs_image_l1`, `steps`, `seconds`.

    Raises InputError for a folder that is not a generator/VAE or a world, a bad config value, or a checkpoint of
    another configuration when resuming.
    """
    from tqdm.auto import tqdm

    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.models.preview import build_preview_for
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, generator_dataset

    for name in ("steps", "batch", "images", "eval_images", "checkpoint_every", "generated_steps"):
        if int(getattr(cfg, name)) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    if int(cfg.generated) < 0:
        raise InputError(f"--generated must be 0 or a positive integer, got {cfg.generated}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise InputError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.latent_noise < 10:
        raise InputError(f"latent_noise must be in [0, 10), got {cfg.latent_noise}")
    if cfg.save_dtype not in ("float32", "float16"):
        raise InputError(f"--save-dtype must be float32 or float16, got {cfg.save_dtype!r}")
    out = Path(out)
    vae, vae_folder = load_vae(model_dir)
    if cfg.generated > 0 and not (Path(model_dir) / "unet").is_dir():
        raise InputError(f"--generated needs --model to be a generator folder (unet/, vae/, ...), got {model_dir}")
    dataset = load_dataset(world_dir)
    world = dataset.world
    if world.image_size != int(vae.config.sample_size) and progress:
        log(f"note: the world's images are {world.image_size} px, the VAE's sample size {vae.config.sample_size} px")
    started = time.perf_counter()
    items = sorted(int(i) for i in dataset.items["item_id"])
    data = generator_dataset(world, cfg.images, items, cfg.seed)
    held_out = generator_dataset(world, cfg.eval_images, [HELD_OUT_ITEM_BASE + k for k in range(16)], cfg.seed + 1)
    log(f"[taesd] encoding {cfg.images} creatives and decoding them with the full VAE (targets)")
    latents, targets = latent_pool(vae, data.images, seed=cfg.seed, latent_noise=cfg.latent_noise)
    if cfg.generated > 0:
        log(f"[taesd] generating {cfg.generated} latents with the generator ({cfg.generated_steps} steps each)")
        made = generated_latents(model_dir, world, items, cfg.generated, steps=cfg.generated_steps, seed=cfg.seed)
        with torch.no_grad():
            scale = float(vae.config.scaling_factor)
            made_targets = torch.cat([vae.decode(z / scale).sample.clamp(-1, 1) for z in made.split(64)])
        latents, targets = torch.cat([latents, made]), torch.cat([targets, made_targets])

    model = build_preview_for(vae, seed=cfg.seed, channels=cfg.channels)
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=cfg.lr, weight_decay=0.0)
    fingerprint = _fingerprint(cfg, vae_folder, Path(world_dir))
    ckpt = checkpoint_dir(out)
    step, losses = 0, []
    if resume and (ckpt / "state.json").is_file():
        step, losses = _load_checkpoint(ckpt, model, opt, fingerprint)
        log(f"[taesd] resuming at step {step} of {cfg.steps} from {ckpt}")
    elif resume:
        log(f"[taesd] no checkpoint at {ckpt}: starting from step 0")

    with tqdm(total=cfg.steps, initial=step, desc="train TAESD decoder", disable=not progress, leave=False) as bar:
        while step < cfg.steps:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, latents.shape[0], (cfg.batch,), generator=gen)
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg)
            pred = model.decode(latents[idx]).sample
            loss = (pred - targets[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.decoder.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.item()))
            step += 1
            bar.update()
            bar.set_postfix(l1=f"{np.mean(losses[-50:]):.4f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_checkpoint(ckpt, model, opt, step, losses, fingerprint)
    model.eval()
    tail = max(1, len(losses) // 5)
    metrics: dict[str, Any] = {
        "steps": cfg.steps,
        "loss": "L1 of the preview against the full VAE decode, images in [-1, 1]",
        "loss_first": float(np.mean(losses[:tail])),
        "loss_last": float(np.mean(losses[-tail:])),
        "seconds": round(time.perf_counter() - started, 1),
    }
    metrics.update(preview_metrics(model, vae, held_out.images))
    if cfg.generated > 0:
        # The same on latents of the generator's loop for held-out products: the error previews show in use.
        made = generated_latents(model_dir, world, [HELD_OUT_ITEM_BASE + k for k in range(16)], cfg.eval_images,
                                 steps=cfg.generated_steps, seed=cfg.seed + 1)
        with torch.no_grad():
            scale = float(vae.config.scaling_factor)
            full = vae.decode(made / scale).sample.clamp(-1, 1)
            metrics["generated_preview_vs_full_l1"] = float((model.decode(made).sample.clamp(-1, 1) - full).abs().mean())
    dtype = torch.float16 if cfg.save_dtype == "float16" else torch.float32
    if dtype != torch.float32:
        stored = build_preview_for(vae, seed=cfg.seed, channels=cfg.channels)
        stored.load_state_dict({k: v.to(dtype).to(torch.float32) for k, v in model.state_dict().items()})
        metrics["stored_" + cfg.save_dtype] = preview_metrics(stored.eval(), vae, held_out.images)
    with atomic_dir(out) as tmp:
        model.to(dtype=dtype).save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "train_config.json").write_text(json.dumps({
            **asdict(cfg), "model": str(model_dir), "world": str(world_dir),
            "vae_scaling_factor": float(vae.config.scaling_factor)}, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics
