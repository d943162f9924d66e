"""Self-cyclic training: the generator's LoRA and the prompt model alternate on reward-ranked creatives.

One cycle (`run_cycle`):
    1. propose   per training product × user group, the prompt model samples prompts from its top-p nucleus
    2. generate  all groups of one product in one batched denoising loop
    3. rank      the reward model scores every creative; the top-k per (product, group) are kept
    4. LoRA      the adapter learns from the top-k images, denoising loss on the background only (prompt frozen)
    5. prompt    the prompt model learns the top-k prompts against the rest (LoRA frozen)
    6. evaluate  held-out products: per group the reward's best creative, served only when the reward model
                 scores it above the original photo (always a candidate); the oracle's aggregate true-CTR lift
                 over the photo (groups weighted by traffic), the mean of per-cell ratios beside it, how often
                 the photo was kept, the mean reward, the reward/oracle gap, diversity, product pixels unchanged
    7. checkpoint one atomic folder per cycle: LoRA (diffusers format), prompt model, metrics

Options against reward hacking (config [guard], [refresh], [lora] anchor_weight / max_delta; `training.guards`):
    3b. refresh  the world logs impressions and clicks of the served training creatives and the photo; the
                 reward model (every ensemble member) is retrained on the logs so far
    4.  anchor   a noise-prediction penalty towards the base UNet, and a cap on each layer's LoRA update
    5b. judge    a reward model trained on disjoint logs scores what the cycle would serve on judge products of
                 their own; with `accept` a cycle it scores below the last accepted one is undone, with
                 `keep_best` the run serves its best-judged cycle and can stop early (`patience`)
    ensemble     the reward models that rank are combined pessimistically (min, or mean − k·std)

Style LoRAs (config [style]; `training.style`): the prompt model also picks a style LoRA per (product, group) (a
category `style`), the generator runs every group of a product in one mixed-LoRA batch (`MixedLoraPipeline`),
and step 5 teaches the prompt model which styles the reward keeps. The style LoRAs stay frozen.

Cycle 0 is the evaluation of the starting models. Every random draw is seeded from (run seed, cycle,
stage) with hashlib, and each cycle's optimizers start fresh, so a cycle depends only on the checkpoint it
starts from: a run resumed after a kill gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.pipeline import derive_seed
from cg4ctr_fast.training.cycle_config import CycleConfig, changed_keys, to_toml

CYCLE_DIR = "cycles"
GUARD_DIR = "guards"  # the judge and the ensemble members, cached per world (training.guards)
STYLE_FILE = "style_loras.json"  # sha256 per style LoRA folder: a resumed run must use the LoRAs it started with
RUN_FILES = frozenset({"config.toml", "config.json", CYCLE_DIR, GUARD_DIR, STYLE_FILE, "metrics.json", "metrics.png"})
# Judge products: a block of held-out ids of their own, far from the evaluation's (HELD_OUT_ITEM_BASE + seed ·
# eval_products), so selecting a cycle by the judge never looks at the products it is evaluated on.
JUDGE_ITEM_OFFSET = 500_000


# ------------------------------------------------------------------------------------------------ context
@dataclass
class CycleContext:
    """Everything a cycle reads: the world and its logs, the models, the products, the group features."""

    config: CycleConfig
    dataset: Any  # cg4ctr_fast.sim.SimDataset
    modules: Any  # DiffusionModules (the UNet carries the LoRA adapter when the run updates it)
    pipe: Any  # CreativePipeline over `modules`
    reward: Any  # RewardModel, or a guards.RewardEnsemble of them (what ranks and picks)
    prompt_model: Any  # PromptModel (updated in place by the prompt step)
    group_ids: list[int]
    group_features: np.ndarray  # [G, group_dim]
    train_items: list[int]
    eval_items: list[int]
    model_paths: dict[str, str]
    judge: Any = None  # the held-out judge (RewardModel) when guard.judge
    judge_items: list[int] = dataclasses.field(default_factory=list)
    fresh: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)  # every cycle's fresh logs
    base_logs: Any = None  # (AdLog, uint8 images) of the world's logs, loaded at the first refresh
    guard_dir: Optional[Path] = None  # where guard models and a materialized world copy are cached
    mixed: Any = None  # style.MixedLoraPipeline over the style LoRAs when [style] loras is not "none"
    style_digests: dict[str, str] = dataclasses.field(default_factory=dict)  # family → sha256 of its LoRA folder

    def reward_members(self) -> list[Any]:
        return list(self.reward.members) if hasattr(self.reward, "members") else [self.reward]

    def set_reward_members(self, members: Sequence[Any]) -> None:
        from cg4ctr_fast.training.guards import RewardEnsemble

        guard = self.config.guard
        self.reward = RewardEnsemble(members, guard.ensemble_rule, guard.ensemble_k) if guard.ensemble > 1 else members[0]

    @property
    def world(self):
        return self.dataset.world

    def item_features(self, item_id: int) -> np.ndarray:
        from cg4ctr_fast.training.toy import item_features_for

        return item_features_for(self.world, item_id, self.dataset.items)


def resolve_models(config: CycleConfig, log: Callable[[str], Any] = print) -> dict[str, str]:
    """The four model folders: the config's, or the embedded toy models (the shipped set, else built and cached)."""
    given = {k: getattr(config.models, k) for k in ("world", "generator", "reward", "prompt")}
    if all(given.values()):
        return given
    if any(given.values()):
        missing = [k for k, v in given.items() if not v]
        raise InputError(f"config: [models] sets some folders but not {', '.join(missing)}; set all four or none")
    from cg4ctr_fast.training.toy import ToyConfig
    from cg4ctr_fast.training.toy_set import resolve_toy_models

    toy = resolve_toy_models(ToyConfig(), log=log)
    return {"world": str(toy.world), "generator": str(toy.generator), "reward": str(toy.reward), "prompt": str(toy.prompt)}


