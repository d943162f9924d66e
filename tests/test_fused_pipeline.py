"""A whole pipeline run with the fused step agrees with the unfused (diffusers) step.

The fused step runs as its torch reference (the CPU path) and as the Triton kernel under
TRITON_INTERPRET=1. Tolerance 1e-4 on images in [0, 1]: the fused update reorders the same fp32 arithmetic
(coefficients folded on the host in float64), which moved outputs by ≤ 1e-6 here.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import numpy as np
import pytest

from cg4ctr_fast.pipeline import CreativePipeline
from tests.conftest import make_product

TOL = 1e-4


@pytest.mark.parametrize("channels,scheduler", [(9, "ddim"), (4, "euler"), (4, "dpm++"), (9, "dpm++")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_pipeline_matches_unfused(channels, scheduler, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    pipe = CreativePipeline.from_preset("tiny", unet_in_channels=channels, scheduler=scheduler)
    image, mask = make_product(seed=channels)
    kwargs = dict(num_inference_steps=5, guidance_scale=6.0, strength=0.8, output_type="np", composite=False,
                  show_progress=False, seed=3)
    pipe.fuse_step = False
    reference = np.stack([c.image for c in pipe(["warm", "cool"], image, mask, **kwargs)])
    pipe.fuse_step, pipe.step_backend = True, backend
    fused = np.stack([c.image for c in pipe(["warm", "cool"], image, mask, **kwargs)])
    err = np.abs(fused - reference).max()
    assert err <= TOL, f"fused vs unfused: {err:.2e}"
    assert np.abs(reference[0] - reference[1]).max() > 1e-3


def test_fused_step_refuses_unsupported_scheduler():
    from cg4ctr_fast.errors import InputError

    pipe = CreativePipeline.from_preset("tiny", scheduler="pndm")
    pipe.fuse_step = True
    image, mask = make_product()
    with pytest.raises(InputError, match="fused step unavailable"):
        pipe("x", image, mask, num_inference_steps=2, show_progress=False)
    pipe.fuse_step = None  # auto: schedulers without a fused path run diffusers' own step
    creative = pipe("x", image, mask, num_inference_steps=2, show_progress=False)[0]
    assert creative.image.size == image.size
