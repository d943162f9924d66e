"""Speed and image cost of the pipeline's levers: DeepCache cache_interval and the guidance cut-off.

One process, the shipped toy generator (64 px, 20 guided DDIM steps by default), one product × 8 user groups
(the prompt model's prompts for them) per call. Every variant is timed round by round beside the plain loop
(A B C … A B C …, `cg4ctr_fast.bench.run_interleaved`), so load from other processes hits them alike; the
speedup is the median of the per-round ratios plain / variant.

Image cost, on `--quality-products` held-out products (same seeds for every variant): mean and max |Δ| of the
float ("np", composited, so the product's own pixels count as 0) output against the plain loop, the same
over the repainted region only (mask white), and the change of the shipped reward model's mean predicted CTR.

    OMP_NUM_THREADS=1 .venv/bin/python bench/levers.py --out bench/results/cpu/levers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

VARIANTS = [  # name, pipeline keyword arguments
    ("plain", {}),
    ("cache_interval=2", {"cache_interval": 2}),
    ("cache_interval=3", {"cache_interval": 3}),
    ("cache_interval=5", {"cache_interval": 5}),
    ("guidance_cutoff=0.5", {"guidance_cutoff": 0.5}),
    ("guidance_cutoff=0.25", {"guidance_cutoff": 0.25}),
    ("cutoff=0.5+cache=3", {"guidance_cutoff": 0.5, "cache_interval": 3}),
]


def main() -> int:
    from cg4ctr_fast.bench import environment, paired_ratio, percentiles, run_interleaved, Variant
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig, item_features_for
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--groups", type=int, default=8, help="user groups per call (one image each)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quality-products", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/cpu/levers", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = resolve_toy_models(ToyConfig(seed=0), progress=False, log=lambda _m: None)
    dataset = load_dataset(models.world)
    world = dataset.world
    groups = dataset.groups[: args.groups]
    group_features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in groups])
    pipe = CreativePipeline.from_pretrained(str(models.generator))
    prompt_model = PromptModel.load(models.prompt)
    reward = RewardModel.load(models.reward)

    def case(k: int):
        item_id = HELD_OUT_ITEM_BASE + k
        product = world.product(item_id)
        item = item_features_for(world, item_id, dataset.items)
        prompts = prompt_model.propose(group_features, np.repeat(item[None], len(groups), axis=0))
        return product, list(prompts)

    def call(product, prompts, output_type="np", **levers):
        return pipe(prompts, product.image, product.mask, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type=output_type, show_progress=False, **levers)

    # ---- latency: product 0, no reward model attached (generation only), side by side
    product, prompts = case(0)
    pipe.reward = None
    variants = [Variant(name=name, call=(lambda kw=kw: call(product, prompts, **kw)), groups=len(prompts),
                        backend="torch") for name, kw in VARIANTS]
    print(f"[levers] timing {len(variants)} variants × {args.warmup}+{args.runs} rounds, "
          f"{len(prompts)} groups, {args.steps} steps", file=sys.stderr, flush=True)
    samples = run_interleaved(variants, runs=args.runs, warmup=args.warmup, device=torch.device("cpu"))
    plain_s = samples[("plain", len(prompts))].wall_s

    # ---- image cost: several products, reward attached
    quality: dict[str, dict[str, list]] = {name: {"l1": [], "max": [], "l1_repaint": [], "reward": []}
                                           for name, _ in VARIANTS}
    for k in range(args.quality_products):
        product, prompts = case(k)
        pipe.reward = reward.pipeline_scorer(group_features, title=product.title, captions=prompts)
        repaint = np.asarray(product.mask) >= 128
        outputs = {name: call(product, prompts, **kw) for name, kw in VARIANTS}
        base = np.stack([c.image for c in outputs["plain"]])
        for name, creatives in outputs.items():
            images = np.stack([c.image for c in creatives])
            diff = np.abs(images - base)
            q = quality[name]
            q["l1"].append(float(diff.mean()))
            q["max"].append(float(diff.max()))
            q["l1_repaint"].append(float(diff[:, repaint].mean()))
            q["reward"].append(float(np.mean([c.reward for c in creatives])))

    rows = []
    for name, kw in VARIANTS:
        wall = samples[(name, len(prompts))].wall_s
        q = quality[name]
        ratio = paired_ratio(plain_s, wall)
        rows.append({
            "variant": name, "levers": kw, "latency_s": percentiles(wall), "samples_s": wall,
            "speedup_vs_plain": ratio["ratio"], "speedup_range": [ratio["min"], ratio["max"]],
            "speedup_flags": ratio["flags"],
            "l1_mean": float(np.mean(q["l1"])), "l1_max": float(np.max(q["max"])),
            "l1_repaint_mean": float(np.mean(q["l1_repaint"])),
            "reward_mean": float(np.mean(q["reward"])),
            "reward_delta_vs_plain": float(np.mean(q["reward"]) - np.mean(quality["plain"]["reward"])),
        })
    report = {
        "what": "pipeline levers on the shipped toy generator: latency per call (1 product × groups) and image "
                "distance against the plain loop",
        "settings": {"steps": args.steps, "guidance_scale": args.guidance, "groups": len(groups),
                     "images_per_group": 1, "runs": args.runs, "warmup": args.warmup,
                     "quality_products": args.quality_products, "threads": args.threads,
                     "scheduler": type(pipe.scheduler).__name__, "resolution": pipe.max_side,
                     "image_distance": "mean |Δ| of float outputs in [0, 1] (np, composited) vs plain; "
                                       "l1_repaint over the mask's white (repainted) pixels only"},
        "environment": environment(torch.device("cpu")),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    lines = [
        f"# Pipeline levers, {report['environment']['device']['name']}, {args.threads} thread(s)",
        "",
        f"Shipped toy generator, {pipe.max_side} px, {type(pipe.scheduler).__name__}, {args.steps} steps, "
        f"guidance {args.guidance}, 1 product × {len(groups)} groups per call; {args.runs} timed rounds "
        f"interleaved after {args.warmup} warm-up. Image distance over {args.quality_products} products "
        "against the plain loop (float outputs in [0, 1]).",
        "",
        f"Command: `{report['environment']['command']}`",
        "",
        "| variant | p50 s/call | min–max s | speedup (paired, range) | mean L1 | mean L1 repainted | max |Δ| "
        "| Δ mean reward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = r["latency_s"]
        flags = f" {','.join(r['speedup_flags'])}" if r["speedup_flags"] else ""
        lines.append(
            f"| {r['variant']} | {lat['p50']:.3f} | {lat['min']:.3f}–{lat['max']:.3f} | "
            f"{r['speedup_vs_plain']:.2f}× ({r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f}){flags} | "
            f"{r['l1_mean']:.4f} | {r['l1_repaint_mean']:.4f} | {r['l1_max']:.3f} | {r['reward_delta_vs_plain']:+.5f} |"
        )
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
