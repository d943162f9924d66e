"""`cg4ctr-train ablate`: which part of self-cyclic training raises the simulated CTR, with confidence intervals.

Arms (all evaluated on the same held-out products, with the same noise, per seed):
    original        the product photo itself (lift 0 by definition: the reference)
    random_prompts  base generator, one random caption per group
    global_prompt   base generator, one prompt for every group (no user information): per category, the token
                    whose logged creatives beat their (item, group) mean by the most, pooled over groups
    lora_only       cycles that update the LoRA; the prompt model stays the base one
    prompt_only     cycles that update the prompt model; no LoRA
    full            both, alternating (self-cyclic)
Cycle 0 of the three cyclic arms is the same starting point (base generator + base prompt model).

Lift = true CTR of the reward model's pick / true CTR of the original − 1, per (seed, product, group). The
95 % intervals come from a cluster bootstrap over (seed, product): the 8 groups of one product share its
images and noise, so they are not independent draws.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import derive_seed
from cg4ctr_fast.training.cycle_config import CycleConfig, to_toml

ARMS = ("original", "random_prompts", "global_prompt", "lora_only", "prompt_only", "full")
CYCLIC_ARMS = {"lora_only": (True, False), "prompt_only": (False, True), "full": (True, True)}
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


def run_seed(config: CycleConfig, seed: int, out: Path, model_paths: dict[str, str], *, progress: bool = False,
             log: Callable[[str], Any] = print) -> None:
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
    for arm, (update_lora, update_prompt) in CYCLIC_ARMS.items():
        log(f"[ablate] seed {seed}: {arm}")
        arm_config = seed_config.replace(run={"update_lora": update_lora, "update_prompt": update_prompt})
        run_cycles(arm_config, seed_dir / arm, resume=True, progress=progress, log=log, model_paths=model_paths)


def _seed_worker(config: CycleConfig, seed: int, out: str, model_paths: dict[str, str], quiet: bool) -> int:
    import sys

    def log(message: str) -> None:
        if not quiet:
            print(f"[seed {seed}] {message}", file=sys.stderr, flush=True)

    run_seed(config, seed, Path(out), model_paths, progress=False, log=log)
    return seed


def run_ablation(config: CycleConfig, seeds: int, out: str | Path, *, progress: bool = True,
                 log: Callable[[str], Any] = print, jobs: int = 1, command: Optional[str] = None) -> dict[str, Any]:
    """Every arm for seeds config.run.seed … +seeds−1; resumable (finished arms and cycles are reused).

    jobs > 1 runs that many seeds at once in separate processes (each with config.run.threads torch
    threads): the ops are small, so on 2 cores two one-thread processes do about twice the work of one.
    command: how the run was started, quoted at the top of results.md.
    """
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.training.cycle import resolve_models

    if seeds < 1:
        raise InputError(f"--seeds must be ≥ 1, got {seeds}")
    if jobs < 1:
        raise InputError(f"--jobs must be ≥ 1, got {jobs}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another --out")
    saved = out / "config.json"
    if saved.is_file() and json.loads(saved.read_text()) != config.to_dict():
        raise InputError(f"{out}: holds an ablation with another config; use {out / 'config.toml'} or another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.toml", to_toml(config).encode())
    atomic_write_bytes(saved, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    paths = resolve_models(config, log=log)  # built once here, not by every worker
    started = time.perf_counter()
    seed_list = [config.run.seed + offset for offset in range(seeds)]
    if jobs == 1:
        for seed in seed_list:
            run_seed(config, seed, out, paths, progress=progress, log=log)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        quiet = progress is False
        # spawn, not fork: a forked child inherits torch's thread pools and locks mid-state.
        with ProcessPoolExecutor(max_workers=min(jobs, seeds), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_seed_worker, config, seed, str(out), paths, quiet) for seed in seed_list]
            for future in futures:
                log(f"[ablate] seed {future.result()} done")
    results = summarize(out, config, seeds)
    results["seconds"] = time.perf_counter() - started
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_markdown(results, command).encode())
    try:
        atomic_write_bytes(out / "lift_per_cycle.png", plot_lift(results))
    except ImportError:  # matplotlib is optional; results.md and results.json hold the numbers
        pass
    return results


# ------------------------------------------------------------------------------------------------ statistics
def _collect(out: Path, config: CycleConfig, seeds: int):
    """Every finished run's evaluation, read once: arm → cycle → rows (seed, item_id, group, lift), the cyclic
    arms' evaluation summaries per (arm, cycle) over seeds, and the global prompt of each seed."""
    cycles = config.run.cycles
    table: dict[str, dict[int, list[dict[str, Any]]]] = {arm: {c: [] for c in range(cycles + 1)} for arm in ARMS}
    evals: dict[tuple[str, int], list[dict[str, Any]]] = {(arm, c): [] for arm in CYCLIC_ARMS for c in range(cycles + 1)}
    global_prompts = set()
    for offset in range(seeds):
        seed = config.run.seed + offset
        seed_dir = out / f"seed_{seed}"
        static = json.loads((seed_dir / STATIC_FILE).read_text())
        global_prompts.add(static["global_prompt_text"])
        for arm in CYCLIC_ARMS:
            for c in range(cycles + 1):
                metrics = json.loads((seed_dir / arm / "cycles" / f"cycle_{c:03d}" / "metrics.json").read_text())
                table[arm][c].extend({**r, "seed": seed} for r in metrics["eval"]["rows"])
                evals[(arm, c)].append(metrics["eval"])
        for c in range(cycles + 1):
            for arm in ("random_prompts", "global_prompt"):
                table[arm][c].extend({**r, "seed": seed} for r in static[arm]["rows"])
            table["original"][c].extend({**r, "seed": seed, "lift": 0.0} for r in static["global_prompt"]["rows"])
    return table, evals, sorted(global_prompts)


