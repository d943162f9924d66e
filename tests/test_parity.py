"""Parity with diffusers' StableDiffusionInpaintPipeline on the same tiny components, seed and scheduler.

Tolerance: 1e-4 on images in [0, 1]. Both sides run the same fp32 modules; what differs is batching (our
prompt embeddings are computed once per distinct prompt and broadcast, diffusers' per batch row), which
moves results by float rounding only: measured ≤ 2e-6 on this CPU. An algorithmic slip (a wrong scheduler
coefficient, a missed blend, a different noise draw) moves pixels by > 1e-2, so 1e-4 separates the two
with margin for other BLAS builds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cg4ctr_fast.pipeline import CreativePipeline
from tests.conftest import make_product

TOL = 1e-4
PROMPTS = ["a warm sunset beach", "cool blue studio backdrop", "green forest moss, soft light"]


def _reference(ours: CreativePipeline):
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    return diffusers_inpaint_pipeline(ours.components.modules)


_CACHE: dict = {}


def _pair(channels: int, scheduler: str):
    key = (channels, scheduler)
    if key not in _CACHE:
        ours = CreativePipeline.from_preset("tiny", unet_in_channels=channels, scheduler=scheduler, seed=channels)
        _CACHE[key] = (ours, _reference(ours))
    return _CACHE[key]


def _run_both(ours, ref, image, mask, prompts, **kwargs):
    seed = kwargs.pop("seed")
    generator_list = kwargs.pop("generator_list", False)
    n = len(prompts) * kwargs.get("num_images_per_prompt", 1)

    def gen():
        if generator_list:
            return [torch.Generator().manual_seed(seed + i) for i in range(n)]
        return torch.Generator().manual_seed(seed)

    creatives = ours(
        prompts, image, mask, generator=gen(), output_type="np", composite=False, show_progress=False, **kwargs
    )
    expected = ref(prompts, image=image, mask_image=mask, generator=gen(), output_type="np", **kwargs).images
    got = np.stack([c.image for c in creatives])
    return got, expected


@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
@pytest.mark.parametrize("guidance,strength", [(7.5, 1.0), (1.0, 1.0), (5.0, 0.6)])
def test_matches_diffusers(channels, scheduler, guidance, strength):
    ours, ref = _pair(channels, scheduler)
    image, mask = make_product(seed=channels)
    got, expected = _run_both(
        ours, ref, image, mask, PROMPTS, num_inference_steps=4, guidance_scale=guidance, strength=strength, seed=11
    )
    assert got.shape == expected.shape == (3, 64, 64, 3)
    err = np.abs(got - expected).max()
    assert err <= TOL, f"max abs error {err:.2e} > {TOL}"
    # The prompts really steer the output: different groups give different images.
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_matches_diffusers_images_per_prompt_and_generator_list():
    ours, ref = _pair(9, "ddim")
    image, mask = make_product(seed=5)
    got, expected = _run_both(
        ours,
        ref,
        image,
        mask,
        PROMPTS[:2],
        num_inference_steps=3,
        guidance_scale=4.0,
        num_images_per_prompt=2,
        negative_prompt=["blurry", "dark, low quality"],
        seed=21,
        generator_list=True,
    )
    assert got.shape == (4, 64, 64, 3)
    assert np.abs(got - expected).max() <= TOL


def test_matches_diffusers_non_square_size():
    ours, ref = _pair(4, "euler")
    image, mask = make_product(width=64, height=48, seed=9)
    got, expected = _run_both(
        ours, ref, image, mask, PROMPTS[:1], num_inference_steps=3, guidance_scale=3.0, height=48, width=64, seed=2
    )
    assert got.shape == expected.shape == (1, 48, 64, 3)
    assert np.abs(got - expected).max() <= TOL


@pytest.mark.parametrize("output_type", ["pt", "latent"])
def test_matches_diffusers_pt_and_latent(output_type):
    """diffusers' other output types: "pt" images [B, 3, H, W] in [0, 1]; "latent" the scaled final latents."""
    ours, ref = _pair(9, "ddim")
    image, mask = make_product(seed=13)
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type=output_type)
    creatives = ours(PROMPTS[:2], image, mask, generator=torch.Generator().manual_seed(4), composite=False,
                     show_progress=False, **kwargs)
    expected = ref(PROMPTS[:2], image=image, mask_image=mask, generator=torch.Generator().manual_seed(4),
                   **kwargs).images
    got = torch.stack([c.image for c in creatives])
    assert got.shape == expected.shape
    err = float((got.float() - expected.float()).abs().max())
    assert err <= TOL, f"max abs error {err:.2e} > {TOL}"


@pytest.mark.parametrize("channels", [9, 4])
def test_callback_on_step_end_matches_diffusers(channels):
    """The same callback, reading and replacing latents (and, for the 9-channel UNet, the masked-image latents),
    gives the same images in both pipelines: diffusers' callback contract, honoured."""
    ours, ref = _pair(channels, "euler")
    image, mask = make_product(seed=channels + 20)
    calls = {"ours": [], "ref": []}

    def make_callback(name):
        def callback(pipe, i, t, kwargs):
            calls[name].append((i, float(t), tuple(kwargs["latents"].shape)))
            out = {"latents": kwargs["latents"] * 0.9 + 0.05} if i == 1 else {}
            if channels == 9 and i == 0:
                out["masked_image_latents"] = kwargs["masked_image_latents"] * 0.5
            return out
        return callback

    names = ["latents", "masked_image_latents"]
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np", callback_on_step_end_tensor_inputs=names)
    got = np.stack([c.image for c in ours(PROMPTS[:2], image, mask, generator=torch.Generator().manual_seed(8),
                                          composite=False, show_progress=False,
                                          callback_on_step_end=make_callback("ours"), **kwargs)])
    expected = ref(PROMPTS[:2], image=image, mask_image=mask, generator=torch.Generator().manual_seed(8),
                   callback_on_step_end=make_callback("ref"), **kwargs).images
    assert calls["ours"] == calls["ref"] and len(calls["ours"]) == 3
    err = np.abs(got - expected).max()
    assert err <= TOL, f"max abs error {err:.2e} > {TOL}"
    # The callback really changed the result (so matching diffusers is not matching a no-op).
    plain = np.stack([c.image for c in ours(PROMPTS[:2], image, mask, generator=torch.Generator().manual_seed(8),
                                            composite=False, show_progress=False, num_inference_steps=3,
                                            guidance_scale=3.0, output_type="np")])
    assert np.abs(plain - got).max() > 1e-3
