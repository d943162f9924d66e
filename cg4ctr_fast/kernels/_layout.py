"""Shape checks and index arithmetic shared by the fused step kernels and their torch references.

Nothing here imports triton.

Conventions (the same for every scheduler family):

* ``sample`` (the latents) has shape ``(B, C, *spatial)`` and is the tensor the step updates.
* ``model_output`` is the UNet output: ``(2B, C, *spatial)`` = ``cat([uncond, text])`` when
  ``guidance_scale`` is not None (classifier-free guidance), else ``(B, C, *spatial)``.
* The optional blend (4-channel inpainting UNets) takes ``mask`` ``(Bm, 1, *spatial)`` with Bm in
  {1, B, 2B} (a 2B mask is the pipeline's ``cat([mask] * 2)``; its first B items are used, as
  ``mask.chunk(2)[0]`` does), ``image_latents`` ``(1 or B, C, *spatial)`` and ``noise``
  ``(1 or B, C, *spatial)``. ``noise=None`` means the last step: the blend target is
  ``image_latents`` itself; otherwise it is ``init_image * image_latents + init_noise * noise``
  (the scheduler's ``add_noise`` at the next timestep, reduced to two host scalars).

Inside one batch item the elements are laid out as ``channel * HW + pixel``, so the kernels
find the mask element of a latent element as ``b * mask_batch_stride + (offset % HW)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Layout:
    """Contiguous views of the inputs and the integers the kernels index with."""

    model_output: torch.Tensor
    sample: torch.Tensor
    mask: torch.Tensor | None
    image_latents: torch.Tensor | None
    noise: torch.Tensor | None
    batch: int
    numel: int  # elements of sample (= of one half of a CFG model_output)
    per_item: int  # C * HW
    hw: int  # pixels per channel
    mask_bstride: int
    image_bstride: int
    noise_bstride: int

    @property
    def has_blend(self) -> bool:
        return self.mask is not None

    @property
    def has_noise(self) -> bool:
        return self.noise is not None


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def prepare(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    guidance_scale: float | None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> Layout:
    """Validate shapes/devices/dtypes and return contiguous tensors plus index constants."""
    if sample.dim() < 1 or sample.shape[0] == 0:
        raise ValueError(f"sample must have a non-empty batch dimension, got shape {tuple(sample.shape)}")
    _check_dtype("sample", sample)
    _check_dtype("model_output", model_output)
    batch = sample.shape[0]
    rest = tuple(sample.shape[1:])
    want = (2 * batch if guidance_scale is not None else batch, *rest)
    if tuple(model_output.shape) != want:
        cfg = "with" if guidance_scale is not None else "without"
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} does not match sample shape {tuple(sample.shape)} "
            f"{cfg} classifier-free guidance (expected {want})"
        )
    numel = sample.numel()
    per_item = numel // batch
    channels = sample.shape[1] if sample.dim() >= 2 else 1
    hw = per_item // channels if channels else 0
    device = sample.device
    if model_output.device != device:
        raise ValueError(f"model_output is on {model_output.device}, sample on {device}")

    mask_bs = image_bs = noise_bs = 0
    if mask is not None:
        if image_latents is None:
            raise ValueError("blend needs image_latents together with mask")
        _check_dtype("mask", mask)
        bm = mask.shape[0] if mask.dim() else 0
        if bm not in (1, batch, 2 * batch) or mask.numel() != bm * hw:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must be (1, B or 2B) x (1, *spatial) for sample {tuple(sample.shape)}"
            )
        mask = mask.contiguous()
        mask_bs = hw if bm > 1 else 0
        for name, t in (("image_latents", image_latents), ("noise", noise)):
            if t is None:
                continue
            _check_dtype(name, t)
            if t.dim() != sample.dim() or tuple(t.shape[1:]) != rest or t.shape[0] not in (1, batch):
                raise ValueError(f"{name} shape {tuple(t.shape)} must be (1 or {batch}, *{rest})")
        image_latents = image_latents.contiguous()
        image_bs = per_item if image_latents.shape[0] > 1 else 0
        if noise is not None:
            noise = noise.contiguous()
            noise_bs = per_item if noise.shape[0] > 1 else 0
        for name, t in (("mask", mask), ("image_latents", image_latents), ("noise", noise)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device}, sample on {device}")
    else:
        image_latents = None
        noise = None

    return Layout(
        model_output=model_output.contiguous(),
        sample=sample.contiguous(),
        mask=mask,
        image_latents=image_latents,
        noise=noise,
        batch=batch,
        numel=numel,
        per_item=per_item,
        hw=hw,
        mask_bstride=mask_bs,
        image_bstride=image_bs,
        noise_bstride=noise_bs,
    )


def check_out(out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, name: str = "out") -> torch.Tensor:
    """Return ``out`` after checking it, or a fresh tensor shaped like ``like`` in ``dtype``."""
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if tuple(out.shape) != tuple(like.shape) or out.dtype != dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {tuple(like.shape)} on {like.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def check_step_noise(step_noise: torch.Tensor | None, sample: torch.Tensor) -> torch.Tensor | None:
    """The few-step schedulers' injected noise (LCM, TCD): None, or a float tensor shaped like ``sample``
    on its device (made contiguous)."""
    if step_noise is None:
        return None
    _check_dtype("step_noise", step_noise)
    if tuple(step_noise.shape) != tuple(sample.shape) or step_noise.device != sample.device:
        raise ValueError(f"step_noise must have the shape {tuple(sample.shape)} and device {sample.device} of sample, "
                         f"got {tuple(step_noise.shape)} on {step_noise.device}")
    return step_noise.contiguous()


# ---------------------------------------------------------------------------------------------
# Torch pieces shared by the references (fp32 math, unfused).


def guided_fp32(lay: Layout, guidance_scale: float | None) -> torch.Tensor:
    mo = lay.model_output.float()
    if guidance_scale is None:
        return mo
    uncond, text = mo.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def blend_fp32(lay: Layout, prev: torch.Tensor, init_image: float, init_noise: float) -> torch.Tensor:
    if lay.mask is None:
        return prev
    mask = lay.mask.float()
    if mask.shape[0] == 2 * lay.batch:  # the pipeline's cat([mask] * 2): use the first half
        mask = mask[: lay.batch]
    mask = mask.reshape(mask.shape[0], 1, -1)
    init = lay.image_latents.float()
    if lay.noise is not None:
        init = init_image * init + init_noise * lay.noise.float()
    init = init.reshape(init.shape[0], -1, lay.hw)
    prev3 = prev.reshape(lay.batch, -1, lay.hw)
    return ((1.0 - mask) * init + mask * prev3).reshape(prev.shape)


def default_block(numel: int) -> int:
    """BLOCK for a launch: 1024 on GPUs; one or few big programs under TRITON_INTERPRET=1."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return max(16, min(1 << max(numel - 1, 1).bit_length(), 1 << 16))
    return 1024
