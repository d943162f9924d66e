"""The latency planner (cg4ctr_fast.planner) on synthetic cost and quality tables, and `generate --deadline-ms`.

No timing is asserted: the tables are made up (seeded random), and the planner's choice is checked against a
brute-force search over the same candidates with the cost model written out independently.
"""
from __future__ import annotations

import dataclasses

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.planner import (
    ALL_LEVERS,
    SCHEMA_VERSION,
    CostTable,
    DeadlineInfeasible,
    Levers,
    Plan,
    QualityEntry,
    QualityTable,
    StageCost,
    candidate_plans,
    detect_levers,
    plan_for,
)


def synthetic_cost(seed: int, *, shallow: float | None = 0.35, preview: bool = True) -> CostTable:
    """A cost table with random (but plausible) stage costs: p99 = p50 × a random factor in [1, 2]."""
    rng = np.random.default_rng(seed)

    def cost(p50):
        return StageCost(float(p50), float(p50 * rng.uniform(1.0, 2.0)), 100)

    stages = {"text": cost(rng.uniform(1, 10)), "saliency": cost(rng.uniform(1, 20)),
              "vae_encode": cost(rng.uniform(1, 10)), "vae_decode": cost(rng.uniform(0.5, 5)),
              "composite": cost(rng.uniform(0.1, 1)), "reward": cost(rng.uniform(0.1, 2)),
              "step": cost(rng.uniform(0.01, 0.1))}
    if preview:
        stages["preview_decode"] = cost(rng.uniform(0.05, 0.5))
    batches = sorted(set(int(b) for b in rng.choice([1, 2, 3, 4, 7, 8, 16, 33], size=4, replace=False)))
    per = rng.uniform(0.5, 3.0)
    unet = [(b, cost(rng.uniform(2, 6) + per * b)) for b in batches]
    # Keep the UNet curve non-decreasing, as measured curves are.
    fixed = []
    last = (0.0, 0.0)
    for b, c in unet:
        c = StageCost(max(c.p50_ms, last[0]), max(c.p99_ms, last[1], c.p50_ms), c.n)
        fixed.append((b, c))
        last = (c.p50_ms, c.p99_ms)
    return CostTable("cpu:test", "torch", "float32", 64, 64, stages, fixed, shallow, model="synthetic")


def synthetic_quality(plans, seed: int) -> QualityTable:
    rng = np.random.default_rng(seed)
    entries = []
    for plan in plans:
        q = float(rng.normal(0.02, 0.05))
        entries.append(QualityEntry(plan, q, (q - 0.03, q + 0.03), 32, 4))
    return QualityTable(entries=entries)


def reference_p99(cost: CostTable, plan: Plan, groups: int, reward: bool = True, saliency: bool = True) -> float:
    """The cost model written out a second way (per creative and per step), from the raw table."""
    def u(b):  # linear interpolation, flat below the first point, last slope above
        xs = [x for x, _ in cost.unet]
        ys = [c.p99_ms for _, c in cost.unet]
        if b <= xs[0]:
            return ys[0]
        if b >= xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else ys[0] / xs[0]
            return ys[-1] + max(slope, 0.0) * (b - xs[-1]) if len(xs) > 1 else ys[0] * b / xs[0]
        return float(np.interp(b, xs, ys))

    s = {k: v.p99_ms for k, v in cost.stages.items()}
    n, m = plan.steps, plan.images_per_prompt
    creatives = groups * m
    guided = math.ceil(round(plan.guidance_cutoff * n, 9)) if plan.guidance_scale > 1 else 0
    total = s["text"] + (s["saliency"] if saliency else 0.0) + s["vae_encode"]
    for i in range(n):
        full = u(2 * creatives if i < guided else creatives)
        total += full if i % plan.cache_interval == 0 else cost.unet_shallow_fraction * full
        total += creatives * s["step"]
    if plan.preview_top_k is None:
        total += creatives * (s["vae_decode"] + s["composite"] + (s["reward"] if reward else 0.0))
    else:
        kept = groups * plan.preview_top_k
        total += creatives * (s["preview_decode"] + s["reward"]) + kept * (s["vae_decode"] + s["composite"] + s["reward"])
    if reward:
        total += groups * s["reward"]
    return total


