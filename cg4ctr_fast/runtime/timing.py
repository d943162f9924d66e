"""Per-stage wall-clock timing for the data path, synchronised with the GPU when there is one.

The pipeline calls `timer.stage(name)` around each stage; with no timer attached the context is free.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator, Optional

import torch

STAGES = ("saliency", "text", "vae_encode", "unet", "step", "vae_decode", "composite", "reward")


class StageTimer:
    """Accumulates seconds per stage for one call (`reset()` between calls)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _sync(self) -> None:
        # Kernels launch asynchronously: without a sync the time lands in whichever stage syncs next.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


NULL_STAGE = contextlib.nullcontext()
