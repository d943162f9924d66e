"""Saliency and toy-generator trainers: short runs that must learn, and outputs that load."""
from __future__ import annotations

import json

import numpy as np
import torch

from cg4ctr_fast.models.saliency import load_saliency
from cg4ctr_fast.training.saliency import SaliencyTrainConfig, save_trained_saliency, train_saliency


def _rect_world(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 48, 48, 3), dtype=np.uint8)
    masks = np.zeros((n, 48, 48), bool)
    for i in range(n):
        x0, y0 = rng.integers(4, 20, 2)
        w, h = rng.integers(12, 24, 2)
        masks[i, y0 : y0 + h, x0 : x0 + w] = True
        images[i, masks[i]] = rng.integers(0, 256, 3)  # flat product on a noisy background
    return images, masks


def test_saliency_learns_products_and_round_trips(tmp_path):
    images, masks = _rect_world(60)
    cfg = SaliencyTrainConfig(size=48, steps=60, batch=8, seed=0)
    model, metrics = train_saliency(images, masks, cfg, progress=False)
    # An all-background guess scores IoU 0; a random map ≈ the product share (≈ 0.15). Learned: ≥ 0.5.
    assert metrics["test_iou"] >= 0.5, metrics
    assert metrics["test_mae"] < 0.3
    out = save_trained_saliency(model, metrics, tmp_path / "sal")
    assert json.loads((out / "config.json").read_text())["size"] == 48
    loaded = load_saliency(out / "saliency.safetensors")
    x = torch.rand(1, 3, 48, 48)
    assert torch.allclose(loaded(x), model(x))


def test_toy_generator_trains_and_loads(tmp_path):
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.training.base import BaseTrainConfig, CreativeSet, train_generator

    # Caption → background colour: "warm" red, "cool" blue; a gray product square in the middle.
    n = 48
    images = torch.zeros(n, 3, 64, 64)
    captions = []
    for i in range(n):
        warm = i % 2 == 0
        images[i, 0 if warm else 2] = 0.8
        images[i, :, 24:40, 24:40] = 0.0
        captions.append("warm" if warm else "cool")
    masks = torch.ones(n, 1, 64, 64)
    masks[:, :, 24:40, 24:40] = 0
    data = CreativeSet(images=images * 2 - 1, masks=masks, captions=captions)
    cfg = BaseTrainConfig(vae_steps=25, vae_batch=8, unet_steps=40, unet_batch=8, seed=0)
    metrics = train_generator(data, tmp_path / "gen", cfg, progress=False, log=lambda _: None)
    assert metrics["vae_steps"] == 25 and metrics["unet_steps"] == 40
    assert np.isfinite(metrics["unet_mse_last50"]) and metrics["scaling_factor"] > 0
    pipe = CreativePipeline.from_pretrained(str(tmp_path / "gen"))
    assert abs(pipe.components.info.scaling_factor - metrics["scaling_factor"]) < 1e-6
    from PIL import Image

    product = Image.fromarray(((images[0].permute(1, 2, 0).numpy()) * 255).astype(np.uint8))
    mask = Image.fromarray((masks[0, 0].numpy() * 255).astype(np.uint8))
    creative = pipe("warm", product, mask, num_inference_steps=2, show_progress=False)[0]
    keep = np.asarray(mask) < 128
    assert np.array_equal(np.asarray(creative.image)[keep], np.asarray(product)[keep])
