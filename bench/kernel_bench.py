#!/usr/bin/env python
"""Micro-benchmark of one denoising step outside the UNet: unfused diffusers vs FusedStep.

    python bench/kernel_bench.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--batch 1,8,16]
                                 [--latent 64] [--steps 20] [--reps N] [--warmup N]
                                 [--variants unfused,fused_torch,fused_compile,fused_native,fused_triton]
                                 [--bw-shapes 64x128,64x256] [--threads N] [--json FILE]

For each scheduler family (DDIM, Euler, DPM-Solver++ 2M; SD's noise schedule), each batch size B
(latents B x 4 x L x L, UNet output 2B x 4 x L x L with classifier-free guidance, the 4-channel
inpainting blend off and on) it times full loops of ``--steps`` steps for

* ``unfused``: diffusers' literal sequence (:class:`cg4ctr_fast.kernels.step.UnfusedStep`),
* ``fused_torch``: ``FusedStep(..., backend="torch")`` (the plain-torch reference pass),
* ``fused_compile``: FusedStep's host coefficients with the reference pass wrapped by ``torch.compile``
  (inductor: C++ on CPU, Triton on CUDA). The step's float scalars go in as one small fp32 tensor, so the
  graphs compile once per (batch, blend, last step) in the warm-up reps instead of once per step; a compile
  failure skips the row with the reason,
* ``fused_native``: the cg4ctr native ops (``kernels/``, built by ``make native``): ``FusedStep(...,
  backend="native")``, or FusedStep's host coefficients with the ``cg4ctr_fast.kernels.native`` wrappers
  where that backend is not there; skipped with the reason ("run `make native`") when the library is not
  built, or on CUDA when it was built without the CUDA kernels,
* ``fused_triton``: ``FusedStep(..., backend="triton")`` (CUDA only; skipped with the reason on CPU),

each rep on a fresh scheduler (``set_timesteps(steps)``; the set-up is not timed), after warm-up
reps (triton and torch.compile compile on their first calls), with the variants' reps interleaved.
``--variants`` picks a subset (default: all). It reports
microseconds per step (median, and p90 from 10 reps on: from fewer it would be an interpolation between the
slowest two, not a tail) and the speedup unfused / fused. A row whose (max − min) / median over reps exceeds
10 % is flagged noisy (``*`` in the table). ``--threads`` (default: the cores available) sets torch's
threads; the load average and /proc/stat steal before and after go to the JSON, with a warning line when the
machine was loaded.

It also measures the memory copy bandwidth (a large ``copy_``, bytes read + written: 1 GiB device to
device on CUDA, 256 MiB in host memory on CPU with the ``--threads`` torch threads) and each fused
variant's effective bandwidth: the bytes one step must move (read the 2B noise prediction and the B
latents [+ blend: B x 1 mask, image latents, noise], write the B latents; DPM-Solver++ also writes its
data prediction and reads the previous one) over the time of the step's elementwise call alone
(preallocated outputs, no scheduler bookkeeping), in a tight eager loop, and on CUDA also replayed from a
CUDA graph (kernel time without the Python launch overhead); at the pipeline sizes, and on CUDA at big
memory-bound sizes too (``--bw-shapes``). Backends there: triton and native on CUDA; native, torch and
compile on CPU (the same skip reasons as the loops). The loop rows carry the same bytes over their
whole per-step time (host overhead included) and its share of the copy bandwidth.

Timing: CUDA events on the GPU, ``time.perf_counter`` on CPU. Nothing here asserts on a timing.
The table is printed last; ``--json FILE`` gets everything (device, versions, git SHA, the command
line, the timestamp), written atomically. Exit status: 0, 1 when a variant failed to run, 2 on a
bad argument.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SCHEMA = "cg4ctr_fast.kernel_bench/1"
GUIDANCE = 7.5
CHANNELS = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("unfused", "fused_torch", "fused_compile", "fused_native", "fused_triton")
# fused variant -> the backend name of its elementwise call in the kernel-bandwidth section
KERNEL_BACKENDS = {"fused_triton": "triton", "fused_native": "native", "fused_torch": "torch",
                   "fused_compile": "compile"}
CUDA_KERNEL_BACKENDS = ("triton", "native")  # the eager torch / compile passes are the CPU comparison
CPU_KERNEL_BACKENDS = ("native", "torch", "compile")
# short name -> (project scheduler name, display name)
FAMILIES = {
    "ddim": ("ddim", "DDIM"),
    "euler": ("euler", "Euler"),
    "dpm++2m": ("dpm++", "DPM-Solver++ 2M"),
}
COPY_BYTES = 1 << 30
COPY_BYTES_CPU = 256 << 20  # well past the last-level cache, small enough for a shared host
COMPILE_RECOMPILE_LIMIT = 64  # graphs per compiled reference: batches x blend x last step, per dtype
NATIVE_HINT = "run `make native`"
DEFAULT_BW_SHAPES = "64x128,64x256"
P90_MIN_REPS = 10  # one rep in 10 lies beyond p90
NOISY_SPREAD = 0.10  # as cg4ctr_fast.bench: (max - min) / median over reps


class ArgError(Exception):
    """A bad command-line argument (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage too; one line is enough
        raise ArgError(message)


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ArgError(f"{name}: {text!r} is not an integer") from None
    if value < 1:
        raise ArgError(f"{name}: {value} must be >= 1")
    return value


def _batch_list(text: str) -> list[int]:
    items = [s.strip() for s in text.split(",")]
    if not items or any(not s for s in items):
        raise ArgError(f"--batch: {text!r} must be a comma-separated list of positive integers, e.g. 1,8,16")
    out: list[int] = []
    for s in items:
        b = _positive_int("--batch", s)
        if b not in out:
            out.append(b)
    return out


def _variant_list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in VARIANTS]
    if not items or bad:
        raise ArgError(f"--variants: {text!r} must be a comma-separated subset of {','.join(VARIANTS)}")
    return [v for v in VARIANTS if v in items]  # table order