def pick_items(config: CycleConfig, dataset) -> tuple[list[int], list[int]]:
    """Training products: a seeded draw from the logged items. Held-out products: ids past every logged
    one, a different block per seed, so seeds also vary the products the evaluation sees."""
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE

    logged = sorted(int(i) for i in dataset.items["item_id"])
    run = config.run
    if run.train_products > len(logged):
        raise InputError(f"run.train_products is {run.train_products} but the logs hold {len(logged)} items")
    rng = np.random.default_rng(derive_seed(run.seed, "train-items") % (2**32))
    train = sorted(int(i) for i in rng.choice(logged, size=run.train_products, replace=False))
    start = HELD_OUT_ITEM_BASE + run.seed * run.eval_products
    return train, list(range(start, start + run.eval_products))


def judge_items(config: CycleConfig) -> list[int]:
    """The judge's held-out products (a different block per seed, disjoint from every evaluation block)."""
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE

    n = config.guard.judge_products
    start = HELD_OUT_ITEM_BASE + JUDGE_ITEM_OFFSET + config.run.seed * n
    return list(range(start, start + n))


def ensure_guard_models(config: CycleConfig, model_paths: dict[str, str], guard_dir: Path,
                        log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Build (or reuse) the judge and the extra ensemble members the config asks for, under guard_dir/<world>.
    Returns {"judge": folder or None, "members": [folders of members 1 … n−1], "styles": {family: folder} or None}.
    Style LoRAs: `style.folder`, or trained once per (world, generator, style.seed) under guard_dir."""
    from cg4ctr_fast.training import guards

    guard = config.guard
    styles = ensure_style_models(config, model_paths, guard_dir, log=log)
    if not guard.judge and guard.ensemble == 1:
        return {"judge": None, "members": [], "styles": styles}
    root = Path(guard_dir) / guards.guard_cache_key(model_paths["world"])
    judge = guards.build_judge(model_paths["world"], root / f"judge_{guard.judge_seed}", seed=guard.judge_seed,
                               log=log) if guard.judge else None
    members = []
    if guard.ensemble > 1:
        world = guards.materialized_world(model_paths["world"], root)
        members = guards.build_members(world, root, guard.ensemble, log=log)
    return {"judge": judge, "members": members, "styles": styles}


def ensure_style_models(config: CycleConfig, model_paths: dict[str, str], guard_dir: Path,
                        log: Callable[[str], Any] = print) -> Optional[dict[str, Path]]:
    """{family: LoRA folder} for [style], or None when the run has no style LoRAs."""
    from cg4ctr_fast.export.manifest import folder_sha256
    from cg4ctr_fast.training import guards, style

    if config.style.loras == "none":
        return None
    if config.style.folder:
        return style.check_style_folder(config.style.folder)
    from cg4ctr_fast.sim import load_dataset

    root = (Path(guard_dir) / guards.guard_cache_key(model_paths["world"])
            / f"style_loras_{config.style.seed}_{folder_sha256(model_paths['generator'])[:12]}")
    dataset = load_dataset(model_paths["world"])
    logged = sorted(int(i) for i in dataset.items["item_id"])
    return style.ensure_style_loras(model_paths["generator"], dataset.world, root, train_items=logged,
                                    config=style.StyleLoraConfig(seed=config.style.seed), log=log)


def build_context(config: CycleConfig, *, log: Callable[[str], Any] = print,
                  model_paths: Optional[dict[str, str]] = None, guard_dir: Optional[Path] = None) -> CycleContext:
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.lora import add_lora

    paths = model_paths or resolve_models(config, log=log)
    dataset = load_dataset(paths["world"])
    modules = load_modules(paths["generator"])
    if config.run.update_lora:
        # peft draws lora_A at random: seed it so the adapter's start is part of the run's seed.
        torch.manual_seed(derive_seed(config.run.seed, "lora-init") % (2**63))
        add_lora(modules.unet, config.lora)
    pipe = CreativePipeline.from_modules(modules)
    reward = RewardModel.load(paths["reward"]).eval()
    prompt_model = PromptModel.load(paths["prompt"])
    groups = sorted(dataset.groups, key=lambda g: g["group_id"])
    train_items, eval_items = pick_items(config, dataset)
    extra = ensure_guard_models(config, paths, Path(guard_dir) if guard_dir else Path(GUARD_DIR), log=log)
    ctx = CycleContext(
        config=config, dataset=dataset, modules=modules, pipe=pipe, reward=reward, prompt_model=prompt_model,
        group_ids=[int(g["group_id"]) for g in groups],
        group_features=np.stack([np.asarray(g["features"], dtype=np.float32) for g in groups]),
        train_items=train_items, eval_items=eval_items, model_paths=paths,
        judge=RewardModel.load(extra["judge"]).eval() if extra["judge"] else None,
        judge_items=judge_items(config) if config.guard.judge else [],
        guard_dir=Path(guard_dir) if guard_dir else Path(GUARD_DIR),
    )
    ctx.set_reward_members([reward] + [RewardModel.load(f).eval() for f in extra["members"]])
    if extra["styles"] is not None:
        from cg4ctr_fast.export.manifest import folder_sha256
        from cg4ctr_fast.training.style import STYLE_CATEGORY, MixedLoraPipeline, style_tokens

        ctx.mixed = MixedLoraPipeline.build(modules, extra["styles"], config.style.mode)
        ctx.style_digests = {name: folder_sha256(folder) for name, folder in extra["styles"].items()}
        tokens = style_tokens()
        # Start at P(none) = 0.4 and 0.15 per family (K = 4): greedy proposals (the evaluation) keep the base
        # generator until the loop has learned a style, so cycle 0 equals the arms without styles, and the
        # top-p nucleus (0.9) holds every style, so sampling explores them all.
        prior = [0.4] + [0.6 / (len(tokens) - 1)] * (len(tokens) - 1)
        ctx.prompt_model = ctx.prompt_model.with_category(STYLE_CATEGORY, tokens, prior=prior)
    return ctx


def style_choices(ctx: CycleContext, proposals: Sequence[str], key: Sequence[Any]) -> list[str]:
    """The proposals as generation will use them: unchanged, or with [style] loras = "random" the style token
    replaced by a family drawn uniformly, seeded by (run seed, *key, row)."""
    if ctx.mixed is None or ctx.config.style.loras != "random":
        return list(proposals)
    from cg4ctr_fast.training.style import with_style

    rng = np.random.default_rng(derive_seed(ctx.config.run.seed, "style-random", *key) % (2**32))
    names = list(ctx.mixed.names)
    return [with_style(p, names[int(rng.integers(len(names)))]) for p in proposals]


# ------------------------------------------------------------------------------------------------ generation
def generate_for_groups(ctx: CycleContext, item_id: int, group_prompts: Sequence[Sequence[str]], *,
                        images_per_prompt: int, steps: int, seed: int) -> list[dict[str, Any]]:
    """One batched denoising loop for one product: `group_prompts[g]` are group g's prompts. Identical prompts
    are generated once and shared (the pipeline's noise depends on the prompt, so they would be identical
    anyway). Every creative is scored by the reward model for its group. Returns one row per (group, creative).

    With style LoRAs (ctx.mixed) the prompts are style-aware proposals (`style.split_choice`): each group's rows
    run their chosen LoRA in the same batch, and rows carry "style" and "choice" (the prompt model's caption)."""
    product = ctx.world.product(item_id)
    unique = list(dict.fromkeys(p for prompts in group_prompts for p in prompts))
    kwargs = dict(num_inference_steps=steps, guidance_scale=ctx.config.generate.guidance,
                  num_images_per_prompt=images_per_prompt, seed=seed, show_progress=False, return_latents=True)
    if ctx.mixed is None:
        choices = None
        creatives = ctx.pipe(unique, product.image, product.mask, **kwargs)
    else:
        from cg4ctr_fast.training.style import split_choice

        choices = {p: split_choice(p) for p in unique}
        creatives = ctx.mixed([choices[p].prompt for p in unique], [choices[p].lora for p in unique], product.image,
                              product.mask, **kwargs)
    by_prompt: dict[str, list] = {}
    for creative in creatives:
        by_prompt.setdefault(unique[creative.group], []).append(creative)
    rows = []
    for g, prompts in enumerate(group_prompts):
        for prompt in prompts:
            for creative in by_prompt[prompt]:
                row = {"item_id": item_id, "group": g, "prompt": prompt, "image": creative.image,
                       "latents": creative.latents, "mask": product.mask, "title": product.title}
                if choices is not None:
                    row.update(prompt=choices[prompt].prompt, style=choices[prompt].style,
                               choice=choices[prompt].caption)
                rows.append(row)
    if rows:
        captions = [r["prompt"] if ctx.config.generate.reward_sees_prompt else "" for r in rows]
        scores = ctx.reward.score_images([r["image"] for r in rows], [r["title"] for r in rows], captions,
                                         ctx.group_features[[r["group"] for r in rows]])
        for row, score in zip(rows, scores):
            row["reward"] = float(score)
    return rows


def top_k(rows: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The k best rows by reward per (item, group); ties keep generation order (stable sort)."""
    buckets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        buckets.setdefault((row["item_id"], row["group"]), []).append(row)
    kept = []
    for key in sorted(buckets):
        ranked = sorted(buckets[key], key=lambda r: -r["reward"])
        kept.extend(ranked[:k])
    return kept


# ------------------------------------------------------------------------------------------------ evaluation
def score_originals(ctx: CycleContext, item_id: int) -> np.ndarray:
    """The reward model's score of the product photo itself for every group, float (G,), in group order.

    The photo has no prompt, so it is scored with an empty caption (what the generated creatives get too
    when `generate.reward_sees_prompt` is false)."""
    product = ctx.world.product(item_id)
    n = len(ctx.group_ids)
    return np.asarray(ctx.reward.score_images([product.image] * n, [product.title] * n, [""] * n,
                                              ctx.group_features), dtype=np.float64)


def evaluate(ctx: CycleContext, prompts_for: Callable[[int], list[str]], *, seed: int,
             images_per_group: Optional[int] = None, steps: Optional[int] = None, progress: bool = False,
             desc: str = "evaluate", items: Optional[Sequence[int]] = None, judge: Any = None) -> dict[str, Any]:
    """Serve each (held-out product, group) as selection would, and score it with the world's oracle.

    The original photo is always a candidate: the reward model's best creative of the group replaces it only
    when its reward is strictly above the photo's (`pick_over_original`), so a kept original has lift 0.
    prompts_for(item_id) gives one prompt per group. Returns (fractions, not percent):
        aggregate_lift         Σ w·CTR(served) / Σ w·CTR(original) − 1 over (product, group), w = the group's
                               traffic share (`World.group_traffic`): what an A/B test would measure
        lift_mean_of_ratios    mean over (product, group) of CTR(served) / CTR(original) − 1 (secondary)
        generated_only_aggregate_lift   the same for the best creative without the original as a candidate
        original_kept_share    fraction of (product, group) where the photo was kept
    and one row per (product, group): `lift` = true CTR served / true CTR of the original − 1.
    items: the products (default: the held-out evaluation products). judge: a reward model that also scores
    what is served and the photo (rows get judge_served and judge_original; the result judge_aggregate_lift,
    `guards.judged_lift`); it never changes what is served.
    """
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift, pick_over_original

    world = ctx.world
    traffic = world.group_traffic()
    per_group = images_per_group or ctx.config.eval.images_per_group
    n_steps = steps or ctx.config.eval.steps
    from tqdm.auto import tqdm

    rows, diversity, unchanged = [], [], True
    for item_id in tqdm(ctx.eval_items if items is None else items, desc=desc, disable=not progress, leave=False):
        product = world.product(item_id)
        prompts = prompts_for(item_id)
        generated = generate_for_groups(ctx, item_id, [[p] for p in prompts], images_per_prompt=per_group,
                                        steps=n_steps, seed=derive_seed(seed, "eval", item_id))
        keep = np.asarray(product.mask) < 128  # the product: must come back bit for bit
        original = np.asarray(product.image.convert("RGB"))
        original_ctr = world.true_ctr_groups(product.image, item_id=item_id)
        original_reward = score_originals(ctx, item_id)
        picks = []
        for g in range(len(ctx.group_ids)):
            group_rows = [r for r in generated if r["group"] == g]
            for r in group_rows:
                unchanged &= bool(np.array_equal(np.asarray(r["image"])[keep], original[keep]))
            best = max(group_rows, key=lambda r: r["reward"])  # first of equals, as pick_over_original
            best_ctr = float(world.true_ctr(best["image"], ctx.group_ids[g], item_id=item_id))
            base = float(original_ctr[ctx.group_ids[g]])
            kept_original = pick_over_original([r["reward"] for r in group_rows], original_reward[g]) is None
            true_ctr = base if kept_original else best_ctr
            rows.append({"item_id": item_id, "group": ctx.group_ids[g], "prompt": best["prompt"],
                         **({"style": best["style"]} if "style" in best else {}),
                         "kept_original": kept_original,
                         "reward": float(original_reward[g]) if kept_original else best["reward"],
                         "original_reward": float(original_reward[g]), "best_generated_reward": best["reward"],
                         "true_ctr": true_ctr, "original_true_ctr": base, "best_generated_true_ctr": best_ctr,
                         "traffic": float(traffic[ctx.group_ids[g]]), "lift": true_ctr / base - 1.0})
            picks.append(np.asarray(best["image"], dtype=np.float32)[~keep] / 255.0)
            if judge is not None:
                caption = best["prompt"] if ctx.config.generate.reward_sees_prompt else ""
                scores = judge.score_images([best["image"], product.image], [product.title] * 2, [caption, ""],
                                            ctx.group_features[[g, g]])
                rows[-1]["judge_original"] = float(scores[1])
                rows[-1]["judge_served"] = float(scores[1] if kept_original else scores[0])
        # Diversity: mean absolute pixel difference between the best creatives of different groups, background only.
        pairs = [np.abs(a - b).mean() for i, a in enumerate(picks) for b in picks[i + 1 :]]
        diversity.append(float(np.mean(pairs)) if pairs else 0.0)
    weights = [r["traffic"] for r in rows]
    base = [r["original_true_ctr"] for r in rows]
    served = aggregate_ctr_lift([r["true_ctr"] for r in rows], base, weights)
    generated_only = aggregate_ctr_lift([r["best_generated_true_ctr"] for r in rows], base, weights)
    rewards = np.array([r["reward"] for r in rows])
    ctrs = np.array([r["true_ctr"] for r in rows])
    judged = {}
    if judge is not None:
        from cg4ctr_fast.training.guards import judged_lift

        judged["judge_aggregate_lift"] = judged_lift(rows)
    if ctx.mixed is not None:  # what is served per (product, group): the photo or a creative of some style
        judged["served_style_share"] = style_share(["photo" if r["kept_original"] else r["style"] for r in rows])
    return {
        **judged,
        "aggregate_lift": served.lift,
        "aggregate_true_ctr": served.treatment_ctr,
        "aggregate_original_true_ctr": served.control_ctr,
        "lift_mean_of_ratios": served.mean_of_ratios,
        "original_kept_share": float(np.mean([r["kept_original"] for r in rows])),
        "generated_only_aggregate_lift": generated_only.lift,
        "generated_only_lift_mean_of_ratios": generated_only.mean_of_ratios,
        "true_ctr_mean": float(ctrs.mean()),
        "original_true_ctr_mean": float(np.mean(base)),
        "reward_mean": float(rewards.mean()),
        # Calibrated reward = predicted CTR: predicted − true on what is served. Growth here is over-optimization.
        "reward_oracle_gap": float((rewards - ctrs).mean()),
        "diversity": float(np.mean(diversity)),
        "distinct_prompts": len({r["prompt"] for r in rows}),
        "product_pixels_unchanged": unchanged,
        "rows": rows,
    }


def style_share(styles: Sequence[str]) -> dict[str, float]:
    """{style: share of rows}, styles sorted by name."""
    names, counts = np.unique(np.asarray(styles, dtype=object).astype(str), return_counts=True)
    return {str(n): float(c / len(styles)) for n, c in zip(names, counts)}


def prompt_model_prompts(ctx: CycleContext) -> Callable[[int], list[str]]:
    """Greedy top-p proposals of the current prompt model, one per group (a random style per (product, group),
    the same every cycle, with [style] loras = "random")."""

    def prompts_for(item_id: int) -> list[str]:
        item = np.repeat(ctx.item_features(item_id)[None], len(ctx.group_ids), axis=0)
        proposals = ctx.prompt_model.propose(ctx.group_features, item, top_p=ctx.config.generate.top_p)
        return style_choices(ctx, proposals, ("evaluate", item_id))

    return prompts_for


# ------------------------------------------------------------------------------------------------ one cycle
def run_cycle(ctx: CycleContext, cycle: int, *, progress: bool = False,
              judge_reference: Optional[float] = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Cycle `cycle` (≥ 1) from the models' current state; returns its metrics and the top-k rows.

    judge_reference: the judged aggregate lift of the last accepted cycle (guard.accept compares with it)."""
    from tqdm.auto import tqdm

    cfg = ctx.config
    gen_cfg = cfg.generate
    seed = cfg.run.seed
    timings: dict[str, float] = {}
    # 1-3. propose, generate, rank.
    started = time.perf_counter()
    sampler = torch.Generator().manual_seed(derive_seed(seed, cycle, "propose") % (2**63))
    rows: list[dict[str, Any]] = []
    for item_id in tqdm(ctx.train_items, desc=f"cycle {cycle}: generate", disable=not progress, leave=False):
        item = np.repeat(ctx.item_features(item_id)[None], len(ctx.group_ids) * gen_cfg.prompts_per_group, axis=0)
        groups = np.repeat(ctx.group_features, gen_cfg.prompts_per_group, axis=0)
        proposals = ctx.prompt_model.propose(groups, item, top_p=gen_cfg.top_p, sample=True, generator=sampler)
        proposals = style_choices(ctx, proposals, (cycle, "generate", item_id))
        group_prompts = [proposals[g * gen_cfg.prompts_per_group : (g + 1) * gen_cfg.prompts_per_group]
                         for g in range(len(ctx.group_ids))]
        rows.extend(generate_for_groups(ctx, item_id, group_prompts, images_per_prompt=gen_cfg.images_per_prompt,
                                        steps=gen_cfg.steps, seed=derive_seed(seed, cycle, "generate", item_id)))
    kept = top_k(rows, gen_cfg.top_k)
    timings["generate_s"] = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "cycle": cycle,
        "train_creatives": len(rows),
        "train_reward_mean": float(np.mean([r["reward"] for r in rows])),
        "topk_reward_mean": float(np.mean([r["reward"] for r in kept])),
        "topk_distinct_prompts": len({r["prompt"] for r in kept}),
    }
    if ctx.mixed is not None:
        metrics["generated_style_share"] = style_share([r["style"] for r in rows])
        metrics["topk_style_share"] = style_share([r["style"] for r in kept])
    # 3b. fresh logs: the world shows what was served (and the photo) and logs clicks; the reward is retrained.
    fresh = None
    if cfg.refresh.enabled:
        started = time.perf_counter()
        fresh = refresh_step(ctx, rows, kept, cycle)
        metrics["refresh"] = {"creatives": int(len(fresh["item_id"])), "impressions": int(fresh["impressions"].sum()),
                              "clicks": int(fresh["clicks"].sum()), "logged_reward_members": len(ctx.reward_members())}
        timings["refresh_s"] = time.perf_counter() - started
    snapshot = _snapshot(ctx) if cfg.guard.accept else None
    # 4. LoRA on the top-k images, prompt model frozen.
    if cfg.run.update_lora:
        started = time.perf_counter()
        metrics.update(lora_step(ctx, kept, seed=derive_seed(seed, cycle, "lora"), progress=progress,
                                 desc=f"cycle {cycle}: LoRA"))
        timings["lora_s"] = time.perf_counter() - started
    # 5. prompt model on the top-k prompts against the rest, LoRA frozen.
    if cfg.run.update_prompt:
        started = time.perf_counter()
        metrics.update(prompt_step(ctx, rows, kept, seed=derive_seed(seed, cycle, "prompt")))
        timings["prompt_s"] = time.perf_counter() - started
    # 5b. the held-out judge on its own products; with guard.accept a cycle it scores lower is undone.
    if ctx.judge is not None:
        started = time.perf_counter()
        judged = judge_step(ctx, progress=progress, desc=f"cycle {cycle}: judge")
        accepted = not cfg.guard.accept or judge_reference is None or judged >= judge_reference
        if not accepted:
            _restore_snapshot(ctx, snapshot)
        metrics["judge"] = {"aggregate_lift": judged, "reference": judge_reference, "accepted": accepted}
        timings["judge_s"] = time.perf_counter() - started
    # 6. held-out evaluation, the same noise every cycle so cycles differ only by the models.
    started = time.perf_counter()
    evaluation = evaluate(ctx, prompt_model_prompts(ctx), seed=derive_seed(seed, "heldout"), progress=progress,
                          desc=f"cycle {cycle}: evaluate")
    timings["eval_s"] = time.perf_counter() - started
    metrics["eval"] = evaluation
    metrics["seconds"] = timings
    if fresh is not None:
        metrics["_fresh"] = fresh  # saved as fresh_logs.npz beside the checkpoint, not in metrics.json
    return metrics, kept


def _snapshot(ctx: CycleContext) -> dict[str, Any]:
    """The LoRA and prompt model as they are, to undo a cycle the judge rejects."""
    import copy

    from cg4ctr_fast.training.lora import lora_state

    return {"lora": lora_state(ctx.modules.unet) if ctx.config.run.update_lora else None,
            "prompt": copy.deepcopy(ctx.prompt_model) if ctx.config.run.update_prompt else None}


def _restore_snapshot(ctx: CycleContext, snapshot: dict[str, Any]) -> None:
    from cg4ctr_fast.training.lora import load_lora_state

    if snapshot["lora"] is not None:
        load_lora_state(ctx.modules.unet, snapshot["lora"])
    if snapshot["prompt"] is not None:
        ctx.prompt_model = snapshot["prompt"]


def judge_step(ctx: CycleContext, *, progress: bool = False, desc: str = "judge") -> float:
    """The judge's aggregate lift of what the current models would serve on the judge products (the same
    noise every cycle, as the evaluation's)."""
    result = evaluate(ctx, prompt_model_prompts(ctx), seed=derive_seed(ctx.config.run.seed, "judge"),
                      items=ctx.judge_items, judge=ctx.judge, progress=progress, desc=desc)
    return float(result["judge_aggregate_lift"])


def refresh_step(ctx: CycleContext, rows: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]],
                 cycle: int) -> dict[str, np.ndarray]:
    """Log the served creatives (the top-k, or all with refresh.served = "all") and the photo for every
    (training product, group), then retrain every reward model on the world's logs plus all fresh logs."""
    from cg4ctr_fast.training import guards

    cfg = ctx.config
    caption = (lambda r: r["prompt"]) if cfg.generate.reward_sees_prompt else (lambda r: "")
    served = [{"image": r["image"], "item_id": r["item_id"], "group": r["group"], "caption": caption(r),
               "title": r["title"]} for r in (kept if cfg.refresh.served == "topk" else rows)]
    for item_id in ctx.train_items:
        product = ctx.world.product(item_id)
        served += [{"image": product.image, "item_id": item_id, "group": g, "caption": "", "title": product.title}
                   for g in range(len(ctx.group_ids))]
    fresh = guards.sample_fresh_logs(ctx.world, served, impressions=cfg.refresh.impressions,
                                     traffic=ctx.world.group_traffic(), group_ids=ctx.group_ids,
                                     seed=derive_seed(cfg.run.seed, cycle, "fresh-logs"))
    ctx.fresh.append(fresh)
    retrain_rewards(ctx, cycle)
    return fresh


