"""`cg4ctr demo`: the whole system on the embedded default, on a laptop CPU.

The toy models (generator, saliency, reward, prompt) ship with the package (cg4ctr_fast/assets/toy, written
by `cg4ctr-train toy`); with `--retrain` or another seed they are trained on the synthetic ad world and
cached instead (training.toy.build_toy_models). Then held-out products go through saliency → prompt model → one batched generation per
product → reward → per group the top creative, served only when the reward model scores it above the
original photo (always a candidate), scored by the world's oracle. The headline is the aggregate true-CTR
lift an A/B test would measure (groups weighted by their traffic); the mean of per-group ratios is
secondary. Every creative's object expansion (training.metrics.object_expansion: salient area of the output
outside the input's product mask, a fraction of the image) is measured with the saliency net; selection can
drop creatives above a threshold (`max_expansion`). Writes the creatives, contact_sheet.png (one row per
product: the original, then what each group is served, labelled with the group and its true CTR against the
original's), ctr_by_group.png (per group, the original's true CTR against the served creative's),
creatives.json and report.md.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Contact-sheet geometry: the demo's 64-px creatives are drawn 3x (nearest neighbour, so the pixels stay
# the model's) in 192-px cells, with 3 text lines of 15 px below each: 9 columns of 200 px = 1,808 px wide,
# which a person reads at 100 % on a laptop screen.
SHEET_CELL = 192
SHEET_FONT_PX = 13
SHEET_LINE_PX = 15
SHEET_PAD = 8

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


def _font(size: int = SHEET_FONT_PX):
    """Pillow's default font: the scalable one at `size` px where FreeType is built in, else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def labelled_contact_sheet(rows: list[list[tuple[Image.Image, list[tuple[str, tuple[int, int, int]]]]]],
                           title: str = "", cell: int = SHEET_CELL, pad: int = SHEET_PAD) -> Image.Image:
    """A contact sheet with text under every tile: rows of (image, [(line, rgb colour), ...]).

    Each image is resized to cell x cell px (nearest neighbour: a 64-px creative at 192 px shows its own
    pixels); the lines are drawn below it in Pillow's default font, `title` on a band above all rows.
    Returns an RGB image of (columns·(cell + pad) + pad) x (title band + rows·(cell + text + pad) + pad) px.
    """
    font = _font()
    n_lines = max((len(lines) for row in rows for _, lines in row), default=0)
    text_h = n_lines * SHEET_LINE_PX + 4
    title_h = SHEET_LINE_PX + 2 * pad if title else 0
    n_cols = max((len(row) for row in rows), default=1)
    width = n_cols * (cell + pad) + pad
    height = title_h + len(rows) * (cell + text_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        top = title_h + pad + r * (cell + text_h + pad)
        for c, (image, lines) in enumerate(row):
            left = pad + c * (cell + pad)
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (left, top))
            for k, (line, colour) in enumerate(lines):
                draw.text((left, top + cell + 2 + k * SHEET_LINE_PX), line, fill=colour, font=font)
    return sheet


