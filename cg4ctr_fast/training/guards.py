"""Guards against reward hacking in the self-cyclic loop, and the fresh logs that close it.

    judge      a held-out reward model trained on a second, disjoint log sample of the same world
               (`build_judge`); it scores what a cycle would serve, and never ranks training creatives
    ensemble   several reward models on the same logs (other seeds: other item splits, initial weights and
               batch orders) combined pessimistically (`RewardEnsemble`): min, or mean − k·std
    refresh    after a cycle the world shows the served creatives and the photo, logs impressions and clicks
               (`sample_fresh_logs`), and the reward model is retrained on the logs so far (`retrain_reward`)

The LoRA anchors (a noise-prediction penalty towards the base UNet, a cap on each layer's update) live in
`training.lora` (LoraTrainConfig.anchor_weight, .max_delta). The loop that uses all of these is
`training.cycle`; the measurements are in docs/cycle.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cg4ctr_fast.pipeline import derive_seed

FRESH_FILE = "fresh_logs.npz"


# ------------------------------------------------------------------------------------------------ ensemble
class RewardEnsemble:
    """Reward models combined pessimistically: the score an over-optimised creative gets only if every member
    is fooled. Same `score_images` interface as `models.reward.RewardModel`.

    rule "min": the lowest member score; "mean_std": mean − k · std over members (population std, ddof 0),
    the lower-confidence-bound ensemble of the reward-model over-optimisation literature (Coste et al., 2023,
    "Reward Model Ensembles Help Mitigate Overoptimization").
    """

    def __init__(self, members: Sequence[Any], rule: str = "min", k: float = 1.0):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if rule not in ("min", "mean_std"):
            raise ValueError(f"unknown ensemble rule {rule!r}")
        self.members = list(members)
        self.rule = rule
        self.k = float(k)

    def member_scores(self, images, titles: Sequence[str], captions: Sequence[str], group_features) -> np.ndarray:
        """float64 [members, n]: every member's calibrated CTR for each creative."""
        return np.stack([np.asarray(m.score_images(images, titles, captions, group_features), dtype=np.float64)
                         for m in self.members])

    def combine(self, scores: np.ndarray) -> np.ndarray:
        """[members, n] → [n] by the ensemble's rule."""
        if self.rule == "min":
            return scores.min(axis=0)
        return scores.mean(axis=0) - self.k * scores.std(axis=0)

    def score_images(self, images, titles: Sequence[str], captions: Sequence[str], group_features) -> np.ndarray:
        """float64 [n]: the combined score (images: PIL images or paths; group_features [n, group_dim])."""
        return self.combine(self.member_scores(images, titles, captions, group_features))


# ------------------------------------------------------------------------------------------------ training
def _reward_config(epochs: int, seed: int):
    from cg4ctr_fast.training.reward import RewardTrainConfig

    return RewardTrainConfig(epochs=epochs, seed=seed)


