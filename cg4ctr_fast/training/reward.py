"""Train the reward (CTR) model on creative click logs.

Procedure (`train_reward`):
1. Aggregate the logs per (creative, user group) over days; drop rows without impressions.
2. Split by ITEM (held-out products): test = `test_fraction` of the items; of the rest, `val_fraction`
   is kept aside to fit the calibration; the model is fitted on the remaining items.
3. Fit the Beta prior on the fitting rows (`metrics.fit_beta_prior`); targets are the smoothed CTRs
   ctr_s = (clicks + α) / (impressions + α + β).
4. Loss, per batch of items (all their user groups):

       L = 0.9 · L_list + 0.1 · L_point
       L_list  = mean over lists (one item for one group, ≥ 2 creatives) of
                 −Σ_i softmax(log ctr_s / τ)_i · log softmax(z)_i          (list-wise soft-max CE)
       L_point = mean over rows of BCE(sigmoid(z), ctr_s)                  (point-wise)

   z is the model's logit.  The paper's code takes the soft-max of 1000·ctr_s; we take it of
   log ctr_s (τ = 1): the target is then each creative's share of its list's smoothed CTR, which
   does not depend on the CTR's scale (a soft-max of raw CTRs ≈ 0.01–0.1 would be almost uniform, and
   1000·ctr almost one-hot), and it matches the point-wise term, whose logits approach log ctr.
5. Adam (AdamW: decoupled weight decay 1e-4) with a one-cycle cosine learning-rate schedule,
   gradient clipping at 1, `epochs` passes over the fitting items in a seeded order; each creative's
   image is embedded once per step (all its groups share the embedding).
6. Platt scaling on the validation items: CTR = sigmoid(a·z + b) by Newton's method on the binomial
   likelihood; a is kept ≥ 0.01 so the calibrated CTR stays increasing in z.  Without validation
   items (too few items) it is fitted on the fitting items, and `metrics.json` says so.
7. Metrics (`metrics.evaluate`) on the test items, and for reference on fit and val.

Threads: `threads` (default 1) intra-op threads while training.  The ops are small, so a second
thread gains little on an idle machine, and on a busy one OpenMP threads waiting for each other
collapse: 400 creatives × 8 groups, 40 epochs took 25 s with 1 thread and 255 s with 2 on a 2-core
machine with other jobs running (same result to the bit).

Images are resized to `image_size` (default 64, the synthetic world's native size; larger real
creatives are downscaled to it; 32 keeps colour, brightness and coarse texture and makes the CNN
about 3× cheaper).
Deterministic under `seed`: the item split, the batch order, the initial weights and dropout all
derive from it (the global torch RNG state is restored afterwards).  Checked to the bit across runs
and across 1 and 2 threads on one machine; other CPUs / torch builds may differ in the last bits.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.models.reward import RewardConfig, RewardModel, Vocabulary
from cg4ctr_fast.training import metrics as M
from cg4ctr_fast.training.data import AdLog, load_creative_images, split_items

__all__ = ["RewardTrainConfig", "RewardTrainResult", "train_reward", "save_reward_run", "fit_platt", "reward_loss"]

METRICS_FILE = "metrics.json"
A_MIN = 0.01


@dataclass(frozen=True)
class RewardTrainConfig:
    epochs: int = 40
    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    image_size: int = 64
    batch_items: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    listwise_weight: float = 0.9
    listwise_temperature: float = 1.0
    max_vocab: int = 20000
    threads: int = 1
    model: Mapping = field(default_factory=dict)  # RewardConfig overrides (sizes, dropout)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"--epochs must be a positive integer, got {self.epochs}")
        if not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 512:
            raise InputError(f"--image-size must be an integer in [16, 512], got {self.image_size}")
        if not isinstance(self.batch_items, int) or self.batch_items < 1:
            raise InputError(f"--batch-items must be a positive integer, got {self.batch_items}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.listwise_weight <= 1.0:
            raise InputError(f"listwise_weight must be in [0, 1], got {self.listwise_weight}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"--threads must be a positive integer, got {self.threads}")
        if not self.listwise_temperature > 0:
            raise InputError(f"listwise_temperature must be > 0, got {self.listwise_temperature}")


@dataclass
class RewardTrainResult:
    model: RewardModel
    metrics: dict


# --------------------------------------------------------------------------------------------
# Loss and calibration
# --------------------------------------------------------------------------------------------


def reward_loss(logits: torch.Tensor, target_ctr: torch.Tensor, list_index: torch.Tensor,
                *, listwise_weight: float = 0.9, temperature: float = 1.0) -> tuple[torch.Tensor, dict]:
    """0.9 · list-wise soft-max CE + 0.1 · point-wise BCE (see the module docstring).

    logits, target_ctr: [R]; list_index: [R] int64, the list (item × group) of each row, 0..L-1.
    Lists with one row carry no ranking information and are left out of the list-wise mean.
    """
    pointwise = F.binary_cross_entropy_with_logits(logits, target_ctr)
    n_lists = int(list_index.max()) + 1 if len(list_index) else 0
    sizes = torch.bincount(list_index, minlength=n_lists)
    # Rank of each row within its list, to scatter into a padded [L, max_len] matrix.
    order = torch.argsort(list_index, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.empty_like(list_index)
    position[order] = torch.arange(len(list_index)) - starts[list_index[order]]
    width = int(sizes.max()) if n_lists else 1
    neg_inf = torch.finfo(logits.dtype).min
    z = torch.full((n_lists, width), neg_inf, dtype=logits.dtype)
    t = torch.full((n_lists, width), neg_inf, dtype=logits.dtype)
    z = z.index_put((list_index, position), logits)
    t = t.index_put((list_index, position), torch.log(target_ctr.clamp_min(1e-12)) / temperature)
    valid = torch.zeros((n_lists, width), dtype=torch.bool).index_put((list_index, position), torch.tensor(True))
    target = torch.softmax(t, dim=1) * valid
    log_p = torch.log_softmax(z, dim=1).masked_fill(~valid, 0.0)
    per_list = -(target * log_p).sum(dim=1)
    multi = sizes >= 2
    listwise = per_list[multi].mean() if bool(multi.any()) else logits.sum() * 0.0
    loss = listwise_weight * listwise + (1.0 - listwise_weight) * pointwise
    return loss, {"listwise": float(listwise.detach()), "pointwise": float(pointwise.detach())}


def fit_platt(logits, clicks, impressions, *, iterations: int = 50) -> tuple[float, float]:
    """(a, b) maximising Σ c log σ(a z + b) + (n − c) log(1 − σ(a z + b)), by Newton's method.

    A small ridge (1e-6) keeps the step defined; a < A_MIN (the scores do not rank on this split)
    falls back to a = A_MIN with b refitted, so the calibrated CTR stays increasing in z.
    """
    z, c, n = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (logits, clicks, impressions))
    keep = n > 0
    z, c, n = z[keep], c[keep], n[keep]
    if n.sum() <= 0 or c.sum() <= 0 or c.sum() >= n.sum():
        return 1.0, 0.0

    def newton(a: float, b: float, fit_a: bool) -> tuple[float, float]:
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(a * z + b)))
            resid = n * p - c
            w = n * p * (1 - p) + 1e-12
            if fit_a:
                grad = np.array([np.sum(resid * z), np.sum(resid)])
                hess = np.array([[np.sum(w * z * z), np.sum(w * z)], [np.sum(w * z), np.sum(w)]]) + 1e-6 * np.eye(2)
                step = np.linalg.solve(hess, grad)
                # Damped: never move a logit by more than 5 per iteration.
                scale = min(1.0, 5.0 / max(1e-12, float(np.max(np.abs(step[0] * z + step[1])))))
                a, b = a - scale * step[0], b - scale * step[1]
                if np.max(np.abs(step)) < 1e-10:
                    break
            else:
                step = np.sum(resid) / np.sum(w)
                b -= float(np.clip(step, -5, 5))
                if abs(step) < 1e-10:
                    break
        return float(a), float(b)

    base = c.sum() / n.sum()
    a, b = newton(1.0, float(np.log(base / (1 - base)) - np.average(z, weights=n)), True)
    if not (math.isfinite(a) and math.isfinite(b)) or a < A_MIN:
        a, b = newton(A_MIN, float(np.log(base / (1 - base)) - A_MIN * np.average(z, weights=n)), False)
    return a, b


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _predict_logits(model: RewardModel, images: torch.Tensor, titles: torch.Tensor, captions: torch.Tensor,
                    groups: torch.Tensor, creative: np.ndarray, group: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    embeddings = torch.cat(
        [model.embed_images(images[i : i + batch].float().div_(255.0)) for i in range(0, len(images), batch)]
    ) if len(images) else torch.zeros((0, model.config.image_dim))
    out = []
    for start in range(0, len(creative), 4096):
        c = torch.as_tensor(np.array(creative[start : start + 4096]))
        g = torch.as_tensor(np.array(group[start : start + 4096]))
        out.append(model.logits(embeddings[c], titles[c], captions[c], groups[g]))
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def train_reward(log: AdLog, config: RewardTrainConfig = RewardTrainConfig(), *, progress: bool = False,
                 images: Optional[np.ndarray] = None, always_fit=()) -> RewardTrainResult:
    """Train, calibrate and evaluate a reward model on `log`; see the module docstring.

    `images` (uint8 [n_creatives, 3, S, S], S = config.image_size) skips loading the image files.
    `always_fit`: item ids (as in `log.creatives["item_id"]`) moved into the fitting split whatever the
    seeded split says (the self-cyclic loop's fresh logs are on its training products, and a refresh that
    held some of them out would not learn from them).
    Raises InputError for an empty split or unreadable images; never writes files.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_reward(log, config, progress=progress, images=images, always_fit=always_fit)
    finally:
        torch.set_num_threads(previous_threads)


