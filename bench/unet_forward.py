"""One UNet forward per backend, side by side: `python bench/unet_forward.py --preset sd15-inpaint`.

Times the UNet alone (the part that dominates a denoising step) for torch eager, torch.compile and ONNX Runtime
on the same random weights and inputs, and reports each backend's ratio to eager. Results go to --json.
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
    parser.add_argument("--json", required=True)
    parser.add_argument("--onnx-dir", default=None, help="keep the exported UNet here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.batch <= 0 or args.runs <= 0:
        print("unet_forward.py: error: --batch and --runs must be positive", file=sys.stderr)
        return 2

    from cg4ctr_fast.bench import environment, percentiles, time_calls
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.models.diffusion import build_modules
    from cg4ctr_fast.runtime.torch_backend import UNetSlot

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
    for backend in args.backends.split(","):
        slot = UNetSlot(unet)
        started = time.perf_counter()
        if backend == "compile":
            slot.forward = torch.compile(unet)
        elif backend == "onnxruntime":
            slot, notes[backend] = _onnxruntime_slot(preset, unet, args)
        elif backend != "torch":
            print(f"unet_forward.py: error: unknown backend {backend!r}", file=sys.stderr)
            return 2
        first = slot(sample, timestep, hidden)  # warm-up (compiles for "compile")
        warm_s = time.perf_counter() - started
        if reference is None:
            reference = first
        max_err = float((first - reference).abs().max())
        seconds = time_calls(lambda: slot(sample, timestep, hidden), runs=args.runs, warmup=0, device=device)
        rows[backend] = {"forward_s": percentiles(seconds), "first_call_s": warm_s, "max_abs_err_vs_eager": max_err,
                         **notes.get(backend, {})}
        print(f"{backend:8s} first call {warm_s:7.1f} s, forward p50 {rows[backend]['forward_s']['p50']:.3f} s, "
              f"max |diff| vs eager {max_err:.2e}", file=sys.stderr, flush=True)
    base = rows.get("torch", {}).get("forward_s", {}).get("p50")
    for row in rows.values():
        row["speedup_vs_eager"] = base / row["forward_s"]["p50"] if base else None
    report = {"environment": environment(device), "preset": preset.name, "batch": args.batch,
              "latent_side": side, "rows": rows}
    atomic_write_bytes(args.json, (json.dumps(report, indent=2) + "\n").encode())
    for name, row in rows.items():
        print(f"{name:8s} {row['forward_s']['p50']:.3f} s  ({row['speedup_vs_eager']:.2f}x eager)")
    return 0


def _onnxruntime_slot(preset, unet, args):
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
    component = OrtComponent(root / "unet" / "model.onnx", contract, ["CPUExecutionProvider"], torch.device("cpu"))
    return OrtUNetSlot(component), {"export_s": export_s, "onnx_files": [f["path"] for f in files],
                                    "onnx_bytes": sum(f["bytes"] for f in files)}


if __name__ == "__main__":
    sys.exit(main())