def _shape_list(text: str) -> list[tuple[int, int]]:
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2:
            raise ArgError(f"--bw-shapes: {item!r} must be BxL (batch x latent side), e.g. 64x128")
        out.append((_positive_int("--bw-shapes batch", parts[0]), _positive_int("--bw-shapes latent", parts[1])))
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(
        prog="kernel_bench.py",
        description="Time the per-step work outside the UNet: unfused diffusers vs FusedStep (torch / triton).",
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="tensor dtype (default fp32)")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes B (default 1,8)")
    ap.add_argument("--latent", default="64", help="latent side L (default 64 = 512 px)")
    ap.add_argument("--steps", default="20", help="denoising steps per loop (default 20)")
    ap.add_argument("--reps", default="5", help="timed loops per variant (default 5)")
    ap.add_argument("--warmup", default="2", help="untimed loops per variant first (default 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated loop variants to run (default: all of {','.join(VARIANTS)}); "
                         "the fused ones also pick the kernel-bandwidth backends")
    ap.add_argument("--bw-shapes", default=DEFAULT_BW_SHAPES,
                    help="CUDA only: extra BxL sizes for the kernel bandwidth figure, or 'none' "
                         f"(default {DEFAULT_BW_SHAPES})")
    ap.add_argument("--threads", default=None,
                    help="torch threads on the CPU (default: the cores this process may use)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write all results to FILE (atomically)")
    args = ap.parse_args(argv)

    args.batch = _batch_list(args.batch)
    args.latent = _positive_int("--latent", args.latent)
    args.steps = _positive_int("--steps", args.steps)
    args.reps = _positive_int("--reps", args.reps)
    try:
        args.warmup = int(args.warmup, 10)
    except ValueError:
        raise ArgError(f"--warmup: {args.warmup!r} is not an integer") from None
    if args.warmup < 0:
        raise ArgError(f"--warmup: {args.warmup} must be >= 0")
    args.bw_shapes = _shape_list(args.bw_shapes)
    args.variants = _variant_list(args.variants)
    args.threads = _positive_int("--threads", args.threads) if args.threads is not None else _available_cores()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ArgError(f"--device cuda: CUDA is not available ({why}, torch {torch.__version__})")
    if args.json is not None:
        parent = Path(args.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise ArgError(f"--json: directory {str(parent)!r} does not exist")
        if Path(args.json).is_dir():
            raise ArgError(f"--json: {args.json!r} is a directory")
    return args


# ---------------------------------------------------------------------------------------------
# Statistics and timing.


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Clock:
    """Seconds taken by ``fn()``: CUDA events on a CUDA device, ``time.perf_counter`` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # nothing queued earlier is counted
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Full denoising loops: unfused vs FusedStep(torch) vs FusedStep(triton).


def scheduler_config() -> dict[str, Any]:
    """The project's SD scheduler config (what a preset gives every family)."""
    from cg4ctr_fast.config import SD_SCHEDULE

    return {**SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def make_schedulers() -> dict[str, Any]:
    """family -> a configured diffusers scheduler (a template; each rep builds a fresh one from it)."""
    from cg4ctr_fast.models.diffusion import make_scheduler

    cfg = scheduler_config()
    return {family: make_scheduler(name, cfg) for family, (name, _) in FAMILIES.items()}


@dataclass
class LoopInputs:
    noise_pred: torch.Tensor  # (2B, 4, L, L): the UNet output with CFG (one tensor reused every step)
    noise: torch.Tensor  # (B, 4, L, L): initial noise, and the blend's noise
    mask: torch.Tensor  # (B, 1, L, L)
    image_latents: torch.Tensor  # (B, 4, L, L)


def make_inputs(batch: int, latent: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LoopInputs:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, CHANNELS, latent, latent)

    def rnd(*s):
        return torch.randn(*s, generator=g, device=device).to(dtype)

    return LoopInputs(
        noise_pred=rnd(2 * batch, *shape[1:]),
        noise=rnd(*shape),
        mask=(torch.rand(batch, 1, latent, latent, generator=g, device=device) > 0.4).to(dtype),
        image_latents=rnd(*shape),
    )


# ---------------------------------------------------------------------------------------------
# The native and torch.compile passes.

_REF_NAMES = {"ddim": "ddim_step_ref", "euler": "euler_step_ref", "dpm": "dpm_solver_step_ref",
              "lcm": "lcm_step_ref", "tcd": "tcd_step_ref"}
_NATIVE_NAMES = {"ddim": "ddim_step_native", "euler": "euler_step_native", "dpm": "dpm_solver_step_native",
                 "lcm": "lcm_step_native", "tcd": "tcd_step_native"}


def _native_module():
    from cg4ctr_fast.kernels import native

    return native


def native_backend_in_step() -> bool:
    """Whether FusedStep itself takes backend="native" (else the bench drives the wrappers)."""
    from cg4ctr_fast.kernels import step

    return "native" in step.BACKENDS


def native_skip_reason(device: torch.device) -> str | None:
    """None when the native ops can run on ``device``, else why not (with the command that builds them)."""
    try:
        native = _native_module()
    except ImportError as exc:
        return f"cg4ctr_fast.kernels.native does not import ({_one_line(exc)}): {NATIVE_HINT}"
    why = native.native_unavailable_reason()  # one line naming `make native`
    if why is not None:
        return why
    if device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("cg4ctr::ddim_step", "CUDA"):
        return (f"the native library has no CUDA kernels (built without a CUDA toolkit or a CUDA torch): "
                f"{NATIVE_HINT} on this machine")
    return None


def native_ops() -> dict[str, Callable[..., Any]]:
    """family -> the native wrapper (the reference's signature)."""
    native = _native_module()
    return {family: getattr(native, name) for family, name in _NATIVE_NAMES.items()}


def _compiled(ref: Callable[..., Any]) -> Callable[..., Any]:
    """``ref`` under torch.compile, called with the reference's signature.

    Dynamo specializes on Python floats (a guard per value: a new graph every step), so the numeric
    keyword arguments travel as one fp32 tensor on the samples' device and come back as 0-d tensors;
    the references do their math in fp32, so x * coef is the same product as with the Python float.
    """
    def body(model_output, sample, coefs, names, rest):
        kw = dict(rest)
        for k, name in enumerate(names):
            kw[name] = coefs[k]
        return ref(model_output, sample, **kw)

    fn = torch.compile(body, dynamic=False)

    def op(model_output: torch.Tensor, sample: torch.Tensor, **kw: Any) -> Any:
        names = tuple(k for k, v in kw.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        coefs = torch.tensor([float(kw[n]) for n in names], dtype=torch.float32, device=sample.device)
        rest = {k: v for k, v in kw.items() if k not in names}
        return fn(model_output, sample, coefs, names, rest)

    return op


_COMPILED: dict[str, Callable[..., Any]] = {}


def compiled_ops() -> dict[str, Callable[..., Any]]:
    """family -> the reference under torch.compile (built once per process; compiles on first calls)."""
    if not _COMPILED:
        import torch._dynamo

        from cg4ctr_fast.kernels import reference

        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), COMPILE_RECOMPILE_LIMIT))
        _COMPILED.update({family: _compiled(getattr(reference, name)) for family, name in _REF_NAMES.items()})
    return _COMPILED


