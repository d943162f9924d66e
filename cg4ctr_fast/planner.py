"""The latency planner: a deadline in ms → the best plan (scheduler, steps, guidance cut-off, feature reuse,
candidates per group, preview ranking) whose predicted p99 latency meets it, and why.

    cost = CostTable.load(default_cost_path("cpu", "torch", key))          # written by cg4ctr-bench --calibrate
    quality = QualityTable.load(shipped_quality_path())                      # measured in the ad world, or None
    plan, why = plan_for(300, groups=8, cost=cost, quality=quality)
    # plan.scheduler, plan.steps, … ; why: "chose ddim-10s-w7.5-cut0.5: predicted p99 212 ms ≤ 300 ms, …"

Two measured tables drive it, both JSON with a schema version (`SCHEMA_VERSION`); a malformed file is refused
with one line (InputError):

- `CostTable` (per device, backend, dtype and working size): the p50 and p99, in ms, of each stage, measured
  by `cg4ctr-bench --calibrate` (`measure_cost_table`). Stages: `text` (per call), `saliency` and `vae_encode`
  (per product), `vae_decode`, `preview_decode`, `composite` and `reward` (per image), `step` (per image per
  denoising step), and the UNet per evaluation at a few batch sizes (linear in batch between them).
- `QualityTable`: per plan configuration, the ad-world quality: the aggregate true-CTR lift of the reward
  model's picks over the original photos, traffic-weighted, with its cluster-bootstrap 95 % CI
  (`training.metrics.aggregate_ctr_lift`), measured offline by `measure_quality`.

The planner maximises expected quality subject to predicted p99 ≤ deadline; ties go to the lower latency.
With no quality table (or none of its plans available) it ranks by UNet work per served creative, a stated
proxy, and says so. A deadline no plan meets raises `DeadlineInfeasible`, naming the fastest feasible time.

Importing this module loads no torch, diffusers or serving library (measuring functions import them lazily).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.serving.errors import DeadlineExceeded

__all__ = [
    "SCHEMA_VERSION", "Plan", "StageCost", "CostTable", "QualityEntry", "QualityTable", "Levers", "Prediction",
    "DeadlineInfeasible", "plan_for", "candidate_plans", "detect_levers", "default_cost_path",
    "shipped_quality_path", "measure_cost_table", "measure_quality", "REFERENCE_PLAN",
]

SCHEMA_VERSION = 1
COST_SCHEMA = "cg4ctr_fast/cost-table"
QUALITY_SCHEMA = "cg4ctr_fast/quality-table"

SCHEDULERS_FEWSTEP = ("lcm", "tcd")  # consistency samplers: meant for the LCM-LoRA UNet, guidance off or low
UNETS = ("base", "lcm")
# Stages and what they are counted per (see CostTable.predict).
PER_CALL = ("text",)
PER_PRODUCT = ("saliency", "vae_encode")
PER_IMAGE = ("vae_decode", "preview_decode", "composite", "reward")
PER_IMAGE_STEP = ("step",)
STAGE_NAMES = PER_CALL + PER_PRODUCT + PER_IMAGE + PER_IMAGE_STEP
# Most creatives one call makes (cg4ctr generate / the serving runtime): one denoising batch, 2× with guidance.
MAX_CREATIVES = 64


class DeadlineInfeasible(DeadlineExceeded):
    """No plan's predicted p99 meets the deadline; nothing was run (HTTP 504 in serving, exit 2 in the CLI).

    fastest_ms: the fastest feasible plan's predicted p99 in ms (the least deadline that would be accepted);
    plan: that plan. A TimeoutError (through serving.errors.DeadlineExceeded).
    """

    def __init__(self, fastest_ms: float, deadline_ms: Optional[float] = None, plan: Optional["Plan"] = None,
                 where: str = ""):
        self.fastest_ms = float(fastest_ms)
        self.deadline_ms = deadline_ms
        self.plan = plan
        asked = f"the {deadline_ms:.0f} ms deadline" if deadline_ms is not None else "the deadline"
        named = f" ({plan.name})" if plan is not None else ""
        super().__init__(f"no plan meets {asked}: the fastest feasible plan{named} needs {self.fastest_ms:.0f} ms "
                         f"(predicted p99{' on ' + where if where else ''}); give a deadline of at least "
                         f"{math.ceil(self.fastest_ms)} ms")


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    """One way to make the creatives of a call.

    scheduler: a short scheduler name ("ddim", "euler", "dpm++", "lcm", "tcd", …; models.diffusion).
    steps: denoising steps n (≥ 1; strength 1, so all n run).
    guidance_scale: classifier-free guidance w ≥ 0; guidance runs when w > 1.
    guidance_cutoff: in (0, 1]: guidance runs for the first ceil(cutoff·n) steps, then the UNet batch halves.
    cache_interval: ≥ 1: step i runs the full UNet when i % cache_interval == 0, else only its shallow blocks.
    images_per_prompt: candidates generated per group (≥ 1).
    preview_top_k: None, or how many candidates per group (1 ≤ k ≤ images_per_prompt) the full VAE decodes after
        the reward model ranked every candidate's tiny-decoder preview.
    unet: "base" (the generator's weights) or "lcm" (base + its LCM-LoRA fused).
    Raises InputError for a value out of range.
    """

    scheduler: str = "ddim"
    steps: int = 20
    guidance_scale: float = 7.5
    guidance_cutoff: float = 1.0
    cache_interval: int = 1
    images_per_prompt: int = 1
    preview_top_k: Optional[int] = None
    unet: str = "base"

    def __post_init__(self):
        if not isinstance(self.scheduler, str) or not self.scheduler:
            raise InputError(f"plan scheduler must be a non-empty name, got {self.scheduler!r}")
        for name in ("steps", "cache_interval", "images_per_prompt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"plan {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
                and self.guidance_scale >= 0):
            raise InputError(f"plan guidance_scale must be a finite number ≥ 0, got {self.guidance_scale!r}")
        if not (isinstance(self.guidance_cutoff, (int, float)) and 0 < self.guidance_cutoff <= 1):
            raise InputError(f"plan guidance_cutoff must be in (0, 1], got {self.guidance_cutoff!r}")
        k = self.preview_top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.images_per_prompt):
            raise InputError(f"plan preview_top_k must be None or from 1 to images_per_prompt "
                             f"({self.images_per_prompt}), got {k!r}")
        if self.unet not in UNETS:
            raise InputError(f"plan unet must be one of {', '.join(UNETS)}, got {self.unet!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def guided_steps(self) -> int:
        """Steps run with guidance (doubled UNet batch): ceil(cutoff·n) when w > 1, else 0."""
        if not self.guided:
            return 0
        # 1e-9: 0.3·10 is 3.0000000000000004 in floats, whose ceil would be 4.
        return min(self.steps, max(1, math.ceil(self.guidance_cutoff * self.steps - 1e-9)))

    @property
    def served_per_group(self) -> int:
        """Creatives per group that come back (fully decoded): preview_top_k, else images_per_prompt."""
        return self.preview_top_k if self.preview_top_k is not None else self.images_per_prompt

    @property
    def name(self) -> str:
        """A short, unique label, e.g. "ddim-10s-w7.5-cut0.5-ci2-n4-top1" or "lcm-4s-w1-lcmlora"."""
        parts = [f"{self.scheduler}-{self.steps}s-w{self.guidance_scale:g}"]
        if self.guided and self.guidance_cutoff < 1:
            parts.append(f"cut{self.guidance_cutoff:g}")
        if self.cache_interval > 1:
            parts.append(f"ci{self.cache_interval}")
        if self.images_per_prompt > 1:
            parts.append(f"n{self.images_per_prompt}")
        if self.preview_top_k is not None:
            parts.append(f"top{self.preview_top_k}")
        if self.unet != "base":
            parts.append(f"{self.unet}lora")
        return "-".join(parts)

    def pipeline_kwargs(self) -> dict:
        """The lever keyword arguments of `CreativePipeline.__call__` / `generate_batch` this plan sets; only
        those that differ from the defaults, so a pipeline without a lever runs every plan that leaves it off."""
        out: dict[str, Any] = {}
        if self.guided and self.guidance_cutoff < 1:
            out["guidance_cutoff"] = float(self.guidance_cutoff)
        if self.cache_interval > 1:
            out["cache_interval"] = int(self.cache_interval)
        if self.preview_top_k is not None:
            out["preview_top_k"] = int(self.preview_top_k)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        """A Plan from its dict; InputError naming `where` for unknown or missing keys and bad values."""
        if not isinstance(data, Mapping):
            raise InputError(f"{where}: expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{where}: unknown plan field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
        try:
            return cls(**dict(data))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None


# The issue's reference point: diffusers' 20 guided DDIM steps, one candidate per group.
REFERENCE_PLAN = Plan("ddim", 20, 7.5)


# ---------------------------------------------------------------------------------------------- cost table
@dataclass(frozen=True)
class StageCost:
    """One stage's measured time in ms: the median and the 99th percentile of n runs (p99 is the maximum of
    the runs when n < 100, a conservative stand-in; `p99_from` says which)."""

    p50_ms: float
    p99_ms: float
    n: int = 0
    p99_from: str = "percentile"

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "StageCost":
        import numpy as np

        values = np.asarray(list(samples_ms), dtype=np.float64)
        if values.size == 0:
            raise ValueError("StageCost.from_samples: no samples")
        n = int(values.size)
        if n >= 100:  # one run in 100 lies beyond p99 (cg4ctr_fast.bench.P99_MIN_RUNS)
            return cls(float(np.percentile(values, 50)), float(np.percentile(values, 99)), n, "percentile")
        return cls(float(np.percentile(values, 50)), float(values.max()), n, f"max of {n} runs")

    def get(self, stat: str) -> float:
        return self.p99_ms if stat == "p99" else self.p50_ms


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted latency in ms (`stat`: "p99" or "p50") and its parts by stage."""

    total_ms: float
    stages: dict
    stat: str = "p99"

    def server_timing(self) -> str:
        """The parts as a Server-Timing-like header value: "unet;dur=120.5, vae_decode;dur=8.1, …"."""
        return ", ".join(f"{k};dur={v:.1f}" for k, v in self.stages.items() if v > 0)