def test_predict_by_hand():
    """One plan worked out by hand: 5 steps, cut-off 0.4 (2 guided), cache interval 2, shallow 0.3, 3 groups."""
    cost = CostTable("cpu:x", "torch", "float32", 64, 64,
                     stages={"text": StageCost(1, 2), "saliency": StageCost(1, 3), "vae_encode": StageCost(1, 4),
                             "vae_decode": StageCost(1, 5), "reward": StageCost(1, 0.5), "step": StageCost(0.1, 0.2)},
                     unet=[(1, StageCost(5, 10)), (4, StageCost(10, 25))], unet_shallow_fraction=0.3)
    plan = Plan("ddim", 5, 7.5, 0.4, 2)
    # U(6) = 25 + 5·2 = 35 (slope (25-10)/3 = 5 past batch 4); U(3) = 10 + 5·2 = 20.
    unet = 35 + 0.3 * 35 + 20 + 0.3 * 20 + 20
    expected = 2 + 3 + 4 + unet + 5 * 3 * 0.2 + 3 * 5 + 3 * 0.5 + 3 * 0.5
    pred = cost.predict(plan, groups=3)
    assert pred.total_ms == pytest.approx(expected, rel=1e-12)
    assert pred.stages["unet"] == pytest.approx(unet, rel=1e-12)
    assert cost.predict(plan, groups=3, stat="p50").total_ms < pred.total_ms


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_predict_matches_reference(seed):
    cost = synthetic_cost(seed)
    rng = np.random.default_rng(100 + seed)
    plans = candidate_plans(int(rng.integers(1, 4)))
    groups = int(rng.integers(1, 9))
    for plan in rng.choice(np.array(plans, dtype=object), size=25, replace=False):
        if groups * plan.images_per_prompt > 64:
            continue
        assert cost.predict(plan, groups).total_ms == pytest.approx(reference_p99(cost, plan, groups), rel=1e-9)
        if plan.preview_top_k is None:  # preview ranking needs the reward model
            assert cost.predict(plan, groups, reward=False, saliency=False).total_ms == pytest.approx(
                reference_p99(cost, plan, groups, reward=False, saliency=False), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_chosen_plan_meets_deadline_and_is_best(seed):
    rng = np.random.default_rng(seed)
    cost = synthetic_cost(seed)
    served = int(rng.integers(1, 3))
    groups = int(rng.integers(1, 9))
    plans = [p for p in candidate_plans(served) if groups * p.images_per_prompt <= 64]
    quality = synthetic_quality(plans, seed)
    latencies = {p: reference_p99(cost, p, groups) for p in plans}
    lo, hi = min(latencies.values()), max(latencies.values())
    for deadline in rng.uniform(lo, hi * 1.1, size=6):
        plan, why = plan_for(float(deadline), groups, cost, quality, served_per_group=served)
        assert latencies[plan] <= deadline
        feasible = [p for p in plans if latencies[p] <= deadline]
        best_q = max(quality.lookup(p).quality for p in feasible)
        assert quality.lookup(plan).quality == best_q
        assert latencies[plan] == min(latencies[p] for p in feasible if quality.lookup(p).quality == best_q)
        assert plan.name in why and f"{latencies[plan]:.0f} ms" in why
        if any(quality.lookup(p).quality > best_q for p in plans):
            assert "best rejected" in why


def test_impossible_deadline_names_fastest():
    cost = synthetic_cost(7)
    plans = candidate_plans(1)
    fastest = min(reference_p99(cost, p, 8) for p in plans)
    with pytest.raises(DeadlineInfeasible) as info:
        plan_for(fastest * 0.99, 8, cost, synthetic_quality(plans, 7))
    assert isinstance(info.value, TimeoutError)
    assert info.value.fastest_ms == pytest.approx(fastest, rel=1e-9)
    assert f"{math.ceil(fastest)} ms" in str(info.value) and "\n" not in str(info.value)
    # At the fastest time itself a plan fits.
    plan, _ = plan_for(fastest * 1.0000001, 8, cost, synthetic_quality(plans, 7))
    assert reference_p99(cost, plan, 8) <= fastest * 1.0000001


def test_unavailable_levers_are_skipped_with_reason():
    cost = synthetic_cost(3, shallow=None, preview=False)
    plans = candidate_plans(1)
    # Make the best-quality plans the ones that need missing levers.
    entries = [QualityEntry(p, 1.0 if (p.cache_interval > 1 or p.unet == "lcm") else 0.0 - p.steps * 1e-3)
               for p in plans]
    levers = Levers(schedulers=frozenset({"ddim"}), unets=frozenset({"base"}), guidance_cutoff=True,
                    cache_interval=True, missing={"unet:lcm": "no LCM-LoRA shipped yet"})
    plan, why = plan_for(1e9, 2, cost, QualityTable(entries), levers=levers)
    assert plan.cache_interval == 1 and plan.unet == "base" and plan.scheduler == "ddim"
    assert "best rejected" in why and "shallow-step" in why  # ddim-20s-w7.5-ci2: the table cannot price it
    # Without a quality table the proxy ranks by UNet work and says so.
    plan, why = plan_for(1e9, 2, cost, None, levers=levers)
    assert "quality unmeasured" in why and plan.steps == 20 and plan.guidance_scale > 1


def test_quality_table_of_another_shape_falls_back_to_the_proxy():
    cost = synthetic_cost(4)
    quality = synthetic_quality(candidate_plans(1), 4)  # one creative per group only
    plan, why = plan_for(1e9, 2, cost, quality, served_per_group=3)
    assert plan.served_per_group == 3 and "quality unmeasured" in why
    plan, why = plan_for(1e9, 2, cost, quality, served_per_group=1)
    assert "true-CTR lift" in why and quality.lookup(plan) is not None


def test_no_runnable_plan_is_input_error():
    cost = synthetic_cost(1)
    with pytest.raises(InputError, match="no plan can run"):
        plan_for(100.0, 2, cost, None, levers=Levers(schedulers=frozenset()))


@pytest.mark.parametrize("deadline", [0, -5, float("nan"), float("inf"), "100"])
def test_bad_deadline(deadline):
    with pytest.raises(InputError):
        plan_for(deadline, 2, synthetic_cost(0))


def test_tables_round_trip(tmp_path):
    cost = synthetic_cost(5)
    path = cost.save(tmp_path / "cost.json")
    back = CostTable.load(path)
    assert back.to_dict() == cost.to_dict()
    plans = candidate_plans(2)[:9]
    quality = synthetic_quality(plans, 5)
    quality.entries[0] = QualityEntry(plans[0], 0.01, (math.nan, math.nan))
    qback = QualityTable.load(quality.save(tmp_path / "q.json"))
    assert [e.plan for e in qback.entries] == plans
    assert [e.quality for e in qback.entries] == [e.quality for e in quality.entries]
    assert all(math.isnan(v) for v in qback.entries[0].ci95)
    for plan in plans:
        assert Plan.from_dict(plan.to_dict()) == plan


def _mutations():
    good = synthetic_cost(0).to_dict()
    yield "not an object", []
    yield "schema", {**good, "schema": "other"}
    yield "version", {**good, "schema_version": SCHEMA_VERSION + 1}
    yield "no unet", {**good, "unet": []}
    yield "negative", {**good, "stages": {**good["stages"], "text": {"p50_ms": -1, "p99_ms": 2}}}
    yield "p99 below p50", {**good, "stages": {**good["stages"], "text": {"p50_ms": 5, "p99_ms": 2}}}
    yield "unknown stage", {**good, "stages": {**good["stages"], "magic": {"p50_ms": 1, "p99_ms": 2}}}
    yield "batch", {**good, "unet": [{"batch": 0, "p50_ms": 1, "p99_ms": 1}]}
    yield "fraction", {**good, "unet_shallow_fraction": 1.5}
    yield "height", {**good, "height": "64"}


@pytest.mark.parametrize("name,data", list(_mutations()), ids=[m[0] for m in _mutations()])
def test_malformed_cost_table_refused(tmp_path, name, data):
    path = tmp_path / "cost.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        CostTable.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_malformed_files_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for loader in (CostTable.load, QualityTable.load):
        with pytest.raises(InputError, match="not valid JSON"):
            loader(bad)
        with pytest.raises(InputError, match="no such file"):
            loader(tmp_path / "missing.json")
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"schema": "cg4ctr_fast/quality-table", "schema_version": SCHEMA_VERSION,
                             "entries": [{"plan": {"steps": 0}, "quality": 0.1}]}))
    with pytest.raises(InputError, match="steps"):
        QualityTable.load(q)
    q.write_text(json.dumps({"schema": "cg4ctr_fast/quality-table", "schema_version": SCHEMA_VERSION,
                             "entries": [{"plan": {"stepz": 4}, "quality": 0.1}]}))
    with pytest.raises(InputError, match="unknown plan field"):
        QualityTable.load(q)