def _ops_step_class():
    from cg4ctr_fast.kernels.step import FusedStep, _unpack_blend

    class OpsStep(FusedStep):
        """FusedStep (host coefficients, scheduler state) with its elementwise pass given per family."""

        def __init__(self, scheduler: Any, guidance_scale: float, do_cfg: bool, ops: dict):
            super().__init__(scheduler, guidance_scale, do_cfg, backend="torch")
            self._family_ops = ops

        def __call__(self, noise_pred, t, latents, *, blend=None, out=None):
            if noise_pred.dtype != latents.dtype:  # FusedStep runs those unfused
                return super().__call__(noise_pred, t, latents, blend=blend, out=out)
            g = self.guidance_scale if self.do_cfg else None
            method = getattr(self, f"_{self.family}")
            return method(self._family_ops[self.family], noise_pred, t, latents, g, _unpack_blend(blend), out)

    return OpsStep


def _make_step(variant: str, scheduler: Any):
    from cg4ctr_fast.kernels.step import FusedStep, UnfusedStep

    if variant == "unfused":
        return UnfusedStep(scheduler, GUIDANCE, True)
    if variant == "fused_compile":
        return _ops_step_class()(scheduler, GUIDANCE, True, compiled_ops())
    if variant == "fused_native" and not native_backend_in_step():
        return _ops_step_class()(scheduler, GUIDANCE, True, native_ops())
    return FusedStep(scheduler, GUIDANCE, True, backend=variant.split("_", 1)[1])


