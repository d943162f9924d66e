"""The rules that keep benchmark ratios from misleading: interleaving, percentile gating, spread and ratio
flags, equal threads for torch and ONNX Runtime, load/steal recording, output paths checked before any work.

No timing is asserted on: clocks are fakes where a number matters.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cg4ctr_fast import bench
from cg4ctr_fast.bench import (
    P95_MIN_RUNS,
    P99_MIN_RUNS,
    Variant,
    format_percentile,
    interleaved_order,
    load_during,
    load_warnings,
    paired_ratio,
    percentiles,
    read_proc_stat,
    row_flags,
    run_interleaved,
    summarise,
    table,
)
from cg4ctr_fast.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


class FakeClock:
    """Each call to `call()` advances it by the next duration; the harness reads it before and after."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _variant(name, log, clock, durations, groups=1, prepare_log=None):
    it = iter(durations)

    def call():
        log.append(name)
        clock.now += next(it)

    prepare = (lambda: prepare_log.append(name)) if prepare_log is not None else None
    return Variant(name=name, call=call, prepare=prepare, groups=groups, backend=name)


# ---------------------------------------------------------------------------------------------- interleaving
def test_interleaved_order_is_round_robin_with_warmup_rounds_first():
    assert interleaved_order(["a", "b", "c"], runs=2, warmup=1) == [
        (0, "a", False), (0, "b", False), (0, "c", False),
        (1, "a", True), (1, "b", True), (1, "c", True),
        (2, "a", True), (2, "b", True), (2, "c", True),
    ]


def test_run_interleaved_calls_abab_and_keeps_only_timed_runs():
    clock, log, prepared = FakeClock(), [], []
    variants = [_variant("diffusers", log, clock, [9.0, 2.0, 2.2, 2.1], prepare_log=prepared),
                _variant("ours", log, clock, [5.0, 1.0, 1.1, 0.9], prepare_log=prepared)]
    rounds = []
    samples = run_interleaved(variants, runs=3, warmup=1, device=CPU, clock=clock, cpu_clock=clock,
                              after_round=lambda r, s: rounds.append(r))
    assert log == ["diffusers", "ours"] * 4  # A B A B …, never A A A B B B
    assert prepared == log  # the untimed preparation runs before every call
    assert samples[("diffusers", 1)].wall_s == pytest.approx([2.0, 2.2, 2.1])  # warm-up (9 s) dropped
    assert samples[("ours", 1)].wall_s == pytest.approx([1.0, 1.1, 0.9])
    assert rounds == [1, 2, 3]  # a partial report after every timed round
    rows = summarise(variants, samples)
    assert rows[0].ratio_vs_diffusers == 1.0
    # Per-round ratios 2.0, 2.0, 2.333…: the median, with the min-max as its stated noise.
    assert rows[1].ratio_vs_diffusers == pytest.approx(2.0)
    assert rows[1].ratio_range == pytest.approx([2.0, 2.1 / 0.9])


def test_run_interleaved_refuses_duplicate_rows():
    clock, log = FakeClock(), []
    v = _variant("x", log, clock, [1.0])
    with pytest.raises(ValueError):
        run_interleaved([v, v], runs=1, warmup=0, device=CPU, clock=clock)


def test_ratios_pair_by_group_count():
    clock, log = FakeClock(), []
    variants = [_variant("diffusers", log, clock, [4.0, 4.0], groups=1),
                _variant("ours", log, clock, [2.0, 2.0], groups=1),
                _variant("diffusers", log, clock, [9.0, 9.0], groups=8),
                _variant("ours", log, clock, [3.0, 3.0], groups=8)]
    rows = summarise(variants, run_interleaved(variants, runs=2, warmup=0, device=CPU, clock=clock))
    assert [(r.name, r.groups, r.ratio_vs_diffusers) for r in rows] == [
        ("diffusers", 1, 1.0), ("ours", 1, 2.0), ("diffusers", 8, 1.0), ("ours", 8, 3.0)]
    assert rows[3].images_per_s == pytest.approx(8 / 3.0)


