"""bench/kernel_bench.py: a tiny CPU run writes a complete JSON; bad arguments exit 2 with one line.

No timing is asserted on: only that every measured number is there and positive. The Triton
launch path (CUDA-only in the benchmark) is checked for plumbing under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "kernel_bench.py"
FAMILIES = ("ddim", "euler", "dpm++2m")
TINY = ["--device", "cpu", "--batch", "1", "--steps", "3", "--reps", "1", "--warmup", "1", "--latent", "8",
        "--variants", "unfused,fused_torch,fused_triton"]  # fused_compile compiles for tens of seconds


@pytest.fixture(scope="module")
def kb():
    spec = importlib.util.spec_from_file_location("kernel_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_bench", module)
    spec.loader.exec_module(module)
    return module


def test_tiny_cpu_run_writes_json(kb, tmp_path, capsys):
    out = tmp_path / "kb.json"
    assert kb.main([*TINY, "--batch", "1,2", "--reps", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused torch" in printed and "skipped" in printed

    data = json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["kb.json"]  # the temp file was renamed, not left
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["device_name"]
    assert {"triton", "diffusers", "git_sha"} <= env.keys()
    assert "--latent 8" in data["command"] and data["argv"][-1] == str(out)
    assert data["timestamp"] and data["config"]["steps"] == 3

    rows = data["loops"]
    assert len(rows) == len(FAMILIES) * 2 * 2 * 3  # family x batch x blend x variant
    for family in FAMILIES:
        assert data["schedulers"][family]["beta_schedule"] == "scaled_linear"
        for batch in (1, 2):
            for blend in (False, True):
                got = {r["variant"]: r for r in rows
                       if r["family"] == family and r["batch"] == batch and r["blend"] == blend}
                assert set(got) == {"unfused", "fused_torch", "fused_triton"}
                for variant in ("unfused", "fused_torch"):
                    r = got[variant]
                    assert r["error"] is None and r["skipped"] is None, r
                    assert r["steps"] == 3 and len(r["samples_us_per_step"]) == 2
                    assert r["us_per_step_median"] > 0, r
                    assert r["us_per_step_p90"] is None  # 2 reps: too few for a p90 (needs 10)
                    assert r["spread"] is not None and r["noisy"] is (r["spread"] > 0.10)
                    assert all(x > 0 for x in r["samples_us_per_step"])
                    assert r["finite"] is True
                assert got["fused_torch"]["speedup_vs_unfused"] > 0
                assert got["fused_torch"]["rel_diff_vs_unfused"] < 1e-5  # same fp32 math, reordered
                assert "CUDA" in got["fused_triton"]["skipped"]  # with the reason
    assert data["copy_bandwidth"]["gb_per_s"] > 0 and data["copy_bandwidth"]["threads"] >= 1  # host memory copy
    kern = data["kernel_bandwidth"]  # the torch pass alone (triton is CUDA only)
    assert {r["backend"] for r in kern} == {"torch"} and len(kern) == len(FAMILIES) * 2 * 2
    assert all(r["eager_us"] > 0 and r["eager_gb_per_s"] > 0 and r["eager_pct_of_copy"] > 0 for r in kern)
    assert data["config"]["threads"] >= 1 and data["config"]["interleaved"] is True
    assert len(data["load"]["before"]["loadavg"]) == 3 and data["load"]["during"]["wall_s"] > 0
    assert "p90 n/a below 10 reps" in printed


def test_p90_from_ten_reps(kb, tmp_path):
    out = tmp_path / "kb.json"
    assert kb.main([*TINY, "--reps", "10", "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["loops"] if r["variant"] == "unfused"]
    for r in rows:
        assert r["us_per_step_p90"] == pytest.approx(kb.percentile(r["samples_us_per_step"], 90))


@pytest.mark.parametrize("bad", [
    ["--batch", "0"],
    ["--batch", "1,,8"],
    ["--batch", "x"],
    ["--device", "tpu"],
    ["--dtype", "fp64"],
    ["--steps", "0"],
    ["--reps", "-1"],
    ["--latent", "0"],
    ["--warmup", "-1"],
    ["--threads", "0"],
    ["--bw-shapes", "64"],
    ["--variants", "fused_cuda"],
    ["--json", "/nonexistent-dir/kb.json"],
    ["--no-such-flag"],
])
def test_bad_argument_exits_2_with_one_line(kb, bad, capsys):
    argv = bad if bad[0] == "--device" else ["--device", "cpu", *bad]
    assert kb.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kernel_bench.py: error:"), captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_exits_2(kb, capsys):
    assert kb.main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_native_rows_match_unfused(kb, tmp_path):
    """fused_native (the cg4ctr ops, when built) runs the loops and its kernel rows; skipped otherwise."""
    from tests.conftest import require_native

    require_native()
    out = tmp_path / "kb.json"
    argv = [a for a in TINY if a != "unfused,fused_torch,fused_triton" and a != "--variants"]
    assert kb.main([*argv, "--variants", "unfused,fused_native", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["loops"] if r["variant"] == "fused_native"]
    assert len(rows) == len(FAMILIES) * 2
    assert all(r["skipped"] is None and r["rel_diff_vs_unfused"] < 1e-5 for r in rows), rows
    assert {r["backend"] for r in data["kernel_bandwidth"]} == {"native"}


@pytest.mark.slow
def test_compiled_reference_compiles_once_for_new_coefficients(kb):
    """fused_compile: the step's floats travel as a tensor, so new coefficients reuse the graph."""
    from torch._dynamo.utils import counters

    from cg4ctr_fast.kernels.reference import euler_step_ref

    op = kb.compiled_ops()["euler"]
    g = torch.Generator().manual_seed(3)
    mo, sample = torch.randn(2, 4, 5, 7, generator=g), torch.randn(1, 4, 5, 7, generator=g)
    graphs = None
    for k in range(3):
        kw = dict(guidance_scale=7.5, x0_sample=1.0 + 0.1 * k, x0_model=-0.5 - k, sigma_hat=2.0 + k, dt=-0.3 + 0.01 * k)
        got = op(mo, sample, **kw)
        torch.testing.assert_close(got, euler_step_ref(mo, sample, **kw), rtol=1e-6, atol=1e-6)
        if k == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for the later coefficients