def _train_reward(log: AdLog, config: RewardTrainConfig, *, progress: bool, images: Optional[np.ndarray],
                  always_fit=()) -> RewardTrainResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    rows = log.aggregate()
    if rows.empty:
        raise InputError(f"{log.root}: no log row has impressions > 0")
    fit_items, val_items, test_items = split_items(rows["item_id"], config.test_fraction, config.val_fraction, config.seed)
    forced = {str(i) for i in always_fit}
    if forced:
        val_items = [i for i in val_items if i not in forced]
        test_items = [i for i in test_items if i not in forced]
        fit_items = sorted(set(fit_items) | (forced & set(rows["item_id"].astype(str))))
        if not test_items:
            raise InputError("always_fit leaves no test item; hold out other items")
    split_of = {**{i: "fit" for i in fit_items}, **{i: "val" for i in val_items}, **{i: "test" for i in test_items}}
    rows["split"] = rows["item_id"].map(split_of)
    fit = rows["split"].to_numpy() == "fit"
    val = rows["split"].to_numpy() == "val"
    test = rows["split"].to_numpy() == "test"
    calib_rows = val if val.any() else fit

    clicks = rows["clicks"].to_numpy(np.float64)
    impressions = rows["impressions"].to_numpy(np.float64)
    prior = M.fit_beta_prior(clicks[fit], impressions[fit])
    target = M.smoothed_ctr(clicks, impressions, prior)
    list_key = rows["item_id"].astype(str) + "\x00" + rows["group"].astype(str)
    list_code = np.unique(list_key.to_numpy(dtype=object).astype(str), return_inverse=True)[1].astype(np.int64)

    # Vocabularies from the texts of the training items only (fit + val): held-out items' unseen
    # words map to <unk>, as they would for a new product.
    creatives = log.creatives
    train_creatives = np.unique(rows.loc[fit | val, "creative"].to_numpy())
    title_vocab = Vocabulary.build(creatives["title"].to_numpy()[train_creatives].tolist(), config.max_vocab)
    caption_vocab = Vocabulary.build(creatives["caption"].to_numpy()[train_creatives].tolist(), config.max_vocab)

    if images is None:
        images = load_creative_images(creatives["path"].tolist(), config.image_size, progress=progress)
    if images.shape != (len(creatives), 3, config.image_size, config.image_size):
        raise ValueError(f"images has shape {images.shape}, expected ({len(creatives)}, 3, {config.image_size}, {config.image_size})")
    image_t = torch.from_numpy(np.ascontiguousarray(images))

    model_config = RewardConfig(
        **{
            "group_dim": int(log.group_features.shape[1]),
            "title_vocab_size": len(title_vocab),
            "caption_vocab_size": len(caption_vocab),
            "image_size": config.image_size,
            "prior_alpha": prior.alpha,
            "prior_beta": prior.beta,
            **dict(config.model),
        }
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = RewardModel(model_config, title_vocab, caption_vocab)
        titles_t = model.encode_titles(creatives["title"].tolist())
        captions_t = model.encode_captions(creatives["caption"].tolist())
        groups_t = torch.from_numpy(log.group_features.astype(np.float32))
        with torch.no_grad():  # start at the prior mean CTR, so the point-wise term starts calibrated
            model.head[-1].bias.fill_(math.log(prior.mean / (1 - prior.mean)))

        row_creative = rows["creative"].to_numpy(np.int64)
        row_group = rows["group"].to_numpy(np.int64)
        item_codes = np.unique(rows["item_id"].to_numpy(dtype=object).astype(str), return_inverse=True)[1]
        fit_rows = np.flatnonzero(fit)
        by_item = fit_rows[np.argsort(item_codes[fit_rows], kind="stable")]
        fit_item_codes, starts = np.unique(item_codes[by_item], return_index=True)
        rows_of_item = dict(zip(fit_item_codes.tolist(), np.split(by_item, starts[1:])))
        target_t = torch.from_numpy(target.astype(np.float32))

        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        n_steps = config.epochs * math.ceil(len(fit_item_codes) / config.batch_items)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(1, n_steps),
                                                       pct_start=0.1, anneal_strategy="cos")
        rng = np.random.default_rng(config.seed)
        history = []
        bar = tqdm(range(config.epochs), desc="reward", unit="epoch", disable=not progress, file=sys.stderr)
        for _epoch in bar:
            model.train()
            order = rng.permutation(fit_item_codes)
            totals = []
            for start in range(0, len(order), config.batch_items):
                batch_rows = np.concatenate([rows_of_item[int(code)] for code in order[start : start + config.batch_items]])
                creatives_in_batch, local = np.unique(row_creative[batch_rows], return_inverse=True)
                embeddings = model.embed_images(image_t[torch.from_numpy(creatives_in_batch)].float().div_(255.0))
                c_idx = torch.from_numpy(creatives_in_batch)
                logits = model.logits(
                    embeddings[torch.from_numpy(local)],
                    titles_t[c_idx][torch.from_numpy(local)],
                    captions_t[c_idx][torch.from_numpy(local)],
                    groups_t[torch.from_numpy(row_group[batch_rows])],
                )
                lists = np.unique(list_code[batch_rows], return_inverse=True)[1]
                loss, parts = reward_loss(
                    logits, target_t[torch.from_numpy(batch_rows)], torch.from_numpy(lists.astype(np.int64)),
                    listwise_weight=config.listwise_weight, temperature=config.listwise_temperature,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                totals.append(float(loss.detach()))
            history.append(float(np.mean(totals)))
            bar.set_postfix(loss=f"{history[-1]:.4f}")
        bar.close()

    logits = _predict_logits(model, image_t, titles_t, captions_t, groups_t, row_creative, row_group)
    a, b = fit_platt(logits[calib_rows], clicks[calib_rows], impressions[calib_rows])
    model.with_calibration(a, b)
    pred = 1.0 / (1.0 + np.exp(-(a * logits + b)))

    def split_metrics(mask: np.ndarray) -> dict:
        if not mask.any():
            return {}
        return M.evaluate(pred[mask], logits[mask], clicks[mask], impressions[mask], list_code[mask], prior)

    creatives_per_list = np.bincount(list_code)
    metrics = {
        "layout": log.layout,
        "data": str(log.root),
        "train_config": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(config).items()},
        "counts": {
            "creatives": int(len(creatives)),
            "groups": int(len(log.group_ids)),
            "items": int(rows["item_id"].nunique()),
            "rows": int(len(rows)),
            "lists": int(len(creatives_per_list)),
            "mean_creatives_per_list": float(creatives_per_list.mean()),
            "fit_items": len(fit_items),
            "val_items": len(val_items),
            "test_items": len(test_items),
        },
        "prior": {"alpha": prior.alpha, "beta": prior.beta, "mean": prior.mean},
        "calibration_fit": {"scale": a, "bias": b, "split": "val" if val.any() else "fit"},
        "loss_per_epoch": history,
        "test": split_metrics(test),
        "val": split_metrics(val),
        "fit": split_metrics(fit),
        "metric_notes": (
            "rows are (creative, group) pairs summed over days; auc is impression-weighted (clicks = positives, "
            "other impressions = negatives); ne = logloss / entropy(base CTR); calibration = predicted / observed "
            "clicks; pairwise_accuracy over same-list (item, group) pairs whose smoothed CTRs differ; "
            "uplift_at_k = CTR of the top-k creatives by score / CTR of the whole list - 1, plain mean over lists "
            "with more than k creatives and at least one click"
        ),
        "test_items": test_items,
        "seconds": time.perf_counter() - started,
    }
    return RewardTrainResult(model=model, metrics=_json_safe(metrics))


def save_reward_run(result: RewardTrainResult, out_dir: Union[str, "Path"]) -> Path:
    """Write model.safetensors, config.json, vocab.json and metrics.json into `out_dir`, atomically as a folder."""
    from cg4ctr_fast.fileio import atomic_dir

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        result.model.save(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