def test_plan_checks_and_guided_steps():
    assert Plan("ddim", 10, 7.5, 0.3).guided_steps == 3  # 0.3·10 is 3.0000000000000004 in floats
    assert Plan("ddim", 7, 7.5, 0.5).guided_steps == 4
    assert Plan("ddim", 7, 1.0, 0.5).guided_steps == 0
    assert Plan("ddim", 7, 7.5, 0.5).pipeline_kwargs() == {"guidance_cutoff": 0.5}
    assert Plan("ddim", 7, 1.0, 0.5).pipeline_kwargs() == {}  # no guidance: the cut-off is moot
    for bad in ({"steps": 0}, {"guidance_cutoff": 0.0}, {"cache_interval": 0}, {"preview_top_k": 2},
                {"unet": "xl"}, {"guidance_scale": float("nan")}):
        with pytest.raises(InputError):
            Plan(**bad)


def test_import_is_light():
    code = ("import sys, cg4ctr_fast.planner; "
            "print(sorted(m for m in ('torch', 'diffusers', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_generate_impossible_deadline_exits_with_one_line(tmp_path, capsys):
    from PIL import Image

    from cg4ctr_fast.cli.main import main

    image = tmp_path / "p.png"
    rgba = np.zeros((40, 56, 4), np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 255, (40, 56, 3))
    rgba[10:30, 15:40, 3] = 255  # the product; the rest is transparent (repainted)
    Image.fromarray(rgba, "RGBA").save(image)
    cost = synthetic_cost(11)
    path = cost.save(tmp_path / "cost.json")
    levers = detect_levers(backend="torch", reward=False)  # what this checkout's pipeline can run
    # The image's transparency is the mask: no saliency net, and no reward model, in the prediction.
    fastest = min(reference_p99(cost, p, 2, reward=False, saliency=False) for p in candidate_plans(1)
                  if levers.why_not(p) is None and cost.missing_for(p, reward=False) is None)
    out = tmp_path / "out"
    code = main(["generate", "--preset", "tiny", "--image", str(image), "--prompt", "a", "--prompt", "b",
                 "--out", str(out), "--deadline-ms", f"{fastest * 0.5:.3f}", "--cost-table", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no plan meets" in err and f"{math.ceil(fastest)} ms" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # The planner's own flags are refused next to --deadline-ms, and a cost table without it.
    code = main(["generate", "--preset", "tiny", "--image", str(image), "--prompt", "a", "--out", str(out),
                 "--deadline-ms", "100", "--steps", "4"])
    assert code == 2 and "--steps" in capsys.readouterr().err
    code = main(["generate", "--preset", "tiny", "--image", str(image), "--prompt", "a", "--out", str(out),
                 "--cost-table", str(path)])
    assert code == 2 and "--deadline-ms" in capsys.readouterr().err
    assert not out.exists()


def test_runtime_plans_requests_with_deadlines(tmp_path):
    """A deadline picks the plan (its steps and guidance reach generate_batch), the result names it, and a
    deadline no plan fits is refused at submit with the fastest feasible time, nothing queued."""
    import time

    import torch

    from cg4ctr_fast.models.reward import RewardConfig, RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.serving.runtime import CreativeRuntime, GenerateRequest, RuntimeObserver
    from tests.conftest import make_product

    slow_good, fast_poor = Plan("ddim", 2, 7.5), Plan("ddim", 1, 1.0)
    # p50 tiny (the batch-time check uses it), p99 in seconds: A needs 2 × U(2) = 6 s, B needs U(1) = 2 s.
    cost = CostTable("cpu:test", "torch", "float32", 64, 64, stages={},
                     unet=[(1, StageCost(0.1, 2000.0)), (2, StageCost(0.2, 3000.0))])
    quality = QualityTable([QualityEntry(slow_good, 0.05), QualityEntry(fast_poor, -0.01)])

    class Rejections(RuntimeObserver):
        def __init__(self):
            self.reasons = []

        def rejected(self, reason):
            self.reasons.append(reason)

    torch.manual_seed(3)
    reward = RewardModel(RewardConfig(group_dim=2, title_vocab_size=5, caption_vocab_size=5)).eval()
    observer = Rejections()
    runtime = CreativeRuntime(CreativePipeline.from_preset("tiny"), store=tmp_path / "store", reward=reward,
                              groups={"a": [1.0, 0.0]}, model_id="preset:tiny:seed0", observer=observer,
                              cost_table=cost.save(tmp_path / "cost.json"), quality_table=quality)
    calls = []
    inner = runtime.pipeline.generate_batch

    def recording(jobs, **kwargs):
        calls.append(kwargs)
        return inner(jobs, **kwargs)

    runtime.pipeline.generate_batch = recording
    image, mask = make_product(48, 40, seed=2)
    try:
        def request(seconds):
            return GenerateRequest("p", image=image, mask_image=mask, prompts=("warm",), group_ids=("a",),
                                   deadline=time.monotonic() + seconds)

        generous = runtime.submit(request(60.0)).result(120)
        tighter = runtime.submit(request(4.5)).result(120)
        with pytest.raises(DeadlineInfeasible) as info:
            runtime.submit(request(1.0))
        plain = runtime.submit(GenerateRequest("p", prompts=("warm",), group_ids=("a",))).result(120)
    finally:
        runtime.close()
    assert (generous.plan, tighter.plan, plain.plan) == (slow_good.name, fast_poor.name, None)
    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in calls] == [(2, 7.5), (1, 1.0),
                                                                               (runtime.num_inference_steps,
                                                                                runtime.guidance_scale)]
    # 2000 ms for the fast plan, plus the queue wait the runtime expects (the batch before may still be storing).
    assert isinstance(info.value, TimeoutError) and info.value.fastest_ms >= 2000
    assert f"{math.ceil(info.value.fastest_ms)} ms" in str(info.value)
    assert observer.reasons == ["deadline"] and runtime.queue_depth() == 0


def test_bench_calibrate_writes_a_table_the_planner_reads(tmp_path, capsys):
    """One timed round on the tiny preset: the file is a valid cost table with every UNet batch asked for and
    the reference plan's whole-call check beside it (values are timings: only their presence and sign are
    checked)."""
    from cg4ctr_fast.cli.bench import main

    out = tmp_path / "cost.json"
    code = main(["--calibrate", "--preset", "tiny", "--runs", "1", "--warmup", "0", "--groups", "3", "--steps", "1",
                 "--threads", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    table = CostTable.load(out)
    assert [b for b, _ in table.unet] == [1, 2, 3, 4, 6, 8]
    assert {"text", "vae_encode", "vae_decode", "step"} <= set(table.stages)
    assert all(c.p99_ms >= c.p50_ms > 0 for c in table.stages.values())
    assert table.meta["validation"]["plan"] == "ddim-1s-w7.5" and table.meta["validation"]["measured_p50_ms"] > 0
    assert table.meta["p99"].startswith("max of 1 runs")
    plan, why = plan_for(1e9, 3, table)
    assert plan.name in why
    # --json and --calibrate do not mix; a file where --out points is checked before any work.
    assert main(["--calibrate", "--json", str(tmp_path / "x.json")]) == 2
    assert main(["--calibrate", "--out", str(tmp_path / "missing" / "c.json")]) == 2
    assert "folder" in capsys.readouterr().err


def test_a_cost_table_for_another_run_says_why():
    table = synthetic_cost(3)
    side = max(table.height, table.width)
    kind = table.device.split(":", 1)[0]
    assert table.mismatch(device_type=kind, backend=table.backend, side=side) is None
    other = "cuda" if kind != "cuda" else "cpu"
    assert f"this run is on {other}" in table.mismatch(device_type=other, backend=table.backend, side=side)
    assert "backend, this run uses tensorrt" in table.mismatch(device_type=kind, backend="tensorrt", side=side)
    assert f"this run works at {side * 2} px" in table.mismatch(device_type=kind, backend=table.backend, side=side * 2)
    stages = dict(table.stages)
    stages.pop("vae_decode")
    lacking = dataclasses.replace(table, stages=stages)
    assert lacking.mismatch(device_type=kind, backend=table.backend, side=side) == "it has no vae_decode timing"
