"""The benchmark harness behind `cg4ctr-bench` and the bench/ scripts.

Every run measures diffusers' own StableDiffusionInpaintPipeline on the same weights and prompts (one call
with the prompt list) beside our backends, so speed is reported as a ratio measured side by side. What keeps
a ratio from lying (a second job on 2 cores once turned ONNX Runtime's 1.5× into 8.4× and 24.6×, because
backends react differently to oversubscribed cores):

- Threads: `apply_threads(n)` gives torch (intra-op, inter-op where still allowed, inductor's compile
  workers) the same n that ONNX Runtime sessions get (`intra_op_num_threads`); the default is the cores
  this process may run on (`available_cores`). The JSON records what each library reports back.
- Interleaving: `run_interleaved` runs every variant once per round (A B C A B C …), warm-up rounds
  included, so a load that comes or goes during the run hits every variant alike. A ratio is the median of
  per-round ratios, with their min–max as its stated noise.
- Machine load: `load_snapshot` / `load_during` record the load average, /proc/stat's steal jiffies and the
  cores other processes kept busy, before and after.
- Flags (`NOISY_SPREAD`, `P95_MIN_RUNS`, `P99_MIN_RUNS`): a row whose (max − min) / median exceeds 10 % is
  "noisy"; a ratio is "noisy" when either side is or when its per-round min–max spans more than 10 % of it,
  and "overlap" when the two sides' min–max ranges overlap (these runs do not tell which side is faster);
  p95 needs ≥ 20 runs and p99 ≥ 100 (one run in 20 / 100 lies beyond them), or they are left out.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.runtime.timing import STAGES, StageTimer

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")

# A percentile is reported only from enough runs that at least one of them lies beyond it: p95 from 20
# runs, p99 from 100. From 5 runs numpy's "p95" is an interpolation between the two slowest, not a tail.
P95_MIN_RUNS = 20
P99_MIN_RUNS = 100
# Spread = (max − min) / median of a row's timed runs. On the quiet 2-core machine the tiny pipeline's rows
# spread by a few percent; above 10 % the run was disturbed and its ratios are flagged "noisy".
NOISY_SPREAD = 0.10
# Other processes using half a core or more on average during the run, or 5 % of CPU time stolen by the
# hypervisor, mark the machine as loaded (beside a 1-minute load average above the cores at the start).
LOADED_OTHERS_CORES = 0.5
LOADED_STEAL_FRACTION = 0.05
PROC_STAT = "/proc/stat"


# ---------------------------------------------------------------------------------------------- statistics
def percentiles(values: Sequence[float]) -> dict[str, Any]:
    """Summary of one row's timed runs (seconds): p50, mean, min, max, n, spread, and p95/p99 when n allows.

    p95 is None below `P95_MIN_RUNS` runs and p99 below `P99_MIN_RUNS` (`format_percentile` prints why).
    spread = (max − min) / p50, None for a single run. Raises ValueError on an empty list.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("percentiles: no values")
    n = int(arr.size)
    p50 = float(np.percentile(arr, 50))
    return {
        "p50": p50,
        "p95": float(np.percentile(arr, 95)) if n >= P95_MIN_RUNS else None,
        "p99": float(np.percentile(arr, 99)) if n >= P99_MIN_RUNS else None,
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": n,
        "spread": float((arr.max() - arr.min()) / p50) if n > 1 and p50 > 0 else None,
    }


def format_percentile(stats: dict[str, Any], key: str, fmt: str = "{:.4f}") -> str:
    """`stats[key]` formatted, or "n/a (needs ≥ N runs)" when the row has too few runs for that percentile."""
    need = {"p95": P95_MIN_RUNS, "p99": P99_MIN_RUNS}.get(key)
    if stats.get(key) is None:
        return f"n/a (needs ≥ {need} runs)" if need else "n/a"
    return fmt.format(stats[key])


def row_flags(stats: dict[str, Any]) -> list[str]:
    """["noisy"] when the row's spread exceeds NOISY_SPREAD or cannot be told (one run); else []."""
    spread = stats.get("spread")
    return ["noisy"] if spread is None or spread > NOISY_SPREAD else []


