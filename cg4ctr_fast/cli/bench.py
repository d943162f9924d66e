"""`cg4ctr-bench`: per-stage latency of our backends against diffusers' pipeline, in one run.

    cg4ctr-bench --preset tiny --backends torch,compile --groups 1,8 --steps 20 --json bench/results/x.json
    cg4ctr-bench --calibrate --preset toy                      # the planner's cost table for this machine
    cg4ctr-bench --pareto --json pareto.json --plot pareto.png # latency vs ad-world quality, one curve per lever

Every row is measured in this process on the same weights and prompts as the diffusers baseline, with the
same thread count for every backend (--threads), the rows interleaved call by call (A B C A B C …), the
machine's load recorded before and after, noisy rows and ratios flagged (rules: cg4ctr_fast.bench), and
every output path checked before any work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from dataclasses import asdict
from typing import Optional, Sequence

from cg4ctr_fast.cli.common import check_out_file, make_parser
from cg4ctr_fast.cli.main import EXIT_BAD_INPUT, MAX_CREATIVES, MAX_GUIDANCE, OneLineParser, _quiet_libraries
from cg4ctr_fast.errors import InputError
from cg4ctr_fast.imaging import MAX_SIDE

# Timed and warm-up rounds: p99 needs 100 timed runs (cg4ctr_fast.bench); 10× that is the most a row takes.
MAX_RUNS = 1000

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


PLOT_SUFFIXES = (".png", ".svg", ".pdf")  # formats matplotlib's Agg backend writes


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("cg4ctr-bench", "Per-stage latency against diffusers, side by side: variants interleaved run "
                    "by run, the same threads for every backend, the machine's load recorded.")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", help="local diffusers folder")
    p.add_argument("--random-weights", action="store_true", help="the preset's architecture with random weights (sd15-inpaint needs this or --model)")
    p.add_argument("--engines", help="exported engine folder (onnxruntime / tensorrt backends)")
    p.add_argument("--backends", default="torch", help="comma list of torch, compile, onnxruntime, tensorrt")
    p.add_argument("--groups", type=_int_list, default=[1, 8],
                   help=f"user groups per product, e.g. 1,8; each at most {MAX_CREATIVES} (one call's creatives, as "
                        "in `cg4ctr generate`)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5, help=f"from 0 to {MAX_GUIDANCE:g} (default: 7.5)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed calls per row, interleaved with the other rows (p95 is shown from 20, p99 from "
                        f"100; at most {MAX_RUNS}; default: 5, or 100 with --calibrate)")
    p.add_argument("--warmup", type=int, default=1,
                   help=f"untimed rounds first (compile happens in them; at most {MAX_RUNS})")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch (intra- and inter-op), ONNX Runtime's intra-op pool and inductor's "
                        f"compile workers, at most the cores this process may use (default: all of them, here {_available_cores()})")
    p.add_argument("--omp-wait", default="passive", choices=("passive", "active", "env"),
                   help="what torch's idle OpenMP threads do: passive = sleep, as ONNX Runtime's sessions here "
                        "do (allow_spinning 0), so an oversubscribed core does not punish one backend; active = "
                        "spin; env = leave OMP_WAIT_POLICY as the environment has it (libgomp on its own spins "
                        "≈300k iterations before sleeping). Applied only before torch is first imported")
    p.add_argument("--prompt-cache", default="cold", choices=("cold", "warm", "both"),
                   help="cold: our rows clear their prompt-embedding cache before every call and encode the "
                        "prompts, as diffusers does each call; warm: they reuse the cached embeddings (as a "
                        "serving process would; rows named +cached); both: one row of each")
    p.add_argument("--size", type=int, default=None,
                   help=f"image side, a multiple of 8 up to {MAX_SIDE} (default: the preset's resolution)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--fuse", default="auto", choices=("auto", "on", "off", "both"),
                   help="fused step: auto (on for CUDA), on, off, or both as separate rows")
    p.add_argument("--step-backend", default="auto",
                   help="the fused step's backend, or a comma list of them as separate rows (+torch, +native, …): "
                        "auto (triton on CUDA, else torch), torch, triton, native (the C++/CUDA ops of `make native`; "
                        "fuses the step on CPU too)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the compile backend (default: reduce-overhead on CUDA)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline (no ratios)")
    p.add_argument("--json", help="where to write the results (atomic; checked before any work; required "
                                  "unless --calibrate)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure the planner's cost table instead (cg4ctr_fast.planner): p50/p99 of every stage and "
                        "of the UNet at a few batch sizes, interleaved, on this machine, for one backend; written "
                        "to --out, else next to --engines (cost_table.json), else to the cache where `cg4ctr "
                        "generate --deadline-ms` finds it (<cache>/cost/<device>-<backend>-<key>.json). --preset "
                        "toy calibrates the shipped toy set (generator, saliency, reward)")
    p.add_argument("--out", help="--calibrate: where to write the cost table (atomic; checked before any work)")
    p.add_argument("--reward", metavar="DIR",
                   help="--calibrate: a reward model folder whose scoring is timed (--preset toy: the toy set's)")
    p.add_argument("--preview-decoder", metavar="DIR",
                   help="--calibrate: a tiny preview decoder (AutoencoderTiny folder) whose decode is timed, for "
                        "preview-ranking plans (--preset toy: the shipped one when there is one)")
    p.add_argument("--pareto", action="store_true",
                   help="latency per creative against ad-world quality on the shipped toy generator, one curve per "
                        "lever (steps, guidance cut-off, cache interval, previews, LCM-LoRA), diffusers' 20 guided "
                        "steps as the reference in the same rounds (cg4ctr_fast.pareto); --json, --plot, --groups, "
                        "--runs, --warmup, --threads apply")
    p.add_argument("--products", type=int, default=8,
                   help="--pareto: held-out products per quality measurement of a plan not in the table (default 8)")
    p.add_argument("--quality", metavar="FILE",
                   help="--pareto: the quality table to start from (default: the toy set's assets/toy/quality.json)")
    p.add_argument("--quality-out", metavar="FILE",
                   help="--pareto: write the completed quality table here (atomic), for the planner")
    p.add_argument("--plot", help="PNG/SVG/PDF of stage times per variant, or --pareto's plot (checked before any work)")
    return p


def pareto(args) -> int:
    """`cg4ctr-bench --pareto`: checks every flag and output path first, then `cg4ctr_fast.pareto.main_pareto`."""
    if args.json is None:
        raise InputError("--pareto needs --json FILE (where the results go)")
    if args.calibrate:
        raise InputError("--pareto and --calibrate are two runs; give one")
    if args.out is not None or args.reward is not None or args.preview_decoder is not None:
        raise InputError("--out, --reward and --preview-decoder belong to --calibrate")
    if args.engines or args.model or args.random_weights or args.backends != "torch":
        raise InputError("--pareto measures the shipped toy generator on the torch backend; drop --engines, --model, "
                         "--random-weights and --backends")
    args.runs = 5 if args.runs is None else args.runs
    check_numbers(args)
    if not 1 <= args.products <= 64:
        raise InputError(f"--products must be from 1 to 64, got {args.products}")
    check_outputs(args)
    if args.quality_out:
        check_out_file(args.quality_out, flag="--quality-out")
    if args.quality:
        from pathlib import Path

        if not Path(args.quality).is_file():
            raise InputError(f"--quality {args.quality}: no such file")
    set_omp_wait_policy(args.omp_wait)
    from cg4ctr_fast.pareto import main_pareto

    return main_pareto(args)


def check_outputs(args) -> None:
    """Every output path, before anything is loaded or measured (InputError, one line, exit 2)."""
    from pathlib import Path

    # No torch import here: --omp-wait must reach libgomp before torch loads.
    check_out_file(args.json, flag="--json")
    if args.plot:
        check_out_file(args.plot, flag="--plot")
        if Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise InputError(f"--plot {args.plot}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
        if Path(args.plot).resolve() == Path(args.json).resolve():
            raise InputError(f"--plot {args.plot}: the same file as --json")


def check_step_backends(text: str) -> list[str]:
    """--step-backend: a comma list of kernels.step.BACKENDS names, in order, without repeats. InputError (one
    line) for an unknown name, and for native when its library is not built (before anything is measured)."""
    from cg4ctr_fast.kernels.step import BACKENDS

    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise InputError("--step-backend needs at least one of " + ", ".join(BACKENDS))
    for name in names:
        if name not in BACKENDS:
            raise InputError(f"--step-backend: unknown step backend {name!r} (choose from {', '.join(BACKENDS)})")
    if "native" in names:
        from cg4ctr_fast.kernels.native import native_unavailable_reason

        reason = native_unavailable_reason()
        if reason is not None:
            raise InputError(f"--step-backend native: {reason}")
    return names


def check_numbers(args) -> None:
    """Every number of the request, before any output or work (InputError, one line, exit 2).

    The limits are `cg4ctr generate`'s: at most MAX_CREATIVES (64) creatives in one call (`--groups 100000`
    was killed for memory at 23 GB), sides up to imaging.MAX_SIDE (4096) px in multiples of 8, guidance in
    [0, MAX_GUIDANCE]; threads up to the cores this process may use. `run` then checks --steps against the
    scheduler's trained timesteps (models.diffusion.check_steps, configs only) once torch may load.
    """
    import math

    if max(args.groups) > MAX_CREATIVES:
        raise InputError(f"--groups {max(args.groups)} is over the {MAX_CREATIVES} creatives one call makes (one "
                         "denoising batch, twice that with guidance), as in `cg4ctr generate`")
    runs = 5 if args.runs is None else args.runs  # None: the default (5; --calibrate sets 100 first)
    for name, value, low, high in (("--steps", args.steps, 1, None), ("--runs", runs, 1, MAX_RUNS),
                                   ("--warmup", args.warmup, 0, MAX_RUNS)):
        if value < low or (high is not None and value > high):
            raise InputError(f"{name} must be an integer from {low} to {high}, got {value}" if high is not None
                             else f"{name} must be a positive integer, got {value}")
    if not (math.isfinite(args.guidance) and 0 <= args.guidance <= MAX_GUIDANCE):
        raise InputError(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {args.guidance}")
    if args.size is not None and not (0 < args.size <= MAX_SIDE and args.size % 8 == 0):
        raise InputError(f"--size must be a positive multiple of 8 up to {MAX_SIDE}, got {args.size}")
    cores = _available_cores()
    if args.threads is not None and not 1 <= args.threads <= cores:
        raise InputError(f"--threads must be from 1 to the {cores} cores this process may use, got {args.threads}")


def set_omp_wait_policy(policy: str) -> dict:
    """Set OMP_WAIT_POLICY for torch's OpenMP pool; libgomp reads it once, when torch is first imported.

    Why: under a second job on 2 cores, torch with 2 spinning threads took 29 s per tiny-preset call against
    1.4 s with passive threads (ONNX Runtime, which does not spin here, 0.3-0.5 s either way): spinning, not
    the thread count, made ONNX Runtime look 78× faster. Returns what was asked, what the environment holds
    and whether it took effect.
    """
    already = "torch" in sys.modules
    if policy in ("passive", "active") and not already:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return {"requested": policy, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "applied": policy == "env" or not already,
            **({"note": "torch was imported before the policy could be set; it runs as the environment had it"}
               if already and policy != "env" else {})}


def run(args) -> dict:
    from cg4ctr_fast.config import get_preset

    if args.json is None:
        raise InputError("--json FILE is required (where the results go), unless --calibrate")
    if args.out is not None or args.reward is not None or args.preview_decoder is not None:
        raise InputError("--out, --reward and --preview-decoder belong to --calibrate")
    args.runs = 5 if args.runs is None else args.runs
    check_numbers(args)
    check_outputs(args)
    preset = get_preset(args.preset)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    threads = args.threads if args.threads is not None else _available_cores()
    omp_wait = set_omp_wait_policy(args.omp_wait)

    import torch

    from cg4ctr_fast.bench import (
        BenchCase,
        apply_threads,
        check_backend,
        compile_modules,
        diffusers_pipeline,
        diffusers_variant,
        engine_components,
        environment,
        load_snapshot,
        ours_variant,
        run_interleaved,
    )
    from cg4ctr_fast.cli.demo import draw_product
    from cg4ctr_fast.imaging import to_rgb_and_alpha_mask
    from cg4ctr_fast.models.diffusion import (
        build_modules,
        check_steps,
        folder_scheduler,
        inspect_model_folder,
        load_modules,
        make_scheduler,
    )
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.runtime.torch_backend import torch_components

    for backend in backends:
        check_backend(backend, args.engines)
    step_backends = check_step_backends(args.step_backend)
    if args.fuse == "off" and step_backends != ["auto"]:
        raise InputError(f"--step-backend {args.step_backend} chooses the fused step's backend, and --fuse off runs "
                         "none; use --fuse on or both")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch")
    # From configs only (no weights): a step count the scheduler cannot run is refused before anything loads.
    scheduler = (folder_scheduler(inspect_model_folder(args.model)) if args.model
                 else make_scheduler(preset.scheduler, preset.scheduler_kwargs()))
    check_steps(scheduler, args.steps, flag="--steps")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    size = args.size or preset.resolution
    # Before anything runs: the same pool size for every backend (ONNX Runtime's sessions get it below).
    thread_info = apply_threads(threads, compile_workers="compile" in backends)
    thread_info["omp_wait_policy"] = omp_wait

    if args.model:
        modules = load_modules(args.model, dtype=torch.float32)
    elif args.random_weights or preset.buildable:
        modules = build_modules(preset, seed=0)
    else:
        raise InputError(f"preset {preset.name!r} needs --model PATH or --random-weights")
    for module in (modules.unet, modules.vae, modules.text_encoder):
        module.to(device=device, dtype=dtype)
    rgb, mask = to_rgb_and_alpha_mask(draw_product(size))

    fuse_modes = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.fuse]
    cache_modes = {"cold": [True], "warm": [False], "both": [True, False]}[args.prompt_cache]
    cases = {
        g: BenchCase(prompts=[GROUP_PROMPTS[i % len(GROUP_PROMPTS)] + f", variant {i}" for i in range(g)],
                     image=rgb, mask=mask, steps=args.steps, guidance=args.guidance, height=size, width=size)
        for g in args.groups
    }
    # Engine folders are loaded (and refused when they do not fit) before anything is measured.
    max_unet_batch = max(args.groups) * (2 if args.guidance > 1.0 else 1)
    components = {
        b: engine_components(b, args.engines, modules, max_unet_batch=max_unet_batch, threads=threads)
        for b in backends
        if b in ("onnxruntime", "tensorrt")
    }
    for b in backends:
        if b not in components:
            source = compile_modules(modules, device) if b == "compile" else modules
            components[b] = torch_components(source, backend=b, compile_mode=args.compile_mode)
    if "onnxruntime" in components:
        # What the sessions really got, read back from ONNX Runtime (0 would mean its own default).
        session = getattr(getattr(components["onnxruntime"].unet, "component", None), "session", None)
        if session is not None:
            thread_info["onnxruntime_session_intra_op"] = session.get_session_options().intra_op_num_threads
    # One pipeline object per row: a cold row's cache clearing never touches a warm row's cache.
    pipes = {}
    for b in backends:
        for fuse in fuse_modes:
            for cold in cache_modes:
                for step_backend in step_backends:
                    if fuse is False and step_backend != step_backends[0]:
                        continue  # the unfused step has no backend: one row, not one per step backend
                    name = (b + {None: "", True: "+fused", False: "+unfused"}[fuse]
                            + ("" if step_backend == "auto" or fuse is False else f"+{step_backend}")
                            + ("" if cold else "+cached"))
                    pipe = CreativePipeline(components[b])
                    pipe.fuse_step = fuse
                    pipe.step_backend = step_backend
                    pipes[name] = (pipe, cold)
    dpipe = None if args.no_diffusers else diffusers_pipeline(modules)
    variants = []
    for groups, case in cases.items():
        if dpipe is not None:
            variants.append(diffusers_variant(dpipe, case))
        for name, (pipe, cold) in pipes.items():
            v = ours_variant(pipe, case, name=name, cold_prompt_cache=cold)
            backend = name.split("+")[0]
            if backend in ("onnxruntime", "tensorrt"):
                v.notes.append(f"engines {args.engines}")
            if backend == "compile":
                v.notes.append(f"torch.compile mode={args.compile_mode or 'default'}; warm-up includes compile")
            variants.append(v)

    ctx = {"device": device, "preset": preset, "size": size, "backends": backends, "threads": thread_info,
           "environment": environment(device), "order": [f"{v.name}/{v.groups}" for v in variants],
           "load_before": load_snapshot()}
    print(f"[bench] {len(variants)} rows × {args.warmup} warm-up + {args.runs} timed rounds, interleaved; "
          f"{threads} threads", file=sys.stderr, flush=True)

    def after_round(rnd, samples):
        print(f"[bench] round {rnd + 1}/{args.warmup + args.runs} done", file=sys.stderr, flush=True)
        # Written after every timed round: a run cut short by a time limit still leaves its finished rounds.
        _write_report(args, ctx, variants, samples, final=False)

    samples = run_interleaved(variants, runs=args.runs, warmup=args.warmup, device=device, after_round=after_round)
    return _write_report(args, ctx, variants, samples, final=True)


def _header(args, ctx, load: dict) -> list[str]:
    from cg4ctr_fast.bench import RULES

    t = ctx["threads"]
    lines = [
        f"threads: {t['requested']} (torch intra-op {t['torch_intra_op']}, inter-op {t['torch_inter_op']}; "
        f"onnxruntime intra-op {t['onnxruntime_intra_op']}; {t['available_cores']} cores available); idle "
        f"OpenMP threads: OMP_WAIT_POLICY={t['omp_wait_policy']['OMP_WAIT_POLICY'] or 'unset'}"
        f"{'' if t['omp_wait_policy']['applied'] else ' (--omp-wait ' + t['omp_wait_policy']['requested'] + ' not applied: torch was imported first)'}",
        f"{args.runs} timed runs per row after {args.warmup} warm-up round(s), interleaved round by round "
        f"in this order: {', '.join(ctx['order'])}",
        {"cold": "prompt embeddings: our rows clear their cache before every call and encode the prompts, as "
                 "diffusers re-encodes every call",
         "warm": "prompt embeddings: our rows reuse embeddings cached across timed calls, while diffusers "
                 "re-encodes every call (their text encoder time is not in our rows)",
         "both": "prompt embeddings: plain rows re-encode every call as diffusers does; +cached rows reuse "
                 "embeddings cached across timed calls"}[args.prompt_cache],
    ]
    before, after, during = load["before"], load["after"], load["during"]
    if before.get("loadavg") and after.get("loadavg"):
        line = (f"load: 1-min load average {before['loadavg'][0]:.2f} at the start, {after['loadavg'][0]:.2f} "
                f"at the end ({before['cores']} cores)")
        if during.get("others_cores") is not None:
            line += (f"; other processes kept {during['others_cores']:.2f} cores busy on average, this one "
                     f"{during['own_cores']:.2f}; steal {100 * during['steal_fraction']:.1f} %")
        lines.append(line)
    lines.append(RULES)
    return lines


def _write_report(args, ctx, variants, samples, *, final: bool) -> dict:
    from cg4ctr_fast.bench import load_during, load_snapshot, load_warnings, plot, summarise, table
    from cg4ctr_fast.fileio import atomic_write_bytes

    results = summarise(variants, samples)
    after = load_snapshot()
    during = load_during(ctx["load_before"], after)
    load = {"before": ctx["load_before"], "after": after, "during": during,
            "warnings": load_warnings(ctx["load_before"], during)}
    text = "\n".join(_header(args, ctx, load) + ["", table(results)] + ([""] + load["warnings"] if load["warnings"]
                                                                         else []))
    report = {
        "environment": ctx["environment"],
        "config": {
            "preset": ctx["preset"].name, "model": args.model, "random_weights": args.random_weights or not args.model,
            "size": ctx["size"], "steps": args.steps, "guidance": args.guidance, "dtype": args.dtype,
            "runs": args.runs, "warmup": args.warmup, "groups": args.groups, "backends": ctx["backends"],
            "fuse": args.fuse, "step_backend": args.step_backend, "engines": args.engines, "threads": ctx["threads"]["requested"],
            "prompt_cache": args.prompt_cache, "order": ctx["order"], "interleaved": True,
        },
        "threads": ctx["threads"],
        "load": load,
        "complete": final,
        "results": [asdict(r) for r in results],
        "table": text,
    }
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    if final:
        if args.plot:
            plot(results, args.plot)
        print(text)
    return report


def calibrate(args) -> dict:
    """`cg4ctr-bench --calibrate`: measure and write the planner's cost table (see --calibrate's help).

    Checks every flag and the output path before anything loads (InputError, one line, exit 2). Besides the
    table, a few whole calls of the reference plan (20 guided DDIM steps, or fewer with --steps) at the largest
    --groups are timed and their median set beside the table's predicted p50 (meta.validation), so a reader
    sees how well the stage sum predicts a call. Returns the table as a dict.
    """
    from pathlib import Path

    from cg4ctr_fast.config import PRESETS, get_preset

    if args.json is not None or args.plot is not None:
        raise InputError("--calibrate writes a cost table to --out (or its default place), not --json/--plot")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(backends) != 1:
        raise InputError(f"--calibrate measures one backend at a time, got --backends {args.backends}")
    backend = backends[0]
    toy = args.preset == "toy"
    if not toy and args.preset not in PRESETS:
        raise InputError(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted([*PRESETS, 'toy']))}")
    if toy and (args.model or args.engines or args.random_weights):
        raise InputError("--preset toy calibrates the shipped toy set; --model, --engines and --random-weights "
                         "do not apply")
    args.runs = 100 if args.runs is None else args.runs
    if args.warmup == 1:
        args.warmup = 3  # the first rounds allocate; three keep them out of a 100-run p99
    check_numbers(args)
    if args.out:
        check_out_file(args.out, flag="--out")
    for flag, folder in (("--reward", args.reward), ("--preview-decoder", args.preview_decoder)):
        if folder and not Path(folder).is_dir():
            raise InputError(f"{flag} {folder}: no such folder")
    threads = args.threads if args.threads is not None else _available_cores()
    omp_wait = set_omp_wait_policy(args.omp_wait)

    import torch

    from cg4ctr_fast import planner
    from cg4ctr_fast.bench import apply_threads, check_backend
    from cg4ctr_fast.export.manifest import folder_sha256, sha256_file
    from cg4ctr_fast.pipeline import CreativePipeline

    check_backend(backend, args.engines)
    if backend == "compile" and args.device == "cpu":
        pass  # measured as it runs: compile happens in the warm-up rounds
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch")
    apply_threads(threads, compile_workers=backend == "compile")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    preset = get_preset("tiny" if toy else args.preset)
    reward_dir = args.reward
    if toy:
        from cg4ctr_fast.training.toy import ToyConfig
        from cg4ctr_fast.training.toy_set import resolve_toy_models

        models = resolve_toy_models(ToyConfig(seed=0), progress=False)
        saliency_cfg = json.loads((models.saliency / "config.json").read_text())
        pipe = CreativePipeline.from_pretrained(
            str(models.generator), saliency=str(models.saliency / "saliency.safetensors"),
            saliency_size=saliency_cfg["size"], saliency_threshold=saliency_cfg["threshold"], backend=backend,
            device=args.device, dtype=dtype)
        model_key = f"toy-{folder_sha256(models.generator)[:12]}"
        reward_dir = reward_dir or str(models.reward)
    elif args.engines:
        pipe = CreativePipeline.from_engines(args.engines, backend=backend, reward=False)
        model_key = f"engines-{sha256_file(Path(args.engines) / 'manifest.json')[:12]}"
    elif args.model:
        pipe = CreativePipeline.from_pretrained(args.model, backend=backend, device=args.device, dtype=dtype)
        model_key = f"model-{folder_sha256(args.model)[:12]}"
    elif args.random_weights or preset.buildable:
        pipe = CreativePipeline.from_preset(preset.name, random_weights=True, backend=backend, device=args.device,
                                            dtype=dtype)
        model_key = f"{preset.name}-random-seed0-c{preset.unet.in_channels}"
    else:
        raise InputError(f"preset {preset.name!r} needs --model PATH or --random-weights")
    reward = None
    if reward_dir:
        from cg4ctr_fast.models.reward import RewardModel
        from cg4ctr_fast.runtime.onnxruntime_backend import default_group_features

        model = RewardModel.load(reward_dir)
        features = np.tile(default_group_features(model.config.group_dim), (max(args.groups), 1))
        reward = pipe.reward = model.pipeline_scorer(features)
    preview_dir = args.preview_decoder or (planner.toy_preview_decoder() if toy else None)
    if preview_dir:
        from cg4ctr_fast.runtime.preview import attach_preview_decoder

        attach_preview_decoder(pipe, preview_dir)
    side = args.size or pipe.max_side
    groups = max(args.groups)
    preview = getattr(pipe.components, "preview_decoder", None) is not None
    batches = sorted(set(planner.calibration_batches(groups, preview=preview)) | {1, 2, 4, 8})
    print(f"[calibrate] {backend} on {args.device}, {threads} threads, {side}×{side}: UNet at batches "
          f"{', '.join(map(str, batches))}; {args.warmup} warm-up + {args.runs} timed rounds, interleaved",
          file=sys.stderr, flush=True)
    table = planner.measure_cost_table(pipe, batches=batches, runs=args.runs, warmup=args.warmup, reward=reward,
                                       height=side, width=side, text_prompts=groups,
                                       log=lambda m: print(m, file=sys.stderr, flush=True))
    table.meta.update(threads=threads, omp_wait_policy=omp_wait, preset=args.preset,
                      validation=_validate(pipe, table, groups, side, steps=args.steps, reward=reward is not None,
                                           runs=max(1, min(5, args.runs))))
    key = planner.cost_table_key(model_key, table.dtype, side, threads)
    if args.out:
        out = Path(args.out)
    elif args.engines:
        out = Path(args.engines) / planner.ENGINE_COST_FILE
    else:
        out = planner.default_cost_path(args.device, backend, key)
    table.meta["key"] = key
    table.save(out)
    v = table.meta["validation"]
    print(f"wrote {out}: " + ", ".join(f"{k} p50 {c.p50_ms:.1f} / p99 {c.p99_ms:.1f} ms" for k, c in table.stages.items())
          + "; UNet " + ", ".join(f"b{b} {c.p50_ms:.1f}/{c.p99_ms:.1f} ms" for b, c in table.unet)
          + (f"; shallow step {table.unet_shallow_fraction:.2f} of a full UNet" if table.unet_shallow_fraction
             else "") + f"; check: {v['plan']} × {groups} groups measured p50 {v['measured_p50_ms']:.0f} ms vs "
          f"predicted p50 {v['predicted_p50_ms']:.0f} ms (p99 {v['predicted_p99_ms']:.0f} ms)")
    return table.to_dict()


def _validate(pipe, table, groups: int, side: int, *, steps: int, reward: bool, runs: int = 5) -> dict:
    """Whole calls of the reference plan beside the table's prediction for them (median of `runs`)."""
    import statistics
    import time

    from cg4ctr_fast.cli.demo import draw_product
    from cg4ctr_fast.imaging import to_rgb_and_alpha_mask
    from cg4ctr_fast.planner import Plan

    plan = Plan("ddim", steps, 7.5)
    rgb, mask = to_rgb_and_alpha_mask(draw_product(side))
    prompts = [GROUP_PROMPTS[i % len(GROUP_PROMPTS)] for i in range(groups)]
    times = []
    for _ in range(runs + 1):
        pipe.clear_prompt_cache()
        started = time.perf_counter()
        pipe(prompts, rgb, mask, num_inference_steps=plan.steps, guidance_scale=plan.guidance_scale,
             show_progress=False)
        times.append(1000 * (time.perf_counter() - started))
    # The alpha mask spares the saliency net, and the original photo is not scored here: neither is predicted.
    p50 = table.predict(plan, groups, reward=reward, stat="p50").stages
    p99 = table.predict(plan, groups, reward=reward, stat="p99").stages
    drop = ("saliency",)
    per_group_reward = table.stage_ms("reward", "p50") * groups if reward else 0.0
    per_group_reward99 = table.stage_ms("reward", "p99") * groups if reward else 0.0
    return {"plan": plan.name, "groups": groups, "runs": runs, "measured_ms": times[1:],
            "measured_p50_ms": statistics.median(times[1:]),
            "predicted_p50_ms": sum(v for k, v in p50.items() if k not in drop) - per_group_reward,
            "predicted_p99_ms": sum(v for k, v in p99.items() if k not in drop) - per_group_reward99,
            "note": "whole calls with the product's alpha as mask (no saliency), the original not scored"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cg4ctr_fast.cli.common import run_cli

    def dispatch(args) -> int:
        if args.pareto:
            return pareto(args)
        if args.calibrate:
            calibrate(args)
        else:
            run(args)
        return 0

    return run_cli("cg4ctr-bench", build_parser(), dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
