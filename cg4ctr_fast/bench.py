"""The benchmark harness behind `cg4ctr-bench` and bench/ scripts.

Every run measures diffusers' own StableDiffusionInpaintPipeline on the same weights and prompts (one call
with the prompt list) beside our backends, so speed is reported as a ratio measured side by side.
"""
from __future__ import annotations

import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.runtime.timing import STAGES, StageTimer

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "n": int(arr.size),
    }


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


def time_calls(fn: Callable[[], Any], *, runs: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    seconds = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


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
    total: dict[str, float]
    stages: dict[str, dict[str, float]]
    images_per_s: float
    memory: dict[str, float]
    ratio_vs_diffusers: Optional[float] = None
    notes: list[str] = field(default_factory=list)


def run_ours(pipe, case: BenchCase, *, name: str, runs: int, warmup: int) -> VariantResult:
    device = pipe.components.device
    timer = StageTimer(device)
    per_run_stages: list[dict[str, float]] = []

    def call():
        timer.reset()
        pipe(case.prompts, case.image, case.mask, num_inference_steps=case.steps, guidance_scale=case.guidance,
             height=case.height, width=case.width, seed=case.seed, show_progress=False)
        per_run_stages.append(timer.snapshot())

    pipe.timer = timer
    try:
        # Prompt embeddings are cached by text: the first warm-up pays for them, timed runs see a warm
        # cache as a serving process does. The "text" stage then times the cache lookups.
        _reset_peak(device)
        seconds = time_calls(call, runs=runs, warmup=warmup, device=device)
    finally:
        pipe.timer = None
    timed = per_run_stages[warmup:]
    stages = {s: percentiles([r.get(s, 0.0) for r in timed]) for s in STAGES if any(s in r for r in timed)}
    total = percentiles(seconds)
    return VariantResult(
        name=name,
        backend=pipe.components.backend,
        fused=pipe.fuse_step,
        groups=len(case.prompts),
        total=total,
        stages=stages,
        images_per_s=len(case.prompts) / total["p50"],
        memory=_peak_mb(device),
    )


def run_diffusers(dpipe, case: BenchCase, *, runs: int, warmup: int, device: torch.device) -> VariantResult:
    generator = torch.Generator("cpu")

    def call():
        generator.manual_seed(case.seed)
        dpipe(case.prompts, image=case.image, mask_image=case.mask, num_inference_steps=case.steps,
              guidance_scale=case.guidance, height=case.height, width=case.width, generator=generator)

    _reset_peak(device)
    seconds = time_calls(call, runs=runs, warmup=warmup, device=device)
    total = percentiles(seconds)
    return VariantResult(
        name="diffusers",
        backend="diffusers-eager",
        fused=None,
        groups=len(case.prompts),
        total=total,
        stages={},
        images_per_s=len(case.prompts) / total["p50"],
        memory=_peak_mb(device),
        ratio_vs_diffusers=1.0,
    )


def diffusers_pipeline(modules):
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    return diffusers_inpaint_pipeline(modules)


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
        info["device"] = {"type": "cpu", "name": platform.processor() or platform.machine()}
    return info


def _git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


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


def engine_components(backend: str, engines: str, modules, *, max_unet_batch: int = 1):
    """The slots of an exported folder, refused unless it was exported from the same weights as `modules`."""
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

        components = onnxruntime_components(onnx_dir)
    # diffusers' pipeline uses the modules' scheduler: the same class and config on both sides.
    components.scheduler = modules.scheduler.__class__.from_config(modules.scheduler.config)
    return components


def table(results: list[VariantResult]) -> str:
    """A fixed-width table: total p50/p95 per variant, its ratio to diffusers and the main stages."""
    head = f"{'variant':<22}{'groups':>7}{'p50 s':>10}{'p95 s':>10}{'img/s':>9}{'vs diffusers':>14}" \
           f"{'unet s':>10}{'step s':>10}{'decode s':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        stage = lambda s: f"{r.stages[s]['p50']:.4f}" if s in r.stages else "-"  # noqa: E731
        ratio = f"{r.ratio_vs_diffusers:.2f}x" if r.ratio_vs_diffusers else "-"
        lines.append(
            f"{r.name:<22}{r.groups:>7}{r.total['p50']:>10.4f}{r.total['p95']:>10.4f}{r.images_per_s:>9.2f}"
            f"{ratio:>14}{stage('unet'):>10}{stage('step'):>10}{stage('vae_decode'):>10}"
        )
    return "\n".join(lines)


def plot(results: list[VariantResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.6 * len(results) + 1.5))
    labels = [f"{r.name} ({r.groups} groups)" for r in results]
    left = np.zeros(len(results))
    for stage in STAGES:
        values = np.array([r.stages.get(stage, {}).get("p50", 0.0) for r in results])
        if values.any():
            ax.barh(labels, values, left=left, label=stage)
            left += values
    other = np.array([r.total["p50"] for r in results]) - left
    ax.barh(labels, np.clip(other, 0, None), left=left, label="other / whole call", color="lightgray")
    ax.set_xlabel("seconds per call (p50)")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
