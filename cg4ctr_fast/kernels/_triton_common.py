"""Triton device helpers shared by the step kernels (this module imports triton)."""
from __future__ import annotations

import os

import triton
import triton.language as tl


@triton.jit
def _offsets(numel, BLOCK: tl.constexpr):
    """Flat element offsets of this program (int64, so 2B*C*H*W may pass 2**31) and their bounds mask."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _load_guided(mo_ptr, offs, in_bounds, numel, guidance, DO_CFG: tl.constexpr):
    """Classifier-free guidance read straight from the 2B UNet output: uncond + g * (text - uncond).

    The unconditional half is the first ``numel`` elements, the conditional half the next ``numel``.
    """
    if DO_CFG:
        uncond = tl.load(mo_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
        text = tl.load(mo_ptr + numel + offs, mask=in_bounds, other=0.0).to(tl.float32)
        e = uncond + guidance * (text - uncond)
    else:
        e = tl.load(mo_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    return e


@triton.jit
def _blend(
    prev,
    offs,
    in_bounds,
    mask_ptr,
    image_ptr,
    noise_ptr,
    per_item,
    hw,
    mask_bstride,
    image_bstride,
    noise_bstride,
    init_image,
    init_noise,
    HAS_BLEND: tl.constexpr,
    HAS_NOISE: tl.constexpr,
):
    """(1 - mask) * init + mask * prev, init = init_image * image_latents + init_noise * noise.

    The 1-channel mask is indexed by (batch, pixel); batch-1 operands use batch stride 0.
    """
    if HAS_BLEND:
        b = offs // per_item
        within = offs - b * per_item
        pix = within % hw
        m = tl.load(mask_ptr + b * mask_bstride + pix, mask=in_bounds, other=0.0).to(tl.float32)
        init = tl.load(image_ptr + b * image_bstride + within, mask=in_bounds, other=0.0).to(tl.float32)
        if HAS_NOISE:
            nz = tl.load(noise_ptr + b * noise_bstride + within, mask=in_bounds, other=0.0).to(tl.float32)
            init = init_image * init + init_noise * nz
        out = (1.0 - m) * init + m * prev
    else:
        out = prev
    return out


@triton.jit
def _to_storage(x, dst_dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 -> storage dtype, rounding to nearest even.

    On GPUs ``.to()`` rounds to nearest even for every dtype. The Triton interpreter truncates
    fp32 -> bf16 instead (a bias of up to one bf16 ulp toward zero per store, which adds up over a
    denoising loop), so under TRITON_INTERPRET=1 (``SOFT_BF16``) bf16 is rounded with integer ops.
    """
    if SOFT_BF16 and dst_dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dst_dtype)
    return y


def soft_bf16() -> bool:
    """Whether launches run in the Triton interpreter (see :func:`_to_storage`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_args(lay):
    """Blend pointers (or stand-ins), numel and the index constants, in kernel argument order."""
    dummy = lay.sample
    return (
        lay.mask if lay.mask is not None else dummy,
        lay.image_latents if lay.image_latents is not None else dummy,
        lay.noise if lay.noise is not None else dummy,
        lay.numel,
        lay.per_item,
        lay.hw,
        lay.mask_bstride,
        lay.image_bstride,
        lay.noise_bstride,
    )


def grid_for(numel: int, block: int):
    return (triton.cdiv(numel, block),)
