"""Fused DDIM (eta=0) denoising step: CFG combine + DDIM update + optional inpainting blend, one pass.

Per element (fp32 registers, one read of each input, one write):

    e    = uncond + g * (text - uncond)            # or the plain model output without CFG
    x0   = x0_sample * s + x0_model * e            # predicted original sample
    x0   = clamp(x0, -clip_range, clip_range)      # config.clip_sample
    eps  = eps_sample * s + eps_model * e          # predicted noise
    prev = prev_x0 * x0 + prev_eps * eps           # sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps
    out  = (1 - mask) * (init_image * img + init_noise * noise) + mask * prev

The host (``cg4ctr_fast.kernels.step``) turns DDIMScheduler state into the scalar coefficients
for epsilon / v_prediction / sample prediction types. This module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import check_out, default_block, prepare
from ._triton_common import _blend, _load_guided, _offsets, _to_storage, grid_for, launch_args, soft_bf16
from .reference import ddim_step_ref

__all__ = ["ddim_step", "ddim_step_ref", "_ddim_step_kernel"]


@triton.jit
def _ddim_step_kernel(
    mo_ptr,
    sample_ptr,
    out_ptr,
    mask_ptr,
    image_ptr,
    noise_ptr,
    numel,
    per_item,
    hw,
    mask_bstride,
    image_bstride,
    noise_bstride,
    guidance,
    x0_sample,
    x0_model,
    eps_sample,
    eps_model,
    prev_x0,
    prev_eps,
    clip_range,
    init_image,
    init_noise,
    DO_CFG: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_BLEND: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, in_bounds = _offsets(numel, BLOCK)
    e = _load_guided(mo_ptr, offs, in_bounds, numel, guidance, DO_CFG)
    s = tl.load(sample_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    x0 = x0_sample * s + x0_model * e
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    eps = eps_sample * s + eps_model * e
    prev = prev_x0 * x0 + prev_eps * eps
    out = _blend(
        prev, offs, in_bounds, mask_ptr, image_ptr, noise_ptr, per_item, hw,
        mask_bstride, image_bstride, noise_bstride, init_image, init_noise, HAS_BLEND, HAS_NOISE,
    )
    tl.store(out_ptr + offs, _to_storage(out, out_ptr.dtype.element_ty, SOFT_BF16), mask=in_bounds)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    eps_sample: float,
    eps_model: float,
    prev_x0: float,
    prev_eps: float,
    clip_range: float | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Launch :func:`_ddim_step_kernel`; same signature and result as :func:`ddim_step_ref`."""
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    if lay.numel == 0:
        return out
    block = block_size or default_block(lay.numel)
    _ddim_step_kernel[grid_for(lay.numel, block)](
        lay.model_output,
        lay.sample,
        out,
        *launch_args(lay),
        float(guidance_scale) if guidance_scale is not None else 1.0,
        float(x0_sample),
        float(x0_model),
        float(eps_sample),
        float(eps_model),
        float(prev_x0),
        float(prev_eps),
        float(clip_range) if clip_range is not None else 0.0,
        float(init_image),
        float(init_noise),
        DO_CFG=guidance_scale is not None,
        CLIP=clip_range is not None,
        HAS_BLEND=lay.mask is not None,
        HAS_NOISE=lay.noise is not None,
        SOFT_BF16=soft_bf16(),
        BLOCK=block,
    )
    return out
