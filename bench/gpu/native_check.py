#!/usr/bin/env python
"""Check the native step and composite ops (``torch.ops.cg4ctr``, built by ``make native``) on one device.

    python bench/gpu/native_check.py [--device cuda|cpu] [--quick] [--reps N] [--json FILE]

For each step family (DDIM, Euler, DPM-Solver++, LCM, TCD), dtype (fp16, fp32), batch B (1, 8) and blend
mode (off; on, mid-loop: mask + image latents + noise; last: mask + image latents, no noise) it runs the
native op through its wrapper (``cg4ctr_fast.kernels.native.<name>_native``) on random inputs at the pipeline
size (latents B x 4 x 64 x 64, guided UNet output 2B x 4 x 64 x 64) with random step coefficients (DDIM and
LCM with clipping, LCM/TCD with injected step noise, DPM-Solver++ second order) and compares it with

* the torch reference (``cg4ctr_fast.kernels.reference``) on the same device,
* on CUDA, the Triton kernel (``cg4ctr_fast.kernels.<name>_step``) when triton imports,

printing the max abs error of every output (DPM-Solver++ also its data prediction ``x0_out``). Tolerance
per element: |native - other| <= atol + rtol * |other| with atol = atol_scale * max(1, max |other|):

* vs reference: fp32 rtol 1e-6, atol_scale 1e-6 (the ops keep the reference's operation order, no FMA,
  so they are expected bit-exact; on CUDA torch divides by a host scalar through its reciprocal, so
  Euler's (s - x0) / sigma_hat can differ by an ulp there); fp16 rtol 2e-3 (2 ulps), atol_scale 1e-5;
* vs Triton (which may contract a*b + c into an FMA): fp32 rtol 1e-5, atol_scale 1e-5; fp16 rtol 2e-3,
  atol_scale 1e-3.

The composite ops run on a 512 x 512 RGB image (mask: a disc of product with random alpha) against
``cg4ctr_fast.imaging.composite`` (8-bit: equal bit for bit) and ``composite_float`` (max abs error
<= 1.2e-7, one float32 ulp at 1.0).

Then it times each step op (B = 8, blend on, each dtype): the native op vs the Triton kernel on CUDA (CUDA
events), vs the torch reference on CPU (perf_counter): median microseconds per call over ``--reps`` runs of
back-to-back calls, and the effective bandwidth (the bytes one step must move, as bench/kernel_bench.py
counts them, over that time). Timing is reported, never checked.

``--quick``: odd small latents (B x 4 x 13 x 17, B in 1 and 3), fp32 and fp16, the three blend modes, a
96 x 80 composite and 3 timing reps (seconds on a CPU). ``--device cpu`` checks the CPU kernels against the
reference the same way (no Triton).

Exit status: 0 when every comparison is within its tolerance, 1 on a mismatch or when the library
(or, on CUDA, its CUDA kernels) is missing, 2 on a bad argument. ``--json FILE`` writes everything
(atomically).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

FAMILIES = ("ddim", "euler", "dpm", "lcm", "tcd")
MODULES = {"ddim": "ddim_step", "euler": "euler_step", "dpm": "dpm_solver_step", "lcm": "lcm_step",
           "tcd": "tcd_step"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BLENDS = ("off", "on", "last")
GUIDANCE = 7.5
CHANNELS = 4
# (rtol, atol_scale) per comparison and dtype; see the module docstring
TOL = {
    "reference": {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 1e-5)},
    "triton": {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3)},
}
COMPOSITE_FLOAT_TOL = 1.2e-7


class ArgError(Exception):
    """A bad command-line argument (one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ArgError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(prog="native_check.py", description="Native cg4ctr ops vs the torch reference (and Triton on CUDA).")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="small odd shapes, few timing reps")
    ap.add_argument("--reps", default=None, help="timing reps (default 20, 3 with --quick; 0 = no timing)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results to FILE (atomically)")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ArgError(f"--device cuda: CUDA is not available ({why}, torch {torch.__version__})")
    if args.reps is None:
        args.reps = 3 if args.quick else 20
    else:
        try:
            args.reps = int(args.reps, 10)
        except ValueError:
            raise ArgError(f"--reps: {args.reps!r} is not an integer") from None
        if args.reps < 0:
            raise ArgError(f"--reps: {args.reps} must be >= 0")
    if args.json is not None:
        parent = Path(args.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise ArgError(f"--json: directory {str(parent)!r} does not exist")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs.


@dataclass
class Case:
    family: str
    dtype: torch.dtype
    batch: int
    spatial: tuple[int, int]
    blend: str


def make_kwargs(case: Case, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(model_output, sample, keyword arguments) of one call: random tensors in ``case.dtype``, random
    coefficients of the family's signature. Blend "on" uses the pipeline's 2B mask when B > 1 and a
    batch-1 image latents (the broadcast paths); "last" passes no noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, (h, w), dt = case.batch, case.spatial, case.dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    def coef(lo=-1.5, hi=1.5):
        return float(lo + (hi - lo) * torch.rand((), generator=g).item())

    mo = rnd(2 * b, CHANNELS, h, w)
    sample = rnd(b, CHANNELS, h, w)
    kw: dict[str, Any] = {"guidance_scale": GUIDANCE}
    if case.blend != "off":
        mb = 2 * b if b > 1 else 1
        kw["mask"] = (torch.rand(mb, 1, h, w, generator=g) > 0.4).to(device=device, dtype=dt)
        kw["image_latents"] = rnd(1, CHANNELS, h, w)
        if case.blend == "on":
            kw["noise"] = rnd(b, CHANNELS, h, w)
            kw["init_image"], kw["init_noise"] = coef(0.1, 1.0), coef(0.1, 1.0)
    f = case.family
    if f == "ddim":
        kw.update(x0_sample=coef(0.5, 3.0), x0_model=coef(-3.0, -0.1), eps_sample=coef(-0.5, 0.5),
                  eps_model=coef(0.5, 1.5), prev_x0=coef(0.1, 1.0), prev_eps=coef(0.1, 1.0), clip_range=1.0)
    elif f == "euler":
        kw.update(x0_sample=coef(0.5, 1.5), x0_model=coef(-3.0, -0.1), sigma_hat=coef(0.5, 5.0), dt=coef(-1.0, -0.05))
    elif f == "dpm":
        kw.update(x0_sample=coef(0.5, 3.0), x0_model=coef(-3.0, -0.1), coef_sample=coef(0.5, 1.0),
                  coef_x0=coef(0.05, 0.5), coef_diff=coef(-0.3, 0.3), prev_x0=rnd(b, CHANNELS, h, w))
    elif f == "lcm":
        kw.update(x0_sample=coef(0.5, 3.0), x0_model=coef(-3.0, -0.1), c_skip=coef(0.0, 0.2), c_out=coef(0.8, 1.0),
                  prev_denoised=coef(0.3, 1.0), prev_noise=coef(0.1, 0.9), step_noise=rnd(b, CHANNELS, h, w),
                  clip_range=1.0)
    else:
        kw.update(x0_sample=coef(0.5, 3.0), x0_model=coef(-3.0, -0.1), eps_sample=coef(-0.5, 0.5),
                  eps_model=coef(0.5, 1.5), noised_x0=coef(0.1, 1.0), noised_eps=coef(0.1, 1.0),
                  prev_noised=coef(0.3, 1.0), prev_noise=coef(0.1, 0.9), step_noise=rnd(b, CHANNELS, h, w))
    return mo, sample, kw


def step_bytes(case: Case) -> int:
    """Bytes one step must move, as bench/kernel_bench.py counts them (plus the LCM/TCD step noise read)."""
    h, w = case.spatial
    lat = case.batch * CHANNELS * h * w
    elems = 2 * lat + lat + lat
    if case.blend != "off":
        elems += case.batch * h * w + lat + (lat if case.blend == "on" else 0)
    if case.family == "dpm":
        elems += 2 * lat
    if case.family in ("lcm", "tcd"):
        elems += lat
    return elems * torch.empty((), dtype=case.dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Functions under comparison.


def functions(device: torch.device) -> tuple[dict, dict, dict | None, str | None]:
    """(native, reference, triton or None, why no triton) per family."""
    from cg4ctr_fast.kernels import native, reference

    nat = {f: getattr(native, f"{MODULES[f]}_native") for f in FAMILIES}
    ref = {f: getattr(reference, f"{MODULES[f]}_ref") for f in FAMILIES}
    if device.type != "cuda":
        return nat, ref, None, "CPU run: the Triton kernels are compared on CUDA only"
    try:
        import importlib

        tri = {f: getattr(importlib.import_module(f"cg4ctr_fast.kernels.{MODULES[f]}"), MODULES[f]) for f in FAMILIES}
    except Exception as exc:  # no triton on this machine
        return nat, ref, None, f"triton kernels unavailable ({type(exc).__name__}: {exc})"
    return nat, ref, tri, None


def outputs(res: Any) -> list[torch.Tensor]:
    return list(res) if isinstance(res, tuple) else [res]


def compare(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_scale: float) -> dict:
    """Max abs error, and the worst |d| / tolerance (> 1 = a mismatch); NaN/inf anywhere counts as one."""
    g, w = got.float(), want.float()
    if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
        same = bool(torch.equal(g.isnan(), w.isnan()) and torch.equal(g[~g.isnan()], w[~w.isnan()]))
        return {"max_abs": None if not same else 0.0, "worst_ratio": 0.0 if same else math.inf,
                "exact": same, "nonfinite": True}
    d = (g - w).abs()
    atol = atol_scale * max(1.0, w.abs().max().item())
    ratio = (d / (atol + rtol * w.abs())).max().item() if d.numel() else 0.0
    return {"max_abs": d.max().item() if d.numel() else 0.0, "worst_ratio": ratio, "exact": bool(torch.equal(g, w))}


# ---------------------------------------------------------------------------------------------
# Checks.


def cases(quick: bool) -> list[Case]:
    spatial, batches = ((13, 17), (1, 3)) if quick else ((64, 64), (1, 8))
    return [Case(f, dt, b, spatial, bl) for f in FAMILIES for dt in DTYPES.values() for b in batches for bl in BLENDS]


def check_steps(device: torch.device, quick: bool, log: Callable[[str], None]) -> tuple[list[dict], str | None]:
    nat, ref, tri, no_triton = functions(device)
    rows = []
    for k, case in enumerate(cases(quick)):
        mo, sample, kw = make_kwargs(case, device, seed=1000 + k)
        with torch.no_grad():
            got = outputs(nat[case.family](mo, sample, **kw))
            others = {"reference": outputs(ref[case.family](mo, sample, **kw))}
            if tri is not None:
                others["triton"] = outputs(tri[case.family](mo, sample, **kw))
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"family": case.family, "dtype": str(case.dtype).replace("torch.", ""), "batch": case.batch,
               "spatial": list(case.spatial), "blend": case.blend}
        ok = True
        for name, want in others.items():
            rtol, atol_scale = TOL[name][case.dtype]
            for label, g, w in zip(("out", "x0_out"), got, want):
                c = compare(g, w, rtol, atol_scale)
                row[f"{label}_vs_{name}"] = c
                ok = ok and c["worst_ratio"] <= 1.0
        row["ok"] = ok
        rows.append(row)
        errs = "  ".join(f"{key.replace('_vs_', ' vs ')} {_fmt_err(v)}" for key, v in row.items() if "_vs_" in key)
        log(f"{'ok  ' if ok else 'FAIL'} {case.family:5s} {row['dtype']:8s} B={case.batch:<2d} "
            f"{'x'.join(map(str, case.spatial)):5s} blend={case.blend:4s} max abs err: {errs}")
    return rows, no_triton


def _fmt_err(c: dict) -> str:
    if c["max_abs"] is None:
        return "non-finite mismatch"
    tag = " (exact)" if c["exact"] else f" ({c['worst_ratio']:.2f} of tol)"
    return f"{c['max_abs']:.2e}{tag}"


def check_composite(device: torch.device, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """The composite ops vs cg4ctr_fast.imaging on one image (computed on the host, compared on the host)."""
    import numpy as np
    from PIL import Image

    from cg4ctr_fast import imaging
    from cg4ctr_fast.kernels import native

    h, w = (96, 80) if quick else (512, 512)
    rng = np.random.default_rng(7)
    original = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    generated_f = rng.random((h, w, 3), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2
    mask = Image.fromarray(np.where(disc, 0, 255).astype(np.uint8), mode="L")  # >= 128: background
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha[: h // 2] = 255  # opaque rows: the product's exact colours
    orig_img, gen_img = Image.fromarray(original, mode="RGB"), Image.fromarray(generated, mode="RGB")
    weights = imaging._paste_weights(orig_img, mask, alpha, "native_check")
    want8 = np.asarray(imaging.composite(orig_img, gen_img, mask, alpha))
    wantf = imaging.composite_float(orig_img, generated_f, mask, alpha)

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    got8 = native.composite_native(dev(original), dev(generated), dev(weights)).cpu().numpy()
    gotf = native.composite_float_native(dev(original), dev(generated_f), dev(weights)).cpu().numpy()
    d8 = int(np.abs(got8.astype(np.int32) - want8.astype(np.int32)).max())
    df = float(np.abs(gotf.astype(np.float64) - wantf.astype(np.float64)).max())
    rows = [
        {"op": "composite", "shape": [h, w, 3], "max_abs": d8, "exact": bool(np.array_equal(got8, want8)),
         "tolerance": 0, "ok": d8 == 0},
        {"op": "composite_float", "shape": [h, w, 3], "max_abs": df, "exact": bool(np.array_equal(gotf, wantf)),
         "tolerance": COMPOSITE_FLOAT_TOL, "ok": df <= COMPOSITE_FLOAT_TOL},
    ]
    for r in rows:
        log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['op']:15s} {h}x{w}x3 vs imaging: max abs err {r['max_abs']:.3g}"
            f"{' (exact)' if r['exact'] else ''}")
    return rows


# ---------------------------------------------------------------------------------------------
# Timing (reported only).


def _time_calls(fn: Callable[[], Any], device: torch.device, reps: int, budget_s: float = 0.02) -> float:
    """Median seconds per call over ``reps`` runs of n back-to-back calls (n sized to ~budget_s)."""
    cuda = device.type == "cuda"

    def run(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    for _ in range(3):
        fn()
    probe = run(5)
    n = int(min(max(budget_s / max(probe, 1e-9), 5), 2000))
    return statistics.median(run(n) for _ in range(reps))


def time_steps(device: torch.device, quick: bool, reps: int, log: Callable[[str], None]) -> list[dict]:
    nat, ref, tri, _ = functions(device)
    others = {"triton": tri} if tri is not None else {}
    if device.type == "cpu":
        others["reference"] = ref
    spatial, batch = ((13, 17), 3) if quick else ((64, 64), 8)
    rows = []
    for dtype in DTYPES.values():
        for family in FAMILIES:
            case = Case(family, dtype, batch, spatial, "on")
            mo, sample, kw = make_kwargs(case, device, seed=7)
            kw["out"] = torch.empty_like(sample)
            if family == "dpm":
                kw["x0_out"] = torch.empty_like(sample)
            nbytes = step_bytes(case)
            row = {"family": family, "dtype": str(dtype).replace("torch.", ""), "batch": batch,
                   "spatial": list(spatial), "blend": "on", "bytes_per_step": nbytes}
            with torch.no_grad():
                for name, table in (("native", nat), *others.items()):
                    fn = table[family]
                    sec = _time_calls(lambda: fn(mo, sample, **kw), device, reps)
                    row[f"{name}_us"] = sec * 1e6
                    row[f"{name}_gb_per_s"] = nbytes / sec / 1e9
            rows.append(row)
            parts = [f"{name} {row[f'{name}_us']:.1f} us {row[f'{name}_gb_per_s']:.1f} GB/s"
                     for name in ("native", *others)]
            log(f"time {family:5s} {row['dtype']:8s} B={batch} {'x'.join(map(str, spatial))} blend=on: "
                + " | ".join(parts))
    return rows


# ---------------------------------------------------------------------------------------------


def unavailable_reason(device: torch.device) -> str | None:
    from cg4ctr_fast.kernels import native

    why = native.native_unavailable_reason()
    if why is not None:
        return why
    key = "CUDA" if device.type == "cuda" else "CPU"
    missing = [op for op in (*MODULES.values(), "composite", "composite_float")
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cg4ctr::{op}", key)]
    if missing:
        return (f"the native library at {native.library_path()} has no {key} kernels for {', '.join(missing)} "
                f"(build it with `python -m cg4ctr_fast.kernels.native build` on a machine with "
                f"{'a CUDA toolkit and a CUDA torch' if key == 'CUDA' else 'a C++ compiler'})")
    return None


def write_json_atomic(path: str, data: dict) -> None:
    from cg4ctr_fast.fileio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False, default=str) + "\n").encode())


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
    except ArgError as exc:
        print(f"native_check.py: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    device = torch.device(args.device)
    why = unavailable_reason(device)
    if why is not None:
        print(f"native_check.py: {why}", file=sys.stderr)
        return 1
    from cg4ctr_fast.kernels import native

    started = time.perf_counter()
    log(f"native_check: {device.type}, torch {torch.__version__}, library {native.library_path()}"
        f"{', quick' if args.quick else ''}")
    steps, no_triton = check_steps(device, args.quick, log)
    if no_triton:
        log(f"(no Triton comparison: {no_triton})")
    comp = check_composite(device, args.quick, log)
    timing = time_steps(device, args.quick, args.reps, log) if args.reps > 0 else []
    failed = [r for r in steps + comp if not r["ok"]]
    result = {
        "schema": "cg4ctr_fast.native_check/1",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "library": str(native.library_path()),
        "quick": args.quick,
        "tolerances": {k: {str(dt).replace("torch.", ""): {"rtol": v[0], "atol_scale": v[1]} for dt, v in t.items()}
                       for k, t in TOL.items()} | {"composite_float_max_abs": COMPOSITE_FLOAT_TOL},
        "triton_skipped": no_triton,
        "steps": steps,
        "composite": comp,
        "timing": timing,
        "failures": len(failed),
        "wall_s": time.perf_counter() - started,
    }
    if args.json:
        write_json_atomic(args.json, _jsonable(result))
    n = len(steps) + len(comp)
    log(f"native_check: {n - len(failed)}/{n} comparisons within tolerance ({result['wall_s']:.1f} s)"
        + ("" if not failed else f"; {len(failed)} MISMATCH"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