def paired_ratio(base: Sequence[float], ours: Sequence[float]) -> dict[str, Any]:
    """How many times faster `ours` is than `base`, from runs measured round by round side by side.

    Both lists hold seconds per call, index i from round i. Returns ratio (median of base[i] / ours[i]),
    min, max, spread ((max − min) / ratio), and flags: "noisy" when either side's spread or the ratio's
    exceeds NOISY_SPREAD, "overlap" when the two sides' [min, max] ranges overlap (which side is faster is
    not resolved by these runs). Raises ValueError when the lists are empty or differ in length.
    """
    if not base or len(base) != len(ours):
        raise ValueError(f"paired_ratio: need equal, non-empty run lists, got {len(base)} and {len(ours)}")
    ratios = [b / o for b, o in zip(base, ours)]
    ratio = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / ratio if len(ratios) > 1 else None
    flags = []
    noisy_side = row_flags(percentiles(base)) or row_flags(percentiles(ours))
    if noisy_side or spread is None or spread > NOISY_SPREAD:
        flags.append("noisy")
    if max(min(base), min(ours)) <= min(max(base), max(ours)):
        flags.append("overlap")
    return {"ratio": ratio, "min": min(ratios), "max": max(ratios), "spread": spread, "n": len(ratios),
            "flags": flags}


# ---------------------------------------------------------------------------------------------- threads
def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; os.cpu_count() where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_threads(threads: int, *, compile_workers: bool = False) -> dict[str, Any]:
    """Give torch `threads` threads (intra-op; inter-op too while torch still allows it) and return what
    each library now reports. ONNX Runtime sessions get the same number through
    `onnxruntime_components(..., threads=threads)`; with `compile_workers` inductor's compile pool too.

    Raises InputError for threads < 1.
    """
    if threads < 1:
        raise InputError(f"--threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)
    interop_note = None
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        # torch allows it once, before any inter-op work; the pipeline runs no inter-op (fork) work.
        interop_note = "inter-op pool already started; left as it was"
    applied: dict[str, Any] = {
        "requested": threads,
        "available_cores": available_cores(),
        "torch_intra_op": torch.get_num_threads(),
        "torch_inter_op": torch.get_num_interop_threads(),
        "onnxruntime_intra_op": threads,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
    }
    if interop_note:
        applied["torch_inter_op_note"] = interop_note
    if compile_workers:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = threads
        applied["inductor_compile_threads"] = threads
    return applied


# ---------------------------------------------------------------------------------------------- machine load
def read_proc_stat(text: Optional[str] = None, path: str = PROC_STAT) -> Optional[dict[str, int]]:
    """Jiffies of the aggregate "cpu" line of /proc/stat: total, idle (idle + iowait), steal, busy; and
    procs_running. `text` is the file's content (tests); None when the file is absent (not Linux) or odd.

    Fields: user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already in
    user/nice, so total sums the first eight.
    """
    if text is None:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            try:
                values = [int(v) for v in parts[1:9]]
            except ValueError:
                return None
            values += [0] * (8 - len(values))
            idle = values[3] + values[4]
            steal = values[7]
            total = sum(values)
            out.update(total=total, idle=idle, steal=steal, busy=total - idle - steal)
        elif parts and parts[0] == "procs_running" and len(parts) > 1 and parts[1].isdigit():
            out["procs_running"] = int(parts[1])
    return out if "total" in out else None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def load_snapshot(proc_stat_text: Optional[str] = None) -> dict[str, Any]:
    """The machine's load now: load averages (1, 5, 15 min), /proc/stat jiffies, this process's CPU seconds."""
    try:
        loadavg = list(os.getloadavg())
    except OSError:
        loadavg = None
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "monotonic_s": time.monotonic(),
        "loadavg": loadavg,
        "proc_stat": read_proc_stat(proc_stat_text),
        "own_cpu_s": _own_cpu_s(),
        "cores": os.cpu_count(),
    }


