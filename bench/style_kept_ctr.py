"""What the style arms of an ablation kept, by style, scored by the world's oracle.

For every cycle ≥ 1 of each style arm (`styles_refresh`, `styles_random_refresh`), each kept (top-k) training
creative's true CTR is in the cycle's fresh logs (`fresh_logs.npz`, logged beside the photo of the same product
and group) and its style in `topk.json`. Per style: the aggregate true-CTR lift of the kept creatives over the
photo, Σ w·CTR(creative) / Σ w·CTR(photo) − 1 with w = the group's traffic share, and a 95 % cluster-bootstrap CI
over (seed, cycle, product).

    python bench/style_kept_ctr.py --ablation out/ablate --seeds 3 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def kept_by_style(ablation: Path, seeds: int, arms=("styles_refresh", "styles_random_refresh")) -> dict:
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.cycle import resolve_models
    from cg4ctr_fast.training.cycle_config import load_cycle_config
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    config = load_cycle_config(ablation / "config.toml")
    world = load_dataset(resolve_models(config, log=lambda _m: None)["world"]).world
    traffic = world.group_traffic()
    result = {}
    for arm in arms:
        rows = defaultdict(lambda: ([], [], [], []))  # style → creative CTR, photo CTR, weight, cluster
        for seed in range(config.run.seed, config.run.seed + seeds):
            for cycle in range(1, config.run.cycles + 1):
                folder = ablation / f"seed_{seed}" / arm / "cycles" / f"cycle_{cycle:03d}"
                if not folder.is_dir():
                    continue
                logs = np.load(folder / "fresh_logs.npz")
                kept = json.loads((folder / "topk.json").read_text())
                photo = {(int(i), int(g)): float(t) for i, g, t, c in
                         zip(logs["item_id"], logs["group"], logs["true_ctr"], logs["caption"]) if c == ""}
                # The fresh logs hold the kept creatives first, in topk.json's order, then the photos.
                for row, ctr, item, group in zip(kept, logs["true_ctr"], logs["item_id"], logs["group"]):
                    ours, base, weight, cluster = rows[row["style"]]
                    ours.append(float(ctr))
                    base.append(photo[(int(item), int(group))])
                    weight.append(float(traffic[int(group)]))
                    cluster.append((seed, cycle, int(item)))
        result[arm] = {}
        for style, (ours, base, weight, cluster) in sorted(rows.items()):
            lift = aggregate_ctr_lift(ours, base, weight, clusters=cluster, resamples=2000, seed=0)
            result[arm][style] = {"n": len(ours), "lift": lift.lift, "ci95": list(lift.ci95)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", type=Path, required=True, help="the `cg4ctr-train ablate --out` folder")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if not (args.ablation / "config.toml").is_file():
        print(f"error: {args.ablation}: not an ablation folder (no config.toml)", file=sys.stderr)
        return 2
    result = kept_by_style(args.ablation, args.seeds)
    for arm, styles in result.items():
        for style, cell in styles.items():
            print(f"{arm:22s} {style:7s} n={cell['n']:5d}  {cell['lift']:+.1%} "
                  f"[{cell['ci95'][0]:+.1%}, {cell['ci95'][1]:+.1%}]")
    if args.json:
        from cg4ctr_fast.fileio import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
