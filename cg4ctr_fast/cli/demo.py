"""`cg4ctr demo`: the whole system on the embedded default, on a laptop CPU.

The toy models (generator, saliency, reward, prompt) are trained on the synthetic ad world on first use
and cached; then held-out products go through saliency → prompt model → one batched generation per
product → reward → top creative per group, scored by the world's oracle. Writes creatives, a contact
sheet, creatives.json and report.md.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

def draw_product(size: int = 64, seed: int = 0) -> Image.Image:
    """A bottle-like product on a transparent background: the alpha channel is the exact product mask."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    body = tuple(int(c) for c in rng.integers(40, 220, 3)) + (255,)
    cap = tuple(int(c) for c in rng.integers(0, 255, 3)) + (255,)
    s = size / 64
    draw.rounded_rectangle([22 * s, 22 * s, 42 * s, 56 * s], radius=int(5 * s), fill=body)
    draw.rectangle([28 * s, 12 * s, 36 * s, 22 * s], fill=body)
    draw.rectangle([27 * s, 8 * s, 37 * s, 13 * s], fill=cap)
    draw.rectangle([24 * s, 32 * s, 40 * s, 42 * s], fill=(245, 245, 235, 255))  # label
    return image


def contact_sheet(rows: list[list[Image.Image]], cell: int = 128, pad: int = 4) -> Image.Image:
    n_cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (n_cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            tile = img.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (pad + c * (cell + pad), pad + r * (cell + pad)))
    return sheet


