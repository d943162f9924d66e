"""Do cheap previews rank creatives as the full VAE decode does? (issue 12, item 6)

On held-out products of the synthetic ad world (never in the logs or the training sets), as `cg4ctr demo`
builds them: the prompt model writes one prompt per user group (8 groups), the shipped toy generator makes N
candidates per group in one batched loop, and the reward model scores each candidate twice: its preview
(the TAESD decoder, `components.preview_decoder`) and its full VAE decode, both composited as shipped. The
pipeline's own preview path does this (`preview_top_k=N`: every candidate is previewed, scored, then fully
decoded and rescored; `Creative.preview_reward` and `Creative.reward`).

Reported per (product, group): top-1 agreement (the preview's best candidate is the full decode's best; chance
1/N), Spearman correlation of the two scores over the N candidates (numpy ranks, ties averaged), pooled over
all candidates of a product too; the oracle's true CTR of what each pick ships (the full decode of the
preview's pick vs of the full decode's pick, aggregated as an A/B test would: traffic-weighted, cluster
bootstrap over products); the preview's image L1 against the full decode; and the decode time of the
preview vs the full VAE on the same latents, interleaved in the same process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/preview_agreement.py --products 8 --candidates 4 \\
        --out bench/results/cpu/preview_agreement
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def ranks(values) -> np.ndarray:
    """Ranks 1..n with ties averaged (as scipy.stats.rankdata's default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a, b) -> float:
    """Spearman's rho: Pearson correlation of the ranks; NaN when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k_rows(cells: list[dict], n: int, seed: int) -> list[dict]:
    """Per preview_top_k = k (1..n): the share of (product, group) cells whose full-decode best is among the
    preview's top k, and the aggregate true CTR of what the pipeline then ships (the best full-decode reward
    among the preview's top k) over what full decoding of all n ships."""
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    rows = []
    for k in range(1, n + 1):
        shipped, found = [], []
        for c in cells:
            # The pipeline's order: best preview first, ties by index (pipeline._preview_rank).
            order = sorted(range(n), key=lambda i: (-c["preview_rewards"][i], i))[:k]
            pick = max(order, key=lambda i: (c["full_rewards"][i], -i))
            shipped.append(c["true_ctr"][pick])
            found.append(c["full_pick"] in order)
        lift = aggregate_ctr_lift(shipped, [c["full_pick_true_ctr"] for c in cells], [c["traffic"] for c in cells],
                                  clusters=[c["product"] for c in cells], seed=seed)
        rows.append({"top_k": k, "full_best_in_preview_top_k": float(np.mean(found)),
                     "full_decodes_per_group": k, "true_ctr_over_full": lift.to_dict()})
    return rows


def time_decoders(slots: dict, latents: torch.Tensor, *, runs: int, warmup: int) -> dict:
    """Median / p90 ms per call of each slot on the same latents, calls interleaved (A B A B ...)."""
    samples = {name: [] for name in slots}
    for k in range(warmup + runs):
        for name, slot in slots.items():
            start = time.perf_counter()
            slot(latents)
            if k >= warmup:
                samples[name].append(1000 * (time.perf_counter() - start))
    return {name: {"median_ms": statistics.median(v), "p90_ms": float(np.quantile(v, 0.9)), "runs": len(v)}
            for name, v in samples.items()}


def main() -> int:
    from cg4ctr_fast.bench import environment, load_during, load_snapshot, load_warnings
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.runtime.preview import attach_preview_decoder
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, item_features_for
    from cg4ctr_fast.training.toy_set import shipped_set_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default=None, help="toy set folder (default: the shipped cg4ctr_fast/assets/toy)")
    parser.add_argument("--taesd", default=None, help="preview decoder folder (default: the set's taesd/)")
    parser.add_argument("--products", type=int, default=8, help="held-out products (default 8)")
    parser.add_argument("--first-product", type=int, default=0, help="first held-out index (default 0)")
    parser.add_argument("--candidates", type=int, default=4, help="candidates per group, N (default 4)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=10, help="timed decode calls per decoder (default 10)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/cpu/preview_agreement", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(args.set) if args.set else shipped_set_dir()
    taesd = Path(args.taesd) if args.taesd else root / "taesd"
    dataset = load_dataset(root / "world")
    world = dataset.world
    traffic = world.group_traffic()
    saliency_cfg = json.loads((root / "saliency" / "config.json").read_text())
    pipe = CreativePipeline.from_pretrained(
        str(root / "generator"), saliency=str(root / "saliency" / "saliency.safetensors"),
        saliency_size=saliency_cfg["size"], saliency_threshold=saliency_cfg["threshold"])
    slot = attach_preview_decoder(pipe, taesd)
    reward = RewardModel.load(root / "reward")
    prompt_model = PromptModel.load(root / "prompt")
    group_ids = [g["group_id"] for g in dataset.groups]
    group_features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in dataset.groups])
    n = args.candidates
    info = pipe.components.info

    before = load_snapshot()
    cells, products, l1s, last_latents = [], [], [], None
    started = time.perf_counter()
    for k in range(args.first_product, args.first_product + args.products):
        item_id = HELD_OUT_ITEM_BASE + k
        product = world.product(item_id)
        item = item_features_for(world, item_id, dataset.items)
        prompts = prompt_model.propose(group_features, np.repeat(item[None], len(group_ids), axis=0))
        pipe.reward = reward.pipeline_scorer(group_features, title=product.title, captions=prompts)
        creatives = pipe(prompts, product.image, None, num_inference_steps=args.steps, seed=args.seed,
                         num_images_per_prompt=n, show_progress=False, preview_top_k=n, return_latents=True)
        latents = torch.stack([c.latents for c in creatives])
        with torch.no_grad():
            full = pipe.components.vae_decoder(latents / info.scaling_factor).float().clamp(-1, 1)
            preview = slot(latents / info.scaling_factor).float()
        l1s.append(float((preview - full).abs().mean()))
        last_latents = latents
        pooled_preview, pooled_full = [], []
        for g_index, group_id in enumerate(group_ids):
            mine = sorted((c for c in creatives if c.group == g_index), key=lambda c: c.index)
            pr = [c.preview_reward for c in mine]
            fr = [c.reward for c in mine]
            pooled_preview += pr
            pooled_full += fr
            preview_pick = int(np.argmax(pr))
            full_pick = int(np.argmax(fr))
            ctr = [world.true_ctr(c.image, group_id, item_id=item_id) for c in mine]
            cells.append({
                "product": k, "item_id": item_id, "group": group_id, "traffic": float(traffic[group_id]),
                "preview_rewards": pr, "full_rewards": fr, "true_ctr": ctr,
                "preview_pick": preview_pick, "full_pick": full_pick, "top1_agree": preview_pick == full_pick,
                "spearman": spearman(pr, fr),
                "preview_pick_true_ctr": ctr[preview_pick], "full_pick_true_ctr": ctr[full_pick],
            })
        products.append({"product": k, "item_id": item_id, "title": product.title,
                         "spearman_pooled": spearman(pooled_preview, pooled_full), "image_l1": l1s[-1]})
        print(f"[preview] product {k}: top-1 agreement "
              f"{np.mean([c['top1_agree'] for c in cells if c['product'] == k]):.2f}, pooled Spearman "
              f"{products[-1]['spearman_pooled']:.3f}, image L1 {l1s[-1]:.4f}", file=sys.stderr, flush=True)
    generation_s = time.perf_counter() - started

    full_slot = pipe.components.vae_decoder
    timing = {}
    for batch in sorted({len(group_ids), last_latents.shape[0]}):
        z = last_latents[:batch] / info.scaling_factor
        timing[str(batch)] = time_decoders({"preview": slot, "full_vae": full_slot}, z, runs=args.runs, warmup=2)
        timing[str(batch)]["speedup"] = timing[str(batch)]["full_vae"]["median_ms"] / timing[str(batch)]["preview"]["median_ms"]
    during = load_during(before, load_snapshot())

    rhos = np.array([c["spearman"] for c in cells])
    lift = aggregate_ctr_lift([c["preview_pick_true_ctr"] for c in cells], [c["full_pick_true_ctr"] for c in cells],
                              [c["traffic"] for c in cells], clusters=[c["product"] for c in cells], seed=args.seed)
    taesd_metrics = json.loads((taesd / "metrics.json").read_text()) if (taesd / "metrics.json").is_file() else {}
    summary = {
        "what": "reward-model scores of TAESD previews vs full VAE decodes of the same latents, toy generator",
        "set": str(root), "taesd": str(taesd), "products": args.products, "first_product": args.first_product,
        "groups": len(group_ids), "candidates_per_group": n, "steps": args.steps, "seed": args.seed,
        "cells": len(cells),
        "top1_agreement": float(np.mean([c["top1_agree"] for c in cells])),
        "top1_chance": 1.0 / n,
        "spearman_per_group_mean": float(np.nanmean(rhos)),
        "spearman_per_group_median": float(np.nanmedian(rhos)),
        "spearman_per_group_nan": int(np.isnan(rhos).sum()),
        "spearman_pooled_per_product_mean": float(np.nanmean([p["spearman_pooled"] for p in products])),
        "spearman_all": spearman([r for c in cells for r in c["preview_rewards"]],
                                 [r for c in cells for r in c["full_rewards"]]),
        "image_l1_preview_vs_full": float(np.mean(l1s)),
        "image_l1_definition": "mean |preview − full decode| over pixels and channels, images in [-1, 1], before "
                               "compositing (×127.5 for 8-bit levels)",
        "true_ctr_preview_pick_over_full_pick": lift.to_dict(),
        "by_top_k": top_k_rows(cells, n, args.seed),
        "true_ctr_definition": ("Σ traffic·true CTR of the full decode of the preview's pick / the same for the full "
                                "decode's pick − 1 over (product, group); CI: cluster bootstrap over products"),
        "decode_ms": timing,
        "generation_s": round(generation_s, 1),
        "taesd_train_metrics": taesd_metrics,
        "per_product": products,
        "per_cell": cells,
        "load": during,
        "load_warnings": load_warnings(before, during),
        "environment": environment(torch.device("cpu")),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), report(summary).encode())
    print(report(summary))
    return 0


