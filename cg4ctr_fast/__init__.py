"""cg4ctr_fast: fast generation of CTR-oriented ad creatives.

`import cg4ctr_fast` stays lean: it imports neither tensorrt, triton nor onnx and never touches a GPU.
The heavy parts (diffusers, the pipeline) load on first attribute access.
"""
from __future__ import annotations

from cg4ctr_fast._lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "CreativePipeline": "cg4ctr_fast.pipeline",
    "Creative": "cg4ctr_fast.pipeline",
    "get_preset": "cg4ctr_fast.config",
    "PRESETS": "cg4ctr_fast.config",
    "InputError": "cg4ctr_fast.errors",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
