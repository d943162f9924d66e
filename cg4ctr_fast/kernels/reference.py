"""Plain-torch references of the fused step kernels (no triton import).

Each ``<name>_ref`` has the signature of its Triton launcher ``<name>`` and does the same math,
unfused, in fp32, storing in the input dtype. They are the ``backend="torch"`` path of
:class:`cg4ctr_fast.kernels.step.FusedStep` and the oracle the kernel tests compare against.
The kernel modules re-export them (``ddim_step.ddim_step_ref`` is ``reference.ddim_step_ref``).

Shapes, broadcasting and the meaning of ``mask`` / ``image_latents`` / ``noise`` /
``init_image`` / ``init_noise`` are described in :mod:`cg4ctr_fast.kernels._layout`.
"""
from __future__ import annotations

import torch

from ._layout import blend_fp32, check_out, check_step_noise, guided_fp32, prepare


def ddim_step_ref(
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
    """DDIM (eta=0) step: e = guided model output, s = sample,
    x0 = clamp(x0_sample*s + x0_model*e), eps = eps_sample*s + eps_model*e,
    prev = prev_x0*x0 + prev_eps*eps, then the optional mask blend."""
    del block_size
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    e = guided_fp32(lay, guidance_scale)
    s = lay.sample.float()
    x0 = x0_sample * s + x0_model * e
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    eps = eps_sample * s + eps_model * e
    prev = prev_x0 * x0 + prev_eps * eps
    out.copy_(blend_fp32(lay, prev, init_image, init_noise))
    return out


def euler_step_ref(
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
    """Euler (s_churn=0) step: x0 = x0_sample*s + x0_model*e, d = (s - x0)/sigma_hat,
    prev = s + d*dt, then the optional mask blend."""
    del block_size
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    e = guided_fp32(lay, guidance_scale)
    s = lay.sample.float()
    x0 = x0_sample * s + x0_model * e
    derivative = (s - x0) / sigma_hat
    prev = s + derivative * dt
    out.copy_(blend_fp32(lay, prev, init_image, init_noise))
    return out


def dpm_solver_step_ref(
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
    """DPM-Solver++ step (first or second order multistep).

    m0 = x0_sample*s + x0_model*e is the data prediction (``convert_model_output``); it is stored
    in ``x0_out`` (model_output dtype, the scheduler's ``model_outputs`` entry) and the stored,
    rounded value is what the update uses, as diffusers does. With ``prev_x0`` = m1 (the previous
    step's entry), prev = coef_sample*s + coef_x0*m0 + coef_diff*(m0 - m1); without it the
    first-order update prev = coef_sample*s + coef_x0*m0. Returns (prev_sample, m0).
    """
    del block_size
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    x0_out = check_out(x0_out, lay.sample, lay.model_output.dtype, "x0_out")
    e = guided_fp32(lay, guidance_scale)
    s = lay.sample.float()
    x0_out.copy_(x0_sample * s + x0_model * e)
    m0 = x0_out.float()
    prev = coef_sample * s + coef_x0 * m0
    if prev_x0 is not None:
        if tuple(prev_x0.shape) != tuple(lay.sample.shape) or prev_x0.device != lay.sample.device:
            raise ValueError(f"prev_x0 shape {tuple(prev_x0.shape)} must equal sample shape {tuple(lay.sample.shape)}")
        prev = prev + coef_diff * (m0 - prev_x0.float())
    out.copy_(blend_fp32(lay, prev, init_image, init_noise))
    return out, x0_out


def lcm_step_ref(
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
    """LCM (LCMScheduler) step: x0 = clamp(x0_sample*s + x0_model*e), denoised = c_out*x0 + c_skip*s,
    prev = prev_denoised*denoised + prev_noise*step_noise (prev = denoised when ``step_noise`` is None:
    diffusers' last step), then the optional mask blend.

    ``step_noise``: the scheduler's injected noise z ~ N(0, I), shape and device of ``sample``.
    """
    del block_size
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    step_noise = check_step_noise(step_noise, lay.sample)
    e = guided_fp32(lay, guidance_scale)
    s = lay.sample.float()
    x0 = x0_sample * s + x0_model * e
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    prev = c_out * x0 + c_skip * s
    if step_noise is not None:
        prev = prev_denoised * prev + prev_noise * step_noise.float()
    out.copy_(blend_fp32(lay, prev, init_image, init_noise))
    return out


def tcd_step_ref(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    guidance_scale: float | None,
    x0_sample: float,
    x0_model: float,
    eps_sample: float,
    eps_model: float,
    noised_x0: float,
    noised_eps: float,
    prev_noised: float = 1.0,
    prev_noise: float = 0.0,
    step_noise: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    image_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    init_image: float = 1.0,
    init_noise: float = 0.0,
    out: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """TCD (TCDScheduler) step: x0 = x0_sample*s + x0_model*e, eps = eps_sample*s + eps_model*e,
    noised = noised_x0*x0 + noised_eps*eps (sqrt(a_s)*x0 + sqrt(1 - a_s)*eps at s = floor((1 - gamma)*t_prev)),
    prev = prev_noised*noised + prev_noise*step_noise (prev = noised when ``step_noise`` is None), then the
    optional mask blend.

    ``step_noise``: the scheduler's injected noise z ~ N(0, I), shape and device of ``sample``.
    """
    del block_size
    lay = prepare(model_output, sample, guidance_scale, mask, image_latents, noise)
    out = check_out(out, lay.sample, lay.sample.dtype)
    step_noise = check_step_noise(step_noise, lay.sample)
    e = guided_fp32(lay, guidance_scale)
    s = lay.sample.float()
    x0 = x0_sample * s + x0_model * e
    eps = eps_sample * s + eps_model * e
    prev = noised_x0 * x0 + noised_eps * eps
    if step_noise is not None:
        prev = prev_noised * prev + prev_noise * step_noise.float()
    out.copy_(blend_fp32(lay, prev, init_image, init_noise))
    return out
