"""`cg4ctr-bench --pareto` (cg4ctr_fast.pareto): a one-round run on the shipped toy set, and its refusals.

The run's numbers are not asserted (speed lives in bench/results); what is checked is that every row is
measured, that quality comes from the quality table it was given, that the same-work ratio pairs the right
rows, and that the equal-quality plan is the fastest one not below the reference's CI, recomputed here.
"""
from __future__ import annotations

import json

import pytest

from cg4ctr_fast.cli.bench import main as bench_main
from cg4ctr_fast.planner import REFERENCE_PLAN, Plan, QualityTable, shipped_quality_path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from cg4ctr_fast.pareto import run_pareto

    out = tmp_path_factory.mktemp("pareto")
    curves = {"steps": [REFERENCE_PLAN, Plan("ddim", 2, 1.0)], "cut-off": [Plan("ddim", 4, 7.5, guidance_cutoff=0.5)]}
    return run_pareto(groups=(1, 2), runs=1, warmup=0, products=1, threads=1, curves=curves,
                      quality_out=str(out / "quality.json")), out


def test_every_row_is_timed_and_scored_from_the_table(report):
    report, out = report
    table = QualityTable.load(shipped_quality_path())
    names = {(r["name"], r["groups"]) for r in report["rows"]}
    for g in (1, 2):
        assert {("ddim-20s-w7.5", g), ("ddim-2s-w1", g), ("ddim-4s-w7.5-cut0.5", g),
                ("diffusers ddim-20s-w7.5", g)} <= names
    for row in report["rows"]:
        assert row["p50_s"] > 0 and len(row["samples_s"]) == 1
        plan = Plan.from_dict(row["plan"])
        assert row["quality"] == table.lookup(plan).quality
        assert row["ms_per_creative"] == pytest.approx(1e3 * row["p50_s"] / row["groups"])
    # the written table holds what it started from (nothing was missing)
    assert len(QualityTable.load(out / "quality.json").entries) == len(table.entries)
    assert report["quality"]["measured_now"] == []


def test_ratios_pair_the_right_rows(report):
    report, _ = report
    ref = QualityTable.load(shipped_quality_path()).lookup(REFERENCE_PLAN)
    for block in report["ratios"]:
        g = block["groups"]
        rows = {r["name"]: r for r in report["rows"] if r["groups"] == g}
        (same,) = block["same_work"]
        assert same["plan"] == "ddim-20s-w7.5"
        assert same["ratio"] == pytest.approx(rows["diffusers ddim-20s-w7.5"]["p50_s"] / rows["ddim-20s-w7.5"]["p50_s"])
        ok = [r for r in rows.values() if r["backend"] == "torch" and r["quality"] >= ref.ci95[0]]
        fastest = min(ok, key=lambda r: r["ms_per_creative"])
        assert block["equal_quality"]["plan"] == fastest["name"]
        assert block["equal_quality"]["ratio"] == pytest.approx(fastest["speedup_vs_diffusers_20"]["ratio"])


def test_table_and_plot(report, tmp_path):
    from cg4ctr_fast.pareto import pareto_table, plot_pareto

    report, _ = report
    text = pareto_table(report)
    assert "equal quality, 2 groups: " in text and "same work, 1 groups: ddim-20s-w7.5" in text
    plot_pareto(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(report, default=str)


@pytest.mark.parametrize("argv, message", [
    (["--pareto"], "--pareto needs --json FILE"),
    (["--pareto", "--json", "{tmp}/r.json", "--products", "0"], "--products must be from 1 to 64"),
    (["--pareto", "--json", "{tmp}/r.json", "--engines", "{tmp}"], "--pareto measures the shipped toy generator"),
    (["--pareto", "--json", "{tmp}/r.json", "--calibrate"], "--pareto and --calibrate are two runs"),
    (["--pareto", "--json", "{tmp}/r.json", "--quality", "{tmp}/none.json"], "--quality {tmp}/none.json: no such"),
    (["--pareto", "--json", "{tmp}/r.json", "--plot", "{tmp}/p.txt"], "the file name must end in"),
])
def test_pareto_refusals_are_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.replace("{tmp}", str(tmp_path)) in err
    assert not (tmp_path / "r.json").exists()