def prepare_loop(template: Any, variant: str, inputs: LoopInputs, steps: int, blend: bool,
                 device: torch.device) -> tuple[Callable[[], None], int, list]:
    """Untimed set-up of one loop: a fresh scheduler, its timesteps, the stepper and the blends.

    Returns (run, number of steps, holder); ``run()`` does the steps, leaving the final latents in holder[0].
    """
    from cg4ctr_fast.kernels.step import Blend

    s = type(template).from_config(template.config)
    s.set_timesteps(steps, device=device)
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(0)  # as the inpainting pipeline does (strength 1: t_start = 0)
    ts = list(s.timesteps)  # element views of scheduler.timesteps, as `for t in timesteps` gives
    latents = inputs.noise * s.init_noise_sigma
    # the pipeline calls this before each UNet call; the first call sets the step index (and
    # Euler's "scale_model_input was called" flag). It is not part of the step, so it stays untimed.
    s.scale_model_input(latents, ts[0])
    if blend:
        blends = [Blend(inputs.mask, inputs.image_latents, inputs.noise, ts[i + 1] if i + 1 < len(ts) else None)
                  for i in range(len(ts))]
    else:
        blends = [None] * len(ts)
    step = _make_step(variant, s)
    noise_pred = inputs.noise_pred
    holder: list = [None]

    def run() -> None:
        x = latents
        for t, bl in zip(ts, blends):
            x = step(noise_pred, t, x, blend=bl)
        holder[0] = x

    return run, len(ts), holder


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@dataclass
class LoopRow:
    family: str
    scheduler: str
    batch: int
    latent: int
    dtype: str
    blend: bool
    variant: str
    steps: int = 0
    reps: int = 0
    warmup: int = 0
    us_per_step_median: float | None = None
    us_per_step_p90: float | None = None
    us_per_step_min: float | None = None
    spread: float | None = None  # (max - min) / median over reps
    noisy: bool | None = None
    samples_us_per_step: list = field(default_factory=list)
    speedup_vs_unfused: float | None = None
    # bytes a mid-loop fused step must move (see step_bytes) / median time per step, and its share of
    # the copy bandwidth (CUDA): a figure of merit for every variant, host overhead included
    bytes_per_step: int | None = None
    effective_gb_per_s: float | None = None
    pct_of_copy: float | None = None
    rel_diff_vs_unfused: float | None = None
    finite: bool | None = None
    skipped: str | None = None
    error: str | None = None


def _is_compile_failure(exc: BaseException) -> bool:
    """An error raised by dynamo/inductor (e.g. no C++ compiler), as opposed to one in the step itself."""
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(exc).__name__


def variant_skip_reasons(device: torch.device, variants: list[str]) -> dict[str, str]:
    """variant -> why it cannot run here (variants that can run are absent)."""
    out = {}
    if "fused_triton" in variants and (why := triton_skip_reason(device)):
        out["fused_triton"] = why
    if "fused_native" in variants and (why := native_skip_reason(device)):
        out["fused_native"] = why
    if "fused_compile" in variants and device.type == "cuda" and (why := triton_skip_reason(device)):
        out["fused_compile"] = f"torch.compile on CUDA generates Triton: {why}"
    return out


def triton_skip_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return (f"the Triton kernels are timed on CUDA tensors only (device {device.type}; on CPU they "
                "would run in the Triton interpreter)")
    from cg4ctr_fast.kernels.step import triton_available

    if not triton_available():
        return "triton does not import"
    return None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def bench_loops(args, device: torch.device, log: Callable[[str], None]) -> list[LoopRow]:
    dtype = DTYPES[args.dtype]
    clock = Clock(device)
    schedulers = make_schedulers()
    skips = variant_skip_reasons(device, args.variants)
    rows: list[LoopRow] = []
    for batch in args.batch:
        inputs = make_inputs(batch, args.latent, dtype, device)
        for family, template in schedulers.items():
            for blend in (False, True):
                group = {v: LoopRow(family, type(template).__name__, batch, args.latent, args.dtype, blend, v,
                                    reps=args.reps, warmup=args.warmup) for v in args.variants}
                rows.extend(group.values())
                for v, why in skips.items():
                    group[v].skipped = why
                live = [v for v in args.variants if group[v].skipped is None]
                finals: dict[str, torch.Tensor] = {}
                t0 = time.perf_counter()
                with torch.no_grad():
                    for rep in range(args.warmup + args.reps):
                        for v in list(live):  # variants interleaved rep by rep
                            row = group[v]
                            try:
                                run, n, holder = prepare_loop(template, v, inputs, args.steps, blend, device)
                                seconds = clock(run)
                            except Exception as exc:  # report it, keep benchmarking the rest
                                if v == "fused_compile" and _is_compile_failure(exc):
                                    row.skipped = f"torch.compile failed: {_one_line(exc)}"
                                else:
                                    row.error = _one_line(exc)
                                live.remove(v)
                                continue
                            row.steps = n
                            if rep >= args.warmup:
                                row.samples_us_per_step.append(seconds / n * 1e6)
                            finals[v] = holder[0]
                for v in live:
                    row = group[v]
                    xs = row.samples_us_per_step
                    row.us_per_step_median = statistics.median(xs)
                    row.us_per_step_p90 = percentile(xs, 90) if len(xs) >= P90_MIN_REPS else None
                    row.us_per_step_min = min(xs)
                    row.spread = (max(xs) - min(xs)) / row.us_per_step_median if len(xs) > 1 else None
                    row.noisy = row.spread is None or row.spread > NOISY_SPREAD
                    row.finite = bool(torch.isfinite(finals[v]).all())
                    row.bytes_per_step = step_bytes(family, batch, args.latent, dtype, blend)
                    row.effective_gb_per_s = row.bytes_per_step / (row.us_per_step_median * 1e-6) / 1e9
                base = group.get("unfused")
                for v in live:
                    if v == "unfused" or base is None or base.us_per_step_median is None:
                        continue
                    row = group[v]
                    row.speedup_vs_unfused = base.us_per_step_median / row.us_per_step_median
                    if "unfused" in finals:
                        row.rel_diff_vs_unfused = _rel_diff(finals[v], finals["unfused"])
                parts = []
                for v in args.variants:
                    r = group[v]
                    parts.append(f"{v} {_fmt_us(r.us_per_step_median)}" if r.us_per_step_median is not None
                                 else f"{v} {'error' if r.error else 'skipped'}")
                log(f"[loops] {family:8s} B={batch:<3d} blend={'on ' if blend else 'off'} us/step: "
                    f"{' | '.join(parts)}  ({time.perf_counter() - t0:.1f}s)")
    return rows