def load_during(before: dict[str, Any], after: dict[str, Any], *, hz: Optional[int] = None) -> dict[str, Any]:
    """What the machine did between two `load_snapshot`s: steal share of all CPU time, cores busy on
    average, the part of them this process used, and the rest (other processes), each in cores."""
    wall = after["monotonic_s"] - before["monotonic_s"]
    out: dict[str, Any] = {"wall_s": wall, "steal_fraction": None, "busy_cores": None,
                           "own_cores": (after["own_cpu_s"] - before["own_cpu_s"]) / wall if wall > 0 else None,
                           "others_cores": None}
    a, b = after.get("proc_stat"), before.get("proc_stat")
    if a and b and wall > 0:
        hz = hz or os.sysconf("SC_CLK_TCK")
        total = a["total"] - b["total"]
        out["steal_jiffies"] = a["steal"] - b["steal"]
        out["steal_fraction"] = out["steal_jiffies"] / total if total > 0 else 0.0
        out["busy_cores"] = (a["busy"] - b["busy"]) / hz / wall
        out["others_cores"] = max(0.0, out["busy_cores"] - out["own_cores"])
    return out


def load_warnings(before: dict[str, Any], during: dict[str, Any]) -> list[str]:
    """One line per sign that the machine was loaded: load average above the cores at the start, other
    processes using ≥ LOADED_OTHERS_CORES cores, or ≥ LOADED_STEAL_FRACTION of CPU time stolen."""
    lines = []
    cores = before.get("cores") or 1
    if before.get("loadavg") and before["loadavg"][0] > cores:
        lines.append(f"WARNING: loaded machine: 1-min load average {before['loadavg'][0]:.2f} > {cores} cores at "
                     "the start; ratios can mislead, see the noise columns")
    others = during.get("others_cores")
    if others is not None and others >= LOADED_OTHERS_CORES:
        lines.append(f"WARNING: loaded machine: other processes kept {others:.2f} of {cores} cores busy on "
                     "average during the run")
    steal = during.get("steal_fraction")
    if steal is not None and steal >= LOADED_STEAL_FRACTION:
        lines.append(f"WARNING: {100 * steal:.1f} % of CPU time was stolen by the hypervisor during the run")
    return lines


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is KiB on Linux and the process's lifetime peak (it never goes down).
    return {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


@dataclass
class Variant:
    """One thing to time: `call()` is one whole call; `prepare()` runs untimed just before each call."""

    name: str
    call: Callable[[], Any]
    prepare: Optional[Callable[[], Any]] = None
    timer: Optional[StageTimer] = None  # reset before each call, snapshot after
    groups: int = 1
    backend: str = ""
    fused: Optional[bool] = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.groups)


