"""The embedded default: every model of the data path trained on the synthetic ad world, cached.

`build_toy_models()` writes, under the cache folder (CG4CTR_CACHE or ~/.cache/cg4ctr_fast):
    world/       the click logs (`cg4ctr-sim logs` layout)
    generator/   tiny VAE + 9-channel UNet + text encoder, a diffusers folder
    saliency/    U²-Net-p trained on the world's creatives
    reward/      the multimodal CTR model
    prompt/      the prompt model
Each folder is written atomically and reused when present, so a killed build resumes where it stopped.
The folder name carries a hash of the configuration: changing it rebuilds instead of mixing versions.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.base import BaseTrainConfig, CreativeSet, check_ranges
from cg4ctr_fast.training.saliency import SaliencyTrainConfig

# v2: the tiny preset's GroupNorms went from 32 to 8 groups (config.TINY), so v1 weights are another model.
TOY_VERSION = "toy-v2"
# Item ids at and above this are never in the logs or the training sets: the demo's held-out products.
HELD_OUT_ITEM_BASE = 100_000


@dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    products: int = 48
    creatives_per_product: int = 8
    days: int = 14
    generator: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    saliency: SaliencyTrainConfig = field(default_factory=lambda: SaliencyTrainConfig(steps=300))
    saliency_images: int = 600
    reward_epochs: int = 40
    prompt_epochs: int = 150
    prompt_top_k: int = 2
    # Evaluation sizes: held-out items for the prompt model's oracle agreement and the steering measure.
    eval_items: int = 4
    steering_images: int = 4
    steering_steps: int = 20

    def __post_init__(self) -> None:
        check_ranges(self, non_negative=("seed",),
                     positive=("products", "creatives_per_product", "days", "saliency_images", "reward_epochs",
                               "prompt_epochs", "prompt_top_k", "eval_items", "steering_images", "steering_steps"))

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(f"{TOY_VERSION}|{text}".encode()).hexdigest()[:10]


# `cg4ctr-train toy --config NAME`: the presets, the source of truth. The repository's training/toy.toml and
# training/toy-small.toml write them out as recipes (tests/test_training_recipes.py keeps each equal to its
# preset). The default builds the shipped set (~50 min on 2 CPU cores); small runs the same path in ~16 s on
# one core (tests/test_toy_set.py): tests/test_demo.py's SMALL with fewer training steps (saliency 30 → 4
# steps, VAE 10 → 3, UNet 20 → 4; SMALL's build takes ~40 s, 20 of them in the saliency net).
TOY_CONFIGS = {
    "default": ToyConfig(),
    "small": ToyConfig(
        products=8, creatives_per_product=4, days=3,
        generator=BaseTrainConfig(n_images=32, vae_steps=3, vae_batch=8, vae_full_steps=1, unet_steps=4, unet_batch=8),
        saliency=SaliencyTrainConfig(steps=4, batch=8), saliency_images=24,
        reward_epochs=1, prompt_epochs=5, eval_items=1, steering_images=2, steering_steps=2,
    ),
}


def load_toy_config(path: str | os.PathLike) -> ToyConfig:
    """The ToyConfig in the TOML file at `path`: ToyConfig's keys at the top level, [generator]
    (BaseTrainConfig) and [saliency] (SaliencyTrainConfig) as tables; a key left out keeps its default.
    Raises InputError (one line, naming the file) for a missing file, invalid TOML, an unknown key, a wrong
    type or a value out of range."""
    from cg4ctr_fast.training.recipes import load_recipe

    return load_recipe(ToyConfig, path)


def resolve_toy_config(name_or_path: str) -> ToyConfig:
    """`cg4ctr-train toy --config`: a preset name of TOY_CONFIGS, else a TOML file (`load_toy_config`).
    Raises InputError (one line) when it is neither."""
    if name_or_path in TOY_CONFIGS:
        return TOY_CONFIGS[name_or_path]
    if not Path(name_or_path).is_file():
        raise InputError(f"--config {name_or_path}: neither a preset ({', '.join(sorted(TOY_CONFIGS))}) nor a TOML "
                         "file (e.g. training/toy.toml)")
    return load_toy_config(name_or_path)


# Held-out creatives on which the VAE's reconstruction is measured: VAE_EVAL_IMAGES of the first VAE_EVAL_PRODUCTS
# held-out products (never in training).
VAE_EVAL_IMAGES = 128
VAE_EVAL_PRODUCTS = 16


@dataclass(frozen=True)
class ToyModels:
    root: Path
    world: Path
    generator: Path
    saliency: Path
    reward: Path
    prompt: Path


def toy_root(config: ToyConfig, cache: Optional[Path] = None) -> Path:
    from cg4ctr_fast.models.tokenizer import cache_dir

    return Path(cache or cache_dir()) / f"{TOY_VERSION}-{config.key()}"


def generator_dataset(world, n_images: int, item_ids: Sequence[int], seed: int) -> CreativeSet:
    """Creatives of the given products on backgrounds from random captions, with their exact masks."""
    from cg4ctr_fast.sim import caption_text

    rng = np.random.default_rng([seed, 7])
    images, masks, captions = [], [], []
    for _ in range(n_images):
        item = int(item_ids[int(rng.integers(len(item_ids)))])
        caption = world.random_caption(rng)
        creative = world.creative(item, caption, rng)
        images.append(np.asarray(creative, dtype=np.float32) / 127.5 - 1.0)
        masks.append(np.asarray(world.product(item).mask, dtype=np.float32) / 255.0)
        captions.append(caption_text(caption))
    return CreativeSet(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(np.stack(masks)).unsqueeze(1),
        captions=captions,
    )


def saliency_dataset(world, n_images: int, item_ids: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Creatives (uint8) and product masks (True = product): half on styled backgrounds, half on plain
    white, since product photos arrive both ways."""
    rng = np.random.default_rng([seed, 11])
    images, masks = [], []
    for k in range(n_images):
        item = int(item_ids[int(rng.integers(len(item_ids)))])
        product = world.product(item)
        image = world.creative(item, world.random_caption(rng), rng) if k % 2 == 0 else product.image
        images.append(np.asarray(image, dtype=np.uint8))
        masks.append(np.asarray(product.mask) < 128)
    return np.stack(images), np.stack(masks)