@dataclass
class CostTable:
    """Measured stage costs on one device and backend, at one working size and dtype (see the module doc).

    stages: stage name → StageCost (names in STAGE_NAMES; per call / product / image / image·step as listed
    there). unet: [(batch, StageCost)] for one UNet evaluation (ms) at each measured batch, ascending.
    unet_shallow_fraction: the cost of a non-key (shallow-blocks-only) step as a fraction of a full UNet
    evaluation, or None when not measured (cache_interval > 1 plans are then not priced).
    meta: where and how it was measured (load, runs, threads, model, command).
    """

    device: str
    backend: str
    dtype: str
    height: int
    width: int
    stages: dict = field(default_factory=dict)
    unet: list = field(default_factory=list)
    unet_shallow_fraction: Optional[float] = None
    model: str = ""
    meta: dict = field(default_factory=dict)

    # -------------------------------------------------------------------------- cost model
    def unet_ms(self, batch: int, stat: str = "p99") -> float:
        """One UNet evaluation at `batch` (ms): linear between the measured batches; below the smallest, its
        cost (a smaller batch is not slower); above the largest, the last segment's slope (one point: ∝ batch)."""
        if not self.unet:
            raise InputError("cost table has no UNet timings")
        points = [(b, c.get(stat)) for b, c in self.unet]
        if batch <= points[0][0]:
            return points[0][1]
        for (b0, c0), (b1, c1) in zip(points, points[1:]):
            if batch <= b1:
                return c0 + (c1 - c0) * (batch - b0) / (b1 - b0)
        if len(points) == 1:
            b0, c0 = points[0]
            return c0 * batch / b0
        (b0, c0), (b1, c1) = points[-2], points[-1]
        return c1 + max(0.0, (c1 - c0) / (b1 - b0)) * (batch - b1)

    def stage_ms(self, name: str, stat: str = "p99") -> float:
        cost = self.stages.get(name)
        return 0.0 if cost is None else cost.get(stat)

    def missing_for(self, plan: Plan, *, reward: bool = True) -> Optional[str]:
        """Why this table cannot price `plan` (a stage it needs was not measured), or None."""
        if not self.unet:
            return "the cost table has no UNet timings"
        if plan.cache_interval > 1 and self.unet_shallow_fraction is None:
            return "the cost table has no shallow-step cost (recalibrate once cache_interval is available)"
        if plan.preview_top_k is not None:
            if "preview_decode" not in self.stages:
                return "the cost table has no preview-decode cost (recalibrate with a preview decoder attached)"
            if not reward or "reward" not in self.stages:
                return "preview ranking needs the reward model and its measured cost"
        return None

    def predict(self, plan: Plan, groups: int, *, products: int = 1, reward: bool = True, saliency: bool = True,
                stat: str = "p99") -> Prediction:
        """Predicted latency (ms) of one call running `plan` for `products` products × `groups` groups.

        With B = products·groups·m creatives (m = images_per_prompt), n = steps, g = plan.guided_steps,
        k = cache_interval, f = unet_shallow_fraction, U(b) = one UNet evaluation at batch b, S(x) = stage x:

            unet    = Σ_{i<n} U(b_i)·(1 if i % k == 0 else f),   b_i = 2B for i < g (guided), else B
            step    = n·B·S(step)
            fixed   = S(text) + products·([saliency] S(saliency) + S(vae_encode))
            decode  = B·(S(vae_decode) + S(composite)) + [reward] B·S(reward)                 (no previews)
                    = B·(S(preview_decode) + S(reward)) + products·groups·top_k·(S(vae_decode) + S(composite)
                      + S(reward))                                                          (preview ranking)
            original= [reward] products·groups·S(reward)   (each original photo scored per group, as the CLI and
                                                            the serving runtime do)
            total   = fixed + unet + step + decode + original

        With stat "p99" every S and U is its p99, so the total is the sum of per-stage p99s: an upper estimate of
        the call's p99 unless the stages' slow runs all coincide. [reward] / [saliency]: counted only when a
        reward model scores the creatives / the saliency net finds the product (no mask, no transparency).
        The table's working size is the largest
        side the model runs at; a smaller or non-square input runs no slower.
        Raises InputError when the table lacks a stage the plan needs (`missing_for`).
        """
        missing = self.missing_for(plan, reward=reward)
        if missing:
            raise InputError(missing)
        if groups < 1 or products < 1:
            raise InputError(f"groups and products must be ≥ 1, got {groups} and {products}")
        batch = products * groups * plan.images_per_prompt
        guided = plan.guided_steps
        fraction = 1.0 if plan.cache_interval == 1 else float(self.unet_shallow_fraction)
        unet = 0.0
        for i in range(plan.steps):
            full = self.unet_ms(2 * batch if i < guided else batch, stat)
            unet += full if i % plan.cache_interval == 0 else fraction * full
        parts = {
            "text": self.stage_ms("text", stat),
            "saliency": products * self.stage_ms("saliency", stat) if saliency else 0.0,
            "vae_encode": products * self.stage_ms("vae_encode", stat),
            "unet": unet,
            "step": plan.steps * batch * self.stage_ms("step", stat),
        }
        decoded = batch if plan.preview_top_k is None else products * groups * plan.preview_top_k
        if plan.preview_top_k is not None:
            parts["preview_decode"] = batch * self.stage_ms("preview_decode", stat)
        parts["vae_decode"] = decoded * self.stage_ms("vae_decode", stat)
        parts["composite"] = decoded * self.stage_ms("composite", stat)
        scored = (batch + decoded) if plan.preview_top_k is not None else (batch if reward else 0)
        if reward:
            scored += products * groups  # the original photo, once per group
        parts["reward"] = scored * self.stage_ms("reward", stat)
        return Prediction(total_ms=float(sum(parts.values())), stages=parts, stat=stat)

    # -------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "schema": COST_SCHEMA, "schema_version": SCHEMA_VERSION,
            "device": self.device, "backend": self.backend, "dtype": self.dtype,
            "height": self.height, "width": self.width, "model": self.model,
            "stages": {k: asdict(v) for k, v in self.stages.items()},
            "unet": [{"batch": b, **asdict(c)} for b, c in self.unet],
            "unet_shallow_fraction": self.unet_shallow_fraction,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "cost table") -> "CostTable":
        """Parse and check a cost table dict; InputError (one line naming `where`) when malformed."""
        _check_schema(data, COST_SCHEMA, where)
        try:
            stages = {}
            for name, value in _mapping(data.get("stages", {}), f"{where}: stages").items():
                if name not in STAGE_NAMES:
                    raise InputError(f"{where}: unknown stage {name!r} (stages: {', '.join(STAGE_NAMES)})")
                stages[name] = _stage_cost(value, f"{where}: stage {name}")
            unet = []
            rows = data.get("unet")
            if not isinstance(rows, list) or not rows:
                raise InputError(f"{where}: unet must be a non-empty list of {{batch, p50_ms, p99_ms}}")
            for row in rows:
                row = _mapping(row, f"{where}: unet row")
                b = row.get("batch")
                if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                    raise InputError(f"{where}: unet batch must be a positive integer, got {b!r}")
                unet.append((b, _stage_cost({k: v for k, v in row.items() if k != "batch"}, f"{where}: unet batch {b}")))
            unet.sort(key=lambda r: r[0])
            if len({b for b, _ in unet}) != len(unet):
                raise InputError(f"{where}: unet lists a batch size twice")
            frac = data.get("unet_shallow_fraction")
            if frac is not None and not (_number(frac) and 0 < frac <= 1):
                raise InputError(f"{where}: unet_shallow_fraction must be in (0, 1] or null, got {frac!r}")
            for key in ("device", "backend", "dtype"):
                if not isinstance(data.get(key), str) or not data[key]:
                    raise InputError(f"{where}: {key} must be a non-empty string")
            for key in ("height", "width"):
                v = data.get(key)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise InputError(f"{where}: {key} must be a positive integer, got {v!r}")
            meta = data.get("meta") or {}
            if not isinstance(meta, dict):
                raise InputError(f"{where}: meta must be an object")
            return cls(device=data["device"], backend=data["backend"], dtype=data["dtype"], height=data["height"],
                       width=data["width"], stages=stages, unet=unet,
                       unet_shallow_fraction=None if frac is None else float(frac),
                       model=str(data.get("model") or ""), meta=meta)
        except InputError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise InputError(f"{where}: malformed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None

    @classmethod
    def load(cls, path) -> "CostTable":
        return cls.from_dict(_read_json(path, "cost table"), where=f"cost table {path}")

    def save(self, path) -> Path:
        """Write atomically (readers see the old table or the whole new one); returns the path."""
        from cg4ctr_fast.fileio import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    def where(self) -> str:
        return f"{self.device}/{self.backend}/{self.dtype} at {self.width}×{self.height}"

    def mismatch(self, *, device_type: str, backend: str, side: int,
                 stages: Sequence[str] = ("text", "vae_encode", "vae_decode")) -> Optional[str]:
        """Why this table cannot price a run on `device_type` ("cpu", "cuda") with `backend` at a working side of
        `side` px, or None: another device type or backend, another working size, or a stage every call runs
        that it never measured (it would count as free). A table from another machine of the same type cannot be
        told apart here; its `meta` says where it was measured."""
        if self.device.split(":", 1)[0] != device_type:
            return f"it was measured on {self.device}, this run is on {device_type}"
        if self.backend != backend:
            return f"it was measured with the {self.backend} backend, this run uses {backend}"
        if max(self.height, self.width) != side:
            return f"it was measured at {self.width}×{self.height} px, this run works at {side} px"
        lacking = [name for name in stages if name not in self.stages]
        if lacking:
            return f"it has no {', '.join(lacking)} timing"
        return None


def default_cost_path(device: str, backend: str, key: str) -> Path:
    """Where a torch cost table lives: <cache>/cost/<device>-<backend>-<key>.json (cache: CG4CTR_CACHE, else
    $XDG_CACHE_HOME/cg4ctr_fast or ~/.cache/cg4ctr_fast). Engine folders keep theirs as <engines>/cost_table.json."""
    root = os.environ.get("CG4CTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cg4ctr_fast")
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)  # noqa: E731
    return Path(root) / "cost" / f"{safe(device)}-{safe(backend)}-{safe(key)}.json"