@dataclass
class Samples:
    """A variant's timed runs, index i from round i: wall and process-CPU seconds, stage seconds."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    peak: dict[str, float] = field(default_factory=dict)


def interleaved_order(names: Sequence[Any], *, runs: int, warmup: int) -> list[tuple[int, Any, bool]]:
    """(round, variant, timed) in the order they run: every variant once per round, warm-up rounds first."""
    return [(r, name, r >= warmup) for r in range(warmup + runs) for name in names]


def run_interleaved(variants: Sequence[Variant], *, runs: int, warmup: int, device: torch.device,
                    after_round: Optional[Callable[[int, dict], Any]] = None,
                    clock: Callable[[], float] = time.perf_counter,
                    cpu_clock: Callable[[], float] = time.process_time) -> dict[tuple[str, int], Samples]:
    """Run the variants round by round (A B C A B C …) and return their samples by `Variant.key`.

    `after_round(round, samples)` is called after each timed round (partial reports). Wall time is
    `clock()` around the call, CPU time `cpu_clock()` (every thread of this process) around it.
    """
    by_key = {v.key: v for v in variants}
    if len(by_key) != len(variants):
        raise ValueError("run_interleaved: two variants share a name and group count")
    samples = {k: Samples() for k in by_key}
    for rnd, key, timed in interleaved_order(list(by_key), runs=runs, warmup=warmup):
        v, s = by_key[key], samples[key]
        if v.prepare is not None:
            v.prepare()
        if v.timer is not None:
            v.timer.reset()
        _sync(device)
        _reset_peak(device)
        c0, t0 = cpu_clock(), clock()
        v.call()
        _sync(device)
        wall, cpu = clock() - t0, cpu_clock() - c0
        if timed:
            s.wall_s.append(wall)
            s.cpu_s.append(cpu)
            if v.timer is not None:
                s.stages.append(v.timer.snapshot())
            for k, mb in _peak_mb(device).items():
                s.peak[k] = max(s.peak.get(k, 0.0), mb)
        if timed and after_round is not None and key == list(by_key)[-1]:
            after_round(rnd, samples)
    return samples


# ---------------------------------------------------------------------------------------------- results
@dataclass
class BenchCase:
    prompts: list[str]
    image: Any
    mask: Any
    steps: int
    guidance: float
    height: int
    width: int
    seed: int = 0


@dataclass
class VariantResult:
    name: str
    backend: str
    fused: Optional[bool]
    groups: int
    total: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    images_per_s: float
    memory: dict[str, float]
    cpu_s: Optional[dict[str, Any]] = None
    cpu_per_wall: Optional[float] = None  # median of per-run process CPU s / wall s: ≈ threads kept busy
    samples_s: list[float] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    ratio_vs_diffusers: Optional[float] = None
    ratio_range: Optional[list[float]] = None
    ratio_flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def summarise(variants: Sequence[Variant], samples: dict[tuple[str, int], Samples], *,
              baseline: Optional[str] = "diffusers") -> list[VariantResult]:
    """One result per variant with at least one timed run; ratios against the `baseline` variant of the same
    group count, paired round by round (`paired_ratio`)."""
    results = []
    for v in variants:
        s = samples[v.key]
        if not s.wall_s:
            continue
        total = percentiles(s.wall_s)
        timed = s.stages
        stages = {st: percentiles([r.get(st, 0.0) for r in timed]) for st in STAGES if any(st in r for r in timed)}
        row = VariantResult(
            name=v.name, backend=v.backend, fused=v.fused, groups=v.groups, total=total, stages=stages,
            images_per_s=v.groups / total["p50"], memory=dict(s.peak),
            cpu_s=percentiles(s.cpu_s) if s.cpu_s else None,
            cpu_per_wall=statistics.median(c / w for c, w in zip(s.cpu_s, s.wall_s)) if s.cpu_s else None,
            samples_s=list(s.wall_s), flags=row_flags(total), notes=list(v.notes),
        )
        base = samples.get((baseline, v.groups)) if baseline else None
        if base is not None and v.name == baseline:
            row.ratio_vs_diffusers = 1.0
        elif base is not None and base.wall_s:
            n = min(len(base.wall_s), len(s.wall_s))  # a partial report can catch a round half done
            pr = paired_ratio(base.wall_s[:n], s.wall_s[:n])
            row.ratio_vs_diffusers, row.ratio_range, row.ratio_flags = pr["ratio"], [pr["min"], pr["max"]], pr["flags"]
        results.append(row)
    return results


def _fmt_ratio(r: VariantResult) -> str:
    if r.ratio_vs_diffusers is None:
        return "-"
    if r.ratio_range is None:
        return f"{r.ratio_vs_diffusers:.2f}x"
    lo, hi = r.ratio_range
    return f"{r.ratio_vs_diffusers:.2f}x [{lo:.2f}-{hi:.2f}]"


def table(results: list[VariantResult]) -> str:
    """A fixed-width table: total p50, spread, p95, cpu/wall per variant, its ratio to diffusers with the
    per-round min–max, the flags, and the main stages."""
    head = (f"{'variant':<28}{'groups':>7}{'p50 s':>9}{'spread':>8}{'p95 s':>24}{'img/s':>8}{'cpu/wall':>9}"
            f"{'vs diffusers [min-max]':>24}  {'flags':<15}{'unet s':>9}{'step s':>9}{'decode s':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        stage = lambda s: f"{r.stages[s]['p50']:.4f}" if s in r.stages else "-"  # noqa: E731
        spread = f"{100 * r.total['spread']:.0f}%" if r.total.get("spread") is not None else "-"
        cpu = f"{r.cpu_per_wall:.2f}" if r.cpu_per_wall is not None else "-"
        flags = ",".join(dict.fromkeys(r.flags + r.ratio_flags)) or "ok"
        lines.append(
            f"{r.name:<28}{r.groups:>7}{r.total['p50']:>9.4f}{spread:>8}{format_percentile(r.total, 'p95'):>24}"
            f"{r.images_per_s:>8.2f}{cpu:>9}{_fmt_ratio(r):>24}  {flags:<15}"
            f"{stage('unet'):>9}{stage('step'):>9}{stage('vae_decode'):>9}"
        )
    return "\n".join(lines)


RULES = (
    f"spread = (max-min)/median of a row's timed runs; 'noisy' = spread > {100 * NOISY_SPREAD:.0f}% (or one run); "
    "a ratio is the median of per-round ratios [their min-max], 'noisy' when either side is or its min-max spans "
    f"> {100 * NOISY_SPREAD:.0f}% of it; 'overlap' = the two sides' min-max ranges overlap (which is faster is not "
    f"resolved); p95 needs >= {P95_MIN_RUNS} runs, p99 >= {P99_MIN_RUNS}; cpu/wall = process CPU s per wall s"
)


def plot(results: list[VariantResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.6 * len(results) + 1.5))
    labels = [f"{r.name} ({r.groups} groups){' [noisy]' if 'noisy' in r.flags else ''}" for r in results]
    left = np.zeros(len(results))
    for stage in STAGES:
        values = np.array([r.stages.get(stage, {}).get("p50", 0.0) for r in results])
        if values.any():
            ax.barh(labels, values, left=left, label=stage)
            left += values
    other = np.array([r.total["p50"] for r in results]) - left
    ax.barh(labels, np.clip(other, 0, None), left=left, label="other / whole call", color="lightgray")
    # The min-max of the timed runs, so a reader sees the noise next to the bar.
    p50 = np.array([r.total["p50"] for r in results])
    lo = p50 - np.array([r.total["min"] for r in results])
    hi = np.array([r.total["max"] for r in results]) - p50
    ax.errorbar(p50, np.arange(len(results)), xerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
    ax.set_xlabel("seconds per call (p50; whiskers: min-max of the timed runs)")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the pipeline variants
def ours_variant(pipe, case: BenchCase, *, name: str, cold_prompt_cache: bool = True) -> Variant:
    """One of our pipelines on one case. With `cold_prompt_cache` the prompt-embedding cache is cleared before
    every call, so the text encoder runs each call as in diffusers; otherwise timed calls reuse the cache."""
    timer = StageTimer(pipe.components.device)

    def prepare():
        pipe.timer = timer
        if cold_prompt_cache:
            pipe.clear_prompt_cache()

    def call():
        try:
            pipe(case.prompts, case.image, case.mask, num_inference_steps=case.steps, guidance_scale=case.guidance,
                 height=case.height, width=case.width, seed=case.seed, show_progress=False)
        finally:
            pipe.timer = None

    notes = ["prompt embeddings re-encoded every call (cache cleared), as diffusers does" if cold_prompt_cache
             else "prompt embeddings cached across calls (diffusers re-encodes every call)"]
    return Variant(name=name, call=call, prepare=prepare, timer=timer, groups=len(case.prompts),
                   backend=pipe.components.backend, fused=pipe.fuse_step, notes=notes)


def diffusers_variant(dpipe, case: BenchCase) -> Variant:
    """diffusers' pipeline on one case, its generator re-seeded before every call (untimed)."""
    generator = torch.Generator("cpu")

    def call():
        dpipe(case.prompts, image=case.image, mask_image=case.mask, num_inference_steps=case.steps,
              guidance_scale=case.guidance, height=case.height, width=case.width, generator=generator)

    return Variant(name="diffusers", call=call, prepare=lambda: generator.manual_seed(case.seed),
                   groups=len(case.prompts), backend="diffusers-eager", fused=None,
                   notes=["encodes the prompts every call"])