# ---------------------------------------------------------------------------------------------
# Copy bandwidth and the fused passes' effective bandwidth.


def copy_bandwidth(device: torch.device, reps: int) -> dict:
    """``copy_`` of a large buffer (device to device on CUDA, host memory on CPU with torch's threads);
    GB/s counts bytes read + written (1 GB = 1e9 B)."""
    if device.type == "cuda":
        nbytes = COPY_BYTES
        free, _ = torch.cuda.mem_get_info(device)
        while nbytes > (64 << 20) and 2 * nbytes > free * 0.8:
            nbytes //= 2
    else:
        nbytes = COPY_BYTES_CPU
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    clock = Clock(device)
    for _ in range(3):
        dst.copy_(src)
    times = [clock(lambda: dst.copy_(src)) for _ in range(max(reps, 10))]
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    med = statistics.median(times)
    return {
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "bytes_copied": nbytes,
        "bytes_moved": 2 * nbytes,
        "us_median": med * 1e6,
        "us_min": min(times) * 1e6,
        "gb_per_s": 2 * nbytes / med / 1e9,
        "gb_per_s_best": 2 * nbytes / min(times) / 1e9,
    }


def step_bytes(family: str, batch: int, latent: int, dtype: torch.dtype, blend: bool) -> int:
    """Bytes one fused step must move (each input read once, each output written once).

    Noise prediction 2B latents, latents B, written latents B; blend (mid-loop: with noise): mask
    B x 1, image latents B, noise B. DPM-Solver++ 2M also reads the previous data prediction and
    writes this step's (the scheduler's ``model_outputs``): 2 more latents-sized tensors.
    """
    lat = batch * CHANNELS * latent * latent
    elems = 2 * lat + lat + lat
    if blend:
        elems += batch * latent * latent + lat + lat
    if family == "dpm++2m":
        elems += 2 * lat
    return elems * torch.empty((), dtype=dtype).element_size()


def kernel_call(family: str, inp: LoopInputs, blend: bool, backend: str = "triton") -> Callable[[], Any]:
    """One fused step's elementwise call (preallocated outputs) as a closure.

    ``backend``: "triton" (the launcher), "torch" (the reference), "native" (the cg4ctr op wrappers) or
    "compile" (the reference under torch.compile; it compiles on the first call).
    Mid-loop coefficients: blend with noise (not the last step), DPM-Solver++ second order, DDIM
    without clipping (SD's config). The values do not matter for the timing.
    """
    if backend == "triton":
        from cg4ctr_fast.kernels.ddim_step import ddim_step
        from cg4ctr_fast.kernels.dpm_solver_step import dpm_solver_step
        from cg4ctr_fast.kernels.euler_step import euler_step
    elif backend in ("native", "compile"):
        ops = native_ops() if backend == "native" else compiled_ops()
        ddim_step, euler_step, dpm_solver_step = ops["ddim"], ops["euler"], ops["dpm"]
    elif backend == "torch":
        from cg4ctr_fast.kernels.reference import ddim_step_ref as ddim_step
        from cg4ctr_fast.kernels.reference import dpm_solver_step_ref as dpm_solver_step
        from cg4ctr_fast.kernels.reference import euler_step_ref as euler_step
    else:
        raise ValueError(f"unknown backend {backend!r}")
    sample = inp.noise.clone()
    out = torch.empty_like(sample)
    kw: dict = {"guidance_scale": GUIDANCE, "out": out}
    if blend:
        kw.update(mask=inp.mask, image_latents=inp.image_latents, noise=inp.noise, init_image=0.6, init_noise=0.8)
    mo = inp.noise_pred
    if family == "ddim":
        kw.update(x0_sample=1.2, x0_model=-0.6, eps_sample=0.0, eps_model=1.0, prev_x0=0.9, prev_eps=0.4,
                  clip_range=None)
        return lambda: ddim_step(mo, sample, **kw)
    if family == "euler":
        kw.update(x0_sample=1.0, x0_model=-2.0, sigma_hat=2.0, dt=-0.3)
        return lambda: euler_step(mo, sample, **kw)
    if family == "dpm++2m":
        kw.update(x0_sample=1.1, x0_model=-0.5, coef_sample=0.8, coef_x0=0.3, coef_diff=0.1,
                  prev_x0=inp.image_latents.clone(), x0_out=torch.empty_like(sample))
        return lambda: dpm_solver_step(mo, sample, **kw)
    raise ValueError(f"unknown family {family!r}")


