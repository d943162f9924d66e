"""Parity with diffusers' StableDiffusionInpaintPipeline on cases the tests do not use.

    python bench/parity_check.py

Runs the tiny preset with seeds, sizes, strengths and schedulers (UniPC, DEIS, PNDM, Euler-ancestral,
DPM-Solver++, DDIM) outside tests/test_parity.py and prints the max abs error of each against diffusers
on the same components and generator (composite off). Exits 1 if any exceeds 1e-4.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

CASES = [
    # (UNet channels, scheduler, seed, (width, height), guidance, strength)
    (9, "unipc", 12345, (80, 56), 6.0, 1.0),
    (4, "DEISMultistepScheduler", 777, (72, 40), 3.0, 0.7),
    (9, "pndm", 31, (64, 64), 7.5, 0.5),
    (4, "euler-a", 5, (48, 80), 5.0, 1.0),
    (9, "dpm++", 99, (96, 64), 2.0, 0.9),
    (4, "ddim", 2024, (56, 56), 1.0, 1.0),
]
TOL = 1e-4


def product_image(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.full((height, width), 255, np.uint8)
    pixels[height // 3 : 5 * height // 6, width // 4 : 3 * width // 4] = rng.integers(0, 256, 3, dtype=np.uint8)
    mask[height // 3 : 5 * height // 6, width // 4 : 3 * width // 4] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)


def main() -> int:
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline
    from cg4ctr_fast.pipeline import CreativePipeline

    worst = 0.0
    for channels, scheduler, seed, (width, height), guidance, strength in CASES:
        ours = CreativePipeline.from_preset("tiny", unet_in_channels=channels, scheduler=scheduler, seed=seed % 7)
        reference = diffusers_inpaint_pipeline(ours.components.modules)
        image, mask = product_image(width, height, seed)
        kwargs = dict(num_inference_steps=6, guidance_scale=guidance, strength=strength, height=height, width=width)
        got = np.stack([c.image for c in ours(["p one", "p two"], image, mask, output_type="np", composite=False,
                                              show_progress=False, generator=torch.Generator().manual_seed(seed),
                                              **kwargs)])
        expected = reference(["p one", "p two"], image=image, mask_image=mask, output_type="np",
                             generator=torch.Generator().manual_seed(seed), **kwargs).images
        err = float(np.abs(got - expected).max())
        worst = max(worst, err)
        print(f"{channels}-ch {scheduler:24s} seed {seed:6d} {width}x{height} g={guidance} s={strength}: {err:.2e}")
    print(f"worst max abs error {worst:.2e} (tolerance {TOL})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
