"""bench/gpu/native_check.py on the CPU: the native ops vs the torch reference, through the script.

Runs only when the native library is built (``make native``); skipped with the reason otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import require_native

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu" / "native_check.py"


@pytest.fixture(scope="module")
def nc():
    spec = importlib.util.spec_from_file_location("native_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("native_check", module)  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_passes_and_writes_json(tmp_path):
    require_native()
    out = tmp_path / "nc.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MISMATCH" not in proc.stdout and "FAIL" not in proc.stdout
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["failures"] == 0 and data["triton_skipped"]
    # every family x dtype x batch x blend mode, each compared with the reference (DPM: both outputs)
    assert len(data["steps"]) == 5 * 2 * 2 * 3
    for row in data["steps"]:
        assert row["ok"] and row["out_vs_reference"]["worst_ratio"] <= 1.0, row
        assert (row["family"] == "dpm") == ("x0_out_vs_reference" in row)
    assert {r["op"] for r in data["composite"]} == {"composite", "composite_float"}
    assert all(r["ok"] for r in data["composite"])
    assert len(data["timing"]) == 10 and all(r["native_us"] > 0 and r["reference_us"] > 0 for r in data["timing"])


def test_compare_flags_a_one_element_error(nc):
    """The tolerance test the script exits on: one perturbed element past the tolerance is a mismatch."""
    g = torch.Generator().manual_seed(0)
    want = torch.randn(2, 4, 5, 7, generator=g)
    assert nc.compare(want.clone(), want, 1e-6, 1e-6)["worst_ratio"] == 0.0
    got = want.clone()
    got[1, 2, 3, 4] += 1e-3
    c = nc.compare(got, want, 1e-6, 1e-6)
    assert c["worst_ratio"] > 1.0 and not c["exact"] and c["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    half = want.half()
    bumped = half.clone()
    bumped.view(torch.int16)[0, 0, 0, 0] += 1  # one fp16 ulp: within the 2-ulp fp16 tolerance
    assert nc.compare(bumped, half, *nc.TOL["reference"][torch.float16])["worst_ratio"] <= 1.0
    nan = want.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert nc.compare(nan, want, 1e-6, 1e-6)["worst_ratio"] == float("inf")


def test_bad_argument_exits_2(nc, capsys):
    assert nc.main(["--reps", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("native_check.py: error:")
