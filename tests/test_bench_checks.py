"""cg4ctr-bench: every number is checked before any output or work (one line, exit 2, nothing written)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cg4ctr_fast.cli.bench import MAX_RUNS, _available_cores, main
from cg4ctr_fast.cli.main import MAX_CREATIVES, MAX_GUIDANCE
from cg4ctr_fast.imaging import MAX_SIDE

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_work(monkeypatch):
    """Records any model build, thread setting or diffusers pipeline: none may happen for a refused request."""
    import cg4ctr_fast.bench as bench
    import cg4ctr_fast.models.diffusion as diffusion

    work = []
    monkeypatch.setattr(diffusion, "build_modules", lambda *a, **k: work.append("build") or 1 / 0)
    monkeypatch.setattr(diffusion, "load_modules", lambda *a, **k: work.append("load") or 1 / 0)
    monkeypatch.setattr(bench, "apply_threads", lambda *a, **k: work.append("threads") or 1 / 0)
    return work


@pytest.mark.parametrize("flags,needle", [
    (["--groups", "100000"], f"over the {MAX_CREATIVES} creatives"),
    (["--groups", f"1,{MAX_CREATIVES + 1}"], f"over the {MAX_CREATIVES} creatives"),
    (["--size", "100000"], f"up to {MAX_SIDE}"),
    (["--size", str(MAX_SIDE + 8)], f"up to {MAX_SIDE}"),
    (["--size", "12"], "multiple of 8"),
    (["--size", "-8"], "multiple of 8"),
    (["--threads", "1000"], "--threads must be from 1 to the"),
    (["--threads", str(_available_cores() + 1)], "--threads must be from 1 to the"),
    (["--guidance", "nan"], "--guidance must be a number from 0"),
    (["--guidance", "inf"], "--guidance must be a number from 0"),
    (["--guidance=-1"], "--guidance must be a number from 0"),
    (["--guidance", str(MAX_GUIDANCE * 2)], "--guidance must be a number from 0"),
    (["--runs", str(MAX_RUNS + 1)], "--runs must be an integer from 1"),
    (["--runs", "0"], "--runs must be an integer from 1"),
    (["--warmup", str(MAX_RUNS + 1)], "--warmup must be an integer from 0"),
    (["--warmup=-1"], "--warmup must be an integer from 0"),
    (["--steps=-3"], "--steps must be a positive integer"),
    (["--steps", "100000"], "--steps 100000 is more than"),  # the scheduler's trained timesteps: configs only
])
def test_bench_refuses_numbers_before_any_output_or_work(tmp_path, capsys, no_work, flags, needle):
    out = tmp_path / "y.json"
    try:
        code = main(["--preset", "tiny", "--steps", "2", "--runs", "1", "--warmup", "0", *flags, "--json", str(out)])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("cg4ctr-bench: error: ") and needle in captured.err, captured.err
    assert captured.out == "" and no_work == [] and list(tmp_path.iterdir()) == []


def test_number_checks_do_not_load_torch(tmp_path):
    """check_numbers runs before OMP_WAIT_POLICY is set, so it must not import torch either."""
    code = ("import sys; from cg4ctr_fast.cli.bench import build_parser, check_numbers; "
            f"a = build_parser().parse_args(['--json', {str(tmp_path / 'x.json')!r}, '--size', '64', "
            "'--threads', '1', '--groups', '1,64']); check_numbers(a); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
