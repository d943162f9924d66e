"""Fused LCM (LCMScheduler) denoising step: CFG combine + consistency update + noise injection + blend, one pass.

Per element (fp32 registers, one read of each input, one write):

    e        = uncond + g * (text - uncond)         # or the plain model output without CFG (LCM usually runs so)
    x0       = x0_sample * s + x0_model * e         # epsilon: (s - sqrt(1-a_t)*e)/sqrt(a_t); v: sqrt(a_t)*s - sqrt(1-a_t)*e
    x0       = clamp(x0, -clip_range, clip_range)   # config.clip_sample
    denoised = c_out * x0 + c_skip * s              # consistency boundary condition at t
    prev     = prev_denoised * denoised + prev_noise * z   # sqrt(a_prev)*denoised + sqrt(1-a_prev)*z; z drawn by the host
    prev     = denoised                             # instead, on the schedule's last step (no z)
    out      = (1 - mask) * (init_image * img + init_noise * noise) + mask * prev

The host (``cg4ctr_fast.kernels.step.FusedStep``) turns LCMScheduler state into these scalars and draws
z with the caller's generator exactly as ``LCMScheduler.step`` does. This module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import check_out, check_step_noise, default_block, prepare
from ._triton_common import _blend, _load_guided, _offsets, _to_storage, grid_for, launch_args, soft_bf16
from .reference import lcm_step_ref

__all__ = ["lcm_step", "lcm_step_ref", "_lcm_step_kernel"]


@triton.jit
def _lcm_step_kernel(
    mo_ptr,
    sample_ptr,
    step_noise_ptr,
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
    clip_range,
    c_skip,
    c_out,
    prev_denoised,
    prev_noise,
    init_image,
    init_noise,
    DO_CFG: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_STEP_NOISE: tl.constexpr,
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
    prev = c_out * x0 + c_skip * s
    if HAS_STEP_NOISE:
        z = tl.load(step_noise_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        prev = prev_denoised * prev + prev_noise * z
    out = _blend(
        prev, offs, in_bounds, mask_ptr, image_ptr, noise_ptr, per_item, hw,
        mask_bstride, image_bstride, noise_bstride, init_image, init_noise, HAS_BLEND, HAS_NOISE,
    )
    tl.store(out_ptr + offs, _to_storage(out, out_ptr.dtype.element_ty, SOFT_BF16), mask=in_bounds)


def lcm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    c_skip: float,
    c_out: float,
    prev_denoised: float = 1.0,
    prev_noise: float = 0.0,
    step_noise: torch.Tensor | None = None,
    clip_range: float | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Launch :func:`_lcm_step_kernel`; same signature and result as :func:`lcm_step_ref`.

    ``out`` may be ``sample`` (in-place update). Raises ValueError on mismatched shapes/devices,
    TypeError on non-float dtypes.
    """
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    step_noise = check_step_noise(step_noise, lay.sample)
    if lay.numel == 0:
        return out
    block = block_size or default_block(lay.numel)
    _lcm_step_kernel[grid_for(lay.numel, block)](
        lay.model_output,
        lay.sample,
        step_noise if step_noise is not None else lay.sample,
        out,
        *launch_args(lay),
        float(guidance_scale) if guidance_scale is not None else 1.0,
        float(x0_sample),
        float(x0_model),
        float(clip_range) if clip_range is not None else 0.0,
        float(c_skip),
        float(c_out),
        float(prev_denoised),
        float(prev_noise),
        float(init_image),
        float(init_noise),
        DO_CFG=guidance_scale is not None,
        CLIP=clip_range is not None,
        HAS_STEP_NOISE=step_noise is not None,
        HAS_BLEND=lay.mask is not None,
        HAS_NOISE=lay.noise is not None,
        SOFT_BF16=soft_bf16(),
        BLOCK=block,
    )
    return out
