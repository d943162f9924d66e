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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The SMALL toy models, trained once for this module's tests (the demo reuses them)."""
    root = tmp_path_factory.mktemp("toy-cache")
    build_toy_models(SMALL, cache=root, progress=False, log=lambda _m: None)
    return root


def test_demo_end_to_end(tmp_path, cache):
    out = tmp_path / "demo"
    summary = run_demo(out, steps=2, quiet=True, n_products=2, images_per_group=2, cache=cache, config=SMALL)
    files = {p.name for p in out.iterdir()}
    assert {"contact_sheet.png", "ctr_by_group.png", "creatives.json", "report.md", "product0.png",
            "product1.png"} <= files
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

    models = build_toy_models(SMALL, cache=cache, progress=False, log=lambda _m: None)
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
    assert report.index("## Aggregate true-CTR lift") < report.index("## Object expansion") < report.index("## Per group")
    assert "![true CTR per group](ctr_by_group.png)" in report and meta["plots"] == ["ctr_by_group.png"]
    assert set(summary["by_group"]) == {str(g) for g in range(8)}
    _check_sheet(out, meta)
    _check_expansion(meta)
    # The second build reuses every cached model.
    messages = []
    build_toy_models(SMALL, cache=cache, progress=False, log=messages.append)
    assert messages == []


def _check_sheet(out, meta):
    """One row per product: the original, then what each group is served, each tile 3x its 64 px (nearest),
    with text (dark pixels) in the band below it."""
    from cg4ctr_fast.cli.demo import SHEET_CELL, SHEET_LINE_PX, SHEET_PAD

    n_products = len({s["product"] for s in meta["selections"]})
    cell, pad, text_h, title_h = SHEET_CELL, SHEET_PAD, 3 * SHEET_LINE_PX + 4, SHEET_LINE_PX + 2 * SHEET_PAD
    sheet = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    assert sheet.shape == (title_h + n_products * (cell + text_h + pad) + pad, 9 * (cell + pad) + pad, 3)
    for s in meta["selections"]:
        column = 1 + s["group"]  # group ids 0..7 in column order after the original
        top, left = title_h + pad + s["product"] * (cell + text_h + pad), pad + column * (cell + pad)
        served = out / (f"product{s['product']}.png" if s["kept_original"] else s["served"])
        want = np.asarray(Image.open(served).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST))
        assert np.array_equal(sheet[top:top + cell, left:left + cell], want)
        label = sheet[top + cell:top + cell + text_h, left:left + cell]
        assert (label.min(axis=2) < 100).sum() > 50  # the group / CTR text is drawn
    first = np.asarray(Image.open(out / "product0.png").convert("RGB").resize((cell, cell), Image.Resampling.NEAREST))
    assert np.array_equal(sheet[title_h + pad:title_h + pad + cell, pad:pad + cell], first)


def _check_expansion(meta):
    records = meta["creatives"]
    values = np.array([r["object_expansion"] for r in records])
    assert ((values >= 0) & (values <= 1)).all()
    e = meta["object_expansion"]
    assert e["creatives"] == len(records) and e["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert e["max"] == values.max() and e["zero"] == int((values == 0).sum())
    for s in meta["selections"]:
        chosen = [r for r in records if r["product"] == s["product"] and r["group"] == s["group"] and r["chosen"]]
        assert s["served_object_expansion"] == (chosen[0]["object_expansion"] if chosen else 0.0)


def test_demo_is_deterministic_and_drops_creatives_above_max_expansion(tmp_path, cache):
    """Same request twice: the same creatives.json (run time aside) and the same contact sheet. Then with
    max_expansion = the second-largest E, every creative above it is dropped from selection."""
    kwargs = dict(steps=2, quiet=True, n_products=1, images_per_group=2, cache=cache, config=SMALL)
    run_demo(tmp_path / "a", **kwargs)
    run_demo(tmp_path / "b", **kwargs)
    a, b = (json.loads((tmp_path / name / "creatives.json").read_text()) for name in "ab")
    assert a.pop("seconds") > 0 and b.pop("seconds") > 0
    assert a == b
    sheets = [np.asarray(Image.open(tmp_path / name / "contact_sheet.png")) for name in "ab"]
    assert np.array_equal(*sheets)

    values = [r["object_expansion"] for r in a["creatives"]]
    # The threshold: the second-largest distinct E, so some creatives are dropped and some are not. (The median
    # would not do: E counts pixels, and half the creatives can share the largest value.)
    distinct = sorted(set(values))
    assert len(distinct) >= 2, values
    threshold = float(distinct[-2])
    assert min(values) <= threshold < max(values)
    c = run_demo(tmp_path / "c", max_expansion=threshold, **kwargs)
    assert c["object_expansion"]["max_expansion"] == threshold
    dropped = [r for r in c["creatives"] if r["dropped_for_expansion"]]
    assert len(dropped) == sum(v > threshold for v in values) == c["object_expansion"]["dropped"] > 0
    assert not any(r["chosen"] for r in dropped)
    for s in c["selections"]:
        group = [r for r in c["creatives"] if r["group"] == s["group"]]
        allowed = [r for r in group if not r["dropped_for_expansion"]]
        best = max(allowed, key=lambda r: r["reward"], default=None)
        if best is None or best["reward"] <= s["original_reward"]:
            assert s["kept_original"]
        else:
            assert s["served"] == best["file"]
    # Same creatives, fewer candidates: the pixels and E do not depend on the threshold.
    assert [r["object_expansion"] for r in c["creatives"]] == values
    assert "dropped" in (tmp_path / "c" / "report.md").read_text()
    with pytest.raises(ValueError, match="max_expansion"):
        run_demo(tmp_path / "d", max_expansion=1.5, **kwargs)