def retrain_rewards(ctx: CycleContext, cycle: int) -> None:
    """Every reward model retrained from scratch on the world's logs plus ctx.fresh (member i with its own seed)."""
    from cg4ctr_fast.training import guards

    if ctx.base_logs is None:
        size = ctx.reward_members()[0].config.image_size
        world = guards.materialized_world(ctx.model_paths["world"],
                                          ctx.guard_dir / guards.guard_cache_key(ctx.model_paths["world"]))
        ctx.base_logs = guards.base_log_and_images(world, size)
    base, images = ctx.base_logs
    members = []
    for member in range(len(ctx.reward_members())):
        model, _metrics = guards.retrain_reward(base, images, ctx.fresh, ctx.group_ids, epochs=ctx.config.refresh.epochs,
                                                seed=derive_seed(ctx.config.run.seed, cycle, "refresh", member) % (2**31))
        members.append(model)
    ctx.set_reward_members(members)


def lora_step(ctx: CycleContext, kept: Sequence[dict[str, Any]], *, seed: int, progress: bool = False,
              desc: str = "LoRA") -> dict[str, Any]:
    from cg4ctr_fast.training.lora import encode_examples, train_lora

    images = torch.stack([torch.from_numpy(np.asarray(r["image"].convert("RGB"), dtype=np.float32)) for r in kept])
    images = images.permute(0, 3, 1, 2) / 127.5 - 1.0
    masks = torch.stack([torch.from_numpy(np.asarray(r["mask"], dtype=np.float32) / 255.0) for r in kept]).unsqueeze(1)
    modules = ctx.modules
    latents = torch.stack([r["latents"] for r in kept]) if ctx.config.lora.train_on == "latents" else None
    examples = encode_examples(modules.vae, images, masks, latents=latents)
    result = train_lora(modules.unet, modules.text_encoder, modules.tokenizer, modules.scheduler, examples,
                        [r["prompt"] for r in kept], ctx.config.lora, seed=seed % (2**63),
                        guidance=ctx.config.generate.guidance, progress=progress, desc=desc)
    from cg4ctr_fast.training.lora import cap_lora_delta

    return {**result, **cap_lora_delta(modules.unet, ctx.config.lora.max_delta)}


