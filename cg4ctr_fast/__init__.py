"""cg4ctr_fast: fast generation of CTR-oriented ad creatives.

`import cg4ctr_fast` stays lean: it imports neither tensorrt, triton nor onnx and never touches a GPU.
The heavy parts (diffusers, the pipeline) load on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CreativePipeline": "cg4ctr_fast.pipeline",
    "Creative": "cg4ctr_fast.pipeline",
    "get_preset": "cg4ctr_fast.config",
    "PRESETS": "cg4ctr_fast.config",
    "InputError": "cg4ctr_fast.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cg4ctr_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
