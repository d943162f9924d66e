"""The pipeline's `preview_decoder` slot, backed by diffusers' `AutoencoderTiny` (TAESD).

Contract (the same as vae_decoder's, runtime/slots.py): `slot(latents / scaling_factor)` with the pipeline's
latents divided by the *main* VAE's scaling factor, [B, latent_channels, h, w] → images [B, 3, h·s, w·s] in
[-1, 1] (s = the VAE's scale factor), in the module's dtype, on its device.

AutoencoderTiny decodes the scaled latents themselves (diffusers pipelines call
`vae.decode(latents / vae.config.scaling_factor)` with its scaling_factor 1.0), so the slot multiplies the
main VAE's factor back in, then divides by the tiny decoder's own (1.0 for TAESD). Its `decode` returns
`2·x − 1` of an unclamped convolution, so the slot clamps to [-1, 1]: the previews are only ranked by the
reward model, which sees 8-bit images anyway.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from cg4ctr_fast.errors import InputError


class PreviewDecoderSlot:
    """Callable slot: `slot(latents / main_scaling_factor)` → images [B, 3, H, W] in [-1, 1] (see the module).

    module: an AutoencoderTiny; scaling_factor: the main VAE's (`Components.info.scaling_factor`, 0.18215 for
    SD1.x). Latents are moved to the module's device and dtype.
    """

    def __init__(self, module, scaling_factor: float):
        if not scaling_factor > 0:
            raise InputError(f"preview decoder: the VAE's scaling_factor must be > 0, got {scaling_factor!r}")
        self.module = module
        self.scaling_factor = float(scaling_factor)
        # AutoencoderTiny's own factor (1.0 for TAESD): latents it decodes = scaled latents / this.
        self.own_scaling_factor = float(getattr(module.config, "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.module.parameters())
        scaled = latents.to(device=param.device, dtype=param.dtype) * (self.scaling_factor / self.own_scaling_factor)
        return self.module.decode(scaled, return_dict=False)[0].clamp_(-1.0, 1.0)


def attach_preview_decoder(pipe, decoder: Any) -> PreviewDecoderSlot:
    """Set `pipe.components.preview_decoder` to a PreviewDecoderSlot for `decoder`; returns the slot.

    decoder: a folder path (str / PathLike: a diffusers AutoencoderTiny folder, safetensors only, loaded with
    `models.preview.load_preview_decoder` onto the pipeline's device in its dtype), an AutoencoderTiny module
    (moved there), or an existing PreviewDecoderSlot (attached as is). The latent channels and scale factor
    must equal the pipeline VAE's (`components.info`); otherwise InputError, one line, nothing attached.
    """
    from cg4ctr_fast.models.preview import load_preview_decoder, vae_geometry

    comps = pipe.components
    info = comps.info
    if isinstance(decoder, PreviewDecoderSlot):
        slot = decoder
    else:
        if isinstance(decoder, (str, os.PathLike)):
            module = load_preview_decoder(decoder, latent_channels=info.latent_channels,
                                          scale_factor=info.vae_scale_factor, dtype=comps.dtype, device=comps.device)
        elif hasattr(decoder, "decode") and hasattr(decoder, "config") and hasattr(decoder.config, "num_decoder_blocks"):
            channels, scale = vae_geometry(decoder)
            if (channels, scale) != (info.latent_channels, info.vae_scale_factor):
                raise InputError(f"preview decoder: {channels} latent channels at scale factor {scale}, the pipeline's "
                                 f"VAE has {info.latent_channels} at {info.vae_scale_factor}")
            module = decoder.to(device=comps.device)
            if module.dtype != comps.dtype:
                module = module.to(dtype=comps.dtype)
            module.eval()
        else:
            raise InputError(f"preview decoder: expected an AutoencoderTiny, its folder or a PreviewDecoderSlot, got "
                             f"{type(decoder).__name__}")
        slot = PreviewDecoderSlot(module, info.scaling_factor)
    comps.preview_decoder = slot
    return slot
