"""cg4ctr_fast.kernels: fused per-step kernels of the denoising loop.

* :mod:`.step`: :class:`FusedStep`, :func:`unfused_step`, :func:`make_step`, :func:`supports_fused`.
* :mod:`.ddim_step`, :mod:`.euler_step`, :mod:`.dpm_solver_step`: one Triton kernel per scheduler
  family (CFG combine + update + inpainting blend in one pass) with a launcher and a torch ``_ref``.
* :mod:`.reference`: the torch references alone (no triton).

Importing this package (or :mod:`.step`) imports neither triton nor diffusers; names below load lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Blend": "step",
    "FusedStep": "step",
    "UnfusedStep": "step",
    "fused_unsupported_reason": "step",
    "make_step": "step",
    "resolve_backend": "step",
    "supports_fused": "step",
    "triton_available": "step",
    "unfused_step": "step",
    "ddim_step_ref": "reference",
    "euler_step_ref": "reference",
    "dpm_solver_step_ref": "reference",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cg4ctr_fast.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
