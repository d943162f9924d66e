"""cg4ctr-bench: a real (tiny) run writes a complete report; bad requests fail with one line."""
from __future__ import annotations

import json

import pytest

from cg4ctr_fast.cli.bench import main


def test_bench_writes_rows_with_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--preset", "tiny", "--backends", "torch", "--groups", "1,3", "--steps", "2", "--runs", "2",
                 "--warmup", "1", "--fuse", "both", "--threads", "1", "--json", str(out),
                 "--plot", str(tmp_path / "b.png")])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True
    rows = report["results"]
    # Rows in the order they ran within each round (every row once per round).
    assert [(r["name"], r["groups"]) for r in rows] == [
        ("diffusers", 1), ("torch+unfused", 1), ("torch+fused", 1),
        ("diffusers", 3), ("torch+unfused", 3), ("torch+fused", 3),
    ]
    assert report["config"]["order"] == [f"{r['name']}/{r['groups']}" for r in rows]
    assert report["config"]["interleaved"] is True and report["config"]["prompt_cache"] == "cold"
    for row in rows:
        assert row["total"]["p50"] > 0 and row["total"]["n"] == 2 and len(row["samples_s"]) == 2
        # Two runs are far from what p95/p99 need.
        assert row["total"]["p95"] is None and row["total"]["p99"] is None
        assert row["ratio_vs_diffusers"] > 0 and row["cpu_per_wall"] > 0
        assert set(row["flags"]) <= {"noisy"}
    for row in rows:
        if row["name"] != "diffusers":
            lo, hi = row["ratio_range"]
            assert lo <= row["ratio_vs_diffusers"] <= hi
            assert "re-encoded every call" in " ".join(row["notes"])
    ours = rows[1]
    assert {"text", "vae_encode", "unet", "step", "vae_decode", "composite"} <= set(ours["stages"])
    # The stages are parts of the whole call.
    assert sum(s["p50"] for s in ours["stages"].values()) <= ours["total"]["p50"] * 1.05
    env = report["environment"]
    assert env["versions"]["torch"] and env["versions"]["diffusers"] and env["command"]
    assert report["threads"]["requested"] == 1 and report["threads"]["torch_intra_op"] == 1
    load = report["load"]
    assert len(load["before"]["loadavg"]) == 3 and load["during"]["wall_s"] > 0
    assert (tmp_path / "b.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "vs diffusers" in printed and "n/a (needs ≥ 20 runs)" in printed and "threads: 1" in printed
    assert "encode the prompts, as diffusers re-encodes every call" in printed
    assert "not applied: torch was imported first" in printed  # in this process torch came first


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--backends", "onnxruntime"], "cg4ctr-export"),
        (["--backends", "cuda-magic"], "unknown backend"),
        (["--groups", "0"], "positive"),
        (["--steps", "0"], "--steps"),
        (["--preset", "sd15-inpaint"], "--random-weights"),
        (["--threads", "0"], "--threads"),
        (["--plot", "/no/such/dir/b.png"], "does not exist"),
        (["--step-backend", "torch,cuda-magic"], "unknown step backend 'cuda-magic'"),
        (["--step-backend", ","], "--step-backend needs at least one of"),
        (["--fuse", "off", "--step-backend", "torch"], "--fuse off runs none"),
    ],
)
def test_bench_bad_requests(tmp_path, capsys, flags, needle):
    try:
        code = main(["--json", str(tmp_path / "x.json"), *flags])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.json").exists()


def test_ranking_bench_reports_latency(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "ranking_bench", Path(__file__).resolve().parent.parent / "bench" / "ranking_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rank.json"
    assert module.main(["--candidates", "8", "--requests", "5", "--warmup", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["per_request_s"]["n"] == 5 and report["per_request_s"]["p50"] > 0
    assert module.main(["--candidates", "0"]) == 2


def test_bench_native_step_backend_missing_is_one_line(tmp_path, capsys, monkeypatch):
    from cg4ctr_fast.kernels import native

    monkeypatch.setenv(native.ENV_LIB, str(tmp_path / "missing.so"))
    monkeypatch.setattr(native, "_loaded", None)
    code = main(["--json", str(tmp_path / "x.json"), "--step-backend", "torch,native"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--step-backend native: native step ops are not built: run `make native`" in err, err
    assert not (tmp_path / "x.json").exists()


def test_bench_rows_per_step_backend(tmp_path):
    """One row per step backend of the fused step (and a single unfused row): torch and native side by side."""
    from tests.conftest import require_native

    require_native()
    out = tmp_path / "bench.json"
    code = main(["--preset", "tiny", "--backends", "torch", "--groups", "2", "--steps", "2", "--runs", "1",
                 "--warmup", "0", "--fuse", "both", "--step-backend", "torch,native", "--threads", "1",
                 "--no-diffusers", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["results"]] == ["torch+unfused", "torch+fused+torch", "torch+fused+native"]
    assert report["config"]["step_backend"] == "torch,native"