# ---------------------------------------------------------------------------------------------- percentiles
@pytest.mark.parametrize("n", [1, 5, P95_MIN_RUNS - 1, P95_MIN_RUNS, P99_MIN_RUNS - 1, P99_MIN_RUNS, 250])
def test_tail_percentiles_need_enough_runs(n):
    values = list(np.random.default_rng(n).uniform(0.1, 1.0, size=n))
    stats = percentiles(values)
    assert stats["n"] == n and stats["p50"] == pytest.approx(np.percentile(values, 50))
    if n >= P95_MIN_RUNS:
        assert stats["p95"] == pytest.approx(np.percentile(values, 95))
        assert format_percentile(stats, "p95") == f"{stats['p95']:.4f}"
    else:
        assert stats["p95"] is None
        assert format_percentile(stats, "p95") == f"n/a (needs ≥ {P95_MIN_RUNS} runs)"
    if n >= P99_MIN_RUNS:
        assert stats["p99"] == pytest.approx(np.percentile(values, 99))
    else:
        assert stats["p99"] is None
        assert format_percentile(stats, "p99") == f"n/a (needs ≥ {P99_MIN_RUNS} runs)"


def test_percentiles_refuses_no_values():
    with pytest.raises(ValueError):
        percentiles([])


# ---------------------------------------------------------------------------------------------- spread flags
@pytest.mark.parametrize(
    "values,noisy",
    [
        ([1.00, 1.05, 1.02], False),  # spread 5 %
        ([1.00, 1.09, 1.00], False),  # 9 %: under the rule
        ([1.00, 1.20, 1.00], True),  # 20 %
        ([0.30, 6.00, 0.35, 0.31], True),  # one call stalled behind a second job
        ([1.00], True),  # one run: the spread cannot be told
    ],
)
def test_row_spread_flag(values, noisy):
    assert row_flags(percentiles(values)) == (["noisy"] if noisy else [])


def test_ratio_flags():
    steady = paired_ratio([2.0, 2.02, 2.01], [1.0, 1.01, 1.0])
    assert steady["ratio"] == pytest.approx(2.0, rel=0.01) and steady["flags"] == []
    # Each side steady but the per-round ratio jumps: the rounds disagree by more than 10 %.
    jumpy = paired_ratio([2.0, 2.05, 2.1], [1.0, 1.09, 0.97])
    assert "noisy" in jumpy["flags"]
    # A noisy side makes the ratio noisy even when the median looks fine.
    assert "noisy" in paired_ratio([2.0, 3.0, 2.0], [1.0, 1.0, 1.0])["flags"]
    # Both sides steady, ranges overlapping: which one is faster is not resolved.
    same = paired_ratio([1.00, 1.04, 1.02], [1.02, 1.03, 1.01])
    assert same["flags"] == ["overlap"]
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_table_and_rows_carry_flags_and_gated_percentiles():
    clock, log = FakeClock(), []
    variants = [_variant("diffusers", log, clock, [1.0, 1.0, 1.0]),
                _variant("onnxruntime", log, clock, [0.05, 0.5, 0.06])]  # a 10× stall in round 2
    rows = summarise(variants, run_interleaved(variants, runs=3, warmup=0, device=CPU, clock=clock))
    assert rows[1].flags == ["noisy"] and "noisy" in rows[1].ratio_flags
    text = table(rows)
    line = next(x for x in text.splitlines() if x.startswith("onnxruntime"))
    assert "noisy" in line and f"n/a (needs ≥ {P95_MIN_RUNS} runs)" in line and "[2.00-20.00]" in line


# ---------------------------------------------------------------------------------------------- threads
@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_threads_sets_torch_and_reports(restore_threads):
    applied = bench.apply_threads(1)
    assert torch.get_num_threads() == 1
    assert applied["torch_intra_op"] == 1 and applied["onnxruntime_intra_op"] == 1
    assert applied["requested"] == 1 and applied["available_cores"] >= 1
    # Inter-op: set when torch still allows it, otherwise left and said so.
    assert applied["torch_inter_op"] == 1 or "torch_inter_op_note" in applied
    with pytest.raises(InputError):
        bench.apply_threads(0)


def test_available_cores_is_the_affinity():
    assert bench.available_cores() == len(__import__("os").sched_getaffinity(0))