def _log_shape(dataset) -> tuple[int, int, int]:
    """(products, creatives per product, days) of a world's logs, as `cg4ctr-sim logs` drew them."""
    n_products = len(dataset.items)
    return n_products, max(1, len(dataset.creatives) // n_products), int(dataset.logs["day"].max()) + 1


def materialized_world(world_dir: str | Path, cache: Path) -> Path:
    """A world folder whose creative images exist on disk (reward training reads them).

    The shipped toy set leaves the creative PNGs out (toy_set.LEFT_OUT). They are the world's own draws from
    its logs stream, so `sample_logs` with `World.logs_rng()` draws them again; the redrawn log table must
    equal the folder's (else InputError: the folder was not written by `cg4ctr-sim logs`). The copy is
    written once under `cache/world` and reused.
    """
    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.sim.dataset import save_dataset

    world_dir = Path(world_dir)
    if (world_dir / "creatives").is_dir():
        return world_dir
    target = cache / "world"
    if (target / "logs.parquet").is_file() and (target / "creatives").is_dir():
        return target
    dataset = load_dataset(world_dir)
    world = dataset.world
    logs = world.sample_logs(*_log_shape(dataset), world.logs_rng())
    if not logs.logs.reset_index(drop=True).equals(dataset.logs.reset_index(drop=True)):
        raise InputError(f"{world_dir}: creatives/ is missing and the world's logs stream does not redraw its "
                         "logs.parquet; give a folder with the creative images")
    save_dataset(logs, target)  # atomic
    return target


def build_judge(world_dir: str | Path, out: Path, *, seed: int = 0, epochs: int = 40,
                log: Callable[[str], Any] = print) -> Path:
    """The held-out judge: a reward model trained on a second log sample of the world in `world_dir`.

    The sample has the same products, creatives per product and days as the world's logs, but its own
    random captions, backgrounds, impressions and clicks (a logs stream seeded by (world seed, "judge-logs",
    seed)), so no log row is shared with the training reward model's. Cached: an existing `out/reward` is
    reused. Returns the reward model folder.
    """
    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.sim.dataset import save_dataset
    from cg4ctr_fast.training.data import load_ad_log
    from cg4ctr_fast.training.reward import save_reward_run, train_reward

    model_dir = out / "reward"
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    dataset = load_dataset(world_dir)
    world = dataset.world
    n_products, per, days = _log_shape(dataset)
    rng = np.random.default_rng(derive_seed(world.seed, "judge-logs", seed) % (2**32))
    log(f"[guard] judge: a disjoint log sample ({n_products} products × {per} creatives × {days} days), "
        f"then a reward model ({epochs} epochs)")
    if not (out / "logs" / "logs.parquet").is_file():
        save_dataset(world.sample_logs(n_products, per, days, rng), out / "logs")  # atomic
    result = train_reward(load_ad_log(out / "logs"), _reward_config(epochs, seed))
    save_reward_run(result, model_dir)
    atomic_write_bytes(out / "judge.json", (json.dumps({"seed": seed, "epochs": epochs, "world": str(world_dir)},
                                                       indent=1) + "\n").encode())
    return model_dir


def build_members(world_dir: str | Path, out: Path, n: int, *, epochs: int = 40,
                  log: Callable[[str], Any] = print) -> list[Path]:
    """Ensemble members 1 … n−1: reward models on the world's own logs with seeds 1 … n−1 (member 0 is the
    given reward model). Cached per seed under `out`. Returns their folders."""
    from cg4ctr_fast.training.data import load_ad_log
    from cg4ctr_fast.training.reward import save_reward_run, train_reward

    folders = []
    ad_log = None
    for member in range(1, n):
        folder = out / f"member_{member}"
        if not (folder / "model.safetensors").is_file():
            if ad_log is None:
                ad_log = load_ad_log(world_dir)
            log(f"[guard] ensemble member {member}: reward model, seed {member}, {epochs} epochs")
            save_reward_run(train_reward(ad_log, _reward_config(epochs, member)), folder)
        folders.append(folder)
    return folders


def guard_cache_key(world_dir: str | Path) -> str:
    """A folder name for a world's guard models: its fingerprint (the same world in any folder shares them)."""
    from cg4ctr_fast.sim import load_dataset

    return "world_" + load_dataset(world_dir).world.fingerprint()[:12]


# ------------------------------------------------------------------------------------------------ fresh logs
def sample_fresh_logs(world, served: Sequence[dict[str, Any]], *, impressions: float, traffic: np.ndarray,
                      group_ids: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """Impressions and clicks for each served creative, as the world would log them.

    served: rows with "image" (PIL, the creative as shown), "item_id", "group" (index into group_ids),
    "caption" (the reward model's caption: the prompt, or "" for the photo) and "title".
    impressions ~ Poisson(impressions · G · traffic[g]) (G groups, so the mean over groups is `impressions`);
    clicks ~ Binomial(impressions, the oracle's true CTR of that image for that group and item).
    Returns arrays: images uint8 [n, H, W, 3], item_id int64, group int64 (index), caption and title (str),
    impressions int64, clicks int64, true_ctr float64.
    """
    rng = np.random.default_rng(seed % (2**32))
    n_groups = len(group_ids)
    true_ctr = np.array([world.true_ctr(r["image"], group_ids[r["group"]], item_id=r["item_id"]) for r in served],
                        dtype=np.float64)
    lam = np.array([impressions * n_groups * traffic[group_ids[r["group"]]] for r in served])
    shown = rng.poisson(lam).astype(np.int64)
    clicks = rng.binomial(shown, true_ctr).astype(np.int64)
    return {
        "images": np.stack([np.asarray(r["image"].convert("RGB"), dtype=np.uint8) for r in served]),
        "item_id": np.array([r["item_id"] for r in served], dtype=np.int64),
        "group": np.array([r["group"] for r in served], dtype=np.int64),
        "caption": np.array([r["caption"] for r in served], dtype=str),
        "title": np.array([r["title"] for r in served], dtype=str),
        "impressions": shown,
        "clicks": clicks,
        "true_ctr": true_ctr,
    }


def save_fresh_logs(fresh: dict[str, np.ndarray], path: Path) -> None:
    """One cycle's fresh logs as .npz (no pickle: strings are fixed-width unicode arrays)."""
    import io

    from cg4ctr_fast.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **fresh)
    atomic_write_bytes(path, buffer.getvalue())


def load_fresh_logs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def fresh_ad_log(base, base_images: np.ndarray, fresh: Sequence[dict[str, np.ndarray]], group_ids: Sequence[int],
                 image_size: int):
    """The base AdLog plus every fresh log, as one AdLog and its uint8 image array [n, 3, S, S].

    Each fresh creative is logged for the one group it was served to, under its product's item id; the
    day column names the cycle ("fresh-<cycle index>")."""
    import pandas as pd
    from PIL import Image

    from cg4ctr_fast.training.data import AdLog

    group_index = {str(g): i for i, g in enumerate(base.group_ids)}
    creatives = [base.creatives]
    logs = [base.logs]
    images = [base_images]
    offset = len(base.creatives)
    for c, batch in enumerate(fresh):
        n = len(batch["item_id"])
        creatives.append(pd.DataFrame({
            "creative_id": [f"fresh-{c}-{i}" for i in range(n)],
            "item_id": [str(int(i)) for i in batch["item_id"]],
            "title": [str(t) for t in batch["title"]],
            "caption": [str(t) for t in batch["caption"]],
            "path": [""] * n,
        }))
        logs.append(pd.DataFrame({
            "creative": np.arange(offset, offset + n, dtype=np.int64),
            "group": np.array([group_index[str(group_ids[g])] for g in batch["group"]], dtype=np.int64),
            "day": [f"fresh-{c}"] * n,
            "impressions": batch["impressions"].astype(np.float64),
            "clicks": batch["clicks"].astype(np.float64),
        }))
        resized = [np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR)
                              if im.shape[0] != image_size else im) for im in batch["images"]]
        images.append(np.stack(resized).transpose(0, 3, 1, 2).astype(np.uint8))
        offset += n
    log = AdLog(base.layout, base.root, pd.concat(creatives, ignore_index=True), list(base.group_ids),
                base.group_features, pd.concat(logs, ignore_index=True))
    return log, np.ascontiguousarray(np.concatenate(images))