def prompt_step(ctx: CycleContext, rows: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]], *,
                seed: int) -> dict[str, Any]:
    """Rows: every generated creative's (group, item, prompt); label 1 for the top-k. Weight: how far the
    creative's reward sits from its (product, group) mean, relative, as for the logs (training/toy.py)."""
    from cg4ctr_fast.models.prompt import train_prompt_model

    kept_ids = {id(r) for r in kept}
    rewards: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        rewards.setdefault((r["item_id"], r["group"]), []).append(r["reward"])
    means = {key: float(np.mean(values)) for key, values in rewards.items()}
    group = np.stack([ctx.group_features[r["group"]] for r in rows])
    item = np.stack([ctx.item_features(r["item_id"]) for r in rows])
    labels = np.array([1.0 if id(r) in kept_ids else 0.0 for r in rows])
    weights = np.array([abs(r["reward"] - means[(r["item_id"], r["group"])]) / means[(r["item_id"], r["group"])]
                        for r in rows])
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    cfg = ctx.config.prompt
    history = train_prompt_model(ctx.prompt_model, group, item, [r.get("choice", r["prompt"]) for r in rows], labels,
                                 weights=weights, epochs=cfg.epochs, lr=cfg.lr, seed=seed % (2**63))
    return {"prompt_loss_first": float(history[0]) if history else float("nan"),
            "prompt_loss_last": float(history[-1]) if history else float("nan")}