def test_onnxruntime_session_gets_the_thread_count(monkeypatch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from cg4ctr_fast.runtime import onnxruntime_backend as ob

    seen = []

    class FakeSession:
        def __init__(self, path, sess_options=None, providers=None):
            seen.append(sess_options)

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    ob.OrtComponent(tmp_path / "m.onnx", _Contract(), ["CPUExecutionProvider"], CPU, threads=3)
    ob.OrtComponent(tmp_path / "m.onnx", _Contract(), ["CPUExecutionProvider"], CPU)
    assert seen[0].intra_op_num_threads == 3
    assert seen[1].intra_op_num_threads == 0  # ONNX Runtime's own default when not asked


def test_onnxruntime_components_pass_threads_to_every_session(monkeypatch):
    from cg4ctr_fast.export.contracts import PIPELINE_COMPONENTS
    from cg4ctr_fast.runtime import onnxruntime_backend as ob

    made = {}

    class Recorder:
        def __init__(self, path, contract, providers, device, threads=None):
            made[Path(path).parent.name] = threads

    monkeypatch.setattr(ob, "load_engine_folder",
                        lambda root: {"components": {n: {"file": f"{n}/model.onnx"} for n in PIPELINE_COMPONENTS}})
    monkeypatch.setattr(ob.mf, "contract_of", lambda manifest, name: None)
    monkeypatch.setattr(ob, "available_providers", lambda providers: ["CPUExecutionProvider"])
    monkeypatch.setattr(ob, "OrtComponent", Recorder)
    monkeypatch.setattr(ob, "engine_components", lambda root, parts, **kw: parts)
    ob.onnxruntime_components("/engines", threads=2)
    assert made == {n: 2 for n in PIPELINE_COMPONENTS}


class _Contract:
    name = "unet"
    inputs = ()
    outputs = ()


# ---------------------------------------------------------------------------------------------- load and steal
PROC_STAT_BEFORE = """cpu  1000 10 500 8000 100 20 30 40 0 0
cpu0 500 5 250 4000 50 10 15 20 0 0
cpu1 500 5 250 4000 50 10 15 20 0 0
intr 12345
ctxt 999
procs_running 3
procs_blocked 0
"""
# 10 s later on 2 cores at 100 jiffies/s: 2000 more jiffies; user +1100, system +200, idle +500, iowait +100,
# steal +100 (guest time is already inside user).
PROC_STAT_AFTER = """cpu  2100 10 700 8500 200 20 30 140 50 0
cpu0 1050 5 350 4150 100 10 15 70 25 0
procs_running 5
"""


def test_read_proc_stat_parses_the_aggregate_line():
    stat = read_proc_stat(PROC_STAT_BEFORE)
    assert stat == {"total": 9700, "idle": 8100, "steal": 40, "busy": 1560, "procs_running": 3}
    assert read_proc_stat("intr 1\n") is None
    assert read_proc_stat(path="/no/such/proc/stat") is None


def test_load_during_steal_and_other_processes():
    before = {"monotonic_s": 100.0, "loadavg": [3.1, 2.0, 1.0], "proc_stat": read_proc_stat(PROC_STAT_BEFORE),
              "own_cpu_s": 10.0, "cores": 2}
    after = {"monotonic_s": 110.0, "loadavg": [3.5, 2.2, 1.1], "proc_stat": read_proc_stat(PROC_STAT_AFTER),
             "own_cpu_s": 15.0, "cores": 2}
    during = load_during(before, after, hz=100)
    assert during["steal_jiffies"] == 100
    assert during["steal_fraction"] == pytest.approx(100 / 2000)
    assert during["busy_cores"] == pytest.approx(1300 / 100 / 10)  # 1.3 cores busy on average
    assert during["own_cores"] == pytest.approx(0.5)
    assert during["others_cores"] == pytest.approx(0.8)
    warnings = load_warnings(before, during)
    assert len(warnings) == 3
    assert "load average 3.10 > 2 cores" in warnings[0]
    assert "other processes kept 0.80 of 2 cores" in warnings[1]
    assert "5.0 % of CPU time was stolen" in warnings[2]
    quiet = dict(before, loadavg=[0.4, 0.3, 0.2])
    assert load_warnings(quiet, {"others_cores": 0.1, "steal_fraction": 0.0}) == []


def test_load_snapshot_reads_this_machine():
    snap = bench.load_snapshot(PROC_STAT_BEFORE)
    assert snap["proc_stat"]["steal"] == 40 and len(snap["loadavg"]) == 3 and snap["own_cpu_s"] >= 0


# ---------------------------------------------------------------------------------------------- output paths
@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--json", "/missing/dir/x.json"], "--json /missing/dir/x.json: folder /missing/dir does not exist"),
        (["--json", "{tmp}"], "is a folder"),
        (["--json", "{tmp}/x.json", "--plot", "/missing/dir/p.png"], "--plot"),
        (["--json", "{tmp}/x.json", "--plot", "{tmp}/p.json"], "must end in"),
        (["--json", "{tmp}/x.json", "--plot", "{tmp}/x.json"], "must end in"),
    ],
)
def test_bench_checks_output_paths_before_any_work(monkeypatch, tmp_path, capsys, flags, needle):
    import cg4ctr_fast.models.diffusion as diffusion
    from cg4ctr_fast.cli.bench import main

    work = []
    monkeypatch.setattr(diffusion, "build_modules", lambda *a, **k: work.append("build") or 1 / 0)
    monkeypatch.setattr(bench, "apply_threads", lambda *a, **k: work.append("threads") or 1 / 0)
    argv = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    try:
        code = main(["--preset", "tiny", *argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert work == []  # refused before threads were set or a model was built
    assert [p.name for p in tmp_path.iterdir()] == []


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script,argv", [
    ("unet_forward", ["--preset", "tiny", "--runs", "1"]),
    ("ranking_bench", ["--candidates", "4", "--requests", "2"]),
    ("kernel_bench", ["--device", "cpu"]),
])
def test_bench_scripts_check_json_path_first(script, argv, capsys):
    code = _script(script).main([*argv, "--json", "/missing/dir/x.json"])
    err = capsys.readouterr().err
    assert code == 2 and "/missing/dir" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------- spin policy
