"""cg4ctr_fast.kernels: fused per-step kernels of the denoising loop.

* :mod:`.step`: :class:`FusedStep`, :func:`unfused_step`, :func:`make_step`, :func:`supports_fused`.
* :mod:`.ddim_step`, :mod:`.euler_step`, :mod:`.dpm_solver_step`, :mod:`.lcm_step`, :mod:`.tcd_step`:
  one Triton kernel per scheduler family (CFG combine + update + inpainting blend in one pass) with a launcher and a torch ``_ref``.
* :mod:`.reference`: the torch references alone (no triton).
* :mod:`.native`: loader and build driver of the C++/CUDA ops (``backend="native"``; ``make native`` builds them).

Importing this package (or :mod:`.step`) imports neither triton nor diffusers and loads no native library;
names below load lazily.
"""
from __future__ import annotations

from cg4ctr_fast._lazy import lazy_getattr

_LAZY = {
    "Blend": ".step",
    "FusedStep": ".step",
    "UnfusedStep": ".step",
    "fused_unsupported_reason": ".step",
    "make_step": ".step",
    "resolve_backend": ".step",
    "supports_fused": ".step",
    "triton_available": ".step",
    "unfused_step": ".step",
    "ddim_step_ref": ".reference",
    "euler_step_ref": ".reference",
    "dpm_solver_step_ref": ".reference",
    "lcm_step_ref": ".reference",
    "tcd_step_ref": ".reference",
    "NativeUnavailableError": ".native",
    "native_unavailable_reason": ".native",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