def diffusers_pipeline(modules):
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    return diffusers_inpaint_pipeline(modules)


def compile_modules(modules, device: torch.device):
    """The modules the compile backend wraps: on CUDA a copy of the UNet (it turns channels_last, which must
    not change the eager rows it is interleaved with); on the CPU the same modules."""
    if device.type != "cuda":
        return modules
    return dataclasses.replace(modules, unet=copy.deepcopy(modules.unet))


# ---------------------------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "diffusers", "transformers", "peft", "triton", "onnx", "onnxruntime", "tensorrt"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "available_cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "git_sha": _git_sha(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gb": round(props.total_memory / 2**30, 1)}
    else:
        info["device"] = {"type": "cpu", "name": cpu_name()}
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------- engine folders
def check_backend(name: str, engines: Optional[str]) -> None:
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if name in ("onnxruntime", "tensorrt") and not engines:
        made_by = "cg4ctr-export onnx" if name == "onnxruntime" else "cg4ctr-export engine"
        raise InputError(f"backend {name!r} runs an exported folder: pass --engines DIR (written by {made_by})")
    if name == "tensorrt":
        from cg4ctr_fast.export.tensorrt_build import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise InputError(reason)


def engine_folders(engines: str) -> tuple[str, Optional[str]]:
    """(ONNX folder, TensorRT engine folder or None) for --engines: an engine folder names its ONNX source."""
    import json
    from pathlib import Path

    from cg4ctr_fast.export import manifest as mf

    try:
        data = json.loads((Path(engines) / mf.MANIFEST).read_text())
    except (OSError, ValueError):
        return engines, None  # the backend's loader refuses it with the reason
    if isinstance(data, dict) and data.get("format") == mf.ENGINE_FORMAT:
        return str((data.get("onnx") or {}).get("path", "")), engines
    return engines, None