# ------------------------------------------------------------------------------------------------ the run
def finished_cycles(out: Path) -> list[int]:
    """Cycles whose checkpoint folder is complete (each is renamed into place whole)."""
    root = out / CYCLE_DIR
    if not root.is_dir():
        return []
    done = []
    for path in root.iterdir():
        if path.name.startswith("cycle_") and path.name[6:].isdigit() and (path / "metrics.json").is_file():
            done.append(int(path.name[6:]))
    return sorted(done)


def cycle_path(out: Path, cycle: int) -> Path:
    return out / CYCLE_DIR / f"cycle_{cycle:03d}"


def restore(ctx: CycleContext, out: Path, cycle: int) -> None:
    """Load what a finished cycle saved: the LoRA, the prompt model, the reward models and the fresh logs so far."""
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.training.guards import FRESH_FILE, load_fresh_logs
    from cg4ctr_fast.training.lora import load_lora_file

    folder = cycle_path(out, cycle)
    if ctx.config.run.update_lora and (folder / "lora").is_dir():
        load_lora_file(ctx.modules.unet, folder / "lora")
    if ctx.config.run.update_prompt and (folder / "prompt").is_dir():
        ctx.prompt_model = PromptModel.load(folder / "prompt")
    if ctx.config.refresh.enabled and cycle > 0:
        ctx.fresh = [load_fresh_logs(cycle_path(out, c) / FRESH_FILE) for c in range(1, cycle + 1)]
        members = sorted((folder / "reward").iterdir(), key=lambda p: int(p.name.split("_")[1]))
        ctx.set_reward_members([RewardModel.load(m).eval() for m in members])


