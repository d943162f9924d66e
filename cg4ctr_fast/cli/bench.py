"""`cg4ctr-bench`: per-stage latency of our backends against diffusers' pipeline, in one run.

    cg4ctr-bench --preset tiny --backends torch,compile --groups 1,8 --steps 20 --json bench/results/x.json

Every row is measured in this process on the same weights and prompts as the diffusers baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Optional, Sequence

from cg4ctr_fast.cli.main import EXIT_BAD_INPUT, OneLineParser, _quiet_libraries
from cg4ctr_fast.errors import InputError

GROUP_PROMPTS = (
    "neon city lights at night, vivid magenta and cyan",
    "green forest moss, soft morning light",
    "warm wooden kitchen table, golden light",
    "calm blue sea and sky, bright daylight",
    "minimal white marble studio, soft shadows",
    "autumn leaves, orange and red, warm sun",
    "snowy mountain cabin, cold blue light",
    "tropical beach, turquoise water, palm shadows",
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cg4ctr-bench", description="Per-stage latency against diffusers, side by side.")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", help="local diffusers folder")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--engines", help="exported engine folder (onnxruntime / tensorrt backends)")
    p.add_argument("--backends", default="torch", help="comma list of torch, compile, onnxruntime, tensorrt")
    p.add_argument("--groups", type=_int_list, default=[1, 8], help="user groups per product, e.g. 1,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="image side (default: the preset's resolution)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--fuse", default="auto", choices=("auto", "on", "off", "both"),
                   help="fused step: auto (on for CUDA), on, off, or both as separate rows")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compile backend (default: reduce-overhead on CUDA)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline (no ratios)")
    p.add_argument("--json", required=True, help="where to write the results (atomic)")
    p.add_argument("--plot", help="PNG of stage times per variant")
    return p


def run(args) -> dict:
    import torch

    from cg4ctr_fast.bench import (
        BenchCase,
        check_backend,
        diffusers_pipeline,
        engine_components,
        run_diffusers,
        run_ours,
    )
    from cg4ctr_fast.cli.demo import draw_product
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.imaging import to_rgb_and_alpha_mask
    from cg4ctr_fast.models.diffusion import build_modules, load_modules
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.runtime.torch_backend import torch_components

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        check_backend(backend, args.engines)
    for name, value in (("--steps", args.steps), ("--runs", args.runs)):
        if value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value}")
    if args.warmup < 0:
        raise InputError(f"--warmup must be ≥ 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch")
    preset = get_preset(args.preset)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)

    if args.model:
        modules = load_modules(args.model, dtype=torch.float32)
    elif args.random_weights or preset.buildable:
        modules = build_modules(preset, seed=0)
    else:
        raise InputError(f"preset {preset.name!r} needs --model PATH or --random-weights")
    for module in (modules.unet, modules.vae, modules.text_encoder):
        module.to(device=device, dtype=dtype)
    size = args.size or preset.resolution
    if size % 8:
        raise InputError(f"--size must be a multiple of 8, got {size}")
    rgb, mask = to_rgb_and_alpha_mask(draw_product(size))

    fuse_modes = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.fuse]
    results = []
    dpipe = None if args.no_diffusers else diffusers_pipeline(modules)
    baselines: dict[int, float] = {}
    # Eager rows first: the compile backend converts the shared UNet to channels_last on CUDA.
    ordered = sorted(backends, key=lambda b: b == "compile")
    cases = {
        g: BenchCase(prompts=[GROUP_PROMPTS[i % len(GROUP_PROMPTS)] + f", variant {i}" for i in range(g)],
                     image=rgb, mask=mask, steps=args.steps, guidance=args.guidance, height=size, width=size)
        for g in args.groups
    }
    # Engine folders are loaded (and refused when they do not fit) before anything is measured.
    max_unet_batch = max(args.groups) * (2 if args.guidance > 1.0 else 1)
    engine_slots = {
        b: engine_components(b, args.engines, modules, max_unet_batch=max_unet_batch)
        for b in backends
        if b in ("onnxruntime", "tensorrt")
    }
    if dpipe is not None:
        for groups, case in cases.items():
            print(f"[bench] diffusers, {groups} groups", file=sys.stderr, flush=True)
            row = run_diffusers(dpipe, case, runs=args.runs, warmup=args.warmup, device=device)
            baselines[groups] = row.total["p50"]
            results.append(row)
            _write_report(args, device, preset, size, backends, results, final=False)
    for backend in ordered:
        if backend in engine_slots:
            components = engine_slots[backend]
        else:
            components = torch_components(modules, backend=backend, compile_mode=args.compile_mode)
        pipe = CreativePipeline(components)
        for fuse in fuse_modes:
            pipe.fuse_step = fuse
            for groups, case in cases.items():
                name = backend + {None: "", True: "+fused", False: "+unfused"}[fuse]
                print(f"[bench] {name}, {groups} groups", file=sys.stderr, flush=True)
                row = run_ours(pipe, case, name=name, runs=args.runs, warmup=args.warmup)
                if groups in baselines:
                    row.ratio_vs_diffusers = baselines[groups] / row.total["p50"]
                if backend in ("onnxruntime", "tensorrt"):
                    row.notes.append(f"engines {args.engines}")
                if backend == "compile":
                    row.notes.append(f"torch.compile mode={args.compile_mode or 'default'}; warm-up includes compile")
                results.append(row)
                # Written after every row: a run cut short by a time limit still leaves its finished rows.
                _write_report(args, device, preset, size, backends, results, final=False)

    return _write_report(args, device, preset, size, backends, results, final=True)


def _write_report(args, device, preset, size, backends, results, *, final: bool) -> dict:
    from cg4ctr_fast.bench import environment, plot, table
    from cg4ctr_fast.fileio import atomic_write_bytes

    report = {
        "environment": environment(device),
        "config": {
            "preset": preset.name, "model": args.model, "random_weights": args.random_weights or not args.model,
            "size": size, "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype,
            "runs": args.runs, "warmup": args.warmup, "groups": args.groups, "backends": backends,
            "fuse": args.fuse, "engines": args.engines,
        },
        "complete": final,
        "results": [asdict(r) for r in results],
        "table": table(results),
    }
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    if final:
        if args.plot:
            plot(results, args.plot)
        print(report["table"])
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except InputError as exc:
        print(f"cg4ctr-bench: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