def test_percentile_and_byte_model(kb):
    assert kb.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 90) == pytest.approx(4.6)
    assert kb.percentile([7.0], 90) == 7.0
    lat = 2 * 4 * 16 * 16  # B=2, L=16
    # read 2B noise pred + B latents, write B latents; blend adds the B x 1 mask, image latents, noise
    assert kb.step_bytes("ddim", 2, 16, torch.float16, False) == 2 * (4 * lat)
    assert kb.step_bytes("euler", 2, 16, torch.float32, True) == 4 * (6 * lat + 2 * 16 * 16)
    # DPM-Solver++ also reads the previous data prediction and writes this step's
    assert kb.step_bytes("dpm++2m", 2, 16, torch.float16, False) == 2 * (6 * lat)


def test_triton_launch_plumbing_under_interpreter(kb):
    """The CUDA-only kernel-bandwidth closures, run on CPU tensors by the Triton interpreter."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    cpu = torch.device("cpu")
    clock = kb.Clock(cpu)
    inputs = kb.make_inputs(2, 8, torch.float32, cpu, seed=1)
    for family in FAMILIES:
        for blend in (False, True):
            got = kb.kernel_call(family, inputs, blend, backend="triton")()
            want = kb.kernel_call(family, inputs, blend, backend="torch")()
            if isinstance(got, tuple):
                got, want = got[0], want[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    seconds, calls = kb.time_kernel_eager(kb.kernel_call("ddim", inputs, True), clock, 1,
                                          budget_s=0.001)
    assert seconds > 0 and calls >= 10