def cluster_bootstrap(values: np.ndarray, clusters: Sequence[Any], *, seed: int = 0, n: int = BOOTSTRAP,
                      level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile interval, resampling whole clusters with replacement."""
    values = np.asarray(values, dtype=np.float64)
    keys = sorted(set(clusters))
    index = {k: i for i, k in enumerate(keys)}
    ids = np.array([index[k] for k in clusters])
    sums = np.bincount(ids, weights=values, minlength=len(keys))
    counts = np.bincount(ids, minlength=len(keys)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), size=(n, len(keys)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _paired(a_rows, b_rows) -> tuple[np.ndarray, list]:
    """Row-wise a − b on matching (seed, item, group)."""
    b_lift = {(r["seed"], r["item_id"], r["group"]): r["lift"] for r in b_rows}
    diffs, clusters = [], []
    for r in a_rows:
        key = (r["seed"], r["item_id"], r["group"])
        diffs.append(r["lift"] - b_lift[key])
        clusters.append(key[:2])
    return np.array(diffs), clusters


def summarize(out: Path, config: CycleConfig, seeds: int) -> dict[str, Any]:
    table, evals, global_prompts = _collect(out, config, seeds)
    cycles = config.run.cycles
    arms: dict[str, Any] = {}
    for arm in ARMS:
        arms[arm] = {}
        for c in range(cycles + 1):
            rows = table[arm][c]
            mean, low, high = cluster_bootstrap([r["lift"] for r in rows], [(r["seed"], r["item_id"]) for r in rows],
                                                seed=c)
            per_seed = {str(s): float(np.mean([r["lift"] for r in rows if r["seed"] == s]))
                        for s in sorted({r["seed"] for r in rows})}
            arms[arm][str(c)] = {"mean": mean, "ci95": [low, high], "n": len(rows), "per_seed": per_seed}
    comparisons = {}
    for name, (a, ca), (b, cb) in (
        ("full_minus_global_prompt", ("full", cycles), ("global_prompt", cycles)),
        ("full_minus_random_prompts", ("full", cycles), ("random_prompts", cycles)),
        ("full_last_minus_cycle0", ("full", cycles), ("full", 0)),
        ("full_minus_lora_only", ("full", cycles), ("lora_only", cycles)),
        ("full_minus_prompt_only", ("full", cycles), ("prompt_only", cycles)),
        ("lora_only_last_minus_cycle0", ("lora_only", cycles), ("lora_only", 0)),
        ("prompt_only_last_minus_cycle0", ("prompt_only", cycles), ("prompt_only", 0)),
    ):
        diffs, clusters = _paired(table[a][ca], table[b][cb])
        mean, low, high = cluster_bootstrap(diffs, clusters, seed=17)
        comparisons[name] = {"a": f"{a}@{ca}", "b": f"{b}@{cb}", "mean": mean, "ci95": [low, high],
                             "excludes_zero": bool(low > 0 or high < 0)}
    extras = {}
    for arm in CYCLIC_ARMS:
        extras[arm] = {}
        for c in range(cycles + 1):
            values = evals[(arm, c)]
            extras[arm][str(c)] = {k: float(np.mean([v[k] for v in values]))
                                   for k in ("reward_mean", "true_ctr_mean", "reward_oracle_gap", "diversity")}
            extras[arm][str(c)]["product_pixels_unchanged"] = all(v["product_pixels_unchanged"] for v in values)
    return {"config": config.to_dict(), "seeds": [config.run.seed + o for o in range(seeds)], "cycles": cycles,
            "lift": arms, "comparisons": comparisons, "eval_metrics": extras, "global_prompt": global_prompts,
            "bootstrap": {"resamples": BOOTSTRAP, "cluster": "(seed, held-out product)", "level": 0.95}}


def _fmt(cell: dict[str, Any]) -> str:
    low, high = cell["ci95"]
    return f"{cell['mean']:+.1%} [{low:+.1%}, {high:+.1%}]"


def results_markdown(results: dict[str, Any], command: Optional[str] = None) -> str:
    cycles = results["cycles"]
    lines = ["# Ablation: simulated CTR lift over the original image", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    cfg = results["config"]
    lines += [
        f"Seeds {results['seeds']}; {cfg['run']['eval_products']} held-out products per seed × 8 user groups; "
        f"{cfg['run']['train_products']} training products; {cycles} cycles; LoRA rank {cfg['lora']['rank']}, "
        f"{cfg['lora']['steps']} steps per cycle; {cfg['generate']['prompts_per_group']} prompts × "
        f"{cfg['generate']['images_per_prompt']} images per (product, group), top-{cfg['generate']['top_k']} kept; "
        f"evaluation picks the reward model's best of {cfg['eval']['images_per_group']} per group.",
        "",
        "Lift = oracle true CTR of the pick / true CTR of the original photo − 1, mean over (seed, product, group); "
        "95 % interval from a cluster bootstrap over (seed, product).",
        "",
        "| arm | " + " | ".join(f"cycle {c}" for c in range(cycles + 1)) + " |",
        "|---|" + "---|" * (cycles + 1),
    ]
    for arm in ARMS:
        cells = [_fmt(results["lift"][arm][str(c)]) for c in range(cycles + 1)]
        if arm not in CYCLIC_ARMS:
            cells = [cells[0]] + ["″"] * cycles  # no cycles: the same evaluation in every column
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (same seed, product, group)", "", "| comparison | mean | 95 % CI | excludes 0 |",
              "|---|---|---|---|"]
    for name, c in results["comparisons"].items():
        lines.append(f"| {c['a']} − {c['b']} | {c['mean']:+.1%} | [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}] | "
                     f"{'yes' if c['excludes_zero'] else 'no'} |")
    lines += ["", "## Held-out metrics of the cyclic arms (mean over seeds)", "",
              "| arm | cycle | mean reward | true CTR | reward − true | diversity | product unchanged |",
              "|---|---|---|---|---|---|---|"]
    for arm, per_cycle in results["eval_metrics"].items():
        for c in range(cycles + 1):
            m = per_cycle[str(c)]
            lines.append(f"| {arm} | {c} | {m['reward_mean']:.4f} | {m['true_ctr_mean']:.4f} | "
                         f"{m['reward_oracle_gap']:+.4f} | {m['diversity']:.3f} | {m['product_pixels_unchanged']} |")
    lines += ["", f"Global prompt: {', '.join(repr(p) for p in results['global_prompt'])}.", ""]
    return "\n".join(lines)


def plot_lift(results: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = list(range(results["cycles"] + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm in ARMS:
        cells = [results["lift"][arm][str(c)] for c in cycles]
        mean = np.array([c["mean"] for c in cells])
        low = np.array([c["ci95"][0] for c in cells])
        high = np.array([c["ci95"][1] for c in cells])
        style = "-o" if arm in CYCLIC_ARMS else "--"
        line, = ax.plot(cycles, mean * 100, style, label=arm)
        ax.fill_between(cycles, low * 100, high * 100, color=line.get_color(), alpha=0.12)
    ax.set_xlabel("cycle")
    ax.set_ylabel("true-CTR lift over the original (%)")
    ax.set_xticks(cycles)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Held-out lift per cycle (95 % cluster-bootstrap CI)", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