def engine_components(backend: str, engines: str, modules, *, max_unet_batch: int = 1,
                      threads: Optional[int] = None):
    """The slots of an exported folder, refused unless it was exported from the same weights as `modules`.
    ONNX Runtime sessions get `threads` intra-op threads (None: ONNX Runtime's default, the physical cores)."""
    from cg4ctr_fast.export import manifest as mf

    onnx_dir, trt_dir = engine_folders(engines)
    if backend == "tensorrt" and trt_dir is None:
        raise InputError(f"{engines}: an ONNX folder; backend 'tensorrt' needs `cg4ctr-export engine` output")
    if backend == "tensorrt":
        manifest = mf.read_manifest(trt_dir, expect=mf.ENGINE_FORMAT)
    else:
        manifest = mf.read_manifest(onnx_dir)
    source, lora = manifest["source"], manifest.get("lora")
    same_unet = source.get("unet_channels") == int(modules.unet.config.in_channels)
    if source.get("model_id") != modules.model_id or lora or not same_unet:
        exported = f"{source.get('model_id')} ({source.get('unet_channels')}-channel UNet)"
        exported += f" + LoRA {lora['source']}" if lora else ""
        raise InputError(
            f"{engines}: exported from {exported}, the benchmark runs {modules.model_id}: "
            "export the same weights without a LoRA (cg4ctr-export onnx with the bench's --preset/--model)"
        )
    unet_batch = mf.contract_of(manifest, "unet").dim("batch")
    if max_unet_batch > unet_batch.max:
        raise InputError(
            f"{engines}: the UNet was exported for batch ≤ {unet_batch.max}, the benchmark needs {max_unet_batch} "
            f"(groups × 2 with guidance): re-export with --batch 1:1:{max_unet_batch // 2 or 1} or more"
        )
    if backend == "tensorrt":
        from cg4ctr_fast.runtime.tensorrt_backend import tensorrt_components

        components = tensorrt_components(trt_dir)
    else:
        from cg4ctr_fast.runtime.onnxruntime_backend import onnxruntime_components

        components = onnxruntime_components(onnx_dir, threads=threads)
    # diffusers' pipeline uses the modules' scheduler: the same class and config on both sides.
    components.scheduler = modules.scheduler.__class__.from_config(modules.scheduler.config)
    return components