def prompt_training_rows(dataset, top_k: int) -> dict[str, Any]:
    """Per (item, group): the captions of the top-k creatives by smoothed CTR are positives, the rest
    negatives. Features: the group's one-hot attributes and the item's numeric attributes."""
    logs = dataset.logs.groupby(["creative_id", "item_id", "group_id"], as_index=False)[["impressions", "clicks"]].sum()
    captions = dict(zip(dataset.creatives["creative_id"], dataset.creatives["caption"]))
    prior_ctr = logs["clicks"].sum() / max(1, logs["impressions"].sum())
    # Beta(α, β) prior with 100 pseudo-impressions at the base rate: (clicks + α) / (impressions + α + β).
    alpha, beta = 100 * prior_ctr, 100 * (1 - prior_ctr)
    logs["smoothed"] = (logs["clicks"] + alpha) / (logs["impressions"] + alpha + beta)
    item_feats = item_feature_table(dataset.items)
    group_feats = {g["group_id"]: np.asarray(g["features"], dtype=np.float32) for g in dataset.groups}
    groups, items, prompts, labels, weights = [], [], [], [], []
    for (item_id, group_id), frame in logs.groupby(["item_id", "group_id"]):
        ranked = frame.sort_values("smoothed", ascending=False)
        # Weight: how far a creative's smoothed CTR sits from its item's mean, in relative terms, so a
        # clear winner (or loser) teaches more than a near-tie at the top-k boundary.
        ctr = ranked["smoothed"].to_numpy()
        advantage = np.abs(ctr - ctr.mean()) / ctr.mean()
        for rank, creative_id in enumerate(ranked["creative_id"]):
            groups.append(group_feats[group_id])
            items.append(item_feats[item_id])
            prompts.append(captions[creative_id])
            labels.append(1.0 if rank < top_k else 0.0)
            weights.append(float(advantage[rank]))
    return {"group": np.stack(groups), "item": np.stack(items), "prompts": prompts, "labels": np.asarray(labels),
            "weights": np.asarray(weights)}


ITEM_NUMERIC = ("price", "rating", "popularity", "area", "aspect", "lightness", "center_x", "center_y")