def retrain_reward(base, base_images: np.ndarray, fresh: Sequence[dict[str, np.ndarray]],
                   group_ids: Sequence[int], *, epochs: int, seed: int):
    """A reward model retrained from scratch on the base logs plus every fresh log (the fresh logs' products
    always in the fitting split). Returns (RewardModel in eval mode, its metrics dict)."""
    from cg4ctr_fast.training.reward import train_reward

    size = base_images.shape[-1]
    log, images = fresh_ad_log(base, base_images, fresh, group_ids, size)
    items = sorted({str(int(i)) for batch in fresh for i in batch["item_id"]})
    result = train_reward(log, _reward_config(epochs, seed), images=images, always_fit=items)
    return result.model.eval(), result.metrics


def base_log_and_images(world_dir: str | Path, image_size: int):
    """The world's AdLog and its creatives' images (uint8 [n, 3, S, S]), loaded once per run."""
    from cg4ctr_fast.training.data import load_ad_log, load_creative_images

    base = load_ad_log(world_dir)
    return base, load_creative_images(base.creatives["path"].tolist(), image_size)


def judged_lift(rows: Sequence[dict[str, Any]]) -> float:
    """The judge's aggregate lift over the photo: Σ w·judge(served) / Σ w·judge(photo) − 1 (w: traffic).

    The judge is calibrated to CTR like the reward model, so this is its estimate of what an A/B test of
    the served creatives against the photo would show on those products."""
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    return float(aggregate_ctr_lift([r["judge_served"] for r in rows], [r["judge_original"] for r in rows],
                                    [r["traffic"] for r in rows]).lift)
