"""`cg4ctr-train ablate`: which part of self-cyclic training raises the simulated CTR, with confidence intervals.

Arms (all evaluated on the same held-out products, with the same noise, per seed):
    original        the product photo itself (lift 0 by definition: the reference)
    random_prompts  base generator, one random caption per group
    global_prompt   base generator, one prompt for every group (no user information): per category, the token
                    whose logged creatives beat their (item, group) mean by the most, pooled over groups
    lora_only       cycles that update the LoRA; the prompt model stays the base one
    prompt_only     cycles that update the prompt model; no LoRA
    full            both, alternating (self-cyclic)
    full_refresh    full, with fresh logs between cycles: the reward model is retrained on what was served
    full_judge      full, each cycle judged by a reward model on disjoint logs: undone when the judge scores it
                    lower than the last accepted one
    full_early_stop full, the best-judged cycle served (not undone; the run stops after 2 cycles without one)
    full_ensemble   full, ranked by the minimum of 3 reward models (other seeds on the same logs)
    full_anchor     full, the LoRA anchored to the base UNet (noise-prediction penalty, capped update)
    full_guarded    full with refresh, judge and anchor together
    styles_refresh  K style LoRAs (frozen), chosen per (product, group) by the prompt model, with fresh logs; no
                    cycle LoRA (one LoRA against K: compare with full_refresh and prompt_refresh)
    styles_random_refresh  the same, each (product, group) given a random family (the check)
    prompt_refresh  prompt_only with fresh logs: no LoRA at all, the reference of the style arms
Cycle 0 of the cyclic arms without refresh or ensemble is the same starting point (base generator + base
prompt model + base reward model); the ensemble arm's cycle 0 already ranks with the ensemble.

Every arm serves, per (seed, held-out product, group), the reward model's best creative only when the reward
model scores it above the original photo, which is always a candidate (`cycle.evaluate`). The headline is
the aggregate true-CTR lift an A/B test would measure: Σ w·CTR(served) / Σ w·CTR(original) − 1 over
(seed, product, group), w = the group's traffic share (`training.metrics.aggregate_ctr_lift`). The mean
of per-cell ratios is a secondary column. The 95 % intervals come from a cluster bootstrap over (seed,
product): the 8 groups of one product share its images and noise, so they are not independent draws.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import derive_seed
from cg4ctr_fast.training.cycle_config import (  # noqa: F401 - the arms are re-exported here, where they run
    ARMS,
    BASE_ARMS,
    STATIC_ARMS,
    VARIANT_ARMS,
    CycleConfig,
    changed_keys,
    to_toml,
)

# (update_lora, update_prompt) per cyclic arm: the style arms keep their LoRAs frozen (StyleSection).
_PROMPT_ONLY = ("prompt_refresh", "styles_refresh", "styles_random_refresh")
CYCLIC_ARMS = {"lora_only": (True, False), "prompt_only": (False, True), "full": (True, True),
               **{name: (name not in _PROMPT_ONLY, True) for name in VARIANT_ARMS}}
STATIC_FILE = "static.json"
BOOTSTRAP = 2000


def global_prompt_from_logs(dataset) -> str:
    """One prompt for everybody, learned from the logs without user information.

    Per (creative, group) the Beta-smoothed CTR (100 pseudo-impressions at the base rate) is compared with its
    (item, group) mean as a log ratio; per category the token with the highest mean log ratio wins.
    """
    from cg4ctr_fast.sim import CATEGORIES, STYLE_VOCAB

    logs = dataset.logs.groupby(["creative_id", "item_id", "group_id"], as_index=False)[["impressions", "clicks"]].sum()
    prior = logs["clicks"].sum() / max(1, logs["impressions"].sum())
    logs["smoothed"] = (logs["clicks"] + 100 * prior) / (logs["impressions"] + 100)
    logs["relative"] = np.log(logs["smoothed"] / logs.groupby(["item_id", "group_id"])["smoothed"].transform("mean"))
    captions = dict(zip(dataset.creatives["creative_id"], dataset.creatives["caption"]))
    words = [set(captions[c].split()) for c in logs["creative_id"]]
    relative = logs["relative"].to_numpy()
    chosen = []
    for category in CATEGORIES:
        best, best_score = None, -np.inf
        for token in STYLE_VOCAB[category]:
            hit = np.array([token in w for w in words])
            if hit.any() and relative[hit].mean() > best_score:
                best, best_score = token, float(relative[hit].mean())
        if best is not None:
            chosen.append(best)
    return " ".join(chosen)


def static_arms(config: CycleConfig, model_paths: dict[str, str], log: Callable[[str], Any]) -> dict[str, Any]:
    """The two arms without cycles, on the base generator: random prompts and the global prompt."""
    from cg4ctr_fast.training.cycle import build_context, evaluate

    base = config.replace(run={"update_lora": False, "update_prompt": False})
    ctx = build_context(base, log=log, model_paths=model_paths)
    seed = config.run.seed
    n_groups = len(ctx.group_ids)

    def random_prompts(item_id: int) -> list[str]:
        from cg4ctr_fast.sim import caption_text

        rng = np.random.default_rng(derive_seed(seed, "random-prompts", item_id) % (2**32))
        return [caption_text(ctx.world.random_caption(rng)) for _ in range(n_groups)]

    prompt = global_prompt_from_logs(ctx.dataset)
    heldout = derive_seed(seed, "heldout")  # the noise the cycles' evaluation uses
    out = {"global_prompt_text": prompt}
    out["random_prompts"] = evaluate(ctx, random_prompts, seed=heldout)
    out["global_prompt"] = evaluate(ctx, lambda _item: [prompt] * n_groups, seed=heldout)
    return out


def arm_config(config: CycleConfig, arm: str) -> CycleConfig:
    """The config one cyclic arm runs with: the run's, with the arm's update flags and guard changes."""
    update_lora, update_prompt = CYCLIC_ARMS[arm]
    sections = {section: dict(values) for section, values in VARIANT_ARMS.get(arm, {}).items()}
    sections["run"] = {**sections.get("run", {}), "update_lora": update_lora, "update_prompt": update_prompt}
    return config.replace(**sections)


def check_arms(arms: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The arms to run, in ARMS order (None = all); the static arms are always part of an ablation."""
    if arms is None:
        return ARMS
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise InputError(f"--arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
    chosen = set(arms) | set(STATIC_ARMS)
    return tuple(a for a in ARMS if a in chosen)


def run_seed(config: CycleConfig, seed: int, out: Path, model_paths: dict[str, str], *, progress: bool = False,
             log: Callable[[str], Any] = print, arms: Sequence[str] = ARMS) -> None:
    """Every arm of one seed into out/seed_<seed>/ (each arm resumes where it stopped)."""
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.training.cycle import run_cycles

    seed_config = config.replace(run={"seed": seed})
    seed_dir = out / f"seed_{seed}"
    static_file = seed_dir / STATIC_FILE
    if not static_file.is_file():
        log(f"[ablate] seed {seed}: random-prompt and global-prompt arms")
        static = static_arms(seed_config, model_paths, log)
        seed_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(static_file, (json.dumps(static, indent=1) + "\n").encode())
    for arm in (a for a in arms if a in CYCLIC_ARMS):
        log(f"[ablate] seed {seed}: {arm}")
        run_cycles(arm_config(seed_config, arm), seed_dir / arm, resume=True, progress=progress, log=log,
                   model_paths=model_paths, guard_dir=out / "guards")


def _seed_worker(config: CycleConfig, seed: int, out: str, model_paths: dict[str, str], quiet: bool,
                 arms: Sequence[str]) -> int:
    import sys

    def log(message: str) -> None:
        if not quiet:
            print(f"[seed {seed}] {message}", file=sys.stderr, flush=True)

    run_seed(config, seed, Path(out), model_paths, progress=False, log=log, arms=arms)
    return seed


def run_ablation(config: CycleConfig, seeds: int, out: str | Path, *, progress: bool = True,
                 log: Callable[[str], Any] = print, jobs: int = 1, command: Optional[str] = None,
                 arms: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Every arm for seeds config.run.seed … +seeds−1; resumable (finished arms and cycles are reused).

    jobs > 1 runs that many seeds at once in separate processes (each with config.run.threads torch
    threads): the ops are small, so on 2 cores two one-thread processes do about twice the work of one.
    command: how the run was started, quoted at the top of results.md.
    arms: the arms to run (default every arm of ARMS; the static arms always run). A later call with more
    arms reuses the finished ones.
    """
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.training.cycle import resolve_models

    arms = check_arms(arms)
    if config.style.loras != "none":
        raise InputError('ablate: the config sets [style] loras; leave it "none" (the style arms set it themselves: '
                         "styles_refresh, styles_random_refresh)")
    if seeds < 1:
        raise InputError(f"--seeds must be ≥ 1, got {seeds}")
    if jobs < 1:
        raise InputError(f"--jobs must be ≥ 1, got {jobs}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another --out")
    saved = out / "config.json"
    if saved.is_file() and changed_keys(json.loads(saved.read_text()), config):
        raise InputError(f"{out}: holds an ablation with another config; use {out / 'config.toml'} or another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.toml", to_toml(config).encode())
    atomic_write_bytes(saved, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    paths = resolve_models(config, log=log)  # built once here, not by every worker
    from cg4ctr_fast.training.cycle import ensure_guard_models

    for arm in (a for a in arms if a in VARIANT_ARMS):  # the judge and ensemble members, once for every worker
        ensure_guard_models(arm_config(config, arm), paths, out / "guards", log=log)
    started = time.perf_counter()
    seed_list = [config.run.seed + offset for offset in range(seeds)]
    if jobs == 1:
        for seed in seed_list:
            run_seed(config, seed, out, paths, progress=progress, log=log, arms=arms)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        quiet = progress is False
        # spawn, not fork: a forked child inherits torch's thread pools and locks mid-state.
        with ProcessPoolExecutor(max_workers=min(jobs, seeds), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_seed_worker, config, seed, str(out), paths, quiet, arms) for seed in seed_list]
            for future in futures:
                log(f"[ablate] seed {future.result()} done")
    results = summarize(out, config, seeds, arms)
    results["seconds"] = time.perf_counter() - started
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_markdown(results, command).encode())
    try:
        atomic_write_bytes(out / "lift_per_cycle.png", plot_lift(results))
        styles = plot_style_share(results)
        if styles is not None:
            atomic_write_bytes(out / "style_share.png", styles)
    except ImportError:  # matplotlib is optional; results.md and results.json hold the numbers
        pass
    return results


# ------------------------------------------------------------------------------------------------ statistics
def served_cycle(run_dir: Path, cycle: int) -> int:
    """Which cycle's evaluation stands for a run after `cycle` cycles.

    - guard.accept: the cycle itself. The models in effect are already the last accepted ones (a rejected
      cycle is undone), with the reward model as refreshed by then: serving an earlier cycle's evaluation
      would also roll back the reward model, which the loop never does.
    - guard.keep_best without accept (early stop): the best-judged cycle so far (`best_cycle` in each cycle's
      metrics); a run that stopped early (guard.patience) serves what its last finished cycle says.
    - otherwise the cycle itself.
    """
    done = sorted(int(p.name[6:]) for p in (run_dir / "cycles").iterdir()
                  if p.name.startswith("cycle_") and p.name[6:].isdigit())
    last = min(cycle, done[-1])
    guard = json.loads((run_dir / "config.json").read_text()).get("guard", {})
    if guard.get("keep_best") and not guard.get("accept"):
        metrics = json.loads((run_dir / "cycles" / f"cycle_{last:03d}" / "metrics.json").read_text())
        return int(metrics["best_cycle"])
    if last < cycle and not guard.get("accept"):
        raise InputError(f"{run_dir}: cycle {cycle} is missing and the run does not keep its best cycle")
    return last


def _collect(out: Path, config: CycleConfig, seeds: int, arms: Sequence[str] = ARMS):
    """Every finished run's evaluation, read once: arm → cycle → rows (seed, item_id, group, true CTRs, traffic,
    kept_original), the cyclic arms' evaluation summaries per (arm, cycle) over seeds, and each seed's global
    prompt. An arm that keeps its best-judged cycle is read at that cycle (`served_cycle`)."""
    cycles = config.run.cycles
    cyclic = [a for a in arms if a in CYCLIC_ARMS]
    table: dict[str, dict[int, list[dict[str, Any]]]] = {arm: {c: [] for c in range(cycles + 1)} for arm in arms}
    evals: dict[tuple[str, int], list[dict[str, Any]]] = {(arm, c): [] for arm in cyclic for c in range(cycles + 1)}
    global_prompts = set()
    for offset in range(seeds):
        seed = config.run.seed + offset
        seed_dir = out / f"seed_{seed}"
        static = json.loads((seed_dir / STATIC_FILE).read_text())
        global_prompts.add(static["global_prompt_text"])
        for arm in cyclic:
            for c in range(cycles + 1):
                served = served_cycle(seed_dir / arm, c)
                metrics = json.loads((seed_dir / arm / "cycles" / f"cycle_{served:03d}" / "metrics.json").read_text())
                table[arm][c].extend({**r, "seed": seed} for r in metrics["eval"]["rows"])
                evals[(arm, c)].append(metrics["eval"])
        for c in range(cycles + 1):
            for arm in ("random_prompts", "global_prompt"):
                table[arm][c].extend({**r, "seed": seed} for r in static[arm]["rows"])
            # Doing nothing: the photo served everywhere (its best creative never replaces it).
            table["original"][c].extend({**r, "seed": seed, "lift": 0.0, "true_ctr": r["original_true_ctr"],
                                         "kept_original": True, "best_generated_true_ctr": r["original_true_ctr"]}
                                        for r in static["global_prompt"]["rows"])
    return table, evals, sorted(global_prompts)


def _lift_cell(rows: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """Aggregate lift over the original (CI), the mean of ratios (CI), the original-kept share, the lift of the
    best creative without the original as a candidate, and the aggregate lift per seed."""
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    clusters = [(r["seed"], r["item_id"]) for r in rows]
    weights = [r["traffic"] for r in rows]
    base = [r["original_true_ctr"] for r in rows]
    served = aggregate_ctr_lift([r["true_ctr"] for r in rows], base, weights, clusters=clusters,
                                resamples=BOOTSTRAP, seed=seed)
    generated = aggregate_ctr_lift([r["best_generated_true_ctr"] for r in rows], base, weights, clusters=clusters,
                                   resamples=BOOTSTRAP, seed=seed)
    per_seed = {}
    for s in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == s]
        per_seed[str(s)] = aggregate_ctr_lift([r["true_ctr"] for r in mine], [r["original_true_ctr"] for r in mine],
                                              [r["traffic"] for r in mine]).lift
    return {"lift": served.lift, "ci95": list(served.ci95), "treatment_ctr": served.treatment_ctr,
            "control_ctr": served.control_ctr, "mean_of_ratios": served.mean_of_ratios,
            "mean_of_ratios_ci95": list(served.mean_of_ratios_ci95),
            "original_kept_share": float(np.mean([r["kept_original"] for r in rows])),
            "generated_only_lift": generated.lift, "generated_only_ci95": list(generated.ci95),
            "n": len(rows), "per_seed": per_seed}


def _compare(a_rows, b_rows, seed: int) -> dict[str, Any]:
    """Aggregate CTR of arm a over arm b − 1 on matching (seed, item, group) cells (b as the control)."""
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    b_ctr = {(r["seed"], r["item_id"], r["group"]): r["true_ctr"] for r in b_rows}
    keys = [(r["seed"], r["item_id"], r["group"]) for r in a_rows]
    result = aggregate_ctr_lift([r["true_ctr"] for r in a_rows], [b_ctr[k] for k in keys],
                                [r["traffic"] for r in a_rows], clusters=[k[:2] for k in keys],
                                resamples=BOOTSTRAP, seed=seed)
    low, high = result.ci95
    return {"lift": result.lift, "ci95": [low, high], "mean_of_ratios": result.mean_of_ratios,
            "mean_of_ratios_ci95": list(result.mean_of_ratios_ci95), "excludes_zero": bool(low > 0 or high < 0)}


def summarize(out: Path, config: CycleConfig, seeds: int, arms: Sequence[str] = ARMS) -> dict[str, Any]:
    table, evals, global_prompts = _collect(out, config, seeds, arms)
    cycles = config.run.cycles
    chosen = list(arms)
    lift: dict[str, Any] = {arm: {str(c): _lift_cell(table[arm][c], seed=c) for c in range(cycles + 1)} for arm in chosen}
    pairs = [
        ("full_over_global_prompt", ("full", cycles), ("global_prompt", cycles)),
        ("full_over_random_prompts", ("full", cycles), ("random_prompts", cycles)),
        ("full_last_over_cycle0", ("full", cycles), ("full", 0)),
        ("full_over_lora_only", ("full", cycles), ("lora_only", cycles)),
        ("full_over_prompt_only", ("full", cycles), ("prompt_only", cycles)),
        ("lora_only_last_over_cycle0", ("lora_only", cycles), ("lora_only", 0)),
        ("prompt_only_last_over_cycle0", ("prompt_only", cycles), ("prompt_only", 0)),
    ]
    for variant in VARIANT_ARMS:
        pairs += [(f"{variant}_last_over_cycle0", (variant, cycles), (variant, 0)),
                  (f"{variant}_over_full", (variant, cycles), ("full", cycles)),
                  (f"{variant}_over_original", (variant, cycles), ("original", cycles))]
    # One LoRA against K, all with fresh logs.
    pairs += [("styles_refresh_over_full_refresh", ("styles_refresh", cycles), ("full_refresh", cycles)),
              ("styles_refresh_over_prompt_refresh", ("styles_refresh", cycles), ("prompt_refresh", cycles)),
              ("styles_refresh_over_styles_random_refresh", ("styles_refresh", cycles),
               ("styles_random_refresh", cycles)),
              ("full_refresh_over_prompt_refresh", ("full_refresh", cycles), ("prompt_refresh", cycles))]
    comparisons = {}
    for name, (a, ca), (b, cb) in pairs:
        if a in table and b in table:
            comparisons[name] = {"a": f"{a}@{ca}", "b": f"{b}@{cb}", **_compare(table[a][ca], table[b][cb], seed=17)}
    extras = {}
    for arm in (a for a in chosen if a in CYCLIC_ARMS):
        extras[arm] = {}
        for c in range(cycles + 1):
            values = evals[(arm, c)]
            extras[arm][str(c)] = {k: float(np.mean([v[k] for v in values]))
                                   for k in ("reward_mean", "true_ctr_mean", "reward_oracle_gap", "diversity")}
            extras[arm][str(c)]["product_pixels_unchanged"] = all(v["product_pixels_unchanged"] for v in values)
            if all("served_style_share" in v for v in values):  # style arms: the photo or a style, per cell
                names = sorted({n for v in values for n in v["served_style_share"]})
                extras[arm][str(c)]["served_style_share"] = {
                    n: float(np.mean([v["served_style_share"].get(n, 0.0) for v in values])) for n in names}
    return {"config": config.to_dict(), "seeds": [config.run.seed + o for o in range(seeds)], "cycles": cycles,
            "arms": chosen, "lift": lift, "comparisons": comparisons, "eval_metrics": extras,
            "global_prompt": global_prompts,
            "bootstrap": {"resamples": BOOTSTRAP, "cluster": "(seed, held-out product)", "level": 0.95},
            "weights": "each (seed, product, group) cell weighted by its group's traffic share (World.group_traffic)"}


def _fmt(value: float, ci: Sequence[float]) -> str:
    return f"{value:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]"


def results_markdown(results: dict[str, Any], command: Optional[str] = None) -> str:
    cycles = results["cycles"]
    lines = ["# Ablation: simulated aggregate CTR lift over the original image", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    cfg = results["config"]
    lines += [
        f"Seeds {results['seeds']}; {cfg['run']['eval_products']} held-out products per seed × 8 user groups; "
        f"{cfg['run']['train_products']} training products; {cycles} cycles; LoRA rank {cfg['lora']['rank']}, "
        f"{cfg['lora']['steps']} steps per cycle; {cfg['generate']['prompts_per_group']} prompts × "
        f"{cfg['generate']['images_per_prompt']} images per (product, group), top-{cfg['generate']['top_k']} kept; "
        f"evaluation: the reward model's best of {cfg['eval']['images_per_group']} per group, served only when the "
        "reward model scores it above the original photo (always a candidate).",
        "",
        "Aggregate lift = Σ w·CTR(served) / Σ w·CTR(original) − 1 over (seed, product, group), w = the group's "
        "traffic share: total clicks over total impressions, as an A/B test measures it. Oracle true CTRs; "
        "95 % intervals from a cluster bootstrap over (seed, product).",
        "",
        "## Aggregate true-CTR lift over the original",
        "",
        "| arm | " + " | ".join(f"cycle {c}" for c in range(cycles + 1)) + " |",
        "|---|" + "---|" * (cycles + 1),
    ]

    def table(cell_text) -> list[str]:
        rows = []
        for arm in results.get("arms", ARMS):
            cells = [cell_text(results["lift"][arm][str(c)]) for c in range(cycles + 1)]
            if arm not in CYCLIC_ARMS:
                cells = [cells[0]] + ["″"] * cycles  # no cycles: the same evaluation in every column
            rows.append(f"| {arm} | " + " | ".join(cells) + " |")
        return rows

    header = ["| arm | " + " | ".join(f"cycle {c}" for c in range(cycles + 1)) + " |", "|---|" + "---|" * (cycles + 1)]
    lines += table(lambda cell: _fmt(cell["lift"], cell["ci95"]))
    lines += ["", "## Secondary: mean over (seed, product, group) of CTR(served) / CTR(original) − 1", "",
              "Unweighted: every (seed, product, group) cell counts alike, whatever its group's share of the traffic.", "", *header]
    lines += table(lambda cell: _fmt(cell["mean_of_ratios"], cell["mean_of_ratios_ci95"]))
    lines += ["", "## How often the original photo was kept (the reward model scored no creative above it)", "",
              *header]
    lines += table(lambda cell: f"{cell['original_kept_share']:.0%}")
    lines += ["", "## Without the original as a candidate: aggregate lift of the reward model's best creative", "",
              *header]
    lines += table(lambda cell: _fmt(cell["generated_only_lift"], cell["generated_only_ci95"]))
    lines += ["", "## Paired comparisons (same seed, product, group): aggregate CTR of A / aggregate CTR of B − 1", "",
              "| A | B | aggregate lift | 95 % CI | excludes 0 | mean of ratios [95 % CI] |", "|---|---|---|---|---|---|"]
    for c in results["comparisons"].values():
        lines.append(f"| {c['a']} | {c['b']} | {c['lift']:+.1%} | [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}] | "
                     f"{'yes' if c['excludes_zero'] else 'no'} | {_fmt(c['mean_of_ratios'], c['mean_of_ratios_ci95'])} |")
    lines += ["", "## Held-out metrics of the cyclic arms (mean over seeds)", "",
              "| arm | cycle | mean reward served | mean true CTR served | reward − true | diversity | product unchanged |",
              "|---|---|---|---|---|---|---|"]
    for arm, per_cycle in results["eval_metrics"].items():
        for c in range(cycles + 1):
            m = per_cycle[str(c)]
            lines.append(f"| {arm} | {c} | {m['reward_mean']:.4f} | {m['true_ctr_mean']:.4f} | "
                         f"{m['reward_oracle_gap']:+.4f} | {m['diversity']:.3f} | {m['product_pixels_unchanged']} |")
    styled = {a: v for a, v in results["eval_metrics"].items() if "served_style_share" in v["0"]}
    if styled:
        names = _style_order({n for v in styled.values() for m in v.values() for n in m["served_style_share"]})
        lines += ["", "## What the style arms serve (share of cells, mean over seeds)", "",
                  "| arm | cycle | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for arm, per_cycle in styled.items():
            for c in range(cycles + 1):
                share = per_cycle[str(c)]["served_style_share"]
                lines.append(f"| {arm} | {c} | " + " | ".join(f"{share.get(n, 0.0):.0%}" for n in names) + " |")
    lines += ["", f"Global prompt: {', '.join(repr(p) for p in results['global_prompt'])}.", ""]
    return "\n".join(lines)


def plot_lift(results: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = list(range(results["cycles"] + 1))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (key, ci_key, title) in zip(axes, (
            ("lift", "ci95", "Aggregate true-CTR lift (traffic-weighted), 95 % cluster-bootstrap CI"),
            ("mean_of_ratios", "mean_of_ratios_ci95", "Secondary: mean of per-(product, group) ratios"))):
        for arm in results.get("arms", ARMS):
            cells = [results["lift"][arm][str(c)] for c in cycles]
            mean = np.array([c[key] for c in cells])
            low = np.array([c[ci_key][0] for c in cells])
            high = np.array([c[ci_key][1] for c in cells])
            style = "-o" if arm in CYCLIC_ARMS else "--"
            line, = ax.plot(cycles, mean * 100, style, label=arm)
            ax.fill_between(cycles, low * 100, high * 100, color=line.get_color(), alpha=0.12)
        ax.set_xlabel("cycle")
        ax.set_xticks(cycles)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("true-CTR lift over the original (%)")
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    from cg4ctr_fast.training.figures import png_bytes

    return png_bytes(fig)


def _style_order(names) -> list[str]:
    """What a style arm serves, in reading order: the photo, the base generator ("none"), then the families."""
    return sorted(names, key=lambda n: (n != "photo", n != "none", n))


def plot_style_share(results: dict[str, Any]) -> Optional[bytes]:
    """Stacked bars per style arm and cycle: the share of (seed, product, group) cells served the photo, the base
    generator ("none") or each style LoRA. None when no arm of `results` has style LoRAs."""
    arms = [a for a, per_cycle in results["eval_metrics"].items() if "served_style_share" in per_cycle["0"]]
    if not arms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = list(range(results["cycles"] + 1))
    names = _style_order({n for a in arms for c in cycles for n in results["eval_metrics"][a][str(c)]["served_style_share"]})
    fig, axes = plt.subplots(1, len(arms), figsize=(4.5 * len(arms), 3.6), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        bottom = np.zeros(len(cycles))
        for name in names:
            share = np.array([results["eval_metrics"][arm][str(c)]["served_style_share"].get(name, 0.0) for c in cycles])
            ax.bar(cycles, share * 100, bottom=bottom * 100, label=name)
            bottom += share
        ax.set_title(f"{arm}: what is served", fontsize=9)
        ax.set_xlabel("cycle")
        ax.set_xticks(cycles)
    axes[0][0].set_ylabel("share of (seed, product, group) cells (%)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    from cg4ctr_fast.training.figures import png_bytes

    return png_bytes(fig)