def _item_standardizer(items) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The numeric item columns present, and their mean and std over the logged items."""
    cols = [c for c in ITEM_NUMERIC if c in items.columns]
    values = items[cols].to_numpy(dtype=np.float64)
    return cols, values.mean(0), values.std(0) + 1e-9


def item_feature_table(items) -> dict[int, np.ndarray]:
    """Item features for the prompt model: numeric attributes standardized over the table."""
    cols, mean, std = _item_standardizer(items)
    values = items[cols].to_numpy(dtype=np.float64)
    return {int(i): ((row - mean) / std).astype(np.float32) for i, row in zip(items["item_id"], values)}


def item_features_for(world, item_id: int, items) -> np.ndarray:
    """The same standardized features for any product (held-out ones too), from its record."""
    cols, mean, std = _item_standardizer(items)
    record = world.product(item_id).record()
    return ((np.array([record[c] for c in cols], dtype=np.float64) - mean) / std).astype(np.float32)


def train_prompt_on_dataset(dataset, out: Path, config: ToyConfig) -> dict[str, Any]:
    """Train the prompt model on the logs; report how often its greedy tokens are the oracle's best."""
    from cg4ctr_fast.models.prompt import PromptModel, PromptModelConfig, train_prompt_model
    from cg4ctr_fast.sim import CATEGORIES, STYLE_VOCAB

    rows = prompt_training_rows(dataset, config.prompt_top_k)
    model_config = PromptModelConfig(
        categories=tuple((c, tuple(STYLE_VOCAB[c])) for c in CATEGORIES),
        group_dim=rows["group"].shape[1],
        item_dim=rows["item"].shape[1],
    )
    torch.manual_seed(config.seed)
    model = PromptModel(model_config)
    history = train_prompt_model(model, rows["group"], rows["item"], rows["prompts"], rows["labels"],
                                 weights=rows["weights"], epochs=config.prompt_epochs, seed=config.seed)
    metrics = {"loss_first": history[0], "loss_last": history[-1], "rows": len(rows["prompts"])}
    metrics.update(prompt_oracle_agreement(model, dataset, n_items=config.eval_items))
    model.save(out)
    from cg4ctr_fast.fileio import atomic_write_bytes

    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def prompt_oracle_agreement(model, dataset, n_items: int = 4) -> dict[str, Any]:
    """Per category, how often the greedy token equals the oracle's best caption's token, over groups
    (world-level oracle, no product) and a few held-out items; plus the oracle CTR of the proposal
    relative to the best caption's."""
    world = dataset.world
    per_category = np.zeros(len(model.spans))
    ctr_ratio = []
    count = 0
    item_ids = [HELD_OUT_ITEM_BASE + k for k in range(n_items)]
    for group in dataset.groups:
        g = np.asarray(group["features"], dtype=np.float32)
        for item_id in item_ids:
            item = item_features_for(world, item_id, dataset.items)
            proposal = model.propose(g[None], item[None])[0].split()
            best = world.best_caption(group["group_id"], item_id)
            per_category += np.array([a == b for a, b in zip(proposal, best)], dtype=float)
            ctr_ratio.append(world.caption_ctr(tuple(proposal), group["group_id"], item_id)
                             / world.caption_ctr(best, group["group_id"], item_id))
            count += 1
    from cg4ctr_fast.sim import CATEGORIES

    return {
        "oracle_token_agreement": {c: float(v / count) for c, v in zip(CATEGORIES, per_category)},
        "oracle_token_agreement_mean": float(per_category.sum() / (count * len(CATEGORIES))),
        "proposal_ctr_over_best_caption_ctr": float(np.mean(ctr_ratio)),
    }


