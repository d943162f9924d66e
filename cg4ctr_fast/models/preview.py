"""Tiny latent decoders for previews: diffusers' `AutoencoderTiny` (TAESD) sized for a pipeline's VAE.

A preview decoder turns the diffusion latents into a rough image at a fraction of the full VAE's cost, so the
reward model can rank every candidate and only the best are decoded by the full VAE (pipeline
`preview_top_k`). Two sources:
- SD1.5 (scale factor 8, 4 latent channels): the user's TAESD weights, a local diffusers folder
  (`config.json` + `diffusion_pytorch_model.safetensors`, e.g. madebyollin/taesd), loaded with
  `load_preview_decoder`;
- the toy generator (scale factor 4, 4 latent channels, 64 px): `cg4ctr-train taesd` distils one from its VAE
  (cg4ctr_fast/training/taesd.py; the shipped one is cg4ctr_fast/assets/toy/taesd/);
  `build_preview_decoder` makes the untrained architecture.

Conventions (diffusers'): an AutoencoderTiny decodes the *scaled* latents, the ones the UNet denoises
(its own `scaling_factor` is 1.0, so diffusers pipelines divide by 1.0 before `decode`), and `decode` returns
images in about [-1, 1] (DecoderTiny ends in `x.mul(2).sub(1)`, not clamped). runtime/preview.py adapts this
to the pipeline's vae_decoder slot contract. Only the decoder half is used: the models built here carry a
minimal encoder (one 16-channel block per stage) because AutoencoderTiny always has one; it is never trained.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from cg4ctr_fast.errors import InputError

# TAESD's published decoder for SD (diffusers' AutoencoderTiny defaults): 64 channels, stages of (3, 3, 3, 1)
# blocks, three 2x upsamplings, so scale factor 8.
TAESD_CHANNELS = 64
TAESD_BLOCKS = (3, 3, 3, 1)
# Smaller scale factors (the toy VAE's 4): a 32-channel decoder with (3, 2, 1) blocks. diffusers' DecoderTiny
# needs one width for every stage (each stage's blocks are width -> width). Multiply-adds per 64-px image:
# ≈0.24 G against ≈0.6 G for the toy VAE's decoder (which adds GroupNorm and a 16×16 attention).
SMALL_CHANNELS = 32
# The untrained, unused encoder half: as small as AutoencoderTiny allows.
ENCODER_CHANNELS = 16

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"


def _stages(scale_factor: int) -> int:
    """Number of decoder stages for a power-of-two scale factor (one 2x upsampling between stages)."""
    if not isinstance(scale_factor, int) or scale_factor < 1 or scale_factor & (scale_factor - 1):
        raise InputError(f"preview decoder: scale factor must be a power of two >= 1, got {scale_factor!r}")
    return scale_factor.bit_length()  # 1 -> 1 stage, 4 -> 3, 8 -> 4


def preview_config(latent_channels: int = 4, scale_factor: int = 8, *, channels: Optional[int] = None,
                   blocks: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """AutoencoderTiny keyword arguments for a VAE with `latent_channels` and `scale_factor` (pixels per latent).

    Scale factor 8 with 4 channels gives TAESD's own architecture (so the published weights load); other
    scale factors a 32-channel decoder with 3 blocks at the lowest resolution, 2 at the next, 1 at the last.
    `channels` / `blocks` override the width / blocks per stage (len(blocks) must be log2(scale_factor) + 1).
    Raises InputError for a scale factor that is not a power of two or a blocks tuple of the wrong length.
    """
    if not isinstance(latent_channels, int) or latent_channels < 1:
        raise InputError(f"preview decoder: latent channels must be a positive integer, got {latent_channels!r}")
    n = _stages(scale_factor)
    if blocks is None:
        blocks = TAESD_BLOCKS if n == len(TAESD_BLOCKS) else tuple(max(1, min(3, n - k)) for k in range(n))
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != n or any(b < 0 for b in blocks):
        raise InputError(f"preview decoder: blocks {blocks} must give {n} stages (scale factor {scale_factor})")
    width = int(channels or (TAESD_CHANNELS if n == len(TAESD_BLOCKS) else SMALL_CHANNELS))
    taesd = n == len(TAESD_BLOCKS) and channels is None
    return {
        "in_channels": 3,
        "out_channels": 3,
        "encoder_block_out_channels": (TAESD_CHANNELS,) * n if taesd else (ENCODER_CHANNELS,) * n,
        "decoder_block_out_channels": (width,) * n,
        "num_encoder_blocks": (1, 3, 3, 3) if taesd else (1,) * n,
        "num_decoder_blocks": blocks,
        "latent_channels": latent_channels,
        "upsampling_scaling_factor": 2,
        "act_fn": "relu",
        "upsample_fn": "nearest",
        "scaling_factor": 1.0,
    }


def build_preview_decoder(latent_channels: int = 4, scale_factor: int = 8, *, seed: int = 0,
                          channels: Optional[int] = None, blocks: Optional[Sequence[int]] = None,
                          dtype: torch.dtype = torch.float32):
    """An AutoencoderTiny with seeded random weights (see `preview_config`); the caller's RNG is untouched."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderTiny(**preview_config(latent_channels, scale_factor, channels=channels, blocks=blocks))
    # diffusers warns on any `.to(dtype)` of a loaded model; cast only when asked for another dtype.
    return (model if dtype == torch.float32 else model.to(dtype=dtype)).eval()


