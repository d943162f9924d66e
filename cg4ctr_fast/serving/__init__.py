"""Serving: nearline generation into a creative store, and online selection within a latency budget.

    from cg4ctr_fast.serving import CreativeRuntime, GenerateRequest
    runtime = CreativeRuntime.from_preset("tiny", store="out/store", reward="models/reward")
    result = runtime.generate([GenerateRequest("sku-1", image="product.png", prompts=("warm beach",))])[0]
    runtime.select("sku-1", group_id="0")        # the best stored creative, or the original and why

Parts: `runtime` (the engine: bounded queue, cross-request batching, deadlines; knows nothing of HTTP),
`store` (SQLite in WAL mode + content-addressed PNG files), `select` (the reward head in numpy on stored
embeddings), and the HTTP layer (`http`, `protocol`, `metrics`; FastAPI + uvicorn, the `serve` extra) behind
`cg4ctr serve`.  Importing this package loads none of them; attributes load on first access.
"""
from __future__ import annotations

from cg4ctr_fast._lazy import lazy_getattr

_LAZY = {
    "CreativeRuntime": "cg4ctr_fast.serving.runtime",
    "GenerateRequest": "cg4ctr_fast.serving.runtime",
    "GenerateResult": "cg4ctr_fast.serving.runtime",
    "StoredCreative": "cg4ctr_fast.serving.runtime",
    "RuntimeObserver": "cg4ctr_fast.serving.runtime",
    "CreativeStore": "cg4ctr_fast.serving.store",
    "RewardHead": "cg4ctr_fast.serving.select",
    "Selection": "cg4ctr_fast.serving.select",
    "Selector": "cg4ctr_fast.serving.select",
    "QueueFull": "cg4ctr_fast.serving.errors",
    "DeadlineExceeded": "cg4ctr_fast.serving.errors",
    "RuntimeClosed": "cg4ctr_fast.serving.errors",
    "NotFound": "cg4ctr_fast.serving.errors",
}

__all__ = list(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