def build_toy_models(
    config: ToyConfig = ToyConfig(),
    *,
    cache: Optional[Path] = None,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> ToyModels:
    """Build (or reuse) every toy model; returns their folders."""
    from cg4ctr_fast.sim import load_dataset, write_dataset

    root = toy_root(config, cache)
    root.mkdir(parents=True, exist_ok=True)
    paths = ToyModels(root=root, world=root / "world", generator=root / "generator", saliency=root / "saliency",
                      reward=root / "reward", prompt=root / "prompt")
    (root / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    if not paths.world.is_dir():
        log(f"[toy] sampling the ad world's click logs → {paths.world}")
        write_dataset(paths.world, seed=config.seed, n_products=config.products,
                      creatives_per_product=config.creatives_per_product, days=config.days)
    dataset = load_dataset(paths.world)
    world = dataset.world
    train_items = list(range(config.products))
    if not paths.saliency.is_dir():
        from cg4ctr_fast.training.saliency import save_trained_saliency, train_saliency

        log("[toy] training the saliency net")
        images, masks = saliency_dataset(world, config.saliency_images, train_items, config.seed)
        model, metrics = train_saliency(images, masks, config.saliency, progress=progress)
        save_trained_saliency(model, metrics, paths.saliency)
        log(f"[toy] saliency: held-out IoU {metrics['test_iou']:.3f}, MAE {metrics['test_mae']:.3f}")
    if not paths.reward.is_dir():
        log("[toy] training the reward model")
        test = train_reward_on_world(paths.world, paths.reward, config, progress=progress)["test"]
        log(f"[toy] reward (held-out items): AUC {test.get('auc', float('nan')):.3f}, "
            f"NE {test.get('ne', float('nan')):.3f}, uplift@1 {test.get('uplift_at_1', float('nan')):+.3f}")
    if not paths.prompt.is_dir():
        log("[toy] training the prompt model")
        metrics = train_prompt_on_dataset(dataset, paths.prompt, config)
        log(f"[toy] prompt model: oracle token agreement {metrics['oracle_token_agreement_mean']:.2f}, "
            f"proposal CTR / best caption CTR {metrics['proposal_ctr_over_best_caption_ctr']:.2f}")
    if not paths.generator.is_dir():
        from cg4ctr_fast.training.base import train_generator

        log("[toy] training the generator (VAE, UNet, text encoder)")
        data = generator_dataset(world, config.generator.n_images, train_items, config.seed)
        train_generator(data, paths.generator, config.generator, progress=progress, log=log)
    vae_file = paths.generator / "vae_eval.json"
    if not vae_file.is_file():
        from diffusers import AutoencoderKL

        from cg4ctr_fast.fileio import atomic_write_bytes
        from cg4ctr_fast.training.base import vae_reconstruction

        items = [HELD_OUT_ITEM_BASE + k for k in range(VAE_EVAL_PRODUCTS)]
        held_out = generator_dataset(world, VAE_EVAL_IMAGES, items, config.seed + 1)
        vae = AutoencoderKL.from_pretrained(str(paths.generator / "vae"))
        result = dict(vae_reconstruction(vae, held_out), products=f"held-out items {items[0]}-{items[-1]}",
                      unit="images in [-1, 1]")
        atomic_write_bytes(vae_file, (json.dumps(result, indent=2) + "\n").encode())
        log(f"[toy] VAE on held-out products: L1 {result['l1']:.4f}, chroma kept {result['chroma_ratio']:.2f}")
    steering_file = paths.generator / "steering.json"
    if not steering_file.is_file():
        from cg4ctr_fast.fileio import atomic_write_bytes
        from cg4ctr_fast.pipeline import CreativePipeline

        log("[toy] measuring how prompts steer the generator")
        pipe = CreativePipeline.from_pretrained(str(paths.generator))
        effect = steering_effect(pipe, world, [HELD_OUT_ITEM_BASE + k for k in range(config.eval_items)],
                                 images_per_prompt=config.steering_images, steps=config.steering_steps,
                                 seed=config.seed)
        atomic_write_bytes(steering_file, (json.dumps(effect, indent=2) + "\n").encode())
        for name, row in effect.items():
            log(f"[toy] steering {name}: {row['feature']} {row['mean_a']:.3f} vs {row['mean_b']:.3f}, "
                f"Cohen's d {row['cohens_d']:+.2f}")
    return paths


def train_reward_on_world(world_dir: Path, out: Path, config: ToyConfig, *, progress: bool = True) -> dict:
    """The reward model on the world's logs (held-out items), saved with its metrics."""
    from cg4ctr_fast.training.data import load_ad_log
    from cg4ctr_fast.training.reward import RewardTrainConfig, save_reward_run, train_reward

    log_data = load_ad_log(world_dir)
    result = train_reward(log_data, RewardTrainConfig(epochs=config.reward_epochs, seed=config.seed),
                          progress=progress)
    save_reward_run(result, out)
    return result.metrics


# Token pairs that move one measurable feature in a known direction (docs/sim.md), with that feature.
STEERING_PAIRS = (
    ("palette", "warm", "cool", "hue_cos"),
    ("lighting", "bright", "dim", "brightness"),
    ("palette", "neon", "monochrome", "saturation"),
)
STEERING_BASE = {"palette": "warm", "texture": "smooth", "scene": "studio", "lighting": "soft"}


def steering_effect(pipe, world, item_ids: Sequence[int], *, images_per_prompt: int = 4, steps: int = 20,
                    guidance: float = 5.0, seed: int = 0) -> dict[str, Any]:
    """How far one prompt token moves its feature in generated backgrounds, as Cohen's d.

    For each pair (token a vs b of one category, the other categories fixed at STEERING_BASE), generate
    `images_per_prompt` creatives per held-out product with each prompt and measure the feature on the
    repainted background with the world's own feature extractor.
    """
    from cg4ctr_fast.sim import CATEGORIES, FEATURE_NAMES

    results = {}
    for category, token_a, token_b, feature in STEERING_PAIRS:
        column = FEATURE_NAMES.index(feature)
        values: dict[str, list[float]] = {token_a: [], token_b: []}
        prompts = []
        for token in (token_a, token_b):
            words = dict(STEERING_BASE, **{category: token})
            prompts.append(" ".join(words[c] for c in CATEGORIES))
        for item_id in item_ids:
            product = world.product(item_id)
            creatives = pipe(prompts, product.image, product.mask, num_inference_steps=steps,
                             guidance_scale=guidance, num_images_per_prompt=images_per_prompt, seed=seed,
                             show_progress=False)
            for creative in creatives:
                token = token_a if creative.group == 0 else token_b
                values[token].append(float(world.features(creative.image, product.mask)[column]))
        a, b = np.asarray(values[token_a]), np.asarray(values[token_b])
        pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) + 1e-12
        results[f"{token_a}_vs_{token_b}"] = {
            "feature": feature,
            "mean_a": float(a.mean()),
            "mean_b": float(b.mean()),
            "cohens_d": float((a.mean() - b.mean()) / pooled),
            "n_per_prompt": int(a.size),
        }
    return results
