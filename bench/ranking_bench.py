"""Online ranking: score the stored creatives of one request with the reward model's small head.

    python bench/ranking_bench.py [--model MODEL_DIR] [--candidates 64] [--requests 2000] [--json FILE]

Image embeddings are computed at generation time and stored; online, a request (one user group, one
product) ranks its candidates with `RewardModel.score` on those embeddings, on one thread. Without
--model a reward model of the default size with random weights is used (the cost does not depend on
the weights). Reports p50/p99 per request and per candidate.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a reward model folder (cg4ctr-train reward)")
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.candidates <= 0 or args.requests <= 0 or args.warmup < 0:
        print("ranking_bench.py: error: --candidates and --requests must be positive", file=sys.stderr)
        return 2
    if args.json:
        from cg4ctr_fast.cli.common import check_out_file
        from cg4ctr_fast.errors import InputError

        try:
            check_out_file(args.json, flag="--json")  # before anything is measured
        except InputError as exc:
            print(f"ranking_bench.py: error: {exc}", file=sys.stderr)
            return 2

    from cg4ctr_fast.bench import (
        environment,
        format_percentile,
        load_during,
        load_snapshot,
        load_warnings,
        percentiles,
        row_flags,
    )
    from cg4ctr_fast.models.reward import RewardConfig, RewardModel

    torch.set_num_threads(1)  # one request, one thread: what a serving worker gets
    if args.model:
        model = RewardModel.load(args.model)
    else:
        torch.manual_seed(0)
        model = RewardModel(RewardConfig(group_dim=19, title_vocab_size=64, caption_vocab_size=32))
    model.eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    store = torch.randn(args.candidates, cfg.image_dim, generator=gen)  # stored image embeddings
    titles = torch.randint(2, cfg.title_vocab_size, (args.candidates, cfg.max_title_tokens), generator=gen)
    captions = torch.randint(2, cfg.caption_vocab_size, (args.candidates, cfg.max_caption_tokens), generator=gen)
    group = torch.rand(1, cfg.group_dim, generator=gen)

    def request() -> int:
        with torch.inference_mode():
            ctr = model.score(store, titles, captions, group.expand(args.candidates, -1))
            return int(torch.argmax(ctr))

    for _ in range(args.warmup):
        request()
    load_before = load_snapshot()
    seconds = []
    for _ in range(args.requests):
        start = time.perf_counter()
        request()
        seconds.append(time.perf_counter() - start)
    stats = percentiles(seconds)
    load_after = load_snapshot()
    during = load_during(load_before, load_after)
    warnings = load_warnings(load_before, during)
    report = {
        "environment": environment(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "load": {"before": load_before, "after": load_after, "during": during, "warnings": warnings},
        "flags": row_flags(stats),
        "model": args.model or "random weights, default size",
        "candidates": args.candidates,
        "requests": args.requests,
        "per_request_s": stats,
        "per_candidate_us_p50": stats["p50"] / args.candidates * 1e6,
    }
    print(f"rank {args.candidates} stored creatives, one thread: p50 {stats['p50'] * 1e3:.3f} ms, "
          f"p99 {format_percentile({'p99': stats['p99'] and stats['p99'] * 1e3}, 'p99', '{:.3f} ms')} per request; "
          f"{report['per_candidate_us_p50']:.1f} µs per candidate (p50)")
    for line in warnings:
        print(line)
    if args.json:
        from cg4ctr_fast.fileio import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