def run_demo(
    out: Path,
    *,
    steps: int = 20,
    seed: int = 0,
    quiet: bool = False,
    n_products: int = 4,
    images_per_group: int = 4,
    cache: Optional[Path] = None,
    config=None,
) -> dict:
    """Build (or reuse) the toy models, then for held-out products × all user groups: prompt model →
    one batched generation per product → reward model → the top creative per group, scored by the
    world's oracle against the original image."""
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig, build_toy_models, item_features_for

    started = time.perf_counter()
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    models = build_toy_models(config or ToyConfig(seed=seed), cache=cache, progress=not quiet, log=say)
    dataset = load_dataset(models.world)
    world = dataset.world
    saliency_cfg = json.loads((models.saliency / "config.json").read_text())
    pipe = CreativePipeline.from_pretrained(
        str(models.generator), saliency=str(models.saliency / "saliency.safetensors"),
        saliency_size=saliency_cfg["size"], saliency_threshold=saliency_cfg["threshold"],
    )
    reward = RewardModel.load(models.reward)
    prompt_model = PromptModel.load(models.prompt)
    group_ids = [g["group_id"] for g in dataset.groups]
    group_features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in dataset.groups])
    group_names = [f"{g['age_band']} {g['gender']} {g['region']} {g['interest']}" for g in dataset.groups]

    records, rows, lifts, saliency_ious = [], [], {g: [] for g in group_ids}, []
    results = []
    for k in range(n_products):
        item_id = HELD_OUT_ITEM_BASE + k
        product = world.product(item_id)
        item = item_features_for(world, item_id, dataset.items)
        prompts = prompt_model.propose(group_features, np.repeat(item[None], len(group_ids), axis=0))
        pipe.reward = reward.pipeline_scorer(group_features, title=product.title, captions=prompts)
        say(f"[demo] product {k + 1}/{n_products}: {product.title}, {len(prompts)} groups × {images_per_group}")
        # No mask passed: the saliency net finds the product in the photo.
        creatives = pipe(prompts, product.image, None, num_inference_steps=steps, seed=seed,
                         num_images_per_prompt=images_per_group, show_progress=not quiet)
        exact = np.asarray(product.mask) < 128
        found = np.asarray(creatives[0].mask) < 128
        saliency_ious.append(float((exact & found).sum() / max(1, (exact | found).sum())))
        keep = found
        original_pixels = np.asarray(product.image)
        for c in creatives:
            if not np.array_equal(np.asarray(c.image)[keep], original_pixels[keep]):
                raise RuntimeError("product pixels changed in a creative")  # the composite guarantees this
        results.append((item_id, product, prompts, creatives))

    with atomic_dir(out) as tmp:
        for k, (item_id, product, prompts, creatives) in enumerate(results):
            product.image.save(tmp / f"product{k}.png")
            row = [product.image]
            for g_index, group_id in enumerate(group_ids):
                group_creatives = [c for c in creatives if c.group == g_index]
                best = max(group_creatives, key=lambda c: c.reward)
                original_ctr = world.true_ctr(product.image, group_id, item_id=item_id)
                for c in group_creatives:
                    name = f"product{k}_group{group_id}_{c.index}.png"
                    c.image.save(tmp / name)
                    true_ctr = world.true_ctr(c.image, group_id, item_id=item_id)
                    records.append({
                        "file": name, "product": k, "item_id": item_id, "title": product.title,
                        "group": group_id, "group_name": group_names[g_index], "prompt": c.prompt,
                        "seed": c.seed, "reward": c.reward, "chosen": c is best,
                        "true_ctr": true_ctr, "original_true_ctr": original_ctr,
                    })
                    if c is best:
                        lifts[group_id].append(true_ctr / original_ctr - 1.0)
                row.append(best.image)
            rows.append(row)
        contact_sheet(rows).save(tmp / "contact_sheet.png")
        summary = {
            "model_root": str(models.root),
            "steps": steps,
            "images_per_group": images_per_group,
            "seconds": round(time.perf_counter() - started, 2),
            "saliency_iou_on_demo_products": float(np.mean(saliency_ious)),
            "mean_true_ctr_lift_of_chosen_by_group": {str(g): float(np.mean(v)) for g, v in lifts.items()},
            "creatives": records,
        }
        (tmp / "creatives.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "report.md").write_text(demo_report(summary, models, group_names, group_ids, records))
    return summary


def demo_report(summary: dict, models, group_names, group_ids, records) -> str:
    def load(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    reward = load(models.reward / "metrics.json").get("test", {})
    prompt = load(models.prompt / "metrics.json")
    saliency = load(models.saliency / "metrics.json")
    steering = load(models.generator / "steering.json")
    lines = [
        "# cg4ctr_fast demo",
        "",
        "Held-out products (never in the logs or the training sets) × every user group of the synthetic ad",
        "world: the prompt model writes one prompt per group, the toy generator repaints the background in",
        f"one batched loop per product ({summary['images_per_group']} images per group), the reward model",
        "picks the top creative per group, and the world's oracle scores it against the original image.",
        "The world is synthetic: these numbers say the machinery works, not what real users would do.",
        "",
        "![contact sheet](contact_sheet.png)",
        "",
        "Rows: products; first column: the original; then each group's chosen creative.",
        "",
        "## Mean true-CTR lift of the chosen creative over the original, per group",
        "",
        "| group | who | chosen creative's CTR | original's CTR | lift |",
        "|---:|---|---:|---:|---:|",
    ]
    for g_index, group_id in enumerate(group_ids):
        chosen = [r for r in records if r["group"] == group_id and r["chosen"]]
        ctr = float(np.mean([r["true_ctr"] for r in chosen]))
        base = float(np.mean([r["original_true_ctr"] for r in chosen]))
        lift = summary["mean_true_ctr_lift_of_chosen_by_group"][str(group_id)]
        lines.append(f"| {group_id} | {group_names[g_index]} | {ctr:.2%} | {base:.2%} | {lift:+.1%} |")
    everything = [r["true_ctr"] / r["original_true_ctr"] - 1 for r in records]
    chosen_all = [r["true_ctr"] / r["original_true_ctr"] - 1 for r in records if r["chosen"]]
    lines += [
        "",
        f"Mean lift of the reward model's choice: {np.mean(chosen_all):+.1%}; of all generated creatives: "
        f"{np.mean(everything):+.1%} (the difference is what ranking adds).",
        "",
        "## Models",
        "",
        "| model | held-out metrics |",
        "|---|---|",
    ]
    if reward:
        lines.append(
            "| reward | " + ", ".join(
                f"{k} {reward[k]:.3f}" for k in ("auc", "logloss", "ne", "calibration", "pairwise_accuracy",
                                                 "uplift_at_1", "uplift_at_5") if isinstance(reward.get(k), float)
            ) + " |"
        )
    if prompt:
        lines.append(
            f"| prompt | oracle-token agreement {prompt.get('oracle_token_agreement_mean', float('nan')):.2f} "
            f"(chance 0.17); proposal CTR / best caption's {prompt.get('proposal_ctr_over_best_caption_ctr', float('nan')):.2f} |"
        )
    if saliency:
        lines.append(
            f"| saliency | IoU {saliency.get('test_iou', float('nan')):.3f}, MAE {saliency.get('test_mae', float('nan')):.3f}; "
            f"on the demo products IoU {summary['saliency_iou_on_demo_products']:.3f} |"
        )
    for name, row in steering.items():
        lines.append(
            f"| generator steering {name} | {row['feature']}: {row['mean_a']:.3f} vs {row['mean_b']:.3f}, "
            f"Cohen's d {row['cohens_d']:+.2f} |"
        )
    lines += ["", f"Run time: {summary['seconds']:.0f} s. Models: `{summary['model_root']}`.", ""]
    return "\n".join(lines)