def plot_ctr_by_group(by_group: dict, selections: list[dict], path: Path, title: str = "") -> bool:
    """ctr_by_group.png: per user group, the original photo's true CTR against the served creative's.

    Bars: means over the products (`by_group` of `run_demo`'s summary, CTR as %); dots: each product.
    Written with matplotlib's Agg backend; returns False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:  # matplotlib is optional ([train] extra); creatives.json holds the numbers
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(by_group)
    x = np.arange(len(groups), dtype=np.float64)
    width = 0.38
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=100)
    original = [100 * by_group[g]["original_true_ctr"] for g in groups]
    served = [100 * by_group[g]["served_true_ctr"] for g in groups]
    ax.bar(x - width / 2, original, width, color="#9e9e9e", label="original photo")
    ax.bar(x + width / 2, served, width, color="#1f77b4", label="served (chosen creative, or the photo if kept)")
    for i, g in enumerate(groups):
        mine = [s for s in selections if str(s["group"]) == g]
        ax.scatter(np.full(len(mine), x[i] - width / 2), [100 * s["original_true_ctr"] for s in mine],
                   s=12, color="#424242", zorder=3)
        ax.scatter(np.full(len(mine), x[i] + width / 2), [100 * s["true_ctr"] for s in mine],
                   s=12, color="#0d3d66", zorder=3)
        lift = by_group[g]["aggregate_lift"]
        top = max([served[i], original[i]] + [100 * s["true_ctr"] for s in mine]
                  + [100 * s["original_true_ctr"] for s in mine])
        ax.annotate(f"{lift:+.0%}", (x[i], top), textcoords="offset points", xytext=(0, 5), ha="center",
                    fontsize=8, color="#2e7d32" if lift > 0 else "#c62828" if lift < 0 else "#616161")
    ax.set_xticks(x, [f"g{g}\n{by_group[g]['name'].replace(' ', chr(10), 1)}\n{by_group[g]['traffic']:.0%} traffic"
                      for g in groups], fontsize=7)
    ax.set_ylabel("true CTR (%); dots: each product")
    ax.set_ylim(0, 1.12 * ax.get_ylim()[1])
    ax.set_title(title or "true CTR per user group: original photo vs served creative", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def _group_label(group_id: int, name: str) -> str:
    age, gender, region, interest = (name.split(" ") + ["", "", "", ""])[:4]
    return f"g{group_id} {age} {gender[:1]} {region} {interest}"


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
    max_expansion: Optional[float] = None,
    retrain: bool = False,
) -> dict:
    """Build (or reuse) the toy models, then for held-out products × all user groups: prompt model →
    one batched generation per product → reward model → per group the top creative, served only when its
    reward is above the original photo's (`pick_over_original`) → the world's oracle scores what is served
    against the original.

    Returns the summary written to creatives.json: `aggregate_true_ctr_lift` (the A/B-test figure: Σ w·CTR
    served / Σ w·CTR original − 1 over (product, group), w = the group's traffic share, with a cluster-
    bootstrap CI over products and the mean of per-cell ratios beside it), `original_kept`, the same
    aggregate for other policies (`policies`), per-group rows (`by_group`), one row per (product, group)
    (`selections`) and one per creative (`creatives`), each with its `object_expansion` E (a fraction of
    the image: salient pixels of the creative, by the saliency net, outside the product mask the pipeline
    kept), summarised in `object_expansion`. Fractions, not percent.

    max_expansion: None (default) keeps every creative a candidate; a fraction of the image in [0, 1]:
    creatives with E above it are dropped from selection (`pick_over_original(max_expansion=...)`), so a
    group whose every creative grew the product keeps the original. Raises ValueError outside [0, 1].

    Models: the set shipped with the package when `config` is its configuration (the default, seed 0) and
    neither `cache` nor `retrain` is given (nothing is trained); otherwise `build_toy_models` into the cache
    (trains what is not cached yet).
    """
    if max_expansion is not None and not 0.0 <= float(max_expansion) <= 1.0:
        raise ValueError(f"max_expansion must be a fraction in [0, 1], got {max_expansion!r}")
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift, object_expansion, pick_over_original
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig, item_features_for
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    started = time.perf_counter()
    say = (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    models = resolve_toy_models(config or ToyConfig(seed=seed), cache=cache, retrain=retrain, progress=not quiet,
                                log=say)
    dataset = load_dataset(models.world)
    world = dataset.world
    traffic = world.group_traffic()
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

    records, selections, rows, saliency_ious = [], [], [], []
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
        # The photo is a candidate too: scored for every group, with no caption (no prompt made it).
        original_rewards = reward.score_images([product.image] * len(group_ids), [product.title] * len(group_ids),
                                               [""] * len(group_ids), group_features)
        exact = np.asarray(product.mask) < 128
        found = np.asarray(creatives[0].mask) < 128
        saliency_ious.append(float((exact & found).sum() / max(1, (exact | found).sum())))
        keep = found
        original_pixels = np.asarray(product.image)
        for c in creatives:
            if not np.array_equal(np.asarray(c.image)[keep], original_pixels[keep]):
                raise RuntimeError("product pixels changed in a creative")  # the composite guarantees this
        # Object expansion of each creative, against the product mask the pipeline kept (the saliency net's
        # own region on the photo at 64 px, where the scaled dilation is 0): an unchanged photo scores 0.
        expansions = [object_expansion(pipe.saliency, c.image, c.mask) for c in creatives]
        results.append((item_id, product, prompts, creatives, original_rewards, expansions))

    with atomic_dir(out) as tmp:
        for k, (item_id, product, prompts, creatives, original_rewards, expansions) in enumerate(results):
            product.image.save(tmp / f"product{k}.png")
            row = [(product.image, [(f"product {k}: original", (0, 0, 0)),
                                    (product.title[:30], (0, 0, 0)),
                                    ("'vs': this photo's CTR", (110, 110, 110))])]
            original_ctr = world.true_ctr_groups(product.image, item_id=item_id)
            expansion_of = {(c.group, c.index): e for c, e in zip(creatives, expansions)}
            for g_index, group_id in enumerate(group_ids):
                group_creatives = [c for c in creatives if c.group == g_index]
                group_expansions = [expansion_of[(c.group, c.index)] for c in group_creatives]
                pick = pick_over_original([c.reward for c in group_creatives], float(original_rewards[g_index]),
                                          expansions=group_expansions, max_expansion=max_expansion)
                chosen = None if pick is None else group_creatives[pick]
                best = max(group_creatives, key=lambda c: c.reward)
                base = float(original_ctr[group_id])
                ctrs = {}
                for c in group_creatives:
                    name = f"product{k}_group{group_id}_{c.index}.png"
                    c.image.save(tmp / name)
                    ctrs[c.index] = world.true_ctr(c.image, group_id, item_id=item_id)
                    records.append({
                        "file": name, "product": k, "item_id": item_id, "title": product.title,
                        "group": group_id, "group_name": group_names[g_index], "prompt": c.prompt,
                        "seed": c.seed, "reward": c.reward, "original_reward": float(original_rewards[g_index]),
                        "chosen": c is chosen, "true_ctr": ctrs[c.index], "original_true_ctr": base,
                        "object_expansion": expansion_of[(c.group, c.index)],
                        "dropped_for_expansion": (max_expansion is not None
                                                  and not expansion_of[(c.group, c.index)] <= max_expansion),
                    })
                served_ctr = base if chosen is None else ctrs[chosen.index]
                selections.append({
                    "product": k, "item_id": item_id, "group": group_id, "traffic": float(traffic[group_id]),
                    "served": "original" if chosen is None else f"product{k}_group{group_id}_{chosen.index}.png",
                    "kept_original": chosen is None, "original_reward": float(original_rewards[g_index]),
                    "best_generated_reward": best.reward, "true_ctr": served_ctr, "original_true_ctr": base,
                    "best_generated_true_ctr": ctrs[best.index],
                    "mean_generated_true_ctr": float(np.mean(list(ctrs.values()))),
                    "oracle_best_true_ctr": max(base, *ctrs.values()),
                    "served_object_expansion": 0.0 if chosen is None else expansion_of[(chosen.group, chosen.index)],
                })
                ratio = served_ctr / base - 1.0
                colour = (0, 110, 0) if ratio > 0 else (170, 0, 0) if ratio < 0 else (90, 90, 90)
                what = "original kept" if chosen is None else f"creative {chosen.index}"
                row.append((product.image if chosen is None else chosen.image, [
                    (_group_label(group_id, group_names[g_index])[:30], (0, 0, 0)),
                    (f"CTR {served_ctr:.2%} vs {base:.2%}", (0, 0, 0)),
                    (f"{ratio:+.1%}  {what}", colour),
                ]))
            rows.append(row)
        labelled_contact_sheet(
            rows, title="Each row: a held-out product, then what each user group is served. "
                        "CTR: true CTR of what is served vs the original photo's, for that group (synthetic world)."
        ).save(tmp / "contact_sheet.png")

        def lift(column: str, cells=selections, clusters=True):
            return aggregate_ctr_lift([r[column] for r in cells], [r["original_true_ctr"] for r in cells],
                                      [r["traffic"] for r in cells],
                                      clusters=[r["product"] for r in cells] if clusters else None, seed=seed)

        by_group = {}
        for g_index, group_id in enumerate(group_ids):
            mine = [r for r in selections if r["group"] == group_id]
            cell = lift("true_ctr", mine, clusters=False)
            by_group[str(group_id)] = {
                "name": group_names[g_index], "traffic": float(traffic[group_id]),
                "served_true_ctr": cell.treatment_ctr, "original_true_ctr": cell.control_ctr,
                "aggregate_lift": cell.lift, "mean_of_ratios": cell.mean_of_ratios,
                "original_kept": int(sum(r["kept_original"] for r in mine)), "products": len(mine),
            }
        kept = int(sum(r["kept_original"] for r in selections))
        all_e = np.array([r["object_expansion"] for r in records], dtype=np.float64)
        served_e = np.array([r["object_expansion"] for r in records if r["chosen"]], dtype=np.float64)
        expansion = {
            "definition": ("E = area(saliency net's region on the creative ∪ input product mask) − area(input "
                           "product mask), a fraction of the image; input mask: the product pixels the pipeline kept"),
            "max_expansion": max_expansion,
            "creatives": int(all_e.size), "mean": float(all_e.mean()), "median": float(np.median(all_e)),
            "p90": float(np.quantile(all_e, 0.9)), "max": float(all_e.max()),
            "zero": int((all_e == 0).sum()),
            "served": int(served_e.size),
            "served_mean": float(served_e.mean()) if served_e.size else 0.0,
            "served_max": float(served_e.max()) if served_e.size else 0.0,
            "dropped": int(sum(r["dropped_for_expansion"] for r in records)),
        }
        summary = {
            "model_root": str(models.root),
            "steps": steps,
            "images_per_group": images_per_group,
            "seconds": round(time.perf_counter() - started, 2),
            "saliency_iou_on_demo_products": float(np.mean(saliency_ious)),
            "lift_definition": ("aggregate true CTR of what is served / aggregate true CTR of the original − 1, "
                                "aggregate = Σ traffic·CTR / Σ traffic over (product, group), products weighted "
                                "equally, groups by World.group_traffic(); CI: cluster bootstrap over products"),
            "aggregate_true_ctr_lift": lift("true_ctr").to_dict(),
            "original_kept": {"count": kept, "of": len(selections), "share": kept / len(selections)},
            "policies": {
                "best_generated_without_the_original": lift("best_generated_true_ctr").to_dict(),
                "any_generated_creative": lift("mean_generated_true_ctr").to_dict(),
                "oracle_best_candidate": lift("oracle_best_true_ctr").to_dict(),
            },
            "object_expansion": expansion,
            "by_group": by_group,
            "selections": selections,
            "creatives": records,
        }
        head = summary["aggregate_true_ctr_lift"]
        summary["plots"] = ["ctr_by_group.png"] if plot_ctr_by_group(
            by_group, selections, tmp / "ctr_by_group.png",
            title=f"True CTR per user group over {n_products} held-out products: original photo vs served "
                  f"(aggregate lift {head['lift']:+.1%})") else []
        (tmp / "creatives.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "report.md").write_text(demo_report(summary, models))
    return summary


def demo_report(summary: dict, models) -> str:
    """report.md: the aggregate lift of each policy (selection first), the original-kept count, per group,
    then the models' held-out metrics. `summary` is what `run_demo` returns."""
    def load(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    def with_ci(cell: dict) -> str:
        low, high = cell["ci95"]
        return f"{cell['lift']:+.1%} [{low:+.1%}, {high:+.1%}]"

    reward = load(models.reward / "metrics.json").get("test", {})
    prompt = load(models.prompt / "metrics.json")
    saliency = load(models.saliency / "metrics.json")
    steering = load(models.generator / "steering.json")
    vae = load(models.generator / "vae_eval.json")
    head = summary["aggregate_true_ctr_lift"]
    kept = summary["original_kept"]
    n_products = len({r["product"] for r in summary["selections"]})
    lines = [
        "# cg4ctr_fast demo",
        "",
        "Held-out products (never in the logs or the training sets) × every user group of the synthetic ad",
        "world: the prompt model writes one prompt per group, the toy generator repaints the background in",
        f"one batched loop per product ({summary['images_per_group']} images per group), the reward model",
        "scores every creative and the original photo, and per group the top creative is served only when",
        "the reward model scores it above the photo (otherwise the photo is kept). The world's oracle gives",
        "the true CTR of what is served and of the photo.",
        "The world is synthetic: these numbers say the machinery works, not what real users would do.",
        "",
        "## Aggregate true-CTR lift over the original photo",
        "",
        "As an A/B test measures it: total clicks / total impressions, each group weighted by its share of",
        "the traffic, products equally. 95 % interval: cluster bootstrap over the "
        f"{n_products} products (few clusters: a rough interval).",
        "",
        "| policy | aggregate CTR | aggregate lift [95 % CI] | mean of per-cell ratios |",
        "|---|---:|---:|---:|",
        f"| original photo everywhere | {head['control_ctr']:.2%} | ±0 | ±0 |",
        f"| **selection (original always a candidate)** | {head['treatment_ctr']:.2%} | **{with_ci(head)}** | "
        f"{head['mean_of_ratios']:+.1%} |",
    ]
    names = {"best_generated_without_the_original": "reward model's best creative, original not a candidate",
             "any_generated_creative": "a generated creative at random (mean over the group's creatives)",
             "oracle_best_candidate": "oracle's best candidate, original included (upper bound)"}
    for key, name in names.items():
        cell = summary["policies"][key]
        lines.append(f"| {name} | {cell['treatment_ctr']:.2%} | {with_ci(cell)} | {cell['mean_of_ratios']:+.1%} |")
    lines += [
        "",
        f"The original photo was kept in {kept['count']} of {kept['of']} (product, group) cells ({kept['share']:.0%}):",
        "the reward model scored none of the group's creatives above it. A creative replaces the photo only",
        "when the reward model prefers it, so selection can lose to the photo only where the reward model is wrong.",
        "",
        "![contact sheet](contact_sheet.png)",
        "",
        "Rows: products; first column: the original; then what each group is served (the original again",
        "where it was kept), labelled with the group, the true CTR of what is served against the original",
        "photo's for that group, and the change (green: up, red: down).",
        "",
    ]
    if "ctr_by_group.png" in summary.get("plots", []):
        lines += [
            "![true CTR per group](ctr_by_group.png)",
            "",
            "Per group: the original photo's true CTR (grey) against what is served (blue), means over the",
            "products (bars) and each product (dots); the label is the group's lift (Σ served / Σ original − 1).",
            "",
        ]
    e = summary["object_expansion"]
    threshold = ("off (every creative a candidate)" if e["max_expansion"] is None else
                 f"{e['max_expansion']:.2%} of the image: {e['dropped']} of {e['creatives']} creatives dropped")
    lines += [
        "## Object expansion",
        "",
        "Inpainting can grow the product's outline into the background (a ghost rim) or paint a second",
        "product. E = area(saliency net's region on the creative ∪ the product mask the pipeline kept) −",
        "area(that mask), as a fraction of the image (`training.metrics.object_expansion`); 0 for the",
        "unchanged photo.",
        "",
        "| creatives | E = 0 | mean | median | p90 | max | served: mean | served: max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {e['creatives']} | {e['zero']} | {e['mean']:.2%} | {e['median']:.2%} | {e['p90']:.2%} | {e['max']:.2%} | "
        f"{e['served_mean']:.2%} | {e['served_max']:.2%} |",
        "",
        f"Selection threshold on E (`run_demo(max_expansion=...)`): {threshold}.",
        "",
        "## Per group",
        "",
        "Served and original CTR: means over the products; lift: Σ CTR served / Σ CTR original − 1 over the",
        "products; mean of ratios: the mean over products of CTR served / CTR original − 1.",
        "",
        "| group | who | traffic | served CTR | original's CTR | lift | mean of ratios | original kept |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for group_id, row in summary["by_group"].items():
        lines.append(f"| {group_id} | {row['name']} | {row['traffic']:.1%} | {row['served_true_ctr']:.2%} | "
                     f"{row['original_true_ctr']:.2%} | {row['aggregate_lift']:+.1%} | {row['mean_of_ratios']:+.1%} | "
                     f"{row['original_kept']}/{row['products']} |")
    lines += [
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
    if vae:
        lines.append(
            f"| generator VAE | reconstruction L1 {vae['l1']:.4f} (images in [-1, 1]), colour kept "
            f"{vae['chroma_ratio']:.2f} (output chroma / input's), {vae['images']} creatives of held-out products |"
        )
    for name, row in steering.items():
        lines.append(
            f"| generator steering {name} | {row['feature']}: {row['mean_a']:.3f} vs {row['mean_b']:.3f}, "
            f"Cohen's d {row['cohens_d']:+.2f} |"
        )
    lines += ["", f"Run time: {summary['seconds']:.0f} s. Models: `{summary['model_root']}`.", ""]
    return "\n".join(lines)