def test_omp_wait_policy_is_set_before_torch_loads(monkeypatch):
    import json
    import subprocess

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    code = ("import json, os, sys; from cg4ctr_fast.cli.bench import set_omp_wait_policy; "
            "r = set_omp_wait_policy('passive'); assert 'torch' not in sys.modules; "
            "print(json.dumps([r, os.environ.get('OMP_WAIT_POLICY')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    got, env = json.loads(out.stdout)
    assert env == "PASSIVE" and got["applied"] is True and got["OMP_WAIT_POLICY"] == "PASSIVE"


def test_omp_wait_policy_after_torch_is_reported_not_applied(monkeypatch):
    from cg4ctr_fast.cli.bench import set_omp_wait_policy

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    got = set_omp_wait_policy("passive")  # torch is imported in this process already
    assert got["applied"] is False and "note" in got
    assert got["OMP_WAIT_POLICY"] == "ACTIVE"  # left as it was: changing it now would record a lie
    assert set_omp_wait_policy("env")["applied"] is True


def test_checks_before_the_run_do_not_load_torch(tmp_path):
    """Output checks and the spin policy come before torch loads, or OMP_WAIT_POLICY could not take effect."""
    import subprocess

    code = ("import sys; from cg4ctr_fast.cli.bench import build_parser, check_outputs, set_omp_wait_policy; "
            f"a = build_parser().parse_args(['--json', {str(tmp_path / 'x.json')!r}, '--plot', "
            f"{str(tmp_path / 'p.png')!r}]); check_outputs(a); r = set_omp_wait_policy('passive'); "
            "assert 'torch' not in sys.modules and r['applied'], r")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


# ---------------------------------------------------------------------------------------------- quiet vs loaded
def _report(rows):
    return {"results": [{"name": n, "groups": g, "ratio_vs_diffusers": r, "ratio_range": rng, "ratio_flags": f}
                        for n, g, r, rng, f in rows]}


def test_compare_runs_verdicts(tmp_path, capsys):
    import json

    cmp = _script("compare_runs")
    quiet = _report([("onnxruntime", 1, 1.79, [1.7, 1.85], []), ("torch", 1, 1.0, [0.98, 1.02], ["overlap"]),
                     ("onnxruntime", 8, 0.97, [0.95, 1.0], [])])
    loaded = _report([("onnxruntime", 1, 1.9, [1.6, 2.2], ["noisy"]),  # 1.79 inside 1.6-2.2
                      ("torch", 1, 1.3, [1.2, 1.5], ["noisy"]),  # outside, but flagged
                      ("onnxruntime", 8, 1.5, [1.45, 1.55], [])])  # outside and not flagged: misleads
    lines, ok = cmp.compare(quiet, loaded)
    assert [line.rsplit("|", 2)[1].strip() for line in lines[2:]] == ["within noise", "flagged noisy", "MISLEADING"]
    assert ok is False
    (tmp_path / "q.json").write_text(json.dumps(quiet))
    (tmp_path / "l.json").write_text(json.dumps(loaded))
    assert cmp.main([str(tmp_path / "q.json"), str(tmp_path / "l.json")]) == 1
    assert cmp.main([str(tmp_path / "q.json"), str(tmp_path / "q.json")]) == 0
    assert cmp.main([str(tmp_path / "q.json"), str(tmp_path / "missing.json")]) == 2
