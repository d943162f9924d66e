"""Serving benchmark: online selection, cross-request batching, and goodput against offered load.

    python bench/serve_bench.py [--reward DIR --groups FILE] [--steps 4] [--duration-s 8] [--out bench/results/cpu]

Three parts, each measured side by side in this one run (ratios, not absolute goals, are what carry over):
  1. select: `CreativeRuntime.select` p50/p99 for 64 stored candidates (stored scores; goal p99 ≤ 0.2 ms on one
     core), and the reward head run live on 64 stored embeddings: numpy `RewardHead` against eager torch.
  2. batching: creatives/s of the runtime (requests submitted together, batched across requests, scored and
     stored) against the offline `CreativePipeline.generate_batch` of the same products at the same batch size,
     rounds interleaved (goal ≥ 90 %).
  3. load: open-loop Poisson arrivals at multiples of the measured capacity for --duration-s each; per rate:
     goodput (requests answered within their deadline, per second), p50/p99 latency of accepted requests, and
     rejections (queue full → 503, deadline → 504). Plotted to serve_bench.png.
Runs in-process against the runtime (no HTTP); the tiny preset with random weights (the cost does not depend on
the weights) and, without --reward, a reward model of the default size with random weights.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _reward(args):
    import torch

    from cg4ctr_fast.models.reward import RewardConfig, RewardModel

    if args.reward:
        return args.reward, args.groups
    torch.manual_seed(0)
    model = RewardModel(RewardConfig(group_dim=19, title_vocab_size=64, caption_vocab_size=32)).eval()
    rng = np.random.default_rng(0)
    groups = {str(g): rng.integers(0, 2, 19).astype(np.float32) for g in range(8)}
    return model, groups


def _products(n: int, side: int = 64):
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mask = np.full((side, side), 255, np.uint8)
        x0, y0 = 8 + k % 9, 10 + k % 7
        mask[y0:y0 + 30, x0:x0 + 28] = 0
        pixels[y0:y0 + 30, x0:x0 + 28] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append((Image.fromarray(pixels), Image.fromarray(mask)))
    return out


def bench_select(runtime, requests: int) -> dict:
    import torch

    from cg4ctr_fast.bench import percentiles
    from cg4ctr_fast.serving.runtime import GenerateRequest

    image, mask = _products(1)[0]
    groups = runtime.group_ids
    # 64 stored creatives for one product: 8 prompts × 8 images; their scores for every group are stored.
    runtime.generate([GenerateRequest("select-bench", image=image, mask_image=mask,
                                      prompts=tuple(f"style {g}" for g in range(8)), num_images_per_prompt=8)])
    group = groups[0]
    for _ in range(200):
        runtime.select("select-bench", group)
    seconds = []
    for _ in range(requests):
        start = time.perf_counter()
        runtime.select("select-bench", group)
        seconds.append(time.perf_counter() - start)
    stored = percentiles(seconds)
    cands = runtime.store.candidates("select-bench", runtime.model_id, group, runtime.reward_id)
    emb = cands.embeddings
    head = runtime.head
    title = head.encode_titles([""])
    captions = head.encode_captions(cands.prompts)
    feats = runtime.group_features[:1]
    live_np, live_torch = [], []
    t_title = runtime.reward.encode_titles([""])
    t_caps = runtime.reward.encode_captions(cands.prompts)
    t_emb = torch.from_numpy(emb)
    t_feats = torch.from_numpy(feats)
    rounds = max(50, requests // 20)
    with torch.inference_mode():
        for i in range(rounds + 10):  # interleaved: both see the same machine state
            start = time.perf_counter()
            head.score(emb, title, captions, feats)
            a = time.perf_counter() - start
            start = time.perf_counter()
            runtime.reward.score(t_emb, t_title, t_caps, t_feats)
            b = time.perf_counter() - start
            if i >= 10:
                live_np.append(a)
                live_torch.append(b)
    return {"candidates": len(cands.creative_ids) + 1, "select_stored_s": stored,
            "head_numpy_live_s": percentiles(live_np), "head_torch_live_s": percentiles(live_torch)}


def bench_batching(runtime, pipe, args) -> dict:
    from cg4ctr_fast.bench import percentiles
    from cg4ctr_fast.pipeline import ProductJob
    from cg4ctr_fast.serving.runtime import GenerateRequest

    products = _products(args.batch_requests)
    prompts = tuple(f"style {g}" for g in range(args.prompts_per_request))
    creatives = args.batch_requests * len(prompts)
    jobs = [ProductJob(list(prompts), image, mask_image=mask, seed=0) for image, mask in products]
    offline, online = [], []
    for r in range(args.batch_rounds + 1):
        start = time.perf_counter()
        pipe.generate_batch(jobs, num_inference_steps=args.steps, show_progress=False)
        a = time.perf_counter() - start
        requests = [GenerateRequest(f"batch-{r}-{k}", image=image, mask_image=mask, prompts=prompts, seed=r)
                    for k, (image, mask) in enumerate(products)]
        start = time.perf_counter()
        results = runtime.generate(requests)
        b = time.perf_counter() - start
        if r:  # round 0 warms both
            offline.append(a)
            online.append(b)
            batch_sizes = sorted({res.batch_creatives for res in results})
    ratio = [o / n for o, n in zip(offline, online)]
    return {"requests": args.batch_requests, "creatives": creatives, "batch_creatives_seen": batch_sizes,
            "offline_s": percentiles(offline), "runtime_s": percentiles(online),
            "offline_creatives_per_s": creatives / float(np.median(offline)),
            "runtime_creatives_per_s": creatives / float(np.median(online)),
            "throughput_ratio_median": float(np.median(ratio)), "throughput_ratio_rounds": ratio}


def bench_load(runtime, args) -> dict:
    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.serving.errors import DeadlineExceeded, QueueFull
    from cg4ctr_fast.serving.runtime import GenerateRequest

    products = _products(16)
    prompts = ("warm", "cool")

    def request(k: int, deadline: float) -> GenerateRequest:
        image, mask = products[k % len(products)]
        return GenerateRequest(f"load-{k}", image=image, mask_image=mask, prompts=prompts, seed=k, deadline=deadline)

    # Capacity: a closed loop that keeps the queue full enough for whole batches.
    start = time.perf_counter()
    n_cap = max(2 * runtime.max_batch // len(prompts), 8)
    runtime.generate([request(k, time.monotonic() + 600) for k in range(n_cap)])
    capacity = n_cap / (time.perf_counter() - start)
    rows = []
    rng = np.random.default_rng(2)
    for multiple in args.load_multiples:
        rate = multiple * capacity
        futures, rejected_full, refused_late = [], 0, 0
        max_depth = 0
        t0 = time.monotonic()
        k = 0
        next_at = t0
        while next_at < t0 + args.duration_s:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic()
            try:
                futures.append((now, runtime.submit(request(k, now + args.timeout_s))))
            except QueueFull:
                rejected_full += 1
            except DeadlineExceeded:  # refused at once: the work queued ahead cannot finish by the deadline
                refused_late += 1
            except InputError:
                raise
            max_depth = max(max_depth, runtime.queue_depth())
            k += 1
            next_at += rng.exponential(1.0 / rate)
        timeouts = 0
        for _, future in futures:
            try:
                future.result(600)
            except DeadlineExceeded:
                timeouts += 1
        ok = [f for _, f in futures if f.exception() is None]
        # submit → answer, as the result records it (queued + its batch's run), not when this loop got to it.
        lat = [(f.result().queued_ms + f.result().run_ms) / 1000 for f in ok]
        elapsed = time.monotonic() - t0
        in_time = sum(1 for x in lat if x <= args.timeout_s)
        rows.append({
            "offered_x_capacity": multiple, "offered_rps": rate, "sent": k, "ok": len(ok), "ok_in_time": in_time,
            "queue_full": rejected_full, "deadline_at_submit": refused_late, "deadline": timeouts, "goodput_rps": in_time / elapsed,
            "latency_ok_s": {"p50": float(np.percentile(lat, 50)) if lat else None,
                             "p99": float(np.percentile(lat, 99)) if lat else None},
            "max_queue_depth": max_depth, "wall_s": elapsed,
        })
        print(f"  load {multiple:g}× capacity ({rate:.2f} req/s): sent {k}, ok {len(ok)}, 503 {rejected_full}, "
              f"504 {refused_late} at submit + {timeouts} queued, goodput {in_time / elapsed:.2f} req/s ({in_time} in time), p50 "
              f"{rows[-1]['latency_ok_s']['p50'] or float('nan'):.3f} s, p99 "
              f"{rows[-1]['latency_ok_s']['p99'] or float('nan'):.3f} s, max queue {max_depth}", file=sys.stderr)
    return {"capacity_rps": capacity, "timeout_s": args.timeout_s, "max_queue": runtime.max_queue,
            "max_batch": runtime.max_batch, "rows": rows}


def plot(load: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load["rows"]
    x = [r["offered_rps"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, x, "k:", label="offered")
    a.plot(x, [r["goodput_rps"] for r in rows], "o-", label="goodput (answered in time)")
    a.axvline(load["capacity_rps"], color="grey", lw=0.8, label="measured capacity")
    a.set_xlabel("offered load (requests/s)")
    a.set_ylabel("requests/s")
    a.legend()
    a.set_title("goodput against offered load")
    b.plot(x, [r["latency_ok_s"]["p50"] for r in rows], "o-", label="p50")
    b.plot(x, [r["latency_ok_s"]["p99"] for r in rows], "s-", label="p99")
    b.axhline(load["timeout_s"], color="red", lw=0.8, label="deadline")
    b.set_xlabel("offered load (requests/s)")
    b.set_ylabel("latency of accepted requests (s)")
    b.legend()
    b.set_title("latency against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", help="a reward model folder (cg4ctr-train reward); default: random weights")
    parser.add_argument("--groups", help="groups.json for --reward")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: one serving core)")
    parser.add_argument("--select-requests", type=int, default=5000)
    parser.add_argument("--batch-requests", type=int, default=8)
    parser.add_argument("--prompts-per-request", type=int, default=4)
    parser.add_argument("--batch-rounds", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--timeout-s", type=float, default=3.0)
    parser.add_argument("--load-multiples", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0, 10.0])
    parser.add_argument("--skip", nargs="*", default=[], choices=("select", "batching", "load"))
    parser.add_argument("--out", help="folder for serve_bench.json and serve_bench.png")
    args = parser.parse_args(argv)
    if args.reward and not args.groups:
        parser.error("--reward needs --groups")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    import torch

    from cg4ctr_fast.bench import environment, load_during, load_snapshot, load_warnings
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.serving.runtime import CreativeRuntime

    torch.set_num_threads(args.threads)
    reward, groups = _reward(args)
    report = {"environment": environment(torch.device("cpu")), "threads": args.threads, "steps": args.steps}
    before = load_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = CreativePipeline.from_preset("tiny")
        runtime = CreativeRuntime(CreativePipeline.from_preset("tiny"), store=Path(tmp) / "store", reward=reward,
                                  groups=groups, model_id="preset:tiny:seed0", num_inference_steps=args.steps,
                                  max_batch=args.max_batch, max_queue=args.max_queue)
        try:
            runtime.warmup()
            if "select" not in args.skip:
                report["select"] = s = bench_select(runtime, args.select_requests)
                print(f"select, {s['candidates']} candidates, stored scores: p50 "
                      f"{s['select_stored_s']['p50'] * 1e3:.4f} ms, p99 {s['select_stored_s']['p99'] * 1e3:.4f} ms; "
                      f"head live: numpy p50 {s['head_numpy_live_s']['p50'] * 1e3:.3f} ms, torch p50 "
                      f"{s['head_torch_live_s']['p50'] * 1e3:.3f} ms", file=sys.stderr)
            if "batching" not in args.skip:
                report["batching"] = b = bench_batching(runtime, pipe, args)
                print(f"batching, {b['requests']} requests × {args.prompts_per_request} prompts: runtime "
                      f"{b['runtime_creatives_per_s']:.1f} creatives/s, offline generate_batch "
                      f"{b['offline_creatives_per_s']:.1f} creatives/s, ratio {b['throughput_ratio_median']:.1%} "
                      f"(batches of {b['batch_creatives_seen']} creatives)", file=sys.stderr)
            if "load" not in args.skip:
                report["load"] = bench_load(runtime, args)
        finally:
            runtime.close(drain=False)
    after = load_snapshot()
    during = load_during(before, after)
    report["load_machine"] = {"before": before, "after": after, "during": during,
                              "warnings": load_warnings(before, during)}
    for line in report["load_machine"]["warnings"]:
        print(line, file=sys.stderr)
    if out is not None:
        from cg4ctr_fast.fileio import atomic_write_bytes

        atomic_write_bytes(out / "serve_bench.json", (json.dumps(report, indent=2) + "\n").encode())
        if "load" in report:
            plot(report["load"], out / "serve_bench.png")
        print(f"wrote {out / 'serve_bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
