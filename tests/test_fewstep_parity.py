"""Few-step schedulers through CreativePipeline's loop: parity with diffusers' StableDiffusionInpaintPipeline.

LCMScheduler and TCDScheduler (gamma = eta 0.3, so both inject fresh noise on every step but the last) on the
tiny preset, 4 steps, guidance off (1.0) and low (1.5, with strength 0.6 so the schedule starts mid-way),
9- and 4-channel UNets (the latter exercises LCM/TCD's add_noise in the blend), the unfused step
(scheduler.step) and the fused one (FusedStep, torch reference on CPU).

Tolerance: tests/test_parity.py's TOL, 1e-4 on images in [0, 1]. Measured on this CPU: unfused <= 1.6e-6,
fused <= 1.6e-6 (fp32 host scalars vs diffusers' fp32 tensor math). The injected noise has unit variance, so a
different draw (another generator, another order, a draw on the last step) moves pixels by > 0.3.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from tests.conftest import make_product
from tests.test_parity import PROMPTS, TOL, _pair, _run_both

# (guidance_scale, strength): guidance off from pure noise; low guidance from the noised photo
SETTINGS = [(1.0, 1.0), (1.5, 0.6)]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("guidance,strength", SETTINGS)
@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_fewstep_matches_diffusers(scheduler, channels, guidance, strength, fused):
    ours, ref = _pair(channels, scheduler)
    assert type(ours.scheduler).__name__ == {"lcm": "LCMScheduler", "tcd": "TCDScheduler"}[scheduler]
    image, mask = make_product(seed=channels)
    kwargs = dict(eta=0.3) if scheduler == "tcd" else {}  # TCD's gamma: diffusers passes eta to its step
    ours.fuse_step = fused
    try:
        got, expected = _run_both(ours, ref, image, mask, PROMPTS[:2], num_inference_steps=4,
                                  guidance_scale=guidance, strength=strength, seed=11, **kwargs)
    finally:
        ours.fuse_step = None
    assert got.shape == expected.shape == (2, 64, 64, 3)
    err = np.abs(got - expected).max()
    hint = ("; the fused step draws LCM/TCD's noise from the generator make_step(fused=True, generator=...) "
            "receives: CreativePipeline._make_stepper must pass it") if fused else ""
    assert err <= TOL, f"max abs error {err:.2e} > {TOL}{hint}"
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the prompts steer: not two copies of one image


def test_fewstep_noise_comes_from_the_generator():
    # Same seed -> same images; another seed -> other injected noise (the start noise alike) -> other images.
    ours, _ = _pair(9, "lcm")
    image, mask = make_product(seed=3)

    def run(seed):
        out = ours(PROMPTS[:1], image, mask, generator=torch.Generator().manual_seed(seed), num_inference_steps=4,
                   guidance_scale=1.0, output_type="np", composite=False, show_progress=False)
        return out[0].image

    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_short_names_and_step_limits():
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    from cg4ctr_fast.models.diffusion import check_steps, make_scheduler, max_inference_steps, swap_scheduler

    assert isinstance(make_scheduler("lcm"), LCMScheduler)
    assert isinstance(make_scheduler("TCD"), TCDScheduler)
    folder = DDIMScheduler(beta_start=0.001, beta_end=0.02, beta_schedule="linear", steps_offset=1)
    swapped = swap_scheduler(folder, "lcm")
    assert isinstance(swapped, LCMScheduler)
    assert torch.equal(swapped.alphas_cumprod, folder.alphas_cumprod)  # the folder's noise schedule is kept
    # LCM/TCD take their steps from the original_inference_steps (50) distillation schedule
    assert max_inference_steps(make_scheduler("lcm")) == 50
    check_steps(make_scheduler("lcm"), 4, 0.5)
    with pytest.raises(InputError, match="at most 50"):
        check_steps(make_scheduler("tcd"), 60)
