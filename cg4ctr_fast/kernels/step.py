"""One denoising step outside the UNet: CFG combine + scheduler update + inpainting blend.

Two interchangeable implementations with the call signature ``step(noise_pred, t, latents, *, blend=None)``:

* :func:`unfused_step` / :class:`UnfusedStep`: the literal diffusers ``StableDiffusionInpaintPipeline``
  sequence (chunk, combine, ``scheduler.step(..., return_dict=False)[0]``, ``add_noise`` blend).
* :class:`FusedStep`: computes the step's scalar coefficients on the host from the scheduler's state,
  runs one elementwise pass (a Triton kernel, the native C++/CUDA op of :mod:`.native`, or the
  plain-torch reference), and advances the scheduler's state exactly as ``scheduler.step`` would
  (``_step_index``; DPM-Solver's ``model_outputs`` / ``lower_order_nums``), so the two can be mixed
  step by step.

Supported in fused mode (anything else raises ``ValueError`` from :class:`FusedStep` /
:func:`make_step`; :func:`supports_fused` / :func:`fused_unsupported_reason` tell beforehand):

* ``DDIMScheduler``: eta=0, prediction_type epsilon / v_prediction / sample, clip_sample on or off,
  no thresholding.
* ``EulerDiscreteScheduler``: s_churn=0 (the pipeline default), prediction_type epsilon /
  v_prediction / sample, any sigma schedule (karras, exponential, ...).
* ``DPMSolverMultistepScheduler``: algorithm_type dpmsolver++, solver_order 1 or 2, solver_type
  midpoint or heun, prediction_type epsilon / v_prediction / sample / flow_prediction, no
  thresholding, no learned variance; lower_order_final / euler_at_final / final_sigmas_type as
  diffusers decides them.
* ``LCMScheduler``: prediction_type epsilon / v_prediction / sample, clip_sample on or off, no
  thresholding, any timestep_scaling / original_inference_steps / custom timesteps.
* ``TCDScheduler``: prediction_type epsilon / v_prediction / sample, gamma (the step's ``eta``) in
  [0, 1] (TCDScheduler.step never clips or thresholds, so those settings do not matter).

LCM and TCD inject fresh noise z ~ N(0, I) in each step but the schedule's last (TCD only when gamma > 0).
:class:`FusedStep` draws it on the host with diffusers' ``randn_tensor`` and the generator it was given,
with the call ``scheduler.step`` makes (same shape, device, dtype, order), so a fused and an unfused loop
given equally seeded generators see the same z.

Importing this module imports neither triton nor diffusers; the Triton kernel modules are
imported on the first call that runs with the triton backend.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import reference as _reference

__all__ = [
    "Blend",
    "FusedStep",
    "UnfusedStep",
    "fused_unsupported_reason",
    "make_step",
    "resolve_backend",
    "supports_fused",
    "triton_available",
    "unfused_step",
]

BACKENDS = ("auto", "triton", "torch", "native")

# Exact diffusers classes (a subclass may override step(), so it is not assumed to share its math).
_FAMILY_BY_CLASS = {
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}


@dataclass
class Blend:
    """Inputs of the 4-channel-UNet inpainting blend after a step.

    ``latents = (1 - mask) * init + mask * latents`` with ``init = scheduler.add_noise(image_latents,
    noise, next_t)``, or ``init = image_latents`` when ``next_t`` is None (the last step).
    ``mask``: (1 or B, 1, H, W), or the pipeline's CFG-doubled (2B, 1, H, W) mask whose first half is
    used; ``image_latents``: (1 or B, C, H, W); ``noise``: (1 or B, C, H, W).
    """

    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor | None
    next_t: Any = None


def _unpack_blend(blend: Any) -> Blend | None:
    if blend is None or isinstance(blend, Blend):
        return blend
    if isinstance(blend, (tuple, list)) and len(blend) == 4:
        return Blend(*blend)
    try:
        return Blend(blend.mask, blend.image_latents, blend.noise, blend.next_t)
    except AttributeError as exc:
        raise TypeError("blend must be None, a Blend, a (mask, image_latents, noise, next_t) tuple "
                        "or an object with those attributes") from exc


# ---------------------------------------------------------------------------------------------
# Support checks and backend choice.


def _family(scheduler: Any) -> str | None:
    cls = type(scheduler)
    if not cls.__module__.startswith("diffusers."):
        return None
    return _FAMILY_BY_CLASS.get(cls.__name__)


def fused_unsupported_reason(scheduler: Any, eta: float = 0.0) -> str | None:
    """None when :class:`FusedStep` supports ``scheduler``, else a one-line reason.

    ``eta`` is DDIM's eta (only 0 is fused) and TCD's gamma (any value in [0, 1]); other families ignore it.
    """
    family = _family(scheduler)
    name = type(scheduler).__name__
    if family is None:
        return f"{name} has no fused step (supported: {', '.join(_FAMILY_BY_CLASS)})"
    cfg = scheduler.config
    pred = cfg.prediction_type
    if family == "ddim":
        if pred not in ("epsilon", "v_prediction", "sample"):
            return f"DDIMScheduler prediction_type {pred!r} is not supported"
        if cfg.thresholding:
            return "DDIMScheduler with thresholding=True (per-sample quantiles) is not supported"
        if eta != 0.0:
            return f"DDIMScheduler with eta={eta} (stochastic) is not supported; only eta=0"
    elif family == "euler":
        if pred not in ("epsilon", "v_prediction", "sample", "original_sample"):
            return f"EulerDiscreteScheduler prediction_type {pred!r} is not supported"
    elif family == "lcm":
        if pred not in ("epsilon", "v_prediction", "sample"):
            return f"LCMScheduler prediction_type {pred!r} is not supported"
        if cfg.thresholding:
            return "LCMScheduler with thresholding=True (per-sample quantiles) is not supported"
    elif family == "tcd":
        if pred not in ("epsilon", "v_prediction", "sample"):
            return f"TCDScheduler prediction_type {pred!r} is not supported"
        if not 0.0 <= eta <= 1.0:
            return f"TCDScheduler gamma (eta) must be in [0, 1], got {eta}"
    else:
        if cfg.algorithm_type != "dpmsolver++":
            return f"DPMSolverMultistepScheduler algorithm_type {cfg.algorithm_type!r} is not supported; only 'dpmsolver++'"
        if cfg.solver_order not in (1, 2):
            return f"DPMSolverMultistepScheduler solver_order={cfg.solver_order} is not supported; only 1 or 2"
        if cfg.solver_type not in ("midpoint", "heun"):
            return f"DPMSolverMultistepScheduler solver_type {cfg.solver_type!r} is not supported"
        if pred not in ("epsilon", "v_prediction", "sample", "flow_prediction"):
            return f"DPMSolverMultistepScheduler prediction_type {pred!r} is not supported"
        if cfg.thresholding:
            return "DPMSolverMultistepScheduler with thresholding=True is not supported"
        if cfg.variance_type is not None:
            return f"DPMSolverMultistepScheduler variance_type {cfg.variance_type!r} is not supported"
    return None


def supports_fused(scheduler: Any, eta: float = 0.0) -> bool:
    """True when :class:`FusedStep` can run ``scheduler`` (with the given DDIM ``eta`` / TCD gamma)."""
    return fused_unsupported_reason(scheduler, eta) is None


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works (imports it; call only when about to use it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors when triton imports, else ``"torch"``.

    An explicit ``"triton"`` is honoured on any device (on CPU tensors it needs TRITON_INTERPRET=1,
    set before triton is first imported). ``"native"`` (the C++/CUDA ops of :mod:`.native`, built with
    ``make native``) is only used when asked for: ``"auto"`` never picks it.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def _ops(backend: str):
    """(ddim, euler, dpm, lcm, tcd) step functions of a resolved backend."""
    if backend == "triton":
        from .ddim_step import ddim_step
        from .dpm_solver_step import dpm_solver_step
        from .euler_step import euler_step
        from .lcm_step import lcm_step
        from .tcd_step import tcd_step

        return ddim_step, euler_step, dpm_solver_step, lcm_step, tcd_step
    if backend == "native":
        from . import native

        native.load()  # a missing library fails here, in one line naming `make native`
        return (native.ddim_step_native, native.euler_step_native, native.dpm_solver_step_native,
                native.lcm_step_native, native.tcd_step_native)
    return (_reference.ddim_step_ref, _reference.euler_step_ref, _reference.dpm_solver_step_ref,
            _reference.lcm_step_ref, _reference.tcd_step_ref)


# ---------------------------------------------------------------------------------------------
# The unfused reference sequence (what the diffusers pipeline does).


@functools.lru_cache(maxsize=None)
def _step_params(cls: type) -> frozenset:
    return frozenset(inspect.signature(cls.step).parameters)


def _extra_step_kwargs(scheduler: Any, generator: torch.Generator | None, eta: float) -> dict:
    # as StableDiffusionInpaintPipeline.prepare_extra_step_kwargs
    params = _step_params(type(scheduler))
    kwargs: dict = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def unfused_step(
    scheduler: Any,
    noise_pred: torch.Tensor,
    t: Any,
    latents: torch.Tensor,
    guidance_scale: float,
    do_cfg: bool,
    blend: Any = None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 0.0,
) -> torch.Tensor:
    """The literal diffusers inpainting-pipeline step (any scheduler)."""
    if do_cfg:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    extra = _extra_step_kwargs(scheduler, generator, eta)
    latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    blend = _unpack_blend(blend)
    if blend is not None:
        init_mask = blend.mask
        if do_cfg and init_mask.shape[0] == 2 * latents.shape[0]:
            init_mask, _ = init_mask.chunk(2)
        init_latents_proper = blend.image_latents
        if blend.next_t is not None:
            init_latents_proper = scheduler.add_noise(
                init_latents_proper, blend.noise, torch.tensor([blend.next_t])
            )
        latents = (1 - init_mask) * init_latents_proper + init_mask * latents
    return latents


class UnfusedStep:
    """:func:`unfused_step` bound to a scheduler, with :class:`FusedStep`'s call signature."""

    fused = False

    def __init__(self, scheduler: Any, guidance_scale: float, do_cfg: bool, *, eta: float = 0.0,
                 generator: torch.Generator | None = None):
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.do_cfg = bool(do_cfg)
        self.eta = eta
        self.generator = generator

    def __call__(self, noise_pred: torch.Tensor, t: Any, latents: torch.Tensor, *, blend: Any = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        res = unfused_step(self.scheduler, noise_pred, t, latents, self.guidance_scale, self.do_cfg,
                           blend, self.generator, eta=self.eta)
        return out.copy_(res) if out is not None else res


# ---------------------------------------------------------------------------------------------
# The fused step.


def _log(x: float) -> float:
    return math.log(x) if x > 0.0 else -math.inf


class _HostCopy:
    """A host list of a scheduler tensor (sigmas / timesteps), refreshed when the tensor changes."""

    __slots__ = ("_src", "_version", "values")

    def __init__(self) -> None:
        self._src = None
        self._version = -1
        self.values: list = []

    def get(self, t: torch.Tensor) -> list:
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter (and cannot be modified in place)
            version = None
        if t is not self._src or version != self._version:
            self._src, self._version = t, version
            self.values = t.detach().reshape(-1).tolist()
        return self.values


class FusedStep:
    """Fused CFG + scheduler step + blend for a diffusers scheduler instance.

    ``FusedStep(scheduler, guidance_scale, do_cfg, backend, generator=g)`` then, inside the denoising loop,
    ``latents = step(noise_pred, t, latents, blend=None)`` in place of the unfused sequence.
    ``noise_pred`` is the raw UNet output (batch 2B when ``do_cfg``); ``backend`` is "auto"
    (triton for CUDA tensors when triton imports, else torch), "triton", "torch" or "native" (the ops of
    :mod:`.native`; raises :class:`~cg4ctr_fast.kernels.native.NativeUnavailableError` at the first step when
    the library is not built).
    The scheduler's ``set_timesteps`` / ``set_begin_index`` / ``scale_model_input`` are used as
    usual; this object reads the scheduler's state at each call and advances it.

    The step's scalars are computed on the host in double precision from the scheduler's fp32
    tables (diffusers computes them as fp32 tensors: the two agree to an fp32 rounding). Timesteps
    that are elements of a CUDA ``scheduler.timesteps`` are read from a host copy, so a step
    does not synchronize with the GPU.

    ``generator``: a ``torch.Generator``, a list of one per batch item, or None (torch's global RNG), as
    ``scheduler.step(..., generator=)`` takes it; only LCM and TCD draw from it (their injected noise).
    ``eta``: DDIM's eta (0 only) or TCD's gamma in [0, 1], as the pipeline passes it to ``scheduler.step``.
    Raises ValueError for a scheduler/config without a fused path (see :func:`fused_unsupported_reason`).
    """

    fused = True

    def __init__(self, scheduler: Any, guidance_scale: float, do_cfg: bool, backend: str = "auto", *,
                 eta: float = 0.0, generator: Any = None):
        reason = fused_unsupported_reason(scheduler, eta)
        if reason is not None:
            raise ValueError(f"no fused step for this scheduler: {reason}; use the unfused step instead")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.scheduler = scheduler
        self.family = _family(scheduler)
        self.guidance_scale = float(guidance_scale)
        self.do_cfg = bool(do_cfg)
        self.backend = backend
        self.eta = eta
        self.generator = generator
        self._warned_fallback = False
        self._sigmas = _HostCopy()
        self._timesteps = _HostCopy()
        cfg = scheduler.config
        self._pred = cfg.prediction_type
        if self.family in ("ddim", "lcm", "tcd"):
            # host copies (DDIM's add_noise moves scheduler.alphas_cumprod to the latents' device)
            self._alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float32).tolist()
            self._final_alpha_cumprod = float(torch.as_tensor(scheduler.final_alpha_cumprod).float())
            self._clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
            self._num_train = int(cfg.num_train_timesteps)
            if self.family == "lcm":
                self._timestep_scaling = float(cfg.timestep_scaling)
        elif self.family == "dpm":
            self._flow = bool(cfg.use_flow_sigmas)
            self._order = int(cfg.solver_order)
            self._midpoint = cfg.solver_type == "midpoint"
            self._lof = bool(cfg.lower_order_final)
            self._euler_at_final = bool(cfg.euler_at_final)
            self._final_zero = cfg.final_sigmas_type == "zero"

    # -- public -----------------------------------------------------------------------------

    def __call__(self, noise_pred: torch.Tensor, t: Any, latents: torch.Tensor, *, blend: Any = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """One step; returns the new latents (written into ``out`` when given; ``out`` may be ``latents``)."""
        blend = _unpack_blend(blend)
        if noise_pred.dtype != latents.dtype:
            # diffusers' dtype promotion differs per scheduler here; keep its exact behaviour
            if not self._warned_fallback:
                warnings.warn(f"FusedStep: noise_pred {noise_pred.dtype} != latents {latents.dtype}; "
                              "running the unfused step", RuntimeWarning, stacklevel=2)
                self._warned_fallback = True
            res = unfused_step(self.scheduler, noise_pred, t, latents, self.guidance_scale, self.do_cfg,
                               blend, self.generator, eta=self.eta)
            return out.copy_(res) if out is not None else res
        backend = resolve_backend(self.backend, latents.device)
        ddim_op, euler_op, dpm_op, lcm_op, tcd_op = _ops(backend)
        g = self.guidance_scale if self.do_cfg else None
        if self.family == "ddim":
            return self._ddim(ddim_op, noise_pred, t, latents, g, blend, out)
        if self.family == "euler":
            return self._euler(euler_op, noise_pred, t, latents, g, blend, out)
        if self.family == "lcm":
            return self._lcm(lcm_op, noise_pred, t, latents, g, blend, out)
        if self.family == "tcd":
            return self._tcd(tcd_op, noise_pred, t, latents, g, blend, out)
        return self._dpm(dpm_op, noise_pred, t, latents, g, blend, out)

    # -- host helpers -----------------------------------------------------------------------

    def _timestep_value(self, t: Any) -> float:
        """Host value of ``t`` without a GPU sync when ``t`` is an element of scheduler.timesteps."""
        if not isinstance(t, torch.Tensor):
            return t
        if t.numel() == 1:
            ts = self.scheduler.timesteps
            if (isinstance(ts, torch.Tensor) and ts.dim() == 1 and ts.is_contiguous() and ts.dtype == t.dtype
                    and ts.device == t.device
                    and t.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
                off, rem = divmod(t.data_ptr() - ts.data_ptr(), ts.element_size())
                if rem == 0 and 0 <= off < ts.numel():
                    return self._timesteps.get(ts)[off]
        return t.item()

    @staticmethod
    def _blend_kwargs(blend: Blend | None, init_image: float = 1.0, init_noise: float = 0.0) -> dict:
        if blend is None:
            return {}
        last = blend.next_t is None
        return {
            "mask": blend.mask,
            "image_latents": blend.image_latents,
            "noise": None if last else blend.noise,
            "init_image": init_image,
            "init_noise": init_noise,
        }

    def _noise_index(self, next_t: Any, step_index_after: int) -> int:
        # the index EulerDiscrete/DPMSolverMultistep add_noise picks when called after step()
        s = self.scheduler
        if s.begin_index is None:
            ts = torch.as_tensor(next_t).reshape(-1)[:1].to(s.timesteps.device)
            return s.index_for_timestep(ts[0], s.timesteps)
        return step_index_after

    # -- DDIM -------------------------------------------------------------------------------

    def _ddim(self, op, noise_pred, t, latents, g, blend, out):
        s = self.scheduler
        if s.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        ac = self._alphas_cumprod
        t_i = int(self._timestep_value(t))
        prev_t = t_i - self._num_train // s.num_inference_steps
        alpha_prod_t = ac[t_i]
        alpha_prod_t_prev = ac[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        sa, sb = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
        if self._pred == "epsilon":  # x0 = (s - sb*e) / sa
            x0c, epsc = (1.0 / sa, -sb / sa), (0.0, 1.0)
        elif self._pred == "v_prediction":  # x0 = sa*s - sb*e, eps = sa*e + sb*s
            x0c, epsc = (sa, -sb), (sb, sa)
        else:  # "sample": x0 = e, eps = (s - sa*x0) / sb
            x0c, epsc = (0.0, 1.0), (1.0 / sb, -sa / sb)
        # eta = 0 -> std_dev_t = 0: prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps
        prev_x0, prev_eps = math.sqrt(alpha_prod_t_prev), math.sqrt(1.0 - alpha_prod_t_prev)
        init_image = init_noise = 0.0
        if blend is not None and blend.next_t is not None:  # add_noise(image_latents, noise, next_t)
            a_next = ac[int(self._timestep_value(blend.next_t))]
            init_image, init_noise = math.sqrt(a_next), math.sqrt(1.0 - a_next)
        return op(
            noise_pred, latents, guidance_scale=g,
            x0_sample=x0c[0], x0_model=x0c[1], eps_sample=epsc[0], eps_model=epsc[1],
            prev_x0=prev_x0, prev_eps=prev_eps, clip_range=self._clip,
            out=out, **self._blend_kwargs(blend, init_image, init_noise),
        )

    # -- Euler ------------------------------------------------------------------------------

    def _euler(self, op, noise_pred, t, latents, g, blend, out):
        s = self.scheduler
        if s.step_index is None:
            s._init_step_index(t)
        i = s.step_index
        sigmas = self._sigmas.get(s.sigmas)
        sigma = sigmas[i]
        sigma_hat = sigma  # s_churn = 0 -> gamma = 0 -> sigma_hat = sigma * (gamma + 1)
        if self._pred == "epsilon":  # x0 = s - sigma_hat * e
            x0c = (1.0, -sigma_hat)
        elif self._pred == "v_prediction":  # x0 = e * (-sigma / sqrt(sigma^2 + 1)) + s / (sigma^2 + 1)
            x0c = (1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0))
        else:  # "sample" / "original_sample"
            x0c = (0.0, 1.0)
        dt = sigmas[i + 1] - sigma_hat
        init_noise = 0.0
        if blend is not None and blend.next_t is not None:  # add_noise: image_latents + noise * sigma
            init_noise = sigmas[self._noise_index(blend.next_t, i + 1)]
        res = op(
            noise_pred, latents, guidance_scale=g,
            x0_sample=x0c[0], x0_model=x0c[1], sigma_hat=sigma_hat, dt=dt,
            out=out, **self._blend_kwargs(blend, 1.0, init_noise),
        )
        s._step_index += 1
        return res

    # -- DPM-Solver++ -----------------------------------------------------------------------

    def _alpha_sigma(self, sigma: float) -> tuple[float, float]:
        # DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t
        if self._flow:
            return 1.0 - sigma, sigma
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return alpha, sigma * alpha

    def _dpm(self, op, noise_pred, t, latents, g, blend, out):
        s = self.scheduler
        if s.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if s.step_index is None:
            s._init_step_index(t)
        i = s.step_index
        n = len(s.timesteps)
        lower_order_final = (i == n - 1) and (self._euler_at_final or (self._lof and n < 15) or self._final_zero)
        sigmas = self._sigmas.get(s.sigmas)

        # convert_model_output: data prediction x0 = x0_sample * sample + x0_model * model_output
        alpha_s0, sigma_s0 = self._alpha_sigma(sigmas[i])
        if self._pred == "epsilon":  # (s - sigma_t * e) / alpha_t
            x0c = (1.0 / alpha_s0, -sigma_s0 / alpha_s0)
        elif self._pred == "v_prediction":  # alpha_t * s - sigma_t * e
            x0c = (alpha_s0, -sigma_s0)
        elif self._pred == "flow_prediction":  # s - sigma * e
            x0c = (1.0, -sigmas[i])
        else:  # "sample"
            x0c = (0.0, 1.0)

        # dpm_solver_first_order_update / multistep_dpm_solver_second_order_update (dpmsolver++)
        first_order = self._order == 1 or s.lower_order_nums < 1 or lower_order_final
        alpha_t, sigma_t = self._alpha_sigma(sigmas[i + 1])
        lambda_t = _log(alpha_t) - _log(sigma_t)  # +inf when the next sigma is 0
        lambda_s0 = _log(alpha_s0) - _log(sigma_s0)
        h = lambda_t - lambda_s0
        phi = math.expm1(-h)  # exp(-h) - 1
        coef_sample = sigma_t / sigma_s0
        coef_x0 = -alpha_t * phi
        coef_diff = 0.0
        prev_x0 = None
        if not first_order:
            alpha_s1, sigma_s1 = self._alpha_sigma(sigmas[i - 1])
            lambda_s1 = _log(alpha_s1) - _log(sigma_s1)
            r0 = (lambda_s0 - lambda_s1) / h
            if self._midpoint:  # - 0.5 * alpha_t * (exp(-h) - 1) * D1, D1 = (m0 - m1) / r0
                coef_diff = -0.5 * alpha_t * phi / r0
            else:  # heun: + alpha_t * ((exp(-h) - 1) / h + 1) * D1
                coef_diff = alpha_t * (phi / h + 1.0) / r0
            prev_x0 = s.model_outputs[-1]
            if prev_x0 is None:
                raise RuntimeError("DPMSolverMultistepScheduler state has lower_order_nums >= 1 but no stored model output")

        init_image = init_noise = 0.0
        if blend is not None and blend.next_t is not None:  # add_noise: alpha * image_latents + sigma * noise
            init_image, init_noise = self._alpha_sigma(sigmas[self._noise_index(blend.next_t, i + 1)])

        res, x0 = op(
            noise_pred, latents, guidance_scale=g,
            x0_sample=x0c[0], x0_model=x0c[1],
            coef_sample=coef_sample, coef_x0=coef_x0, coef_diff=coef_diff, prev_x0=prev_x0,
            out=out, **self._blend_kwargs(blend, init_image, init_noise),
        )
        # state, as DPMSolverMultistepScheduler.step leaves it
        for k in range(self._order - 1):
            s.model_outputs[k] = s.model_outputs[k + 1]
        s.model_outputs[-1] = x0
        if s.lower_order_nums < self._order:
            s.lower_order_nums += 1
        s._step_index += 1
        return res


    # -- LCM / TCD ---------------------------------------------------------------------------

    def _pred_coefs(self, alpha_prod_t: float) -> tuple[tuple[float, float], tuple[float, float]]:
        """(x0, eps) as (coef on sample, coef on model output), for LCM/TCD's three prediction types."""
        sa, sb = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
        if self._pred == "epsilon":  # x0 = (s - sb*e) / sa, eps = e
            return (1.0 / sa, -sb / sa), (0.0, 1.0)
        if self._pred == "v_prediction":  # x0 = sa*s - sb*e, eps = sa*e + sb*s
            return (sa, -sb), (sb, sa)
        return (0.0, 1.0), (1.0 / sb, -sa / sb)  # "sample": x0 = e, eps = (s - sa*x0) / sb

    def _few_step_start(self, t: Any) -> tuple[int, int, list]:
        """(step index, timestep value, host timesteps) after the checks LCM/TCD ``step`` make first."""
        s = self.scheduler
        if s.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if s.step_index is None:
            s._init_step_index(t)
        return s.step_index, int(self._timestep_value(t)), self._timesteps.get(s.timesteps)

    def _step_noise(self, latents: torch.Tensor) -> torch.Tensor:
        # LCMScheduler/TCDScheduler.step: randn_tensor(model_output.shape, generator=generator,
        # device=model_output.device, dtype=<the denoised sample's dtype>); the guided model output and the
        # denoised sample have the latents' shape, device and dtype here (mixed dtypes ran unfused above).
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(latents.shape, generator=self.generator, device=latents.device, dtype=latents.dtype)

    def _ddpm_blend_coefs(self, blend: Blend | None) -> tuple[float, float]:
        # LCM/TCD add_noise is DDPM's: sqrt(a_next) * image_latents + sqrt(1 - a_next) * noise
        if blend is None or blend.next_t is None:
            return 0.0, 0.0
        a_next = self._alphas_cumprod[int(self._timestep_value(blend.next_t))]
        return math.sqrt(a_next), math.sqrt(1.0 - a_next)

    def _lcm(self, op, noise_pred, t, latents, g, blend, out):
        s = self.scheduler
        i, t_i, timesteps = self._few_step_start(t)
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else t_i
        ac = self._alphas_cumprod
        alpha_prod_t = ac[t_i]
        alpha_prod_t_prev = ac[int(prev_t)] if prev_t >= 0 else self._final_alpha_cumprod
        # get_scalings_for_boundary_condition_discrete: sigma_data = 0.5
        scaled = t_i * self._timestep_scaling
        c_skip = 0.25 / (scaled * scaled + 0.25)
        c_out = scaled / math.sqrt(scaled * scaled + 0.25)
        x0c, _ = self._pred_coefs(alpha_prod_t)
        step_noise = None
        prev_denoised, prev_noise = 1.0, 0.0
        if s.step_index != s.num_inference_steps - 1:  # diffusers' test: no noise on the schedule's last step
            step_noise = self._step_noise(latents)
            prev_denoised, prev_noise = math.sqrt(alpha_prod_t_prev), math.sqrt(1.0 - alpha_prod_t_prev)
        init_image, init_noise = self._ddpm_blend_coefs(blend)
        res = op(
            noise_pred, latents, guidance_scale=g,
            x0_sample=x0c[0], x0_model=x0c[1], c_skip=c_skip, c_out=c_out,
            prev_denoised=prev_denoised, prev_noise=prev_noise, step_noise=step_noise, clip_range=self._clip,
            out=out, **self._blend_kwargs(blend, init_image, init_noise),
        )
        s._step_index += 1
        return res

    def _tcd(self, op, noise_pred, t, latents, g, blend, out):
        s = self.scheduler
        gamma = float(self.eta)
        i, t_i, timesteps = self._few_step_start(t)
        prev_t = int(timesteps[i + 1]) if i + 1 < len(timesteps) else 0
        # timestep_s = floor((1 - gamma) * prev_t) in float32 as TCDScheduler.step computes it: a float64
        # product can land on the other side of an integer (gamma 0.3: 0.7 * 90 is 63 in fp32, 62.99... in
        # fp64; 16 of the 1000 timesteps differ so), which would pick another alphas_cumprod entry
        t_s = int(torch.floor((1 - gamma) * torch.tensor(prev_t, dtype=torch.long)).to(torch.long))
        ac = self._alphas_cumprod
        alpha_prod_t = ac[t_i]
        alpha_prod_t_prev = ac[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        alpha_prod_s = ac[t_s]
        x0c, epsc = self._pred_coefs(alpha_prod_t)
        step_noise = None
        prev_noised, prev_noise = 1.0, 0.0
        if gamma > 0 and s.step_index != s.num_inference_steps - 1:
            step_noise = self._step_noise(latents)
            ratio = alpha_prod_t_prev / alpha_prod_s
            prev_noised, prev_noise = math.sqrt(ratio), math.sqrt(max(1.0 - ratio, 0.0))
        init_image, init_noise = self._ddpm_blend_coefs(blend)
        res = op(
            noise_pred, latents, guidance_scale=g,
            x0_sample=x0c[0], x0_model=x0c[1], eps_sample=epsc[0], eps_model=epsc[1],
            noised_x0=math.sqrt(alpha_prod_s), noised_eps=math.sqrt(1.0 - alpha_prod_s),
            prev_noised=prev_noised, prev_noise=prev_noise, step_noise=step_noise,
            out=out, **self._blend_kwargs(blend, init_image, init_noise),
        )
        s._step_index += 1
        return res


def make_step(
    scheduler: Any,
    guidance_scale: float,
    do_cfg: bool,
    *,
    fused: bool,
    backend: str = "auto",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> FusedStep | UnfusedStep:
    """A step callable ``step(noise_pred, t, latents, *, blend=None) -> latents``.

    ``fused=True`` returns a :class:`FusedStep` and raises ``ValueError`` (with the reason) when the
    scheduler/config has no fused path, so callers can fall back to ``fused=False``. ``generator`` goes to
    ``scheduler.step`` (unfused) or draws LCM/TCD's injected noise (fused) the same way.
    """
    if fused:
        return FusedStep(scheduler, guidance_scale, do_cfg, backend, eta=eta, generator=generator)
    return UnfusedStep(scheduler, guidance_scale, do_cfg, eta=eta, generator=generator)
