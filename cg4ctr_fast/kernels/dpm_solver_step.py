"""Fused DPM-Solver++ (multistep, order 1 or 2) step: CFG combine + data prediction + update + blend.

Per element (fp32 registers, one read of each input, two writes):

    e    = uncond + g * (text - uncond)            # or the plain model output without CFG
    m0   = x0_sample * s + x0_model * e            # convert_model_output: epsilon (s - sigma_t*e)/alpha_t, v: alpha_t*s - sigma_t*e
    x0_out <- m0                                   # stored in model_output dtype: the scheduler's model_outputs[-1]
    m0   = the stored (rounded) value, as diffusers keeps it
    prev = coef_sample * s + coef_x0 * m0 (+ coef_diff * (m0 - m1) with the previous entry m1: second order)
    out  = (1 - mask) * (init_image * img + init_noise * noise) + mask * prev

This module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import check_out, default_block, prepare
from ._triton_common import _blend, _load_guided, _offsets, _to_storage, grid_for, launch_args, soft_bf16
from .reference import dpm_solver_step_ref

__all__ = ["dpm_solver_step", "dpm_solver_step_ref", "_dpm_solver_step_kernel"]


@triton.jit
def _dpm_solver_step_kernel(
    mo_ptr,
    sample_ptr,
    prev_x0_ptr,
    out_ptr,
    x0_out_ptr,
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
    coef_sample,
    coef_x0,
    coef_diff,
    init_image,
    init_noise,
    DO_CFG: tl.constexpr,
    SECOND_ORDER: tl.constexpr,
    HAS_BLEND: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, in_bounds = _offsets(numel, BLOCK)
    e = _load_guided(mo_ptr, offs, in_bounds, numel, guidance, DO_CFG)
    s = tl.load(sample_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    m0_stored = _to_storage(x0_sample * s + x0_model * e, x0_out_ptr.dtype.element_ty, SOFT_BF16)
    m0 = m0_stored.to(tl.float32)
    prev = coef_sample * s + coef_x0 * m0
    if SECOND_ORDER:
        m1 = tl.load(prev_x0_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        prev = prev + coef_diff * (m0 - m1)
    tl.store(x0_out_ptr + offs, m0_stored, mask=in_bounds)
    out = _blend(
        prev, offs, in_bounds, mask_ptr, image_ptr, noise_ptr, per_item, hw,
        mask_bstride, image_bstride, noise_bstride, init_image, init_noise, HAS_BLEND, HAS_NOISE,
    )
    tl.store(out_ptr + offs, _to_storage(out, out_ptr.dtype.element_ty, SOFT_BF16), mask=in_bounds)


def dpm_solver_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    coef_sample: float,
    coef_x0: float,
    coef_diff: float = 0.0,
    prev_x0: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_dpm_solver_step_kernel`; same signature and results as :func:`dpm_solver_step_ref`.

    ``out`` may be ``sample`` (in-place update); ``x0_out`` must not alias ``prev_x0`` or ``sample``.
    """
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    x0_out = check_out(x0_out, lay.sample, lay.model_output.dtype, "x0_out")
    if prev_x0 is not None:
        if tuple(prev_x0.shape) != tuple(lay.sample.shape) or prev_x0.device != lay.sample.device:
            raise ValueError(f"prev_x0 shape {tuple(prev_x0.shape)} must equal sample shape {tuple(lay.sample.shape)}")
        prev_x0 = prev_x0.contiguous()
    if lay.numel == 0:
        return out, x0_out
    block = block_size or default_block(lay.numel)
    _dpm_solver_step_kernel[grid_for(lay.numel, block)](
        lay.model_output,
        lay.sample,
        prev_x0 if prev_x0 is not None else lay.sample,
        out,
        x0_out,
        *launch_args(lay),
        float(guidance_scale) if guidance_scale is not None else 1.0,
        float(x0_sample),
        float(x0_model),
        float(coef_sample),
        float(coef_x0),
        float(coef_diff),
        float(init_image),
        float(init_noise),
        DO_CFG=guidance_scale is not None,
        SECOND_ORDER=prev_x0 is not None,
        HAS_BLEND=lay.mask is not None,
        HAS_NOISE=lay.noise is not None,
        SOFT_BF16=soft_bf16(),
        BLOCK=block,
    )
    return out, x0_out