def build_preview_for(info, **kwargs):
    """The preview decoder for a pipeline's VAE: `info` is a `ModelInfo` (Components.info), a config `VaeSpec`
    or an AutoencoderKL config (latent_channels, block_out_channels)."""
    channels, scale = vae_geometry(info)
    return build_preview_decoder(channels, scale, **kwargs)


def vae_geometry(info) -> tuple[int, int]:
    """(latent channels, scale factor) of a ModelInfo, VaeSpec, AutoencoderKL(-config) or AutoencoderTiny."""
    if hasattr(info, "vae_scale_factor"):  # ModelInfo
        return int(info.latent_channels), int(info.vae_scale_factor)
    if hasattr(info, "scale_factor") and hasattr(info, "latent_channels"):  # config.VaeSpec
        return int(info.latent_channels), int(info.scale_factor)
    config = getattr(info, "config", info)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("num_decoder_blocks") is not None:  # AutoencoderTiny
        return int(get("latent_channels")), preview_scale_factor(config)
    return int(get("latent_channels")), 2 ** (len(get("block_out_channels")) - 1)


def preview_scale_factor(config) -> int:
    """Pixels per latent pixel of an AutoencoderTiny config: upsampling factor ** (stages − 1)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return int(get("upsampling_scaling_factor", 2)) ** (len(get("num_decoder_blocks")) - 1)


def load_preview_decoder(path: str | os.PathLike, *, latent_channels: Optional[int] = None,
                         scale_factor: Optional[int] = None, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu"):
    """A user's TAESD (or `cg4ctr-train taesd` output) from a local diffusers folder, safetensors only.

    Checks before any weight is read: the folder exists, its config.json is an AutoencoderTiny's, its
    latent channels and scale factor equal the pipeline VAE's (`latent_channels`, `scale_factor`, when given),
    and `diffusion_pytorch_model.safetensors` is there (a .bin checkpoint is refused: it is a pickle).
    Returns the AutoencoderTiny in eval mode on `device` in `dtype` (the stored weights may be float16).
    Raises InputError (one line) for each of those and for a file that does not load.
    """
    from diffusers import AutoencoderTiny

    folder = Path(path)
    what = f"preview decoder {folder}"
    if not folder.is_dir():
        raise InputError(f"{what}: folder not found (a diffusers AutoencoderTiny folder: config.json + {SAFETENSORS_NAME})")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{what}: no config.json (a diffusers AutoencoderTiny folder: config.json + {SAFETENSORS_NAME})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{what}: cannot read config.json: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{what}: config.json is a {found!r}, not an AutoencoderTiny (TAESD)")
    try:
        defaults = AutoencoderTiny.load_config(str(folder))
        channels = int(defaults.get("latent_channels", 4))
        scale = preview_scale_factor({**{"num_decoder_blocks": TAESD_BLOCKS}, **defaults})
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{what}: bad config.json: {' '.join(str(exc).split())}") from None
    if latent_channels is not None and channels != int(latent_channels):
        raise InputError(f"{what}: decodes {channels} latent channels, the pipeline's VAE has {latent_channels}")
    if scale_factor is not None and scale != int(scale_factor):
        raise InputError(f"{what}: scale factor {scale} (pixels per latent pixel), the pipeline's VAE has "
                         f"{scale_factor}; use a TAESD made for this VAE")
    if not (folder / SAFETENSORS_NAME).is_file():
        other = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
        hint = f" (found {', '.join(other)}: pickled checkpoints are not loaded)" if other else ""
        raise InputError(f"{what}: no {SAFETENSORS_NAME}{hint}")
    try:
        model = AutoencoderTiny.from_pretrained(str(folder), use_safetensors=True, torch_dtype=dtype)
    except Exception as exc:  # diffusers raises OSError/ValueError/RuntimeError/SafetensorError for bad files
        raise InputError(f"{what}: cannot load the weights: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}") from None
    return model.to(device=device).eval()  # already in `dtype` (torch_dtype above)