def report(s: dict) -> str:
    lift = s["true_ctr_preview_pick_over_full_pick"]
    lines = [
        "# Preview ranking agreement (TAESD vs full VAE decode)",
        "",
        f"Toy generator (shipped set), {s['products']} held-out products × {s['groups']} groups × "
        f"{s['candidates_per_group']} candidates, {s['steps']} steps; the reward model scores each candidate's "
        "preview and its full decode (both composited). Command: `" + s["environment"]["command"] + "`.",
        "",
    ] + ([f"Note: {s['note']}", ""] if s.get("note") else [""]) + [
        "| measure | value |",
        "|---|---:|",
        f"| top-1 agreement per (product, group), {s['cells']} cells | {s['top1_agreement']:.3f} (chance "
        f"{s['top1_chance']:.2f}) |",
        f"| Spearman per group, mean / median ({s['candidates_per_group']} candidates each) | "
        f"{s['spearman_per_group_mean']:.3f} / {s['spearman_per_group_median']:.3f} |",
        f"| Spearman pooled per product ({s['groups'] * s['candidates_per_group']} candidates), mean | "
        f"{s['spearman_pooled_per_product_mean']:.3f} |",
        f"| Spearman over all {s['cells'] * s['candidates_per_group']} candidates | {s['spearman_all']:.3f} |",
        f"| image L1, preview vs full decode ([-1, 1]) | {s['image_l1_preview_vs_full']:.4f} "
        f"({127.5 * s['image_l1_preview_vs_full']:.1f} of 255) |",
        f"| true CTR of the preview's pick vs the full decode's pick (aggregate, 95 % CI) | "
        f"{lift['lift']:+.2%} [{lift['ci95'][0]:+.2%}, {lift['ci95'][1]:+.2%}] |",
        "",
        "With `preview_top_k = k` the pipeline fully decodes the preview's best k per group and ships the best of "
        "them by full-decode reward:",
        "",
        "| k | full-decode best among the preview's top k | true CTR shipped vs full decoding of all (95 % CI) |",
        "|---:|---:|---:|",
    ] + [
        f"| {r['top_k']} | {r['full_best_in_preview_top_k']:.3f} | {r['true_ctr_over_full']['lift']:+.2%} "
        f"[{r['true_ctr_over_full']['ci95'][0]:+.2%}, {r['true_ctr_over_full']['ci95'][1]:+.2%}] |"
        for r in s.get("by_top_k", [])
    ] + [
        "",
        "Decode time on the same latents, interleaved calls, same process "
        f"({s['environment']['torch_threads']} torch thread(s), {s['environment']['device']['name']}):",
        "",
        "| batch | preview median ms | full VAE median ms | full / preview |",
        "|---:|---:|---:|---:|",
    ]
    for batch, row in s["decode_ms"].items():
        lines.append(f"| {batch} | {row['preview']['median_ms']:.1f} | {row['full_vae']['median_ms']:.1f} | "
                     f"{row['speedup']:.2f}× |")
    lines.append("")
    for warning in s["load_warnings"]:
        lines.append(f"- {warning}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