from cg4ctr_fast.export.manifest import COST_TABLE as ENGINE_COST_FILE  # noqa: E402 - beside its users


# ---------------------------------------------------------------------------------------------- quality table
@dataclass(frozen=True)
class QualityEntry:
    """A plan's ad-world quality: the aggregate true-CTR lift of the reward's picks over the originals
    (a fraction: +0.05 = 5 % more clicks), its 95 % CI, and how it was measured."""

    plan: Plan
    quality: float
    ci95: tuple = (math.nan, math.nan)
    cells: int = 0
    products: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class QualityTable:
    """Measured quality per plan (`entries`), for one generator and world (`source`)."""

    entries: list = field(default_factory=list)
    metric: str = "aggregate true-CTR lift of the reward's picks over the original photos"
    source: dict = field(default_factory=dict)

    def lookup(self, plan: Plan) -> Optional[QualityEntry]:
        for entry in self.entries:
            if entry.plan == plan:
                return entry
        return None

    def to_dict(self) -> dict:
        return {"schema": QUALITY_SCHEMA, "schema_version": SCHEMA_VERSION, "metric": self.metric,
                "source": self.source,
                "entries": [{"plan": e.plan.to_dict(), "quality": e.quality, "ci95": list(e.ci95), "cells": e.cells,
                             "products": e.products, "meta": e.meta} for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "quality table") -> "QualityTable":
        _check_schema(data, QUALITY_SCHEMA, where)
        rows = data.get("entries")
        if not isinstance(rows, list):
            raise InputError(f"{where}: entries must be a list")
        entries = []
        for i, row in enumerate(rows):
            row = _mapping(row, f"{where}: entry {i}")
            plan = Plan.from_dict(row.get("plan"), where=f"{where}: entry {i}")
            q = row.get("quality")
            if not (_number(q) and math.isfinite(q)):
                raise InputError(f"{where}: entry {i} ({plan.name}): quality must be a finite number, got {q!r}")
            ci = row.get("ci95", [math.nan, math.nan])
            if not (isinstance(ci, list) and len(ci) == 2 and all(_number(v) or v is None for v in ci)):
                raise InputError(f"{where}: entry {i} ({plan.name}): ci95 must be [low, high]")
            ci = tuple(math.nan if v is None else float(v) for v in ci)
            if any(e.plan == plan for e in entries):
                raise InputError(f"{where}: plan {plan.name} is listed twice")
            meta = row.get("meta") or {}
            entries.append(QualityEntry(plan, float(q), ci, int(row.get("cells") or 0), int(row.get("products") or 0),
                                        meta if isinstance(meta, dict) else {}))
        source = data.get("source") or {}
        return cls(entries=entries, metric=str(data.get("metric") or cls.metric),
                   source=source if isinstance(source, dict) else {})

    @classmethod
    def load(cls, path) -> "QualityTable":
        return cls.from_dict(_read_json(path, "quality table"), where=f"quality table {path}")

    def save(self, path) -> Path:
        from cg4ctr_fast.fileio import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan=False would refuse a NaN CI: write null instead.
        data = self.to_dict()
        for row in data["entries"]:
            row["ci95"] = [None if (isinstance(v, float) and math.isnan(v)) else v for v in row["ci95"]]
        atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
        return path


def shipped_quality_path() -> Path:
    """The toy set's quality table (present only once measured): cg4ctr_fast/assets/toy/quality.json."""
    return Path(__file__).resolve().parent / "assets" / "toy" / "quality.json"


def _read_json(path, what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{what} {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _check_schema(data: Any, schema: str, where: str) -> None:
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != schema:
        raise InputError(f"{where}: schema is {data.get('schema')!r}, expected {schema!r}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(f"{where}: schema_version {version!r} is not the {SCHEMA_VERSION} this version reads; "
                         "measure it again")


def _mapping(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise InputError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _stage_cost(value: Any, where: str) -> StageCost:
    value = _mapping(value, where)
    p50, p99 = value.get("p50_ms"), value.get("p99_ms")
    for name, v in (("p50_ms", p50), ("p99_ms", p99)):
        if not (_number(v) and math.isfinite(v) and v >= 0):
            raise InputError(f"{where}: {name} must be a finite number of ms ≥ 0, got {v!r}")
    if p99 < p50:
        raise InputError(f"{where}: p99_ms {p99} is below p50_ms {p50}")
    n = value.get("n", 0)
    return StageCost(float(p50), float(p99), int(n) if _number(n) else 0, str(value.get("p99_from", "percentile")))


# ---------------------------------------------------------------------------------------------- levers
@dataclass(frozen=True)
class Levers:
    """What this process can run: scheduler short names, UNet weights, and the pipeline levers; `missing`
    maps a lever ("guidance_cutoff", "cache_interval", "preview", "scheduler:lcm", "unet:lcm") to why not."""

    schedulers: frozenset = frozenset({"ddim"})
    unets: frozenset = frozenset({"base"})
    guidance_cutoff: bool = False
    cache_interval: bool = False
    preview: bool = False
    missing: dict = field(default_factory=dict)

    def why_not(self, plan: Plan) -> Optional[str]:
        """Why `plan` cannot run here, or None."""
        if plan.scheduler not in self.schedulers:
            return self.missing.get(f"scheduler:{plan.scheduler}") or f"scheduler {plan.scheduler!r} is not available"
        if plan.unet not in self.unets:
            return self.missing.get(f"unet:{plan.unet}") or f"no {plan.unet} UNet weights"
        if plan.guided and plan.guidance_cutoff < 1 and not self.guidance_cutoff:
            return self.missing.get("guidance_cutoff") or "the pipeline has no guidance_cutoff"
        if plan.cache_interval > 1 and not self.cache_interval:
            return self.missing.get("cache_interval") or "the pipeline has no cache_interval"
        if plan.preview_top_k is not None and not self.preview:
            return self.missing.get("preview") or "no preview decoder"
        return None


ALL_LEVERS = Levers(schedulers=frozenset({"ddim", "euler", "dpm++", "lcm", "tcd"}), unets=frozenset(UNETS),
                    guidance_cutoff=True, cache_interval=True, preview=True)


def detect_levers(*, backend: str = "torch", lcm_lora: Optional[str] = None, preview_decoder: bool = False,
                  reward: bool = True, unet: Optional[str] = None) -> Levers:
    """The levers this installation offers, with a reason for each one it does not (imports diffusion code).

    backend: the UNet backend (cache_interval needs torch or compile). lcm_lora: the LCM-LoRA path, or None
    (the "lcm" UNet is then unavailable). preview_decoder: whether a tiny preview decoder can be attached.
    reward: whether a reward model scores the creatives (preview ranking needs one). unet: force the only
    UNet the caller has loaded ("base" or "lcm"; serving cannot swap weights per request).
    """
    import inspect

    from cg4ctr_fast.models import diffusion
    from cg4ctr_fast.pipeline import CreativePipeline

    missing: dict[str, str] = {}
    schedulers = {"ddim", "euler", "dpm++"}
    for name in SCHEDULERS_FEWSTEP:
        if name in diffusion.SCHEDULER_NAMES:
            schedulers.add(name)
        else:
            missing[f"scheduler:{name}"] = f"scheduler {name!r} is not in this version's short names yet"
    unets = {"base"}
    if lcm_lora and Path(lcm_lora).exists():
        unets.add("lcm")
    else:
        missing["unet:lcm"] = ("no LCM-LoRA: " + (f"{lcm_lora} does not exist" if lcm_lora else
                                                  "none shipped or given yet"))
    if unet is not None:
        unets = {unet}
        for other in UNETS:
            if other != unet:
                missing[f"unet:{other}"] = f"this pipeline runs the {unet} UNet; weights are not swapped per call"
    params = inspect.signature(CreativePipeline.generate_batch).parameters
    cutoff = "guidance_cutoff" in params
    if not cutoff:
        missing["guidance_cutoff"] = "the pipeline has no guidance_cutoff yet"
    cache = "cache_interval" in params and backend in ("torch", "compile")
    if "cache_interval" not in params:
        missing["cache_interval"] = "the pipeline has no cache_interval yet"
    elif not cache:
        missing["cache_interval"] = f"the {backend} backend cannot reuse features (torch and compile can)"
    preview = "preview_top_k" in params and preview_decoder and reward
    if "preview_top_k" not in params:
        missing["preview"] = "the pipeline has no preview_top_k yet"
    elif not preview_decoder:
        missing["preview"] = "no preview decoder attached"
    elif not reward:
        missing["preview"] = "preview ranking needs a reward model"
    return Levers(frozenset(schedulers), frozenset(unets), cutoff, cache, preview, missing)


# ---------------------------------------------------------------------------------------------- candidates
def candidate_plans(served_per_group: int = 1, *, base_steps: int = 20, guidance: float = 7.5,
                    max_creatives_per_group: Optional[int] = None) -> list[Plan]:
    """The default grid of plans that serve `served_per_group` creatives per group: the guided DDIM reference
    and fewer steps, guidance cut-offs 0.5/0.25, cache intervals 2/3, unguided steps, LCM/TCD with the LCM-LoRA
    at 1-8 steps, and preview ranking of 2× and 4× the candidates. Each plan's images_per_prompt is at most
    `max_creatives_per_group` (default MAX_CREATIVES)."""
    cap = max_creatives_per_group or MAX_CREATIVES
    m = served_per_group
    plans: list[Plan] = []
    step_counts = sorted({base_steps, 15, 10, 8, 6, 4} - {s for s in (15, 10, 8, 6, 4) if s > base_steps},
                         reverse=True)
    for steps in step_counts:
        for cutoff in (1.0, 0.5, 0.25):
            for ci in (1, 2, 3):
                if ci > 1 and steps < 4:
                    continue
                plans.append(Plan("ddim", steps, guidance, cutoff, ci, m))
        plans.append(Plan("ddim", steps, 1.0, 1.0, 1, m))
    for scheduler in SCHEDULERS_FEWSTEP:
        for steps in (1, 2, 4, 8):
            plans.append(Plan(scheduler, steps, 1.0, 1.0, 1, m, unet="lcm"))
    with_previews = []
    for plan in plans:
        for factor in (2, 4):
            if m * factor <= cap:
                with_previews.append(replace(plan, images_per_prompt=m * factor, preview_top_k=m))
    return plans + with_previews


def _work_proxy(plan: Plan, cost: Optional[CostTable]) -> float:
    """UNet evaluations per served creative (shallow steps counted by their measured fraction): the stated
    stand-in for quality when none was measured (more denoising work and more ranked candidates ranks first)."""
    fraction = (cost.unet_shallow_fraction if cost is not None and cost.unet_shallow_fraction else 0.5)
    evals = 0.0
    for i in range(plan.steps):
        evals += (2 if i < plan.guided_steps else 1) * (1 if i % plan.cache_interval == 0 else fraction)
    return evals * plan.images_per_prompt / plan.served_per_group


# ---------------------------------------------------------------------------------------------- the planner
@dataclass
class _Scored:
    plan: Plan
    quality: Optional[float]
    rank: float
    entry: Optional[QualityEntry]
    p99: Optional[float] = None
    rejected: Optional[str] = None


def plan_for(deadline_ms: float, groups: int, cost: CostTable, quality: Optional[QualityTable] = None, *,
             products: int = 1, served_per_group: int = 1, reward: bool = True, saliency: bool = True,
             levers: Optional[Levers] = None, candidates: Optional[Iterable[Plan]] = None,
             stat: str = "p99") -> tuple[Plan, str]:
    """The best plan whose predicted latency meets the deadline, and a one-line `why`.

    deadline_ms: the budget for one call, in ms (> 0, finite). groups / products: the call's size.
    served_per_group: creatives per group the caller wants back (plans serving another count are not
    considered). reward: whether a reward model scores the creatives (counted in the cost; preview plans need
    it). saliency: whether the saliency net runs (no mask given). levers: what can run here (default: `ALL_LEVERS`, i.e. no filter). candidates: plans to choose from
    (default: the quality table's plans when it has any that can run here, else `candidate_plans`).
    stat: "p99" (default) or "p50", the latency statistic held against the deadline.

    Quality: the table's measured value (higher is better); with no measured plan available, the UNet work per
    served creative (`_work_proxy`), and `why` says so. Among plans of equal quality the faster one wins.
    `why` names the chosen plan, its predicted latency and quality, and the best plan rejected and why.
    Raises InputError for a bad deadline/groups or when no candidate can run at all, DeadlineInfeasible
    (naming the fastest feasible time in ms) when candidates run but none meets the deadline.
    """
    if not (_number(deadline_ms) and math.isfinite(deadline_ms) and deadline_ms > 0):
        raise InputError(f"deadline must be a finite number of ms > 0, got {deadline_ms!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise InputError(f"groups must be a positive integer, got {groups!r}")
    if stat not in ("p99", "p50"):
        raise InputError(f"stat must be p99 or p50, got {stat!r}")
    levers = levers or ALL_LEVERS

    def fits(p: Plan) -> bool:  # serves what was asked, within one call's creatives
        return p.served_per_group == served_per_group and products * groups * p.images_per_prompt <= MAX_CREATIVES

    # Measured quality counts when at least one measured plan of this shape can run here.
    measured = quality is not None and any(levers.why_not(e.plan) is None and fits(e.plan) for e in quality.entries)
    if candidates is None:
        pool = [e.plan for e in quality.entries] if measured else candidate_plans(served_per_group)
    else:
        pool = list(candidates)
    pool = [p for p in dict.fromkeys(pool) if fits(p)]
    scored: list[_Scored] = []
    for plan in pool:
        entry = quality.lookup(plan) if quality is not None else None
        if measured:
            s = _Scored(plan, entry.quality if entry else None, entry.quality if entry else -math.inf, entry)
            if entry is None:
                s.rejected = "its quality was not measured"
        else:
            s = _Scored(plan, None, _work_proxy(plan, cost), None)
        if s.rejected is None:
            s.rejected = levers.why_not(plan) or cost.missing_for(plan, reward=reward)
        if s.rejected is None:
            s.p99 = cost.predict(plan, groups, products=products, reward=reward, saliency=saliency,
                                 stat=stat).total_ms
            if s.p99 > deadline_ms:
                s.rejected = f"predicted {stat} {s.p99:.0f} ms > {deadline_ms:.0f} ms"
        scored.append(s)
    feasible = [s for s in scored if s.rejected is None]
    priced = [s for s in scored if s.p99 is not None]
    if not feasible:
        if not priced:
            reasons = sorted({s.rejected for s in scored if s.rejected}) or ["no candidate plans"]
            raise InputError(f"no plan can run here for {groups} group(s) × {served_per_group}: {reasons[0]}")
        fastest = min(priced, key=lambda s: s.p99)
        raise DeadlineInfeasible(fastest.p99, deadline_ms, fastest.plan, where=cost.where())
    best = max(feasible, key=lambda s: (s.rank, -s.p99))
    better = [s for s in scored if s.rejected is not None and s.rank >= best.rank and s is not best]
    rejected = max(better, key=lambda s: (s.rank, -(s.p99 or 0.0))) if better else None
    why = (f"chose {best.plan.name}: predicted {stat} {best.p99:.0f} ms ≤ deadline {deadline_ms:.0f} ms "
           f"({cost.where()}), {_quality_text(best, measured)}; ")
    if rejected is not None:
        why += f"best rejected: {rejected.plan.name} ({_quality_text(rejected, measured)}): {rejected.rejected}"
    else:
        why += "no better plan was rejected"
    return best.plan, why


def _quality_text(s: _Scored, measured: bool) -> str:
    if not measured:
        return f"quality unmeasured, ranked by UNet work {s.rank:.1f} evaluations per served creative"
    if s.entry is None:
        return "quality unmeasured"
    lo, hi = s.entry.ci95
    ci = f" [95 % CI {lo:+.1%}, {hi:+.1%}]" if math.isfinite(lo) and math.isfinite(hi) else ""
    return f"quality {s.entry.quality:+.1%}{ci} true-CTR lift"


# ---------------------------------------------------------------------------------------------- measuring
def measure_cost_table(pipe, *, batches: Sequence[int] = (1, 2, 4, 8, 16), runs: int = 100, warmup: int = 3,
                       reward=None, saliency: bool = True, shallow_interval: int = 2, device_name: Optional[str] = None,
                       height: Optional[int] = None, width: Optional[int] = None, text_prompts: int = 2,
                       log=None) -> CostTable:
    """Measure a `CostTable` for `pipe` (a `CreativePipeline`) on this machine (imports torch).

    Every stage is timed directly on the pipeline's slots, round-robin (one run of every stage and batch per
    round, `warmup` untimed rounds first), so a load that comes or goes hits them alike; `runs` timed rounds
    (p99 needs ≥ 100, else it is the max of the runs). batches: UNet batch sizes (≥ 1). reward: a callable
    `reward(images, groups) -> scores` (e.g. `RewardModel.pipeline_scorer(...)`), or None (no reward stage).
    saliency: time the pipeline's saliency net when it has one. shallow_interval: when the pipeline takes
    cache_interval (and its slot supports it), the shallow-step fraction is measured from whole calls at this
    interval against interval 1 (UNet stage time). The preview decoder (components.preview_decoder), when
    attached, is timed too. text_prompts: how many distinct prompts the text stage encodes (a call's groups;
    the text cost is counted once per call). Returns the table (not written: see `CostTable.save`).
    """
    import torch
    from PIL import Image

    from cg4ctr_fast.bench import environment, load_during, load_snapshot

    comps = pipe.components
    info = comps.info
    dev, dtype = comps.device, comps.dtype
    height = height or pipe.max_side
    width = width or pipe.max_side
    scale = info.vae_scale_factor
    h, w = height // scale, width // scale
    channels = info.latent_channels if hasattr(info, "latent_channels") else 4
    gen = torch.Generator("cpu").manual_seed(0)
    prompts = [f"a warm wooden kitchen table, golden light, variant {i}" for i in range(max(1, text_prompts))]
    embeds = pipe.encode_prompts(prompts[:1])
    max_b = max(batches)
    latents_full = torch.randn(max_b, channels, h, w, generator=gen).to(dev, dtype)
    in_ch = info.unet_in_channels
    unet_in = torch.randn(max_b, in_ch, h, w, generator=gen).to(dev, dtype)
    t = comps.scheduler.timesteps[0] if getattr(comps.scheduler, "timesteps", None) is not None else 500
    t = torch.as_tensor(int(t) if not torch.is_tensor(t) else int(t.item()), device=dev)
    image = torch.rand(1, 3, height, width, generator=gen).to(dev, dtype) * 2 - 1
    decode_batch = min(8, max_b)
    pil = [Image.new("RGB", (width, height), (200, 180, 160))] * decode_batch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    tasks: dict[str, Any] = {}

    def add(name, fn, per=1):
        tasks[name] = (fn, per)

    def text():
        pipe.clear_prompt_cache()
        pipe.encode_prompts(prompts)

    add("text", text)
    add("vae_encode", lambda: comps.vae_encoder(image))
    for b in batches:
        e = embeds.expand(b, -1, -1)
        add(f"unet@{b}", (lambda b=b, e=e: comps.unet(unet_in[:b], t, e)))
    add("vae_decode", lambda: comps.vae_decoder(latents_full[:decode_batch] / info.scaling_factor), decode_batch)
    preview = getattr(comps, "preview_decoder", None)
    if preview is not None:
        add("preview_decode", lambda: preview(latents_full[:decode_batch] / info.scaling_factor), decode_batch)
    if saliency and pipe.saliency is not None:
        from cg4ctr_fast.models.saliency import mask_from_saliency, predict_saliency

        def sal():  # what pipe.product_mask runs, without its check that the mask holds a product
            size, threshold = pipe.saliency_settings()
            dilate = pipe.saliency_dilate_px
            if dilate is None:
                dilate = getattr(getattr(pipe.saliency, "config", None), "dilate_px", None)
            mask_from_saliency(predict_saliency(pipe.saliency, pil[0], size=size), threshold=threshold,
                               dilate_px=dilate)

        add("saliency", sal)
    if reward is not None:
        add("reward", lambda: reward(pil, [0] * decode_batch), decode_batch)
    scheduler = comps.scheduler.__class__.from_config(comps.scheduler.config)
    scheduler.set_timesteps(20, device=dev)
    noise = latents_full[:decode_batch]

    def step():
        s = scheduler.__class__.from_config(scheduler.config)
        s.set_timesteps(20, device=dev)
        s.step(noise, s.timesteps[0], noise)

    add("step", step, decode_batch)
    samples: dict[str, list[float]] = {k: [] for k in tasks}
    before = load_snapshot()
    with torch.inference_mode():
        for rnd in range(warmup + runs):
            for name, (fn, per) in tasks.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if rnd >= warmup:
                    samples[name].append(1000 * (time.perf_counter() - t0) / per)
            if log is not None and (rnd + 1) % 20 == 0:
                log(f"[calibrate] round {rnd + 1}/{warmup + runs}")
    during = load_during(before, load_snapshot())
    stages = {k: StageCost.from_samples(v) for k, v in samples.items() if not k.startswith("unet@")}
    unet = [(b, StageCost.from_samples(samples[f"unet@{b}"])) for b in batches]
    shallow = _measure_shallow_fraction(pipe, shallow_interval, height, width, runs=max(1, min(3, runs)), log=log)
    env = environment(dev)
    name = device_name or (env["device"]["name"] if isinstance(env.get("device"), dict) else dev.type)
    table = CostTable(
        device=f"{dev.type}:{name}", backend=comps.backend, dtype=str(dtype).replace("torch.", ""),
        height=height, width=width, stages=stages, unet=unet, unet_shallow_fraction=shallow,
        model=str(info.model_id),
        meta={"runs": runs, "warmup": warmup, "interleaved": True, "batches": list(batches),
              "decode_batch": decode_batch, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "torch_threads": torch.get_num_threads(), "load_during": during,
              "command": env.get("command"), "git_sha": env.get("git_sha"),
              "p99": "empirical 99th percentile" if runs >= 100 else f"max of {runs} runs (fewer than 100)",
              "unet_shallow_fraction": None if shallow is None else f"from whole calls at cache_interval "
                                                                    f"{shallow_interval} vs 1"},
    )
    return table


def _measure_shallow_fraction(pipe, interval: int, height: int, width: int, *, runs: int = 3, log=None
                              ) -> Optional[float]:
    """f such that a call at cache_interval k spends U·(keys + f·(n − keys)) in the UNet, from the UNet stage
    time of whole calls at k and at 1 (median of `runs` each), or None when the pipeline lacks the lever."""
    import inspect
    import statistics

    from PIL import Image

    from cg4ctr_fast.runtime.timing import StageTimer

    if "cache_interval" not in inspect.signature(pipe.generate_batch).parameters:
        return None
    if not getattr(pipe.components.unet, "supports_feature_cache", False):
        return None
    image = Image.new("RGB", (width, height), (200, 180, 160))
    mask = Image.new("L", (width, height), 255)
    mask.paste(0, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))  # a product to keep
    steps = 8
    times = {}
    for k in (1, interval):
        timer = StageTimer(pipe.components.device)
        values = []
        for _ in range(runs + 1):
            timer.reset()
            pipe.timer = timer
            try:
                pipe(["calibration"], image, mask, num_inference_steps=steps, guidance_scale=1.0,
                     show_progress=False, output_type="latent", cache_interval=k)
            finally:
                pipe.timer = None
            values.append(timer.snapshot().get("unet", 0.0))
        times[k] = statistics.median(values[1:])
    keys = len(range(0, steps, interval))
    full = times[1] / steps
    if full <= 0:
        return None
    fraction = (times[interval] - keys * full) / ((steps - keys) * full)
    return float(min(1.0, max(0.01, fraction)))


def measure_quality(plan: Plan, *, products: int = 4, seed: int = 0, log=None, pipe=None) -> QualityEntry:
    """A plan's ad-world quality on the shipped toy set (loads torch and the toy models).

    For `products` held-out products × every user group (the demo's setting): the prompt model proposes a prompt
    per group, the plan generates its candidates, the reward model picks per group (the original kept unless a
    creative scores strictly above it: `pick_over_original`), and the world's oracle gives the true CTR of what
    is served. Quality = aggregate true-CTR lift of the picks over the originals, traffic-weighted, with a
    cluster-bootstrap 95 % CI over products (`aggregate_ctr_lift`). Preview plans rank by the previews and pick
    among the fully decoded top-k, as they would serve.
    pipe: a pipeline over the toy generator to reuse (its scheduler and LoRA state are the caller's).
    Raises InputError when the plan needs a lever this installation lacks.
    """
    import numpy as np

    from cg4ctr_fast.models.diffusion import swap_scheduler
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift, pick_over_original
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig, item_features_for
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    say = log or (lambda _m: None)
    models = resolve_toy_models(ToyConfig(seed=0), progress=False, log=say)
    dataset = load_dataset(models.world)
    world = dataset.world
    traffic = world.group_traffic()
    lcm_lora = toy_lcm_lora()
    levers = detect_levers(lcm_lora=lcm_lora, preview_decoder=toy_preview_decoder() is not None)
    why = levers.why_not(plan)
    if why:
        raise InputError(f"plan {plan.name} cannot run here: {why}")
    if pipe is None:
        saliency_cfg = json.loads((models.saliency / "config.json").read_text())
        pipe = CreativePipeline.from_pretrained(
            str(models.generator), saliency=str(models.saliency / "saliency.safetensors"),
            saliency_size=saliency_cfg["size"], saliency_threshold=saliency_cfg["threshold"])
        apply_plan_weights(pipe, plan, lcm_lora=lcm_lora)
    pipe.scheduler = swap_scheduler(pipe.scheduler, plan.scheduler)
    reward = RewardModel.load(models.reward)
    prompt_model = PromptModel.load(models.prompt)
    group_ids = [g["group_id"] for g in dataset.groups]
    features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in dataset.groups])
    cells = []
    for k in range(products):
        item_id = HELD_OUT_ITEM_BASE + k
        product = world.product(item_id)
        item = item_features_for(world, item_id, dataset.items)
        prompts = prompt_model.propose(features, np.repeat(item[None], len(group_ids), axis=0))
        pipe.reward = reward.pipeline_scorer(features, title=product.title, captions=prompts)
        creatives = pipe(prompts, product.image, None, num_inference_steps=plan.steps,
                         guidance_scale=plan.guidance_scale, num_images_per_prompt=plan.images_per_prompt,
                         seed=seed, show_progress=False, **plan.pipeline_kwargs())
        originals = reward.score_images([product.image] * len(group_ids), [product.title] * len(group_ids),
                                        [""] * len(group_ids), features)
        base_ctr = world.true_ctr_groups(product.image, item_id=item_id)
        for g, group_id in enumerate(group_ids):
            mine = [c for c in creatives if c.group == g]
            pick = pick_over_original([c.reward for c in mine], float(originals[g]))
            base = float(base_ctr[group_id])
            best = int(np.argmax([c.reward for c in mine]))
            best_ctr = world.true_ctr(mine[best].image, group_id, item_id=item_id)
            served = base if pick is None else best_ctr  # pick_over_original picks the best reward or none
            cells.append((served, base, float(traffic[group_id]), k, best_ctr))
        say(f"[quality] {plan.name}: product {k + 1}/{products}")
    lift = aggregate_ctr_lift([c[0] for c in cells], [c[1] for c in cells], [c[2] for c in cells],
                              clusters=[c[3] for c in cells], seed=seed)
    # Beside it: the reward's best creative served always (no fallback to the original), which tells a plan
    # whose creatives are worse but rejected (lift near 0: the original kept) from one whose creatives are good.
    creative = aggregate_ctr_lift([c[4] for c in cells], [c[1] for c in cells], [c[2] for c in cells],
                                  clusters=[c[3] for c in cells], seed=seed)
    kept = sum(1 for c in cells if c[0] == c[1] and c[4] != c[1])
    return QualityEntry(plan, lift.lift, tuple(lift.ci95), lift.cells, products,
                        {"treatment_ctr": lift.treatment_ctr, "control_ctr": lift.control_ctr, "seed": seed,
                         "original_kept": kept, "best_creative_lift": creative.lift,
                         "best_creative_lift_ci95": list(creative.ci95),
                         "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def measure_quality_table(plans: Sequence[Plan], out, *, products: int = 8, seed: int = 0, log=None,
                          existing: Optional[QualityTable] = None) -> QualityTable:
    """`measure_quality` for each plan on the toy set, the table rewritten atomically at `out` after each plan
    (a run cut short keeps what it finished); plans already in `existing` are kept, not re-measured. Plans
    this installation cannot run are skipped with a log line."""
    table = existing or QualityTable(source={
        "set": "cg4ctr_fast/assets/toy", "weights_sha256": toy_weights_sha256(),
        "products": products, "seed": seed,
        "how": "planner.measure_quality: held-out products x every group, the reward's pick per group vs the "
               "original photo, true CTR from the world's oracle, aggregate_ctr_lift with a cluster bootstrap "
               "over products"})
    say = log or (lambda _m: None)
    for plan in plans:
        if table.lookup(plan) is not None:
            continue
        try:
            entry = measure_quality(plan, products=products, seed=seed, log=log)
        except InputError as exc:
            say(f"[quality] {plan.name}: skipped: {exc}")
            continue
        table.entries.append(entry)
        table.save(out)
        say(f"[quality] {plan.name}: lift {entry.quality:+.2%} [{entry.ci95[0]:+.2%}, {entry.ci95[1]:+.2%}]")
    return table


def toy_weights_sha256() -> dict:
    """sha256 of every weight file of the shipped toy set a quality measurement depends on (generator, reward,
    prompt and saliency weights, the LCM-LoRA and the preview decoder when present): which weights a quality
    table was measured with. The manifest's own hash would not do: the table is listed in that manifest."""
    import hashlib

    from cg4ctr_fast.training.toy_set import EXTRA_FP16_FILES, FP16_FILES, shipped_set_dir

    root = shipped_set_dir()
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
            for rel in FP16_FILES + EXTRA_FP16_FILES if (root / rel).is_file()}


def toy_lcm_lora() -> Optional[str]:
    """The toy generator's shipped LCM-LoRA folder (cg4ctr_fast/assets/toy/lcm_lora/), or None until it ships."""
    path = Path(__file__).resolve().parent / "assets" / "toy" / "lcm_lora"
    return str(path) if path.is_dir() and any(path.iterdir()) else None


def toy_preview_decoder() -> Optional[str]:
    """The toy VAE's shipped tiny preview decoder folder (cg4ctr_fast/assets/toy/taesd/), or None."""
    path = Path(__file__).resolve().parent / "assets" / "toy" / "taesd"
    return str(path) if path.is_dir() and any(path.iterdir()) else None


def apply_plan_weights(pipe, plan: Plan, *, lcm_lora: Optional[str] = None,
                       loras: Sequence[tuple[str, float]] = ()) -> None:
    """Fuse what the plan's UNet needs (the LCM-LoRA for unet "lcm") plus the user's `loras` [(path, scale)]
    into a torch pipeline's modules (`export.lora.fuse_loras`), and attach the preview decoder when the plan
    ranks previews. Raises InputError when a needed piece is missing."""
    wanted = list(loras)
    if plan.unet == "lcm":
        if not lcm_lora:
            raise InputError(f"plan {plan.name} needs an LCM-LoRA and none is available")
        wanted.insert(0, (lcm_lora, 1.0))
    if wanted:
        from cg4ctr_fast.export.lora import fuse_loras

        modules = getattr(pipe, "modules", None) or getattr(pipe.components, "modules", None)
        if modules is None:
            raise InputError("LoRAs fuse into torch modules; this pipeline has none (an engine folder?)")
        fuse_loras(modules, wanted)
    if plan.preview_top_k is not None:
        attach_toy_preview_decoder(pipe, f"plan {plan.name} ranks previews")


def attach_toy_preview_decoder(pipe, what: str) -> None:
    """Attach the toy set's shipped tiny preview decoder (`runtime.preview.attach_preview_decoder`) unless the
    pipeline has one already. InputError naming `what` when the set ships none."""
    if getattr(pipe.components, "preview_decoder", None) is not None:
        return
    path = toy_preview_decoder()
    if path is None:
        raise InputError(f"{what}: no preview decoder weights shipped")
    from cg4ctr_fast.runtime.preview import attach_preview_decoder

    attach_preview_decoder(pipe, path)


def cost_table_key(model: str, dtype: str, side: int, threads: int) -> str:
    """The cache key of a cost table: what its timings depend on besides device and backend (the weights'
    architecture, named by `model`; the dtype; the working side in px; torch's thread count)."""
    return f"{model}-{dtype}-{side}px-{threads}t"


def calibration_batches(max_creatives: int, *, preview: bool = False) -> list[int]:
    """UNet batch sizes worth measuring for calls of up to `max_creatives` creatives: 1, the unguided and the
    guided batch, and with preview ranking the 4× candidates batch (linear interpolation covers the rest)."""
    top = 2 * max_creatives * (4 if preview else 1)
    return sorted({1, max_creatives, 2 * max_creatives, min(top, 2 * MAX_CREATIVES)})