def _calls(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def loop() -> None:
        for _ in range(n):
            fn()

    return loop


def time_kernel_eager(fn: Callable[[], Any], clock: Clock, reps: int, budget_s: float = 0.02) -> tuple[float, int]:
    """Median seconds per call of ``fn`` called back to back (launch overhead included); and calls per rep."""
    for _ in range(3):
        fn()
    probe = clock(_calls(fn, 10)) / 10
    n = int(min(max(budget_s / max(probe, 1e-9), 10), 2000))
    loop = _calls(fn, n)
    return statistics.median(clock(loop) / n for _ in range(reps)), n


def time_kernel_graph(fn: Callable[[], Any], clock: Clock, reps: int, n: int) -> float:
    """Median seconds per call of ``n`` calls captured in one CUDA graph (GPU time only)."""
    n = max(1, min(n, 200))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = [clock(graph.replay) / n for _ in range(reps)]
    del graph
    return statistics.median(times)


def kernel_backends(device: torch.device, variants: list[str]) -> list[str]:
    """The elementwise backends timed alone on ``device``, among the chosen variants, in table order."""
    wanted = {KERNEL_BACKENDS[v] for v in variants if v in KERNEL_BACKENDS}
    order = CUDA_KERNEL_BACKENDS if device.type == "cuda" else CPU_KERNEL_BACKENDS
    return [b for b in order if b in wanted]


def bench_kernel_bandwidth(args, device: torch.device, copy_gbps: float | None,
                           log: Callable[[str], None], skips: dict[str, str] | None = None) -> list[dict]:
    """Rows of the elementwise calls timed alone: eager everywhere, CUDA-graph replay on CUDA.

    ``skips``: backend -> reason; those backends get one skipped row each instead of timings.
    """
    dtype = DTYPES[args.dtype]
    clock = Clock(device)
    cuda = device.type == "cuda"
    skips = dict(skips or {})
    backends = kernel_backends(device, args.variants)
    shapes = [(b, args.latent, "pipeline") for b in args.batch]
    if cuda:  # big memory-bound sizes: what a GPU's bandwidth is measured at; on CPU the pipeline sizes do
        shapes += [(b, lat, "big") for b, lat in args.bw_shapes
                   if (b, lat) not in {(x, args.latent) for x in args.batch}]
    rows: list[dict] = []
    for backend in backends:
        if backend in skips:
            rows.append({"backend": backend, "family": "all", "batch": None, "latent": None, "dtype": args.dtype,
                         "blend": None, "size": None, "skipped": skips[backend]})
    backends = [b for b in backends if b not in skips]
    reps = max(args.reps, 5)
    for batch, latent, kind in shapes:
        if not backends:
            break
        try:
            inputs = make_inputs(batch, latent, dtype, device, seed=1)
        except Exception as exc:  # e.g. out of memory at a big --bw-shapes size
            rows.append({"backend": "all", "family": "all", "batch": batch, "latent": latent, "dtype": args.dtype,
                         "blend": None, "size": kind, "error": _one_line(exc)})
            log(f"[kernel] B={batch} L={latent}: {rows[-1]['error']}")
            continue
        for family in FAMILIES:
            for blend in (False, True):
                for backend in backends:
                    row: dict = {"backend": backend, "family": family, "batch": batch, "latent": latent,
                                 "dtype": args.dtype, "blend": blend, "size": kind,
                                 "bytes_per_step": step_bytes(family, batch, latent, dtype, blend)}
                    rows.append(row)
                    fn = None
                    try:
                        with torch.no_grad():
                            fn = kernel_call(family, inputs, blend, backend)
                            eager, n = time_kernel_eager(fn, clock, reps)
                        row.update(eager_us=eager * 1e6, eager_calls_per_rep=n,
                                   eager_gb_per_s=row["bytes_per_step"] / eager / 1e9)
                    except Exception as exc:
                        if backend == "compile" and _is_compile_failure(exc):
                            row["skipped"] = f"torch.compile failed: {_one_line(exc)}"
                        else:
                            row["error"] = _one_line(exc)
                        log(f"[kernel] {backend} {family} B={batch} L={latent}: "
                            f"{row.get('error') or row.get('skipped')}")
                        continue
                    if cuda:
                        try:
                            with torch.no_grad():
                                graph = time_kernel_graph(fn, clock, reps, n)
                            row.update(graph_us=graph * 1e6, graph_gb_per_s=row["bytes_per_step"] / graph / 1e9)
                        except Exception as exc:  # capture not possible here: the eager figure stands
                            row["graph_error"] = _one_line(exc)
                            try:
                                torch.cuda.synchronize()
                            except Exception:
                                pass
                    for key in ("eager", "graph"):
                        if copy_gbps and f"{key}_gb_per_s" in row:
                            row[f"{key}_pct_of_copy"] = 100.0 * row[f"{key}_gb_per_s"] / copy_gbps
                    del fn
            log(f"[kernel] {family:8s} B={batch:<3d} L={latent:<3d} done ({', '.join(backends)})")
        del inputs
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# Environment, table, JSON.


def _git_sha() -> dict:
    def git(*cmd) -> str | None:
        try:
            res = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"git_sha": sha, "git_dirty": bool(status) if status is not None else None}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    from cg4ctr_fast.bench import cpu_name

    env = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),  # the distribution's version: importing triton is left to the kernels
        "diffusers": _version("diffusers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    env.update(_git_sha())
    env["native_library"] = _native_library_facts()
    return env


def _native_library_facts() -> dict | None:
    """Path and build facts of the native library when it is built (its build.txt next to it)."""
    try:
        native = _native_module()
    except ImportError:
        return None
    path = native.library_path()
    if not path.is_file():
        return None
    facts: dict = {"path": str(path)}
    info = path.with_name(path.name + ".build.txt")
    if info.is_file():
        for line in info.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip():
                facts[key.strip()] = value.strip()
    return facts


def _fmt_us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _cell(row: LoopRow) -> str:
    if row.error:
        return "error"
    if row.skipped:
        return "skipped"
    p90 = _fmt_us(row.us_per_step_p90) if row.us_per_step_p90 is not None else "n/a"
    return f"{_fmt_us(row.us_per_step_median)} ({p90}){'*' if row.noisy else ''}"


def _gbps(row: LoopRow) -> str:
    if row.effective_gb_per_s is None:
        return "-"
    pct = f" ({row.pct_of_copy:.0f}%)" if row.pct_of_copy is not None else ""
    return f"{row.effective_gb_per_s:.2f}{pct}"


def _speed(row: LoopRow) -> str:
    return f"{row.speedup_vs_unfused:.2f}x" if row.speedup_vs_unfused is not None else "-"


def format_report(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [
        f"kernel_bench: {env['device_name']} ({env['device']}), torch {env['torch']}, triton {env['triton']}, "
        f"diffusers {env['diffusers']}, git {(env['git_sha'] or '?')[:12]}{'+dirty' if env['git_dirty'] else ''}",
        f"dtype {cfg['dtype']}, latents Bx4x{cfg['latent']}x{cfg['latent']}, UNet output 2Bx4 (CFG g={GUIDANCE}), "
        f"{cfg['steps']} steps/loop, {cfg['reps']} reps after {cfg['warmup']} warm-up; "
        f"us per step: median (p90) over reps, p90 n/a below {P90_MIN_REPS} reps; * = noisy: (max-min)/median "
        f"over reps > {100 * NOISY_SPREAD:.0f}%; speedup = unfused median / fused median; torch threads "
        f"{cfg.get('threads')}",
        "",
    ]
    loops = result["loops"]
    variants = [v for v in VARIANTS if any(r.variant == v for r in loops)]
    header = ["family", "B", "blend"]
    for v in variants:
        header += [v.replace("_", " ")] + ([] if v == "unfused" else ["speedup"])
    header += ["GB/s " + v.split("_", 1)[-1] for v in variants if v != "unfused"]
    table = []
    by_key: dict = {}
    for r in loops:
        by_key.setdefault((r.family, r.batch, r.blend), {})[r.variant] = r
    for (family, batch, blend), g in by_key.items():
        cells = [family, str(batch), "on" if blend else "off"]
        for v in variants:
            cells += [_cell(g[v])] + ([] if v == "unfused" else [_speed(g[v])])
        cells += [_gbps(g[v]) for v in variants if v != "unfused"]
        table.append(cells)
    lines += _grid(header, table)
    if any(v != "unfused" for v in variants):
        lines += ["GB/s = bytes one fused step must move / median us per step of the whole loop step (host "
                  "bookkeeping included), (% of the copy bandwidth)"]
    notes = sorted({f"{r.variant}: skipped: {r.skipped}" for r in loops if r.skipped})
    notes += [f"{r.variant} {r.family} B={r.batch} blend={'on' if r.blend else 'off'}: ERROR {r.error}"
              for r in loops if r.error]
    copy = result.get("copy_bandwidth") or {}
    kern = result.get("kernel_bandwidth") or []
    if "gb_per_s" in copy:
        where = "device to device" if env["device"] == "cuda" else f"host memory, {copy.get('threads')} threads"
        lines += ["", f"copy bandwidth: {copy['gb_per_s']:.1f} GB/s (copy_ of {copy['bytes_copied'] / 2**30:g} GiB, "
                      f"{where}, read + written, median of reps; best {copy['gb_per_s_best']:.1f} GB/s)"]
    elif copy.get("skipped") or copy.get("error"):
        notes.append(f"copy bandwidth: {copy.get('skipped') or 'ERROR ' + copy['error']}")
    timed = [r for r in kern if r.get("batch") is not None]
    for r in kern:
        if r.get("batch") is None and r.get("skipped"):
            notes.append(f"kernel {r['backend']}: skipped: {r['skipped']}")
    if timed:
        cache = ("sizes that fit in L2 can show more than the DRAM copy bandwidth" if env["device"] == "cuda"
                 else "sizes that fit in the CPU caches can show more than the copy bandwidth")
        lines += ["", "fused step's elementwise call alone, effective bandwidth = bytes per step / time per call "
                  "(eager: back-to-back calls; graph: CUDA-graph replay, GPU time only); " + cache]
        header = ["family", "B", "L", "blend", "backend", "MB/step", "eager us", "GB/s", "%copy", "graph us", "GB/s",
                  "%copy"]
        table = []
        for r in timed:
            blend = {True: "on", False: "off"}.get(r["blend"], "-")
            if "error" in r or "skipped" in r:
                mb = f"{r['bytes_per_step'] / 1e6:.2f}" if "bytes_per_step" in r else "-"
                what = "error" if "error" in r else "skipped"
                table.append([r["family"], str(r["batch"]), str(r["latent"]), blend, r.get("backend", "triton"), mb,
                              what, "", "", "", "", ""])
                notes.append(f"kernel {r.get('backend', 'triton')} {r['family']} B={r['batch']} L={r['latent']}: "
                             f"{'ERROR ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
                continue
            cells = [r["family"], str(r["batch"]), str(r["latent"]), blend, r.get("backend", "triton"),
                     f"{r['bytes_per_step'] / 1e6:.2f}"]
            for key in ("eager", "graph"):
                if f"{key}_us" in r:
                    pct = r.get(f"{key}_pct_of_copy")
                    gbps = r[f"{key}_gb_per_s"]
                    cells += [f"{r[f'{key}_us']:.1f}", f"{gbps:.0f}" if gbps >= 100 else f"{gbps:.2f}",
                              f"{pct:.0f}%" if pct is not None else "-"]
                else:
                    cells += ["-", "-", "-"]
            if "graph_error" in r:
                notes.append(f"kernel {r['family']} B={r['batch']} L={r['latent']}: no CUDA graph: {r['graph_error']}")
            table.append(cells)
        lines += _grid(header, table, left=5)
    elif result.get("kernel_bandwidth_skipped"):
        notes.append(f"kernel bandwidth: skipped: {result['kernel_bandwidth_skipped']}")
    notes += (result.get("load") or {}).get("warnings", [])
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]], left: int = 3) -> list[str]:
    """Aligned text table; the first ``left`` columns are left-justified, the rest right-justified."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _jsonable(x: Any) -> Any:
    if isinstance(x, LoopRow):
        x = x.__dict__
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json_atomic(path: str, data: dict) -> None:
    target = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.resolve().parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(data), f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        command = shlex.join([sys.executable, sys.argv[0], *argv])
    else:
        argv = list(argv)
        command = shlex.join([sys.executable, str(Path(__file__)), *argv])
    try:
        args = parse_args(argv)
    except ArgError as exc:
        print(f"kernel_bench.py: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    from cg4ctr_fast.bench import load_during, load_snapshot, load_warnings

    load_before = load_snapshot()
    started = time.perf_counter()
    result: dict = {
        "schema": SCHEMA,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "argv": argv,
        "environment": environment(device),
        "config": {
            "device": args.device, "dtype": args.dtype, "batch": args.batch, "latent": args.latent,
            "steps": args.steps, "reps": args.reps, "warmup": args.warmup, "guidance_scale": GUIDANCE,
            "variants": args.variants,
            "threads": args.threads, "interleaved": True, "p90_min_reps": P90_MIN_REPS, "noisy_spread": NOISY_SPREAD,
            "cfg": True, "channels": CHANNELS, "bw_shapes": [list(s) for s in args.bw_shapes],
            "scheduler_config": scheduler_config(),
            "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        },
    }
    result["schedulers"] = {family: {"class": type(s).__name__,
                                     **{k: v for k, v in s.config.items() if not k.startswith("_")}}
                            for family, s in make_schedulers().items()}
    result["loops"] = bench_loops(args, device, log)
    try:
        result["copy_bandwidth"] = copy_bandwidth(device, args.reps)
    except Exception as exc:
        result["copy_bandwidth"] = {"error": _one_line(exc)}
    copy_gbps = result["copy_bandwidth"].get("gb_per_s")
    for row in result["loops"]:
        if copy_gbps and row.effective_gb_per_s is not None:
            row.pct_of_copy = 100.0 * row.effective_gb_per_s / copy_gbps
    if kernel_backends(device, args.variants):
        skips = {KERNEL_BACKENDS[v]: why for v, why in variant_skip_reasons(device, args.variants).items()}
        result["kernel_bandwidth"] = bench_kernel_bandwidth(args, device, copy_gbps, log, skips)
    else:
        result["kernel_bandwidth_skipped"] = (f"none of the variants {','.join(args.variants)} has an elementwise "
                                              f"call timed alone on {device.type}")
    result["wall_s"] = time.perf_counter() - started
    load_after = load_snapshot()
    during = load_during(load_before, load_after)
    result["load"] = {"before": load_before, "after": load_after, "during": during,
                      "warnings": load_warnings(load_before, during)}
    failed = any(r.error for r in result["loops"]) or any("error" in r for r in result.get("kernel_bandwidth", []))
    failed = failed or "error" in result["copy_bandwidth"]
    result["table"] = format_report(result)
    if args.json:
        write_json_atomic(args.json, result)
    print(result["table"])
    if args.json:
        print(f"\nwrote {args.json} ({result['wall_s']:.1f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
