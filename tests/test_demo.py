"""The main job end to end on a small configuration: toy models built and cached, then the demo folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
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
    for record in meta["creatives"]:
        assert 0 < record["true_ctr"] < 1 and 0 < record["original_true_ctr"] < 1
        assert record["reward"] is not None and record["item_id"] >= HELD_OUT_ITEM_BASE
        assert len(record["prompt"].split()) == 4
    # The original photo is always a candidate: per (product, group) the top creative is served only when the
    # reward model scores it above the photo; otherwise nothing is "chosen" and the photo is served.
    selections = meta["selections"]
    assert len(selections) == 2 * 8
    for s in selections:
        group = [x for x in meta["creatives"] if x["product"] == s["product"] and x["group"] == s["group"]]
        chosen = [x for x in group if x["chosen"]]
        best = max(x["reward"] for x in group)
        assert s["best_generated_reward"] == best and all(x["original_reward"] == s["original_reward"] for x in group)
        if best > s["original_reward"]:
            assert not s["kept_original"] and len(chosen) == 1 and chosen[0]["reward"] == best
            assert s["served"] == chosen[0]["file"] and s["true_ctr"] == chosen[0]["true_ctr"]
        else:
            assert s["kept_original"] and not chosen and s["served"] == "original"
            assert s["true_ctr"] == s["original_true_ctr"]
    kept = sum(s["kept_original"] for s in selections)
    assert meta["original_kept"] == {"count": kept, "of": 16, "share": kept / 16}
    # The headline is the aggregate lift: Σ traffic·CTR served / Σ traffic·CTR original − 1, with the world's
    # group shares; the mean of per-cell ratios is reported beside it.
    from cg4ctr_fast.sim import load_dataset

    models = build_toy_models(SMALL, cache=tmp_path / "cache", progress=False, log=lambda _m: None)
    traffic = load_dataset(models.world).world.group_traffic()
    w = np.array([traffic[s["group"]] for s in selections])
    served = np.array([s["true_ctr"] for s in selections])
    base = np.array([s["original_true_ctr"] for s in selections])
    head = meta["aggregate_true_ctr_lift"]
    assert head["lift"] == pytest.approx((w * served).sum() / (w * base).sum() - 1, rel=1e-12)
    assert head["mean_of_ratios"] == pytest.approx(np.mean(served / base - 1), rel=1e-12)
    assert head["clusters"] == 2 and head["ci95"][0] <= head["ci95"][1]
    assert summary["aggregate_true_ctr_lift"] == head
    report = (out / "report.md").read_text()
    assert "Aggregate true-CTR lift" in report and f"{head['lift']:+.1%}" in report and "| reward |" in report
    assert report.index("Aggregate true-CTR lift") < report.index("mean of ratios")
    assert f"kept in {kept} of 16" in report
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > sheet.height  # 2 rows, 1 + 8 columns
    assert set(summary["by_group"]) == {str(g) for g in range(8)}
    # The second build reuses every cached model.
    messages = []
    build_toy_models(SMALL, cache=tmp_path / "cache", progress=False, log=messages.append)
    assert messages == []
