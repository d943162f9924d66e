"""Fused Euler-discrete (s_churn=0) denoising step: CFG combine + Euler update + optional blend, one pass.

Per element (fp32 registers, one read of each input, one write):

    e    = uncond + g * (text - uncond)            # or the plain model output without CFG
    x0   = x0_sample * s + x0_model * e            # epsilon: s - sigma*e; v: s/(sigma^2+1) - sigma/sqrt(sigma^2+1)*e
    d    = (s - x0) / sigma_hat                    # ODE derivative
    prev = s + d * dt                              # dt = sigma_next - sigma_hat
    out  = (1 - mask) * (init_image * img + init_noise * noise) + mask * prev

``sample`` is read in fp32 as EulerDiscreteScheduler.step upcasts it. This module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import check_out, default_block, prepare
from ._triton_common import _blend, _load_guided, _offsets, _to_storage, grid_for, launch_args, soft_bf16
from .reference import euler_step_ref

__all__ = ["euler_step", "euler_step_ref", "_euler_step_kernel"]


@triton.jit
def _euler_step_kernel(
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
    sigma_hat,
    dt,
    init_image,
    init_noise,
    DO_CFG: tl.constexpr,
    HAS_BLEND: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, in_bounds = _offsets(numel, BLOCK)
    e = _load_guided(mo_ptr, offs, in_bounds, numel, guidance, DO_CFG)
    s = tl.load(sample_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    x0 = x0_sample * s + x0_model * e
    derivative = (s - x0) / sigma_hat
    prev = s + derivative * dt
    out = _blend(
        prev, offs, in_bounds, mask_ptr, image_ptr, noise_ptr, per_item, hw,
        mask_bstride, image_bstride, noise_bstride, init_image, init_noise, HAS_BLEND, HAS_NOISE,
    )
    tl.store(out_ptr + offs, _to_storage(out, out_ptr.dtype.element_ty, SOFT_BF16), mask=in_bounds)


def euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    sigma_hat: float,
    dt: float,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Launch :func:`_euler_step_kernel`; same signature and result as :func:`euler_step_ref`."""
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    if lay.numel == 0:
        return out
    block = block_size or default_block(lay.numel)
    _euler_step_kernel[grid_for(lay.numel, block)](
        lay.model_output,
        lay.sample,
        out,
        *launch_args(lay),
        float(guidance_scale) if guidance_scale is not None else 1.0,
        float(x0_sample),
        float(x0_model),
        float(sigma_hat),
        float(dt),
        float(init_image),
        float(init_noise),
        DO_CFG=guidance_scale is not None,
        HAS_BLEND=lay.mask is not None,
        HAS_NOISE=lay.noise is not None,
        SOFT_BF16=soft_bf16(),
        BLOCK=block,
    )
    return out
