"""The serving runtime: batches that fill across products equal per-product calls; deadlines; the queue bound.

Reference: `CreativePipeline.__call__` for one product (itself tested against diffusers in test_parity.py).
Tolerance 1e-4 on float outputs (output_type="np"): a larger UNet batch changes the summation order of the
CPU kernels, measured ≤ 2e-6 here; the same bound as test_pipeline's batch-composition test.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import CreativePipeline, ProductJob
from tests.conftest import make_product

TOL = 1e-4


@pytest.fixture(scope="module")
def pipe9():
    return CreativePipeline.from_preset("tiny")


@pytest.fixture(scope="module")
def pipe4():
    return CreativePipeline.from_preset("tiny", unet_in_channels=4, scheduler="euler")


def _products():
    # Odd boxes and seeds: every product has its own mask, so a mixed-up row would show.
    return [
        make_product(seed=3, box=(5, 9, 41, 50)),
        make_product(seed=4, box=(20, 3, 61, 30)),
        make_product(seed=5, box=(11, 17, 29, 59)),
    ]


@pytest.mark.parametrize("which, guidance, strength", [("pipe9", 7.5, 1.0), ("pipe9", 1.0, 1.0),
                                                        ("pipe4", 5.0, 1.0), ("pipe9", 7.5, 0.7)])
def test_cross_product_batch_equals_per_product_calls(request, which, guidance, strength):
    pipe = request.getfixturevalue(which)
    products = _products()
    prompts = [["warm beach"], ["cool studio", "neon city"], ["green moss", "red brick", "warm beach"]]
    per_prompt = [2, 1, 1]
    jobs = [ProductJob(p, image, mask_image=mask, num_images_per_prompt=n, seed=7)
            for p, (image, mask), n in zip(prompts, products, per_prompt)]
    common = dict(num_inference_steps=3, guidance_scale=guidance, strength=strength, show_progress=False)
    batched = pipe.generate_batch(jobs, output_type="np", **common)
    worst = 0.0
    for job, got in zip(jobs, batched):
        alone = pipe(job.prompt, job.image, job.mask_image, num_images_per_prompt=job.num_images_per_prompt,
                     seed=job.seed, output_type="np", **common)
        assert [(c.prompt, c.group, c.index, c.seed) for c in got] == \
               [(c.prompt, c.group, c.index, c.seed) for c in alone]
        for a, b in zip(alone, got):
            worst = max(worst, float(np.abs(a.image - b.image).max()))
            assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert worst < TOL, worst
    # Product pixels bit-exact in every product of the batch (8-bit output: a copy, not a computation).
    pil = pipe.generate_batch(jobs, output_type="pil", **common)
    for (image, mask), creatives in zip(products, pil):
        keep = np.asarray(mask) < 128
        for c in creatives:
            assert np.array_equal(np.asarray(c.image)[keep], np.asarray(image)[keep])


def test_batch_of_other_working_sizes_is_refused(pipe9):
    (a, ma), _, _ = _products()
    wide, wide_mask = make_product(width=96, height=48, seed=9)
    jobs = [ProductJob("x", a, mask_image=ma), ProductJob("y", wide, mask_image=wide_mask)]
    with pytest.raises(InputError, match="different working sizes"):
        pipe9.generate_batch(jobs, num_inference_steps=1, show_progress=False)


def test_each_product_is_encoded_once(pipe9, monkeypatch):
    calls = []
    original = pipe9._encode_image

    def counting(image, generator):
        calls.append(image.shape[0])
        return original(image, generator)

    monkeypatch.setattr(pipe9, "_encode_image", counting)
    jobs = [ProductJob(["a", "b", "c"], image, mask_image=mask) for image, mask in _products()]
    pipe9.generate_batch(jobs, num_inference_steps=1, show_progress=False, output_type="latent")
    # 9-channel UNet at strength 1: one masked-image encode per product, of one image, whatever its groups.
    assert calls == [1, 1, 1]
