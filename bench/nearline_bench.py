"""Nearline benchmark: creatives/s of `cg4ctr nearline` (Ray Data actor pool) for 1, 2 and 4 actors against the
single-process `CreativeRuntime` on the same products, in one run, plus the projected cluster throughput for the
SD1.5-inpaint architecture from the GPU per-batch times recorded in bench/results/gpu-h200/pipeline_bench.json.

    python bench/nearline_bench.py [--products 96] [--groups 8] [--steps 4] [--batch 4] [--actors 1,2,4]
                                   [--out bench/results/cpu]

Every arm makes the same creatives (tiny preset, random weights seeded 0; the toy reward model, groups and prompt
model; one request per product for every group), each into a fresh store:
  - single-process: `CreativeRuntime.generate` of every request, torch threads 1 (one actor's setting) and
    torch threads = cores (the best one process gets from this machine);
  - nearline N actors: `run_nearline` with N actors of 1 logical CPU each (Ray started with max(N, cores)
    logical CPUs, so 4 actors run on 2 physical cores, each with torch threads 1).
creatives/s counts from the job's start (actors load their models inside it) to the last shard merged; the
steady rate counts from the earliest task's start to the latest task's end, as the actors clock them (model
loading excluded; the single process: from its runtime loaded to the last result). Writes
nearline_bench.json and nearline_bench.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _products(folder: Path, n: int) -> None:
    from tests.conftest import make_product

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        image, mask = make_product(seed=100 + k, box=(6 + k % 9, 8 + k % 7, 40 + k % 11, 54))
        image.save(folder / f"p{k:04d}.png")
        mask.save(folder / f"p{k:04d}.mask.png")


def _job(products: Path, store: Path, args, actors: int):
    from cg4ctr_fast.cli.main import build_parser
    from cg4ctr_fast.cli.nearline import build_job

    group_ids = ",".join(str(g) for g in range(args.groups))
    parsed = build_parser().parse_args(["nearline", "--products", str(products), "--store", str(store), "--preset",
                                        "tiny", "--steps", str(args.steps), "--actors", str(actors), "--batch",
                                        str(args.batch), "--group-ids", group_ids])
    return build_job(parsed)


def single_process(products: Path, store: Path, args, threads: int) -> dict:
    import torch

    from cg4ctr_fast.serving.runtime import CreativeRuntime, GenerateRequest

    job = _job(products, store, args, 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    runtime = CreativeRuntime.from_preset("tiny", random_weights=True, store=store, reward=job.reward,
                                          groups=job.groups, prompt_model=job.prompt_model, max_batch=job.max_batch,
                                          num_inference_steps=args.steps, max_wait_ms=job.max_wait_ms)
    loaded = time.perf_counter()
    try:
        requests = [GenerateRequest(p.stem, image=p.read_bytes(), mask_image=p.with_name(p.stem + ".mask.png")
                                    .read_bytes(), group_ids=job.group_ids, seed=0)
                    for p in sorted(products.glob("p*.png")) if not p.name.endswith(".mask.png")]
        results = runtime.generate(requests)
    finally:
        runtime.close()
        torch.set_num_threads(previous)
    done = time.perf_counter()
    creatives = sum(len(r.creatives) for r in results)
    return {"arm": f"single process, torch threads {threads}", "creatives": creatives,
            "wall_s": done - started, "load_s": loaded - started, "creatives_per_s": creatives / (done - started),
            "steady_creatives_per_s": creatives / (done - loaded)}


def nearline(products: Path, store: Path, args, actors: int) -> dict:
    from cg4ctr_fast.serving.nearline import run_nearline

    job = _job(products, store, args, actors)
    arrivals = []
    summary = run_nearline(job, progress=False, on_task=lambda row: arrivals.append(
        (float(row["started_at"]), float(row["ended_at"]))))
    # Steady: from the earliest task's start to the latest task's end, as the actors clocked them (one machine:
    # one clock); model loading and actor start-up before the first task are left out. (The driver's arrival
    # times are not used: Ray Data hands outputs on in bursts, which shortened the window.)
    steady = summary.creatives / (max(e for _, e in arrivals) - min(s for s, _ in arrivals))
    return {"arm": f"nearline, {actors} actor{'s' if actors > 1 else ''}", "actors": actors,
            "creatives": summary.creatives, "wall_s": summary.wall_s, "creatives_per_s": summary.creatives_per_s,
            "steady_creatives_per_s": steady, "merge_s": summary.merge_s, "tasks": summary.tasks,
            "retried_tasks": summary.retried_tasks,
            "per_actor": {k: {"tasks": v["tasks"], "creatives": v["creatives"], "busy_s": round(v["busy_s"], 3),
                              "utilisation": round(v["utilisation"], 3)} for k, v in summary.actors.items()}}


def projection(path: Path) -> dict:
    """Cluster throughput for SD1.5-inpaint at 512², 20 guided steps, from the recorded H200 per-batch p50."""
    record = json.loads(path.read_text())
    rows = {(r["name"], r["groups"]): r for r in record["results"]}
    best = max((r for r in record["results"] if r["backend"] != "diffusers-eager"),
               key=lambda r: r["groups"] / r["total"]["p50"])
    batch_s, images = best["total"]["p50"], best["groups"]
    per_gpu = images / batch_s
    creatives = 1_000_000 * 32  # a million products × 32 user groups × 1 image
    lines = [f"source: {path.relative_to(ROOT)} ({record['environment']['device']['name']}, "
             f"{record['environment']['timestamp']}): best row '{best['name']}' ({best['backend']}), batch of "
             f"{images} images (groups) in p50 {batch_s:.3f} s",
             f"one GPU actor: {images} / {batch_s:.3f} s = {per_gpu:.2f} creatives/s "
             f"(= {per_gpu * 3600:,.0f} per hour)"]
    table = []
    for gpus in (1, 8, 64, 256):
        rate = gpus * per_gpu
        hours = creatives / rate / 3600
        table.append({"gpus": gpus, "creatives_per_s": rate, "hours_for_32M": hours})
        lines.append(f"{gpus} GPU actors × {per_gpu:.2f} = {rate:,.1f} creatives/s; 1M products × 32 groups = "
                     f"32,000,000 creatives / {rate:,.1f} = {creatives / rate:,.0f} s = {hours:,.1f} h")
    return {"source": str(path.relative_to(ROOT)), "row": best["name"], "backend": best["backend"],
            "batch_images": images, "batch_p50_s": batch_s, "per_gpu_creatives_per_s": per_gpu,
            "other_rows": {f"{n}@{g}": rows[(n, g)]["total"]["p50"] for (n, g) in sorted(rows)},
            "table": table, "lines": lines}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=96)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="products per task (4 × 8 groups = one batch of 32)")
    parser.add_argument("--actors", default="1,2,4")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from cg4ctr_fast.bench import load_during, load_snapshot

    cores = os.cpu_count() or 1
    actor_counts = [int(a) for a in args.actors.split(",")]
    before = load_snapshot()
    ray.init(num_cpus=max(max(actor_counts), cores), include_dashboard=False, log_to_driver=False)
    arms = []
    with tempfile.TemporaryDirectory(prefix="nearline_bench_") as tmp:
        tmp = Path(tmp)
        _products(tmp / "products", args.products)
        for threads in sorted({1, cores}):
            arms.append(single_process(tmp / "products", tmp / f"single_t{threads}", args, threads))
            print(json.dumps(arms[-1]), flush=True)
        for actors in actor_counts:
            arms.append(nearline(tmp / "products", tmp / f"nearline_{actors}", args, actors))
            print(json.dumps(arms[-1]), flush=True)
    ray.shutdown()
    during = load_during(before, load_snapshot())
    baseline = arms[0]["creatives_per_s"]
    for arm in arms:
        arm["vs_single_t1"] = arm["creatives_per_s"] / baseline
    gpu = projection(ROOT / "bench" / "results" / "gpu-h200" / "pipeline_bench.json")
    record = {
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "cores": cores,
                        "ray": ray.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "loadavg_start": before["loadavg"], "busy_cores_during": during.get("busy_cores"),
                        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])},
        "config": {"products": args.products, "groups": args.groups, "steps": args.steps, "batch": args.batch,
                   "preset": "tiny (64 px)", "creatives": args.products * args.groups},
        "arms": arms, "projection_sd15": gpu}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nearline_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    md = [f"# nearline_bench — {record['environment']['timestamp']}", "",
          f"{cores} cores, Ray {ray.__version__}; {args.products} products × {args.groups} groups = "
          f"{args.products * args.groups} creatives, tiny preset (64 px), {args.steps} steps, {args.batch} products "
          f"per task. 1-min load average at the start {before['loadavg'][0]:.2f}; all processes kept "
          f"{during.get('busy_cores') or float('nan'):.2f} of {cores} cores busy on average during the run.", "",
          "| arm | creatives/s (wall) | steady creatives/s | wall s | vs single t1 | per-actor utilisation |",
          "|---|---:|---:|---:|---:|---|"]
    for arm in arms:
        util = ", ".join(f"{100 * v['utilisation']:.0f} %" for v in arm.get("per_actor", {}).values()) or "–"
        md.append(f"| {arm['arm']} | {arm['creatives_per_s']:.2f} | {arm['steady_creatives_per_s']:.2f} | "
                  f"{arm['wall_s']:.1f} | {arm['vs_single_t1']:.2f}× | {util} |")
    merged = [a for a in arms if a.get("merge_s")]
    if merged:
        creatives = sum(a["creatives"] for a in merged)
        merge_s = sum(a["merge_s"] for a in merged)
        record["driver_merge"] = {"creatives": creatives, "merge_s": merge_s, "creatives_per_s": creatives / merge_s}
        md += ["", f"Driver merge (the one SQLite writer), all nearline arms together: {creatives} creatives in "
               f"{merge_s:.2f} s = {creatives / merge_s:,.0f} creatives/s at 64 px (it reads each PNG back from the "
               "shared path and hashes it: at 512 px, ~50x the bytes, expect it proportionally lower)."]
        (out / "nearline_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    md += ["", "## Projected cluster throughput, SD1.5-inpaint architecture (arithmetic)", ""]
    md += [f"- {line}" for line in gpu["lines"]]
    (out / "nearline_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
