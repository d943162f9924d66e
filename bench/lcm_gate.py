"""Quality gate of the distilled LCM-LoRA, in the synthetic ad world: 4 LCM steps without guidance against the
demo's 20 guided DDIM steps.

As `cg4ctr demo` (cli/demo.py run_demo) does it: held-out products (never in the logs or training sets) × the 8
user groups; the prompt model proposes one prompt per group, the generator paints `--images-per-group` creatives
per group in one batched loop per product, the reward model scores them, and per group its top creative is
picked. The world's oracle gives the true CTR of each pick. Differences from the demo, to isolate the generator:
the exact product mask is passed (no saliency net), and the headline policy is the reward's best generated
creative (the demo's "original photo as a candidate" selection is reported beside it).

Arms (same prompts, same seeds, so creative i of group g starts from the same noise in every arm):
    ddim20_w7.5   the reference: the toy generator, DDIM, 20 steps, guidance 7.5 (the demo's settings)
    lcm4_lora     the toy generator + the LCM-LoRA fused, LCMScheduler, 4 steps, guidance off (w = 1)
    lcm4_base     control: the same 4 LCM steps on the base UNet (what the LoRA adds)
    ddim4_w7.5    control: 4 guided DDIM steps on the base UNet (the same UNet work as lcm4 × 2)

Gate: the aggregate true CTR of lcm4_lora's picks (traffic-weighted over (product, group) cells) lies inside
the 95 % cluster-bootstrap interval (over products) of ddim20_w7.5's (training.metrics.aggregate_ctr_lift,
against the original photo as control). Also: the paired lift of each arm over the reference with its interval,
the mean L1 distance ([0, 1] floats, background pixels) between each arm's creative and the reference creative
of the same seed, and the steering effect sizes (training.toy.steering_effect: Cohen's d of three token pairs
on four held-out products) of lcm4_lora against ddim20_w7.5.

    OMP_NUM_THREADS=1 .venv/bin/python bench/lcm_gate.py                        # the shipped LoRA, 16 products
    OMP_NUM_THREADS=1 .venv/bin/python bench/lcm_gate.py --lora DIR --products 8 --out /tmp/gate.json

Writes --out (JSON) and the same name with .md. Timings are wall-clock on whatever machine runs it (a shared,
loaded CPU here): context, not a speed claim.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "ddim20_w7.5"
CANDIDATE = "lcm4_lora"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_arms(generator: Path, lora: Path, controls: bool) -> dict[str, tuple]:
    """name → (pipeline, steps, guidance_scale)."""
    from cg4ctr_fast.pipeline import CreativePipeline

    arms = {
        REFERENCE: (CreativePipeline.from_pretrained(str(generator)), 20, 7.5),
        CANDIDATE: (CreativePipeline.from_pretrained(str(generator), lora=str(lora), scheduler="LCMScheduler"), 4, 1.0),
    }
    if controls:
        arms["lcm4_base"] = (CreativePipeline.from_pretrained(str(generator), scheduler="LCMScheduler"), 4, 1.0)
        arms["ddim4_w7.5"] = (arms[REFERENCE][0], 4, 7.5)
    return arms


def background_l1(a, b, product_mask: np.ndarray) -> float:
    """Mean |a − b| over background pixels and channels, images as [0, 1] floats."""
    x = np.asarray(a, dtype=np.float32) / 255.0
    y = np.asarray(b, dtype=np.float32) / 255.0
    return float(np.abs(x - y)[~product_mask].mean())


def run_gate(args) -> dict:
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift, pick_over_original
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, item_features_for, steering_effect
    from cg4ctr_fast.training.toy_set import shipped_set_dir

    toy = shipped_set_dir()
    generator = Path(args.generator) if args.generator else toy / "generator"
    lora = Path(args.lora) if args.lora else toy / "lcm_lora"
    dataset = load_dataset(toy / "world")
    world = dataset.world
    traffic = world.group_traffic()
    reward = RewardModel.load(toy / "reward")
    prompt_model = PromptModel.load(toy / "prompt")
    group_ids = [g["group_id"] for g in dataset.groups]
    group_features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in dataset.groups])
    arms = build_arms(generator, lora, controls=not args.no_controls)
    seconds = {name: 0.0 for name in arms}
    cells = {name: [] for name in arms}  # one row per (product, group)
    distances = {name: [] for name in arms if name != REFERENCE}
    item_ids = [HELD_OUT_ITEM_BASE + args.first_product + k for k in range(args.products)]
    for k, item_id in enumerate(item_ids):
        product = world.product(item_id)
        item = item_features_for(world, item_id, dataset.items)
        prompts = prompt_model.propose(group_features, np.repeat(item[None], len(group_ids), axis=0))
        original_ctr = world.true_ctr_groups(product.image, item_id=item_id)
        original_rewards = reward.score_images([product.image] * len(group_ids), [product.title] * len(group_ids),
                                               [""] * len(group_ids), group_features)
        product_mask = np.asarray(product.mask) < 128
        made = {}
        for name, (pipe, steps, guidance) in arms.items():
            pipe.reward = reward.pipeline_scorer(group_features, title=product.title, captions=prompts)
            started = time.perf_counter()
            made[name] = pipe(prompts, product.image, product.mask, num_inference_steps=steps,
                              guidance_scale=guidance, num_images_per_prompt=args.images_per_group, seed=args.seed,
                              show_progress=False)
            seconds[name] += time.perf_counter() - started
        reference = {(c.group, c.index): c for c in made[REFERENCE]}
        for name, creatives in made.items():
            if name != REFERENCE:
                for c in creatives:
                    ref = reference[(c.group, c.index)]
                    assert c.seed == ref.seed, "arms must share seeds"
                    distances[name].append(background_l1(c.image, ref.image, product_mask))
            for g_index, group_id in enumerate(group_ids):
                mine = [c for c in creatives if c.group == g_index]
                ctrs = [world.true_ctr(c.image, group_id, item_id=item_id) for c in mine]
                best = int(np.argmax([c.reward for c in mine]))
                pick = pick_over_original([c.reward for c in mine], float(original_rewards[g_index]))
                cells[name].append({
                    "product": k, "item_id": item_id, "group": group_id, "traffic": float(traffic[group_id]),
                    "pick_true_ctr": ctrs[best], "pick_reward": mine[best].reward,
                    "selection_true_ctr": float(original_ctr[group_id]) if pick is None else ctrs[pick],
                    "mean_true_ctr": float(np.mean(ctrs)), "original_true_ctr": float(original_ctr[group_id]),
                })
        if not args.quiet:
            done = {n: f"{np.mean([r['pick_true_ctr'] for r in rows]):.4f}" for n, rows in cells.items()}
            print(f"[gate] product {k + 1}/{len(item_ids)}: mean pick CTR so far {done}", file=sys.stderr, flush=True)

    def lift(rows, column, control_rows=None, control_column="original_true_ctr"):
        control = control_rows if control_rows is not None else rows
        return aggregate_ctr_lift([r[column] for r in rows], [r[control_column] for r in control],
                                  [r["traffic"] for r in rows], clusters=[r["product"] for r in rows],
                                  seed=args.seed).to_dict()

    n_creatives = args.products * len(group_ids) * args.images_per_group
    results = {}
    for name, rows in cells.items():
        pipe, steps, guidance = arms[name]
        entry = {
            "steps": steps, "guidance_scale": guidance, "scheduler": type(pipe.scheduler).__name__,
            "unet_evaluations_per_creative": steps * (2 if guidance > 1 else 1),
            "picks_over_original": lift(rows, "pick_true_ctr"),
            "selection_over_original": lift(rows, "selection_true_ctr"),
            "mean_creative_over_original": lift(rows, "mean_true_ctr"),
            "generation_ms_per_creative": 1000 * seconds[name] / n_creatives,
        }
        if name != REFERENCE:
            entry["picks_over_reference"] = lift(rows, "pick_true_ctr", cells[REFERENCE], "pick_true_ctr")
            entry["background_l1_to_reference"] = {
                "mean": float(np.mean(distances[name])), "median": float(np.median(distances[name])),
                "p90": float(np.quantile(distances[name], 0.9)), "creatives": len(distances[name])}
        results[name] = entry
    ref = results[REFERENCE]["picks_over_original"]
    cand = results[CANDIDATE]["picks_over_original"]
    control_ctr = ref["control_ctr"]
    ci_ctr = [control_ctr * (1 + ref["ci95"][0]), control_ctr * (1 + ref["ci95"][1])]
    gate = {
        "rule": f"aggregate true CTR of {CANDIDATE}'s reward picks inside the 95 % cluster-bootstrap CI of "
                f"{REFERENCE}'s",
        "reference_ctr": ref["treatment_ctr"], "reference_ci95": ci_ctr,
        "candidate_ctr": cand["treatment_ctr"],
        "passed": bool(ci_ctr[0] <= cand["treatment_ctr"] <= ci_ctr[1]),
    }
    steering = {}
    if not args.no_steering:
        steer_items = [HELD_OUT_ITEM_BASE + k for k in range(4)]
        for name in (REFERENCE, CANDIDATE):
            pipe, steps, guidance = arms[name]
            pipe.reward = None
            steering[name] = steering_effect(pipe, world, steer_items, images_per_prompt=4, steps=steps,
                                             guidance=guidance, seed=args.seed)
    return {
        "gate": gate,
        "arms": results,
        "steering": steering,
        "setup": {
            "products": args.products, "item_ids": [item_ids[0], item_ids[-1]], "groups": len(group_ids),
            "images_per_group": args.images_per_group, "seed": args.seed, "mask": "exact product mask",
            "generator": str(generator.relative_to(ROOT) if generator.is_relative_to(ROOT) else generator),
            "lora": str(lora.relative_to(ROOT) if lora.is_relative_to(ROOT) else lora),
            "lora_config": _read_json(lora / "lcm_config.json"),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "git_sha": _git_sha(), "machine": platform.platform(), "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        },
    }


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def report_md(result: dict) -> str:
    def pct(x):
        return f"{100 * x:.2f} %"

    def with_ci(cell):
        lo, hi = cell["ci95"]
        return f"{cell['lift']:+.1%} [{lo:+.1%}, {hi:+.1%}]"

    gate, setup = result["gate"], result["setup"]
    lines = [
        "# LCM-LoRA quality gate (toy world)",
        "",
        f"`{setup['command']}` at {setup['git_sha'][:10]}; {setup['products']} held-out products "
        f"(items {setup['item_ids'][0]}–{setup['item_ids'][1]}) × {setup['groups']} groups × "
        f"{setup['images_per_group']} images, seed {setup['seed']}, {setup['mask']}.",
        "",
        f"**Gate ({'passed' if gate['passed'] else 'FAILED'})**: {gate['rule']}: "
        f"{pct(gate['candidate_ctr'])} against {pct(gate['reference_ctr'])} "
        f"[{pct(gate['reference_ci95'][0])}, {pct(gate['reference_ci95'][1])}].",
        "",
        "| arm | steps | w | UNet evals / creative | pick CTR | picks vs original [95 % CI] | picks vs reference "
        "[95 % CI] | selection vs original | background L1 to reference (mean / p90) | ms / creative |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, arm in result["arms"].items():
        vs_ref = with_ci(arm["picks_over_reference"]) if "picks_over_reference" in arm else "—"
        dist = arm.get("background_l1_to_reference")
        dist_s = f"{dist['mean']:.4f} / {dist['p90']:.4f}" if dist else "—"
        lines.append(
            f"| {name} | {arm['steps']} | {arm['guidance_scale']:g} | {arm['unet_evaluations_per_creative']} | "
            f"{pct(arm['picks_over_original']['treatment_ctr'])} | {with_ci(arm['picks_over_original'])} | {vs_ref} | "
            f"{with_ci(arm['selection_over_original'])} | {dist_s} | {arm['generation_ms_per_creative']:.1f} |")
    lines += [
        "",
        "Pick: the reward model's top generated creative per (product, group); selection: the demo's policy (the",
        "original photo kept unless a creative's reward beats it). CTRs are the oracle's, aggregated with the",
        "groups' traffic shares; intervals are cluster bootstraps over products. ms / creative: wall clock on a",
        "shared CPU (other jobs running), context only.",
    ]
    if result["steering"]:
        lines += ["", "## Steering (Cohen's d, 4 held-out products × 4 images per prompt)", "",
                  "| pair | feature | " + " | ".join(result["steering"]) + " |",
                  "|---|---|" + "---:|" * len(result["steering"])]
        first = next(iter(result["steering"].values()))
        for pair, row in first.items():
            values = " | ".join(f"{arm[pair]['cohens_d']:+.2f}" for arm in result["steering"].values())
            lines.append(f"| {pair} | {row['feature']} | {values} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", default=None, help="LCM-LoRA folder (default: the shipped set's lcm_lora/)")
    parser.add_argument("--generator", default=None, help="generator folder (default: the shipped set's generator/)")
    parser.add_argument("--products", type=int, default=16, help="held-out products (default 16)")
    parser.add_argument("--first-product", type=int, default=0, help="offset of the first held-out product")
    parser.add_argument("--images-per-group", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-controls", action="store_true", help="skip the lcm4_base and ddim4 control arms")
    parser.add_argument("--no-steering", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "lcm_gate.json"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run_gate(args)
    result["setup"]["seconds"] = round(time.perf_counter() - started, 1)
    from cg4ctr_fast.fileio import atomic_write_bytes

    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), report_md(result).encode())
    gate = result["gate"]
    print(f"gate {'passed' if gate['passed'] else 'FAILED'}: {CANDIDATE} pick CTR {gate['candidate_ctr']:.4%} vs "
          f"{REFERENCE} {gate['reference_ctr']:.4%} [{gate['reference_ci95'][0]:.4%}, {gate['reference_ci95'][1]:.4%}]"
          f" -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
