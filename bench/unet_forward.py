"""One UNet forward per backend, side by side: `python bench/unet_forward.py --preset sd15-inpaint`.

Times the UNet alone (the part that dominates a denoising step) for torch eager, torch.compile and ONNX Runtime
on the same random weights and inputs, the same thread count (--threads) and the timed forwards interleaved
backend by backend, and reports each backend's ratio to eager (median of per-round ratios, with their min-max,
flagged by the rules in cg4ctr_fast.bench) and the machine's load. Results go to --json, checked first.
The onnxruntime row exports the UNet first (cg4ctr_fast.export, the same path as `cg4ctr-export onnx`; over
2 GB it goes to model.onnx + model.onnx.data) into --onnx-dir or a temporary folder; its first call includes
the export and the session's graph optimisation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15-inpaint")
    parser.add_argument("--batch", type=int, default=2, help="2 = one image with classifier-free guidance")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backends", default="torch,compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for torch and ONNX Runtime's intra-op pool (default: the cores available)")
    parser.add_argument("--json", required=True)
    parser.add_argument("--onnx-dir", default=None, help="keep the exported UNet here (default: a temporary folder)")
    args = parser.parse_args(argv)

    from cg4ctr_fast.bench import available_cores
    from cg4ctr_fast.cli.common import check_out_file
    from cg4ctr_fast.errors import InputError

    try:
        check_out_file(args.json, flag="--json")  # before anything is built or measured
    except InputError as exc:
        print(f"unet_forward.py: error: {exc}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else available_cores()
    if args.batch <= 0 or args.runs <= 0 or threads <= 0:
        print("unet_forward.py: error: --batch, --runs and --threads must be positive", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in ("torch", "compile", "onnxruntime")]
    if unknown:
        print(f"unet_forward.py: error: unknown backend {unknown[0]!r}", file=sys.stderr)
        return 2

    from cg4ctr_fast.bench import (
        RULES,
        Variant,
        apply_threads,
        environment,
        load_during,
        load_snapshot,
        load_warnings,
        paired_ratio,
        percentiles,
        row_flags,
        run_interleaved,
    )
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.models.diffusion import build_modules
    from cg4ctr_fast.runtime.torch_backend import UNetSlot

    thread_info = apply_threads(threads, compile_workers="compile" in backends)
    preset = get_preset(args.preset)
    modules = build_modules(preset, seed=0)
    unet = modules.unet
    side = preset.unet.sample_size
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, preset.unet.in_channels, side, side, generator=gen)
    hidden = torch.randn(args.batch, 77, preset.unet.cross_attention_dim, generator=gen)
    timestep = torch.tensor(500)
    device = torch.device("cpu")
    rows = {}
    reference = None
    notes = {}
    slots = {}
    load_before = load_snapshot()
    for backend in backends:
        slot = UNetSlot(unet)
        started = time.perf_counter()
        if backend == "compile":
            slot.forward = torch.compile(unet)
        elif backend == "onnxruntime":
            slot, notes[backend] = _onnxruntime_slot(preset, unet, args, threads)
        first = slot(sample, timestep, hidden)  # warm-up (compiles for "compile")
        warm_s = time.perf_counter() - started
        if reference is None:
            reference = first
        slots[backend] = slot
        rows[backend] = {"first_call_s": warm_s, "max_abs_err_vs_eager": float((first - reference).abs().max()),
                         **notes.get(backend, {})}
        print(f"{backend:8s} first call {warm_s:7.1f} s, max |diff| vs eager {rows[backend]['max_abs_err_vs_eager']:.2e}",
              file=sys.stderr, flush=True)
    # The timed forwards, interleaved backend by backend (A B C A B C …) so a load hits each alike.
    variants = [Variant(name=b, call=lambda s=s: s(sample, timestep, hidden), backend=b) for b, s in slots.items()]
    samples = run_interleaved(variants, runs=args.runs, warmup=0, device=device)
    base = samples[(backends[0], 1)].wall_s if backends[0] == "torch" else None
    for b in backends:
        s = samples[(b, 1)]
        rows[b].update(forward_s=percentiles(s.wall_s), samples_s=s.wall_s, flags=row_flags(percentiles(s.wall_s)))
        if b == "torch":
            rows[b].update(speedup_vs_eager=1.0, speedup_range=[1.0, 1.0], speedup_flags=[])
        elif base is not None:
            pr = paired_ratio(base, s.wall_s)
            rows[b].update(speedup_vs_eager=pr["ratio"], speedup_range=[pr["min"], pr["max"]], speedup_flags=pr["flags"])
        else:
            rows[b].update(speedup_vs_eager=None)
    load_after = load_snapshot()
    during = load_during(load_before, load_after)
    warnings = load_warnings(load_before, during)
    report = {"environment": environment(device), "preset": preset.name, "batch": args.batch,
              "latent_side": side, "threads": thread_info, "interleaved": True, "rules": RULES,
              "load": {"before": load_before, "after": load_after, "during": during, "warnings": warnings},
              "rows": rows}
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    print(f"threads {threads}; {args.runs} forwards per backend, interleaved; {RULES}")
    for name, row in rows.items():
        speed = (f"{row['speedup_vs_eager']:.2f}x eager [{row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}]"
                 if row.get("speedup_vs_eager") else "-")
        flags = ",".join(dict.fromkeys(row["flags"] + row.get("speedup_flags", []))) or "ok"
        print(f"{name:12s} {row['forward_s']['p50']:.3f} s  ({speed})  {flags}")
    for line in warnings:
        print(line)
    return 0


def _onnxruntime_slot(preset, unet, args, threads=None):
    """Export the UNet with the contracts (fp32, batch up to args.batch) and wrap it in the ORT UNet slot."""
    import tempfile
    from pathlib import Path

    from cg4ctr_fast.export.contracts import ExportSettings, StackDims, build_contracts
    from cg4ctr_fast.export.modules import UNetExport
    from cg4ctr_fast.export.onnx_export import export_component
    from cg4ctr_fast.runtime.onnxruntime_backend import OrtComponent, OrtUNetSlot

    creatives = max(1, (args.batch + 1) // 2)  # the UNet profile is 1 .. 2 × creatives
    contract = build_contracts(StackDims.from_preset(preset), ExportSettings(batch=(1, creatives, creatives)),
                               ["unet"])["unet"]
    root = Path(args.onnx_dir) if args.onnx_dir else Path(tempfile.mkdtemp(prefix="unet-onnx-"))
    root.mkdir(parents=True, exist_ok=True)
    if (root / "unet").exists():
        import shutil

        shutil.rmtree(root / "unet")
    started = time.perf_counter()
    files = export_component(contract, UNetExport(unet).eval(), root, 17)
    export_s = time.perf_counter() - started
    print(f"onnx     exported in {export_s:.1f} s: {', '.join(f['path'] for f in files)}", file=sys.stderr, flush=True)
    component = OrtComponent(root / "unet" / "model.onnx", contract, ["CPUExecutionProvider"], torch.device("cpu"),
                             threads=threads)
    return OrtUNetSlot(component), {"export_s": export_s, "onnx_files": [f["path"] for f in files],
                                    "onnx_bytes": sum(f["bytes"] for f in files)}


if __name__ == "__main__":
    sys.exit(main())
