"""`cg4ctr-sim`: the synthetic ad world from the command line.

    cg4ctr-sim logs --out data/sim [--overwrite] [--seed 0] [--products 48] [--creatives-per-product 8]
                    [--days 14] [--image-size 64] [--groups 8] [--quiet]
    cg4ctr-sim oracle (--data data/sim | --seed 0 [--groups 8]) [--item ID]
    cg4ctr-sim sheet --out sheet.png [--overwrite] [--seed 0] [--image-size 64]
    cg4ctr-sim stages --out DIR [--products 16] [--candidates 8] [--requests 2000] [--seeds 0 ...]
                      [--world W --generator G --reward R --prompt P] [--quiet]

Bad arguments get one line on stderr and exit code 2 (`cg4ctr_fast.cli.common.run_cli`); nothing is
written (the dataset folder is built in a temporary folder and renamed at the end; an existing, non-empty
`--out` needs `--overwrite`). The world is synthetic: see docs/sim.md.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from cg4ctr_fast.cli.common import (
    OneLineParser,
    add_overwrite,
    add_subcommand,
    add_subcommands,
    check_out_file,
    make_parser,
    run_cli,
)
from cg4ctr_fast.fileio import check_out_dir
from cg4ctr_fast.errors import InputError

PROG = "cg4ctr-sim"


def build_parser() -> OneLineParser:
    parser = make_parser(PROG, "Synthetic ad world: products, user groups, click logs, oracle CTR.")
    sub = add_subcommands(parser)

    logs = add_subcommand(sub, "logs", "write a simulated dataset: images, masks, groups, items, creatives, click logs")
    logs.add_argument("--out", required=True, help="output folder")
    add_overwrite(logs)
    logs.add_argument("--seed", type=int, default=0, help="world seed (default 0): same seed, same dataset")
    logs.add_argument("--products", type=int, default=48, help="number of products (default 48)")
    logs.add_argument("--creatives-per-product", type=int, default=8, help="creatives per product (default 8)")
    logs.add_argument("--days", type=int, default=14, help="days of logs (default 14)")
    logs.add_argument("--image-size", type=int, default=64, help="square image side in pixels, 32..512 (default 64)")
    logs.add_argument("--groups", type=int, default=8, help="number of user groups, 1..64 (default 8)")
    logs.add_argument("--quiet", action="store_true", help="no progress bar or summary line")

    oracle = add_subcommand(sub, "oracle", "print each group's best caption and its CTR lift (the hidden truth)")
    oracle.add_argument("--data", help="a dataset folder written by `cg4ctr-sim logs` (its world.json)")
    oracle.add_argument("--seed", type=int, default=0, help="world seed when --data is not given")
    oracle.add_argument("--groups", type=int, default=8, help="number of groups when --data is not given")
    oracle.add_argument("--item", type=int, default=None, help="score captions on this product (default: no product)")

    sheet = add_subcommand(sub, "sheet", "a contact sheet: one row per vocabulary category, plus a row of products")
    sheet.add_argument("--out", required=True, help="PNG file to write")
    add_overwrite(sheet)
    sheet.add_argument("--seed", type=int, default=0)
    sheet.add_argument("--image-size", type=int, default=64)
    add_stages_parser(sub)
    return parser


def add_stages_parser(sub) -> None:
    stages = add_subcommand(sub, "stages", "A-stage against B-stage creative selection in a simulated ad auction",
                            description="Simulate the ad ranker (predicted CTR × bid, top slot shown) with creatives "
                            "chosen before ranking (A-stage) or ranked with the items (B-stage); writes results.json, "
                            "results.md and results.png. The stored creatives are cached in --out/cache, so a rerun "
                            "into the same folder reuses them.")
    stages.add_argument("--out", required=True, help="output folder (new, empty, or one this command wrote)")
    stages.add_argument("--products", type=int, default=16, help="products in each seed's pool")
    stages.add_argument("--candidates", type=int, default=8, help="candidate items per request (≤ --products)")
    stages.add_argument("--requests", type=int, default=2000, help="requests per seed")
    stages.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (each: its own product pool and requests)")
    stages.add_argument("--prompts-per-group", type=int, default=2, help="prompts sampled per (product, group)")
    stages.add_argument("--images-per-prompt", type=int, default=2, help="creatives per prompt")
    stages.add_argument("--steps", type=int, default=15, help="denoising steps of the toy generator")
    stages.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (≥ 20)")
    stages.add_argument("--timed-requests", type=int, default=300, help="requests whose online scoring is timed")
    stages.add_argument("--threads", type=int, default=1, help="torch threads (the scoring time is per this many)")
    for name in ("world", "generator", "reward", "prompt"):
        stages.add_argument(f"--{name}", default=None,
                            help=f"{name} folder; give all four or none (none: the embedded toy models)")
    stages.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def _check_common(args) -> None:
    if args.seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {args.seed}")
    size = getattr(args, "image_size", None)
    if size is not None and not 32 <= size <= 512:
        raise InputError(f"--image-size must be from 32 to 512, got {size}")
    groups = getattr(args, "groups", None)
    if groups is not None and not 1 <= groups <= 64:
        raise InputError(f"--groups must be from 1 to 64, got {groups}")


def cmd_logs(args) -> int:
    from tqdm import tqdm

    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.sim.dataset import write_dataset

    _check_common(args)
    out = check_out_dir(args.out, overwrite=args.overwrite)
    bar = None

    def on_start(total: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, desc=PROG, unit="img", disable=args.quiet, file=sys.stderr, leave=False)

    # write_dataset fills the fresh temporary folder; atomic_dir then renames it onto --out (replacing it
    # with --overwrite), so an old dataset stays whole until the new one is complete.
    try:
        with atomic_dir(out) as tmp:
            summary = write_dataset(
                tmp, seed=args.seed, n_products=args.products, creatives_per_product=args.creatives_per_product,
                days=args.days, image_size=args.image_size, n_groups=args.groups,
                progress=lambda n: bar.update(n) if bar is not None else None, on_start=on_start,
            )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        ctr = summary["clicks"] / max(summary["impressions"], 1)
        print(
            f"wrote {summary['products']} products, {summary['creatives']} creatives, {summary['rows']} log rows "
            f"({summary['impressions']} impressions, {summary['clicks']} clicks, CTR {ctr:.2%}; true CTR "
            f"{summary['true_ctr_min']:.2%}..{summary['true_ctr_max']:.2%}) to {out} "
            f"in {summary['seconds']:.1f} s",
            file=sys.stderr,
        )
    return 0


def cmd_oracle(args) -> int:
    import numpy as np

    from cg4ctr_fast.sim.world import World

    if args.data:
        world = World.load(args.data)
    else:
        _check_common(args)
        world = World(seed=args.seed, n_groups=args.groups)
    if args.item is not None and args.item < 0:
        raise InputError(f"--item must be a non-negative integer, got {args.item}")
    captions, ctr = world.caption_ctr_table(args.item)
    print("group_id\tgroup\tbest_caption\tbest_ctr\tmedian_ctr\tlift")
    for g, group in enumerate(world.groups):
        best = int(np.argmax(ctr[g]))
        median = float(np.median(ctr[g]))
        print(f"{g}\t{group.name}\t{' '.join(captions[best])}\t{ctr[g, best]:.4f}\t{median:.4f}\t{ctr[g, best] / median:.2f}")
    return 0


def cmd_sheet(args) -> int:
    import numpy as np

    from cg4ctr_fast.cli.demo import contact_sheet
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.sim.render import render_background
    from cg4ctr_fast.sim.vocab import CATEGORIES, STYLE_VOCAB
    from cg4ctr_fast.sim.world import World

    _check_common(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: takes a .png file name")
    if not out.parent.exists():  # as atomic_dir does for folders: missing parents are created
        check_out_dir(out.parent, overwrite=True, flag="--out")
    else:
        check_out_file(out, flag="--out", overwrite=args.overwrite)
    world = World(seed=args.seed, image_size=args.image_size)
    base = {"palette": "warm", "texture": "smooth", "scene": "studio", "lighting": "soft"}
    rng = np.random.default_rng([args.seed, 7])
    rows = []
    for category in CATEGORIES:
        row = []
        for token in STYLE_VOCAB[category]:
            caption = [token if c == category else base[c] for c in CATEGORIES]
            row.append(render_background(caption, rng, args.image_size))
        rows.append(row)
    rows.append([p.image for p in world.products(8)])
    import io

    buffer = io.BytesIO()
    contact_sheet(rows, cell=max(96, args.image_size)).save(buffer, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buffer.getvalue())
    print(f"wrote {out}: rows = {', '.join(CATEGORIES)}, products (base caption: "
          f"{' '.join(base[c] for c in CATEGORIES)})", file=sys.stderr)
    return 0


def cmd_stages(args) -> int:
    from cg4ctr_fast.training.stages import check_out, check_settings

    check_settings(products=args.products, candidates=args.candidates, requests=args.requests, seeds=args.seeds,
                   prompts_per_group=args.prompts_per_group, images_per_prompt=args.images_per_prompt,
                   steps=args.steps, resamples=args.resamples, timed_requests=args.timed_requests)
    if args.threads < 1:
        raise InputError(f"--threads must be ≥ 1, got {args.threads}")
    given = {k: getattr(args, k) for k in ("world", "generator", "reward", "prompt")}
    if any(given.values()) and not all(given.values()):
        missing = ", ".join(f"--{k}" for k, v in given.items() if not v)
        raise InputError(f"give all four model folders or none; missing {missing}")
    for name, folder in given.items():
        if folder and not Path(folder).is_dir():
            raise InputError(f"--{name} {folder}: not a folder")
    check_out(Path(args.out))
    import shlex

    import torch

    from cg4ctr_fast.training.stages import run_stages

    torch.set_num_threads(args.threads)
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    command = " ".join(["cg4ctr-sim", *map(shlex.quote, sys.argv[1:])]) if sys.argv[1:2] == ["stages"] else None
    results = run_stages(args.out, products=args.products, candidates=args.candidates, requests=args.requests,
                         seeds=args.seeds, prompts_per_group=args.prompts_per_group,
                         images_per_prompt=args.images_per_prompt, steps=args.steps, resamples=args.resamples,
                         timed_requests=args.timed_requests, model_paths=given if all(given.values()) else None,
                         progress=not args.quiet, log=log, command=command)
    if not args.quiet:
        r = results["ratios"]
        print(f"B/A expected clicks {r['B/A']['expected_clicks']['ratio']:.4f} "
              f"[{r['B/A']['expected_clicks']['ci95'][0]:.4f}, {r['B/A']['expected_clicks']['ci95'][1]:.4f}], "
              f"revenue {r['B/A']['revenue']['ratio']:.4f} [{r['B/A']['revenue']['ci95'][0]:.4f}, "
              f"{r['B/A']['revenue']['ci95'][1]:.4f}]; scoring {results['cost']['B/A']['ms_ratio']:.2f}× the time; "
              f"wrote {Path(args.out) / 'results.md'}", file=sys.stderr)
    return 0


COMMANDS = {"logs": cmd_logs, "oracle": cmd_oracle, "sheet": cmd_sheet, "stages": cmd_stages}


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(PROG, build_parser(), lambda args: COMMANDS[args.command](args), argv)


if __name__ == "__main__":
    sys.exit(main())
