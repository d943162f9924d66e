"""The main job end to end on a small configuration: toy models built and cached, then the demo folder."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cg4ctr_fast.cli.demo import run_demo
from cg4ctr_fast.training.base import BaseTrainConfig
from cg4ctr_fast.training.saliency import SaliencyTrainConfig
from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig, build_toy_models

SMALL = ToyConfig(
    products=8, creatives_per_product=4, days=3,
    generator=BaseTrainConfig(n_images=64, vae_steps=10, vae_batch=8, unet_steps=20, unet_batch=8),
    saliency=SaliencyTrainConfig(steps=30, batch=8), saliency_images=60,
    reward_epochs=1, prompt_epochs=5, eval_items=1, steering_images=2, steering_steps=2,
)


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, steps=2, quiet=True, n_products=2, images_per_group=2, cache=tmp_path / "cache",
                       config=SMALL)
    files = {p.name for p in out.iterdir()}
    assert {"contact_sheet.png", "creatives.json", "report.md", "product0.png", "product1.png"} <= files
    meta = json.loads((out / "creatives.json").read_text())
    assert len(meta["creatives"]) == 2 * 8 * 2  # products × groups × images per group
    chosen = [r for r in meta["creatives"] if r["chosen"]]
    assert len(chosen) == 2 * 8  # one per (product, group)
    for record in meta["creatives"]:
        assert 0 < record["true_ctr"] < 1 and 0 < record["original_true_ctr"] < 1
        assert record["reward"] is not None and record["item_id"] >= HELD_OUT_ITEM_BASE
        assert len(record["prompt"].split()) == 4
    # Each group's chosen creative has the highest reward among its group's creatives for that product.
    for r in chosen:
        group = [x for x in meta["creatives"] if x["product"] == r["product"] and x["group"] == r["group"]]
        assert r["reward"] == max(x["reward"] for x in group)
    report = (out / "report.md").read_text()
    assert "lift" in report and "| reward |" in report
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > sheet.height  # 2 rows, 1 + 8 columns
    assert set(summary["mean_true_ctr_lift_of_chosen_by_group"]) == {str(g) for g in range(8)}
    # The second build reuses every cached model.
    messages = []
    build_toy_models(SMALL, cache=tmp_path / "cache", progress=False, log=messages.append)
    assert messages == []
