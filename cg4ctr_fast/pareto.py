"""Latency per creative against ad-world quality, one curve per lever (`cg4ctr-bench --pareto`).

On the shipped toy generator (cg4ctr_fast/assets/toy), in one process:

* **Quality** of each plan is its `planner.QualityEntry`: the aggregate true-CTR lift of the reward model's
  picks over the original photos, traffic-weighted, with a cluster-bootstrap 95 % CI over held-out products
  (`planner.measure_quality`). Plans already in the quality table given (default: the shipped
  `assets/toy/quality.json`) are read from it; the others are measured in this run and added to the table
  written beside the results, so the planner can read it (`planner.QualityTable`).
* **Latency** of each plan, at every group count asked (default 1 and 8), is timed with the bench harness
  (`cg4ctr_fast.bench.run_interleaved`): every row once per round, warm-up rounds first, on the same product,
  mask and prompts. diffusers' `StableDiffusionInpaintPipeline` on the same modules at 20 guided DDIM steps is
  the reference row of the same rounds, and with an LCM-LoRA a diffusers row at the LCM plan's steps on the
  same fused weights. Every row, diffusers' included, ends with the reward model scoring its images, the
  work a serving call does (preview plans need it to rank).
  "Per creative" = one call's time / (groups × creatives served per group).

Two ratios per group count (`ratios`):

* **same work**: diffusers / ours at the same scheduler, steps and guidance with no lever on (the 20-step
  reference plan; and the LCM plan against diffusers with LCMScheduler), the median of per-round ratios.
* **equal quality**: diffusers at 20 guided steps / our fastest plan whose quality is not below the lower end
  of the reference plan's 95 % CI. The reference plan's quality stands for diffusers' own: with compositing on,
  the two give the same pixels within float tolerance (tests/test_parity.py), so the same picks.

Importing this module loads no torch; `run_pareto` does.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cg4ctr_fast.planner import REFERENCE_PLAN, Plan

__all__ = ["pareto_curves", "run_pareto", "plot_pareto", "pareto_table"]

LCM_STEPS = (8, 4, 2)


def pareto_curves(*, lcm: bool, previews: bool) -> dict[str, list[Plan]]:
    """The plans of each lever's curve, each starting from (or next to) the 20-step guided reference.

    lcm: include the LCM-LoRA curve (needs the toy set's LCM-LoRA); previews: the preview-ranking curve (needs
    its tiny decoder). Returns {curve name: plans}; a plan may sit on several curves.
    """
    ref = REFERENCE_PLAN
    curves: dict[str, list[Plan]] = {
        "steps (DDIM, w 7.5)": [Plan("ddim", n, 7.5) for n in (20, 10, 6, 4, 2)],
        "guidance cut-off (20 steps)": [ref, Plan("ddim", 20, 7.5, guidance_cutoff=0.5),
                                        Plan("ddim", 20, 7.5, guidance_cutoff=0.25)],
        "cache interval (20 steps)": [ref] + [Plan("ddim", 20, 7.5, cache_interval=c) for c in (2, 3, 5)],
        "combined (cut-off 0.5, cache 2)": [Plan("ddim", n, 7.5, guidance_cutoff=0.5, cache_interval=2)
                                            for n in (10, 6, 4)],
    }
    if previews:
        curves["previews (4 candidates, top 1)"] = [
            Plan("ddim", 20, 7.5, images_per_prompt=4),
            Plan("ddim", 20, 7.5, images_per_prompt=4, preview_top_k=1),
            Plan("ddim", 6, 7.5, images_per_prompt=4, preview_top_k=1),
        ]
    if lcm:
        curves["LCM-LoRA (no guidance)"] = [Plan("lcm", n, 1.0, unet="lcm") for n in LCM_STEPS]
    return curves


def _unique(plans: Sequence[Plan]) -> list[Plan]:
    seen: dict[Plan, None] = {}
    for plan in plans:
        seen.setdefault(plan, None)
    return list(seen)


def run_pareto(*, groups: Sequence[int] = (1, 8), runs: int = 5, warmup: int = 1, products: int = 8,
               quality_path: Optional[str] = None, quality_out: Optional[str] = None, seed: int = 0,
               threads: Optional[int] = None, log: Optional[Callable[[str], None]] = None,
               curves: Optional[dict[str, list[Plan]]] = None) -> dict[str, Any]:
    """Measure every curve's plans (see the module docstring) and return the report (JSON-ready dict).

    groups: group counts to time (each ≤ the world's 8 groups); runs / warmup: timed and untimed rounds;
    products: held-out products per quality measurement; quality_path: the quality table to start from
    (default: the shipped one, if any); quality_out: where the completed table is written (atomic; None: not
    written); threads: torch threads (default: the cores this process may use).
    Raises InputError for a group count outside 1..8 or runs < 1.
    """
    import numpy as np
    import torch

    from cg4ctr_fast import bench as hb
    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline, make_scheduler
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.planner import (
        QualityTable,
        apply_plan_weights,
        measure_quality,
        shipped_quality_path,
        toy_lcm_lora,
        toy_preview_decoder,
        toy_weights_sha256,
    )
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, ToyConfig, item_features_for
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    say = log or (lambda _m: None)
    if runs < 1 or warmup < 0:
        raise InputError(f"--runs must be ≥ 1 and --warmup ≥ 0, got {runs} and {warmup}")
    applied = hb.apply_threads(threads or hb.available_cores())
    models = resolve_toy_models(ToyConfig(seed=0), progress=False, log=say)
    dataset = load_dataset(models.world)
    world = dataset.world
    group_ids = [g["group_id"] for g in dataset.groups]
    bad = [g for g in groups if not 1 <= g <= len(group_ids)]
    if bad:
        raise InputError(f"--groups {bad[0]}: the toy world has {len(group_ids)} user groups (1..{len(group_ids)})")
    lcm_lora, preview_dir = toy_lcm_lora(), toy_preview_decoder()
    curves = curves or pareto_curves(lcm=lcm_lora is not None, previews=preview_dir is not None)
    plans = _unique([p for plist in curves.values() for p in plist])

    # Pipelines: the generator's own weights, and (for LCM plans) a second copy with the LCM-LoRA fused.
    import json

    saliency_cfg = json.loads((models.saliency / "config.json").read_text())

    def toy_pipe(unet: str):
        pipe = CreativePipeline.from_pretrained(
            str(models.generator), saliency=str(models.saliency / "saliency.safetensors"),
            saliency_size=saliency_cfg["size"], saliency_threshold=saliency_cfg["threshold"])
        apply_plan_weights(pipe, Plan("lcm", 4, 1.0, unet="lcm") if unet == "lcm" else Plan(), lcm_lora=lcm_lora)
        if preview_dir is not None:
            from cg4ctr_fast.runtime.preview import attach_preview_decoder

            attach_preview_decoder(pipe, preview_dir)
        return pipe

    pipes = {unet: toy_pipe(unet) for unet in sorted({p.unet for p in plans})}

    # 1. quality: from the table, or measured now ------------------------------------------------------------
    start_table = quality_path or (str(shipped_quality_path()) if shipped_quality_path().is_file() else None)
    table = QualityTable.load(start_table) if start_table else QualityTable(source={
        "set": "cg4ctr_fast/assets/toy", "products": products, "seed": seed,
        "how": "planner.measure_quality (cg4ctr-bench --pareto)"})
    # The weights this run measures with (a table started from another set's keeps its entries, and says so).
    if table.source.get("weights_sha256") not in (None, toy_weights_sha256()):
        table.source["earlier_weights_sha256"] = table.source["weights_sha256"]
    table.source.pop("manifest_sha256", None)
    table.source["weights_sha256"] = toy_weights_sha256()
    measured_now = []
    for plan in plans:
        if table.lookup(plan) is None:
            say(f"[pareto] quality of {plan.name} ({products} products × {len(group_ids)} groups)")
            table.entries.append(measure_quality(plan, products=products, seed=seed, pipe=pipes[plan.unet]))
            measured_now.append(plan.name)
            if quality_out:
                table.save(quality_out)
    if quality_out:
        table.save(quality_out)

    # 2. latency: every plan and the diffusers rows, interleaved round by round --------------------------------
    reward = RewardModel.load(models.reward)
    prompt_model = PromptModel.load(models.prompt)
    features = np.stack([np.asarray(g["features"], dtype=np.float32) for g in dataset.groups])
    item_id = HELD_OUT_ITEM_BASE
    product = world.product(item_id)
    item = item_features_for(world, item_id, dataset.items)
    prompts = prompt_model.propose(features, np.repeat(item[None], len(group_ids), axis=0))
    base_pipe = pipes["base"] if "base" in pipes else next(iter(pipes.values()))
    mask = base_pipe.product_mask(product.image.convert("RGB"))  # found once; every row gets the same mask
    schedulers: dict[tuple[str, str], Any] = {}

    def scheduler_for(pipe_key: str, name: str, config) -> Any:
        key = (pipe_key, name)
        if key not in schedulers:
            schedulers[key] = make_scheduler(name, dict(config))
        return schedulers[key]

    def scorer(g: int):
        return reward.pipeline_scorer(features[:g], title=product.title, captions=prompts[:g])

    variants: list[hb.Variant] = []
    row_plan: dict[str, Plan] = {}
    for g in groups:
        for plan in plans:
            pipe = pipes[plan.unet]
            sched = scheduler_for(plan.unet, plan.scheduler, pipe.scheduler.config)
            score = scorer(g)

            def prepare(pipe=pipe, sched=sched, score=score):
                pipe.scheduler = sched
                pipe.reward = score
                pipe.clear_prompt_cache()  # diffusers encodes its prompts every call

            def call(pipe=pipe, plan=plan, g=g):
                pipe(prompts[:g], product.image, mask, num_inference_steps=plan.steps,
                     guidance_scale=plan.guidance_scale, num_images_per_prompt=plan.images_per_prompt,
                     seed=seed, show_progress=False, **plan.pipeline_kwargs())

            variants.append(hb.Variant(name=plan.name, call=call, prepare=prepare, groups=g, backend="torch"))
            row_plan[plan.name] = plan
        for label, unet, plan in _diffusers_rows(plans):
            dpipe = diffusers_inpaint_pipeline(pipes[unet].components.modules)
            sched = make_scheduler(plan.scheduler, dict(pipes[unet].scheduler.config))
            generator = torch.Generator("cpu")
            score = scorer(g)

            def dprepare(dpipe=dpipe, sched=sched, generator=generator):
                dpipe.scheduler = sched
                generator.manual_seed(seed)

            def dcall(dpipe=dpipe, plan=plan, g=g, generator=generator, score=score):
                images = dpipe(prompts[:g], image=product.image.convert("RGB"), mask_image=mask,
                               num_inference_steps=plan.steps, guidance_scale=plan.guidance_scale,
                               generator=generator).images
                score(images, list(range(g)))

            variants.append(hb.Variant(name=label, call=dcall, prepare=dprepare, groups=g, backend="diffusers-eager"))
    say(f"[pareto] timing {len(variants)} rows × {warmup + runs} rounds")
    before = hb.load_snapshot()
    samples = hb.run_interleaved(variants, runs=runs, warmup=warmup, device=torch.device("cpu"))
    during = hb.load_during(before, hb.load_snapshot())
    warnings = hb.load_warnings(before, during)

    # 3. rows, ratios --------------------------------------------------------------------------------------------
    ref_label = _diffusers_label(REFERENCE_PLAN)
    rows = []
    for v in variants:
        s = samples[v.key]
        stats = hb.percentiles(s.wall_s)
        row: dict[str, Any] = {"name": v.name, "groups": v.groups, "backend": v.backend, "p50_s": stats["p50"],
                               "min_s": stats["min"], "max_s": stats["max"], "spread": stats.get("spread"),
                               "flags": hb.row_flags(stats), "samples_s": list(s.wall_s)}
        base = samples.get((ref_label, v.groups))
        if base is not None and v.name != ref_label:
            pr = hb.paired_ratio(base.wall_s, s.wall_s)
            row["speedup_vs_diffusers_20"] = {"ratio": pr["ratio"], "min": pr["min"], "max": pr["max"],
                                              "flags": pr["flags"]}
        plan = row_plan.get(v.name) if v.backend == "torch" else _diffusers_plan(v.name, plans)
        served = plan.served_per_group if plan is not None else 1
        row["ms_per_creative"] = 1e3 * stats["p50"] / (v.groups * served)
        if plan is not None:
            row["plan"] = plan.to_dict()
            entry = table.lookup(plan)
            if entry is not None:
                row.update(quality=entry.quality, ci95=list(entry.ci95), quality_products=entry.products)
            row["curves"] = [c for c, plist in curves.items() if plan in plist] if v.backend == "torch" else []
        rows.append(row)

    ref_entry = table.lookup(REFERENCE_PLAN)
    ratios = []
    for g in groups:
        mine = [r for r in rows if r["groups"] == g]
        out: dict[str, Any] = {"groups": g}
        same = []
        for label, _unet, plan in _diffusers_rows(plans):
            d, o = samples.get((label, g)), samples.get((plan.name, g))
            if d and o:
                pr = hb.paired_ratio(d.wall_s, o.wall_s)
                same.append({"plan": plan.name, "diffusers": label, "ratio": pr["ratio"], "min": pr["min"],
                             "max": pr["max"], "flags": pr["flags"]})
        out["same_work"] = same
        if ref_entry is not None and math.isfinite(ref_entry.ci95[0]):
            floor = ref_entry.ci95[0]
            ok = [r for r in mine if r["backend"] == "torch" and r.get("quality") is not None
                  and r["quality"] >= floor and "speedup_vs_diffusers_20" in r]
            if ok:
                best = min(ok, key=lambda r: r["ms_per_creative"])
                sp = best["speedup_vs_diffusers_20"]
                out["equal_quality"] = {"plan": best["name"], "quality": best["quality"], "ci95": best["ci95"],
                                        "reference_quality": ref_entry.quality,
                                        "reference_ci95": list(ref_entry.ci95), "ratio": sp["ratio"],
                                        "min": sp["min"], "max": sp["max"], "flags": sp["flags"]}
        ratios.append(out)
    return {
        "what": "latency per creative vs ad-world quality on the shipped toy generator, one curve per lever",
        "device": "cpu", "cpu": hb.cpu_name(), "threads": applied, "runs": runs, "warmup": warmup,
        "groups": list(groups), "product_item_id": item_id, "seed": seed,
        "curves": {name: [p.name for p in plist] for name, plist in curves.items()},
        "rows": rows, "ratios": ratios,
        "quality": {"table": start_table, "measured_now": measured_now, "written_to": quality_out,
                    "metric": table.metric, "products_per_plan": products},
        "levers_missing": {"lcm_lora": lcm_lora is None, "preview_decoder": preview_dir is None},
        "load": {"before": before, "during": during, "warnings": warnings},
        "environment": hb.environment(torch.device("cpu")),
        "rules": hb.RULES,
    }


def _diffusers_label(plan: Plan) -> str:
    return f"diffusers {plan.name}"


def _diffusers_rows(plans: Sequence[Plan]) -> list[tuple[str, str, Plan]]:
    """(label, unet, plan) of the diffusers rows: the 20-step guided reference, and the LCM plan with the
    fewest steps ≥ 4 (diffusers with LCMScheduler on the same fused weights) when LCM plans are measured."""
    rows = [(_diffusers_label(REFERENCE_PLAN), "base", REFERENCE_PLAN)]
    lcm = sorted((p for p in plans if p.unet == "lcm" and p.pipeline_kwargs() == {} and p.images_per_prompt == 1),
                 key=lambda p: (p.steps < 4, p.steps))
    if lcm:
        rows.append((_diffusers_label(lcm[0]), "lcm", lcm[0]))
    return rows


def _diffusers_plan(label: str, plans: Sequence[Plan]) -> Optional[Plan]:
    for row_label, _unet, plan in _diffusers_rows(plans):
        if row_label == label:
            return plan
    return None


def pareto_table(report: dict[str, Any]) -> str:
    """A fixed-width text table of the report's rows, then its ratios."""
    head = (f"{'row':<40}{'groups':>7}{'p50 s':>9}{'ms/creative':>13}{'vs diffusers-20 [min-max]':>28}"
            f"{'quality (lift)':>16}{'95% CI':>20}  flags")
    lines = [head, "-" * len(head)]
    for r in sorted(report["rows"], key=lambda r: (r["groups"], r["ms_per_creative"])):
        sp = r.get("speedup_vs_diffusers_20")
        ratio = f"{sp['ratio']:.2f}x [{sp['min']:.2f}-{sp['max']:.2f}]" if sp else "1.00x (reference)"
        q = f"{r['quality']:+.2%}" if r.get("quality") is not None else "-"
        ci = f"[{r['ci95'][0]:+.1%}, {r['ci95'][1]:+.1%}]" if r.get("ci95") else "-"
        flags = ",".join(dict.fromkeys(r["flags"] + (sp["flags"] if sp else []))) or "ok"
        lines.append(f"{r['name']:<40}{r['groups']:>7}{r['p50_s']:>9.3f}{r['ms_per_creative']:>13.1f}{ratio:>28}"
                     f"{q:>16}{ci:>20}  {flags}")
    for block in report["ratios"]:
        for s in block["same_work"]:
            lines.append(f"same work, {block['groups']} groups: {s['plan']} vs {s['diffusers']}: {s['ratio']:.2f}x "
                         f"[{s['min']:.2f}-{s['max']:.2f}] {','.join(s['flags']) or 'ok'}")
        eq = block.get("equal_quality")
        if eq:
            lines.append(f"equal quality, {block['groups']} groups: {eq['plan']} (lift {eq['quality']:+.2%}, reference "
                         f"{eq['reference_quality']:+.2%} CI [{eq['reference_ci95'][0]:+.2%}, "
                         f"{eq['reference_ci95'][1]:+.2%}]) vs diffusers 20 steps: {eq['ratio']:.2f}x "
                         f"[{eq['min']:.2f}-{eq['max']:.2f}] {','.join(eq['flags']) or 'ok'}")
        else:
            lines.append(f"equal quality, {block['groups']} groups: no plan measured")
    return "\n".join(lines)


def plot_pareto(report: dict[str, Any], path: str) -> None:
    """One panel per group count: ms per creative (log x) against quality with its 95 % CI, a line per curve,
    diffusers' 20-step reference as a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    groups = report["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.2 * len(groups), 4.8), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref_name = _diffusers_label(REFERENCE_PLAN)
    for ax, g in zip(axes[0], groups):
        rows = {r["name"]: r for r in report["rows"] if r["groups"] == g}
        for i, (curve, names) in enumerate(report["curves"].items()):
            pts = [rows[n] for n in names if n in rows and rows[n].get("quality") is not None]
            pts.sort(key=lambda r: r["ms_per_creative"])
            if not pts:
                continue
            x = [r["ms_per_creative"] for r in pts]
            y = [100 * r["quality"] for r in pts]
            err = [[100 * (r["quality"] - r["ci95"][0]) for r in pts], [100 * (r["ci95"][1] - r["quality"]) for r in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, lw=1.2, color=colours[i % len(colours)],
                        label=curve, alpha=0.85)
        ref = rows.get(ref_name)
        if ref is not None and ref.get("quality") is not None:
            ax.plot([ref["ms_per_creative"]], [100 * ref["quality"]], marker="*", ms=14, color="black", ls="none",
                    label="diffusers, 20 guided steps")
            ax.axhspan(100 * ref["ci95"][0], 100 * ref["ci95"][1], color="grey", alpha=0.12,
                       label="reference 95 % CI")
        ax.set_xscale("log")
        # plain numbers at 1, 2, 5 × 10^k (20, 50, 100, 200) rather than 2×10¹
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("ms per creative served (p50 of the call / groups)")
        ax.set_title(f"{g} group{'s' if g > 1 else ''}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("aggregate true-CTR lift of the picks vs the originals (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    flags = " (machine loaded: see load warnings)" if report["load"]["warnings"] else ""
    fig.suptitle(f"Toy generator on {report['cpu']}, {report['threads']['torch_intra_op']} threads{flags}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_pareto(args) -> int:
    """`cg4ctr-bench --pareto`: run, print the table, write --json (and --plot, --quality-out)."""
    import json

    from cg4ctr_fast.fileio import atomic_write_bytes

    log = (lambda m: print(m, file=sys.stderr, flush=True))
    started = time.perf_counter()
    report = run_pareto(groups=args.groups, runs=args.runs, warmup=args.warmup, products=args.products,
                        quality_path=args.quality, quality_out=args.quality_out, threads=args.threads, log=log)
    report["wall_s"] = time.perf_counter() - started
    text = pareto_table(report)
    report["table"] = text
    atomic_write_bytes(Path(args.json), (json.dumps(report, indent=2, default=str) + "\n").encode())
    if args.plot:
        plot_pareto(report, args.plot)
    for line in report["load"]["warnings"]:
        print(line, file=sys.stderr)
    print(text)
    print(f"[pareto] {len(report['rows'])} rows in {report['wall_s']:.0f} s -> {args.json}", file=sys.stderr)
    return 0
