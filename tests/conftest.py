"""Shared fixtures: tiny components built in code, synthetic product images. No downloads."""
from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pytest
from PIL import Image


def make_product(width: int = 64, height: int = 64, seed: int = 0, box=None):
    """A random-textured background with a flat-coloured rectangular 'product'; mask white = background."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.full((height, width), 255, np.uint8)
    x0, y0, x1, y1 = box or (width // 4, height // 3, 3 * width // 4, 5 * height // 6)
    pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    mask[y0:y1, x0:x1] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)


@pytest.fixture(scope="session")
def product():
    return make_product()


@pytest.fixture(scope="session")
def cycle_toy(tmp_path_factory):
    """The small toy models of the self-cyclic tests (tests/test_cycle.py SMALL), trained once per session: the
    cycle and the style-cycle modules share them (≈ 50 s on 2 cores)."""
    from cg4ctr_fast.training.toy import build_toy_models
    from tests.test_cycle import SMALL

    return build_toy_models(SMALL, cache=tmp_path_factory.mktemp("toy-cache"), progress=False, log=lambda _m: None)


NATIVE_SKIP_REASON = "native ops not built: run `make native`"


def require_native() -> None:
    """Skip the calling test when the native library (`make native`) does not load; with
    CG4CTR_REQUIRE_NATIVE=1 (set by CI, which builds it) fail instead, so a lost build cannot pass as a skip."""
    from cg4ctr_fast.kernels import native

    reason = native.native_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CG4CTR_REQUIRE_NATIVE") == "1":
        pytest.fail(f"CG4CTR_REQUIRE_NATIVE=1 but {reason}")
    pytest.skip(NATIVE_SKIP_REASON)