def save_cycle(ctx: CycleContext, out: Path, cycle: int, metrics: dict[str, Any],
               kept: Sequence[dict[str, Any]]) -> Path:
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.training.lora import save_lora

    from cg4ctr_fast.training.guards import FRESH_FILE, save_fresh_logs

    fresh = metrics.pop("_fresh", None)
    summary = {k: v for k, v in metrics.items() if k != "eval"}
    summary["eval"] = {k: v for k, v in metrics["eval"].items() if k != "rows"}
    with atomic_dir(cycle_path(out, cycle)) as tmp:
        if fresh is not None:
            save_fresh_logs(fresh, tmp / FRESH_FILE)
            for i, member in enumerate(ctx.reward_members()):
                member.save(tmp / "reward" / f"member_{i}")
        if cycle > 0 and ctx.config.run.update_lora:
            save_lora(ctx.modules.unet, tmp / "lora",
                      extra_metadata={"cycle": cycle, "seed": ctx.config.run.seed, "metrics": summary})
        if cycle > 0 and ctx.config.run.update_prompt:
            ctx.prompt_model.save(tmp / "prompt")
        (tmp / "topk.json").write_text(json.dumps(
            [{k: r[k] for k in ("item_id", "group", "prompt", "style", "reward") if k in r} for r in kept],
            indent=1) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return cycle_path(out, cycle)


def check_run_folder(out: Path, config: CycleConfig, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not resume:
        raise InputError(f"{out}: a run folder already exists; pass --resume to continue it or choose another --out")
    foreign = sorted({p.name for p in out.iterdir() if not p.name.startswith(".")} - RUN_FILES)
    if foreign:
        raise InputError(f"{out}: not a cg4ctr-train cycle folder (it holds {', '.join(foreign[:3])})")
    saved = out / "config.json"
    if saved.is_file():
        changed = changed_keys(json.loads(saved.read_text()), config)
        if changed:
            raise InputError(f"{out}: --resume with a different config ({changed[0]} changed); use the saved "
                             f"{out / 'config.toml'} or another --out")


def run_cycles(config: CycleConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
               log: Callable[[str], Any] = print, model_paths: Optional[dict[str, str]] = None,
               guard_dir: Optional[Path] = None) -> list[dict[str, Any]]:
    """Run (or resume) `config.run.cycles` cycles into `out`; returns every cycle's metrics, cycle 0 first.

    guard_dir: where the judge and ensemble members are built and cached (default out/guards). With
    guard.keep_best every cycle's metrics carry "best_cycle" (the cycle the judge scored highest so far: the
    one to serve), and with guard.patience the run stops once that many cycles passed without a better one."""
    from cg4ctr_fast.fileio import atomic_write_bytes

    out = Path(out)
    check_run_folder(out, config, resume)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    ctx = build_context(config, log=log, model_paths=model_paths, guard_dir=guard_dir or out / GUARD_DIR)
    styles = out / STYLE_FILE
    if ctx.style_digests and styles.is_file():
        changed = sorted(k for k, v in json.loads(styles.read_text()).items() if ctx.style_digests.get(k) != v)
        if changed:
            raise InputError(f"{out}: the style LoRA {changed[0]!r} differs from the one this run started with; "
                             "restore it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if ctx.style_digests and not styles.is_file():
        atomic_write_bytes(styles, (json.dumps(ctx.style_digests, indent=1, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out / "config.toml", to_toml(config).encode())
    atomic_write_bytes(out / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode())
    done = finished_cycles(out)
    history: list[dict[str, Any]] = [json.loads((cycle_path(out, c) / "metrics.json").read_text()) for c in done]
    if done:
        if done != list(range(len(done))):
            raise InputError(f"{out}: cycle folders {done} have a gap; remove the later ones to resume")
        restore(ctx, out, done[-1])
        log(f"[cycle] resuming after cycle {done[-1]} ({out})")
    else:
        started = time.perf_counter()
        evaluation = evaluate(ctx, prompt_model_prompts(ctx), seed=derive_seed(config.run.seed, "heldout"),
                              progress=progress, desc="cycle 0: evaluate")
        metrics = {"cycle": 0, "eval": evaluation, "seconds": {"eval_s": time.perf_counter() - started}}
        if ctx.judge is not None:
            judged = judge_step(ctx, progress=progress, desc="cycle 0: judge")
            metrics["judge"] = {"aggregate_lift": judged, "reference": None, "accepted": True}
            _track_best(metrics, None)
        save_cycle(ctx, out, 0, metrics, [])
        history.append(json.loads((cycle_path(out, 0) / "metrics.json").read_text()))
        log(_line(history[-1]))
        write_summary(out, history)
    for cycle in range(len(history), config.run.cycles + 1):
        previous = history[-1]
        patience = config.guard.patience
        if patience and cycle - 1 - previous["best_cycle"] >= patience:
            log(f"[cycle] stopping after cycle {cycle - 1}: {patience} cycle(s) without a better judged lift "
                f"(serve cycle {previous['best_cycle']})")
            break
        reference = previous["judge"]["reference"] if ctx.judge is not None else None
        if ctx.judge is not None and previous["judge"]["accepted"]:
            reference = previous["judge"]["aggregate_lift"]
        metrics, kept = run_cycle(ctx, cycle, progress=progress, judge_reference=reference)
        if ctx.judge is not None:
            if not metrics["judge"]["accepted"]:
                metrics["judge"]["reference"] = reference  # the state in effect is still the last accepted one
            _track_best(metrics, previous)
        save_cycle(ctx, out, cycle, metrics, kept)
        history.append(json.loads((cycle_path(out, cycle) / "metrics.json").read_text()))
        log(_line(history[-1]))
        write_summary(out, history)
    if done and len(history) == len(done):
        # Nothing left to run: a kill between a checkpoint and its summary may have left the summary behind.
        write_summary(out, history)
    return history


def _track_best(metrics: dict[str, Any], previous: Optional[dict[str, Any]]) -> None:
    """best_cycle / best_judge_lift: the cycle the judge scored highest so far (ties keep the earlier one),
    among accepted cycles."""
    judged = metrics["judge"]["aggregate_lift"]
    if previous is None or (metrics["judge"]["accepted"] and judged > previous["best_judge_lift"]):
        metrics["best_cycle"], metrics["best_judge_lift"] = metrics["cycle"], judged
    else:
        metrics["best_cycle"], metrics["best_judge_lift"] = previous["best_cycle"], previous["best_judge_lift"]


def _line(metrics: dict[str, Any]) -> str:
    e = metrics["eval"]
    return (f"[cycle {metrics['cycle']}] held-out aggregate CTR lift {e['aggregate_lift']:+.1%} (mean of ratios "
            f"{e['lift_mean_of_ratios']:+.1%}, original kept {e['original_kept_share']:.0%}), reward {e['reward_mean']:.4f}, "
            f"true CTR {e['true_ctr_mean']:.4f}, gap {e['reward_oracle_gap']:+.4f}, diversity {e['diversity']:.3f}, "
            f"product unchanged {e['product_pixels_unchanged']}"
            + (f", judged lift {metrics['judge']['aggregate_lift']:+.1%}"
               f"{'' if metrics['judge']['accepted'] else ' (rejected: undone)'}, best cycle {metrics['best_cycle']}"
               if "judge" in metrics else ""))


def write_summary(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.json (one entry per cycle, no per-row detail) and metrics.png, rewritten atomically."""
    from cg4ctr_fast.fileio import atomic_write_bytes

    compact = []
    for m in history:
        entry = {k: v for k, v in m.items() if k != "eval"}
        entry["eval"] = {k: v for k, v in m["eval"].items() if k != "rows"}
        compact.append(entry)
    atomic_write_bytes(out / "metrics.json", (json.dumps(compact, indent=2) + "\n").encode())
    try:
        atomic_write_bytes(out / "metrics.png", plot_cycles(compact))
    except ImportError:  # matplotlib is optional ([train] extra); the JSON has everything
        pass


def plot_cycles(history: Sequence[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycles = [m["cycle"] for m in history]
    panels = (("aggregate_lift", "held-out aggregate true-CTR lift"), ("original_kept_share", "original kept"),
              ("reward_mean", "mean reward served"), ("reward_oracle_gap", "reward − true CTR"),
              ("diversity", "diversity (pixel L1)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(cycles, [m["eval"][key] for m in history], marker="o", label="aggregate" if key == "aggregate_lift" else None)
        if key == "aggregate_lift":  # the mean of per-(product, group) ratios, secondary, dashed
            ax.plot(cycles, [m["eval"]["lift_mean_of_ratios"] for m in history], "--", marker=".",
                    label="mean of ratios")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cycle")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from cg4ctr_fast.training.figures import png_bytes

    return png_bytes(fig)


def main_log(quiet: bool) -> Callable[[str], Any]:
    return (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
