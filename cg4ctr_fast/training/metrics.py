"""CTR metrics on aggregated logs, and the Beta prior used to smooth CTRs.

Every metric takes one row per (creative, user group) with its predicted CTR or score, its clicks
and its impressions (counts summed over days), so a row stands for `impressions` Bernoulli trials of
which `clicks` succeeded.  All are small pure functions over numpy arrays; a metric that is
undefined on its input (no clicks, no pairs, ...) returns NaN rather than raising.

Smoothed CTR.  With a Beta(α, β) prior on a creative's CTR and `c` clicks in `n` impressions the
posterior mean is

    ctr_smooth = (c + α) / (n + α + β)

(the paper writes (c + α)/(n + β') with β' = α + β).  α and β are fitted to the training logs by
the method of moments, see `fit_beta_prior`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd

__all__ = [
    "BetaPrior",
    "fit_beta_prior",
    "smoothed_ctr",
    "auc",
    "logloss",
    "entropy",
    "ne",
    "calibration",
    "pairwise_accuracy",
    "uplift_at_k",
    "uplift_at_1",
    "uplift_at_5",
    "evaluate",
    "CtrLift",
    "aggregate_ctr_lift",
    "pick_over_original",
    "salient_region",
    "object_expansion",
]

_EPS = 1e-7


def _arrays(*values) -> list[np.ndarray]:
    arrays = [np.asarray(v, dtype=np.float64).reshape(-1) for v in values]
    if len({a.shape[0] for a in arrays}) > 1:
        raise ValueError(f"arrays of different lengths: {[a.shape[0] for a in arrays]}")
    return arrays


# --------------------------------------------------------------------------------------------
# Beta prior
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetaPrior:
    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def fit_beta_prior(clicks, impressions, *, max_strength: float = 1e6) -> BetaPrior:
    """Beta(α, β) prior of the per-row CTR, by the impression-weighted method of moments.

    With r_i = c_i / n_i, m = Σc / Σn and the weighted variance v = Σ n_i (r_i − m)² / Σn, the
    binomial noise contributes about k·m(1−m)/Σn to v (k = number of rows), so the spread of the
    true CTRs is  s² = v − k·m(1−m)/Σn.  Matching the Beta's mean and variance,

        α + β = m(1−m)/s² − 1,   α = m(α + β),   β = (1 − m)(α + β).

    α + β is clipped to [2, max_strength]: no visible spread beyond the binomial noise (s² ≤ 0)
    gives the strongest prior (every creative ≈ the mean); the lower bound keeps α, β > 0 sensible
    for tiny logs.  Rows with no impressions are ignored; with no clicks or no impressions at all,
    m is clipped into [1e-6, 1 − 1e-6].
    """
    c, n = _arrays(clicks, impressions)
    keep = n > 0
    c, n = c[keep], n[keep]
    total = n.sum()
    if total <= 0:
        return BetaPrior(1.0, 1.0)
    m = float(np.clip(c.sum() / total, 1e-6, 1 - 1e-6))
    r = c / n
    v = float(np.sum(n * (r - m) ** 2) / total)
    spread = v - len(n) * m * (1 - m) / total
    strength = max_strength if spread <= 0 else m * (1 - m) / spread - 1.0
    strength = float(np.clip(strength, 2.0, max_strength))
    return BetaPrior(m * strength, (1 - m) * strength)


def smoothed_ctr(clicks, impressions, prior: BetaPrior) -> np.ndarray:
    """(clicks + α) / (impressions + α + β), elementwise."""
    c, n = _arrays(clicks, impressions)
    return (c + prior.alpha) / (n + prior.alpha + prior.beta)


# --------------------------------------------------------------------------------------------
# Point metrics: AUC, logloss, NE, calibration
# --------------------------------------------------------------------------------------------


def auc(pred, clicks, impressions) -> float:
    """Impression-weighted ROC AUC.

    Row i contributes c_i positives (clicks) and n_i − c_i negatives (impressions without a click),
    all at score pred_i.  AUC = P(score of a random positive > that of a random negative), ties
    counting 1/2.  NaN without positives or negatives.
    """
    p, c, n = _arrays(pred, clicks, impressions)
    neg = n - c
    total_pos, total_neg = c.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    values, inverse = np.unique(p, return_inverse=True)
    pos_u = np.bincount(inverse, weights=c, minlength=len(values))
    neg_u = np.bincount(inverse, weights=neg, minlength=len(values))
    neg_below = np.cumsum(neg_u) - neg_u
    return float(np.sum(pos_u * (neg_below + 0.5 * neg_u)) / (total_pos * total_neg))


def logloss(pred, clicks, impressions) -> float:
    """Mean binary cross-entropy per impression: −Σ[c log p + (n−c) log(1−p)] / Σn (p clipped to [1e-7, 1−1e-7])."""
    p, c, n = _arrays(pred, clicks, impressions)
    total = n.sum()
    if total <= 0:
        return float("nan")
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.sum(c * np.log(p) + (n - c) * np.log1p(-p)) / total)


def entropy(p: float) -> float:
    """Binary entropy in nats; 0 at p ∈ {0, 1}."""
    if p <= 0 or p >= 1:
        return 0.0
    return float(-(p * math.log(p) + (1 - p) * math.log1p(-p)))


def ne(pred, clicks, impressions) -> float:
    """Normalized entropy: logloss / entropy(base CTR), base CTR = Σc / Σn.

    1 for a predictor that always says the base CTR; lower is better.  NaN when the base CTR is 0 or 1.
    """
    _, c, n = _arrays(pred, clicks, impressions)
    total = n.sum()
    if total <= 0:
        return float("nan")
    h = entropy(c.sum() / total)
    if h <= 0:
        return float("nan")
    return logloss(pred, clicks, impressions) / h


def calibration(pred, clicks, impressions) -> float:
    """Predicted clicks / observed clicks = Σ p·n / Σ c (1 is perfect; NaN without clicks)."""
    p, c, n = _arrays(pred, clicks, impressions)
    observed = c.sum()
    if observed <= 0:
        return float("nan")
    return float(np.sum(p * n) / observed)


# --------------------------------------------------------------------------------------------
# Ranking metrics within lists (one item for one user group)
# --------------------------------------------------------------------------------------------


def _lists(list_ids) -> list[np.ndarray]:
    """Row indices of each list, lists in order of first appearance, rows in input order."""
    if isinstance(list_ids, (np.ndarray, pd.Series, pd.Index)) and np.ndim(list_ids) == 1:
        ids = list_ids
    else:  # a list of scalars or of tuples such as (item, group)
        ids = pd.Series(list(list_ids), dtype=object)
    codes = np.asarray(pd.factorize(ids)[0])
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds) if len(order) else []


def pairwise_accuracy(scores, targets, list_ids) -> float:
    """Fraction of creative pairs, within the same list, that the scores order like the targets.

    Only pairs whose targets (e.g. smoothed CTRs) differ count; a score tie counts 1/2.  `list_ids`
    names each row's list (one item for one user group).  NaN when there is no such pair.
    """
    s, t = _arrays(scores, targets)
    agree = 0.0
    pairs = 0
    for rows in _lists(list_ids):
        if len(rows) < 2:
            continue
        ds = s[rows][:, None] - s[rows][None, :]
        dt = t[rows][:, None] - t[rows][None, :]
        upper = np.triu(np.ones((len(rows), len(rows)), dtype=bool), 1) & (dt != 0)
        pairs += int(upper.sum())
        agree += float(np.sum((np.sign(ds) == np.sign(dt))[upper]) + 0.5 * np.sum((ds == 0)[upper]))
    return agree / pairs if pairs else float("nan")


def uplift_at_k(scores, clicks, impressions, list_ids, k: int, *, weighted: bool = False) -> float:
    """The paper's replay uplift@k: how much better the top-k creatives by score did in the logs.

    For each list (one item for one user group) with more than k creatives and at least one click:
    pool the clicks and impressions of the k highest-scoring creatives (ties broken by row order),
    uplift = CTR(top-k pool) / CTR(all creatives of the list pooled) − 1.  Lists with k or fewer
    creatives are skipped (their top-k is the whole list: uplift 0 by construction).
    Average over lists: plain mean (default), or weighted by each list's impressions.
    NaN when no list qualifies.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    s, c, n = _arrays(scores, clicks, impressions)
    values, weights = [], []
    for rows in _lists(list_ids):
        if len(rows) <= k:
            continue
        base_n, base_c = n[rows].sum(), c[rows].sum()
        if base_n <= 0 or base_c <= 0:
            continue
        top = rows[np.argsort(-s[rows], kind="stable")[:k]]
        top_n = n[top].sum()
        if top_n <= 0:
            continue
        values.append((c[top].sum() / top_n) / (base_c / base_n) - 1.0)
        weights.append(base_n)
    if not values:
        return float("nan")
    return float(np.average(values, weights=weights if weighted else None))


def uplift_at_1(scores, clicks, impressions, list_ids, *, weighted: bool = False) -> float:
    return uplift_at_k(scores, clicks, impressions, list_ids, 1, weighted=weighted)


def uplift_at_5(scores, clicks, impressions, list_ids, *, weighted: bool = False) -> float:
    return uplift_at_k(scores, clicks, impressions, list_ids, 5, weighted=weighted)


def evaluate(pred, scores, clicks, impressions, list_ids: Sequence, prior: BetaPrior) -> dict:
    """All metrics for one split: calibrated CTR `pred` for the point metrics, `scores` for ranking."""
    _, _, n = _arrays(pred, clicks, impressions)
    c = np.asarray(clicks, dtype=np.float64)
    return {
        "auc": auc(pred, clicks, impressions),
        "logloss": logloss(pred, clicks, impressions),
        "ne": ne(pred, clicks, impressions),
        "calibration": calibration(pred, clicks, impressions),
        "pairwise_accuracy": pairwise_accuracy(scores, smoothed_ctr(clicks, impressions, prior), list_ids),
        "uplift_at_1": uplift_at_1(scores, clicks, impressions, list_ids),
        "uplift_at_5": uplift_at_5(scores, clicks, impressions, list_ids),
        "rows": int(len(n)),
        "impressions": float(n.sum()),
        "clicks": float(c.sum()),
        "base_ctr": float(c.sum() / n.sum()) if n.sum() > 0 else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# A/B-test lift: aggregate CTR, as an A/B test measures it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtrLift:
    """The result of `aggregate_ctr_lift`; every rate is a fraction (0.03 = 3 %), lifts are relative (−0.02 = −2 %)."""

    lift: float  # aggregate CTR(treatment) / aggregate CTR(control) − 1: the headline number
    ci95: tuple[float, float]  # cluster-bootstrap percentile interval of `lift` (NaN, NaN without clusters)
    treatment_ctr: float  # Σ w·t / Σ w
    control_ctr: float  # Σ w·c / Σ w
    mean_of_ratios: float  # mean over cells of t/c − 1, unweighted: secondary, over-weights small cells
    mean_of_ratios_ci95: tuple[float, float]
    cells: int
    clusters: int

    def to_dict(self) -> dict:
        return {"lift": self.lift, "ci95": list(self.ci95), "treatment_ctr": self.treatment_ctr,
                "control_ctr": self.control_ctr, "mean_of_ratios": self.mean_of_ratios,
                "mean_of_ratios_ci95": list(self.mean_of_ratios_ci95), "cells": self.cells,
                "clusters": self.clusters}


def aggregate_ctr_lift(treatment_ctr, control_ctr, weights=None, *, clusters: Optional[Sequence] = None,
                       resamples: int = 2000, level: float = 0.95, seed: int = 0) -> CtrLift:
    """Aggregate-CTR lift of a treatment over a control, as an A/B test reports it, with a cluster bootstrap.

    One cell i per (group[, product][, seed]): its true CTR under the treatment t_i and under the control
    c_i, and its share of the traffic w_i (impressions; any positive scale, e.g. the world's group shares
    `World.group_traffic()[group]`).  With n_i = w_i·N impressions per cell, expected clicks are n_i·t_i, so

        aggregate CTR(arm) = Σ_i w_i·t_i / Σ_i w_i          (total clicks / total impressions)
        lift               = Σ_i w_i·t_i / Σ_i w_i·c_i − 1  (aggregate CTR(treatment) / aggregate CTR(control) − 1)

    (DESIGN.md §13).  The mean of per-cell ratios, mean_i(t_i / c_i − 1), is returned beside it as a
    secondary value only: it weights a group of 5 % of the traffic like one of 25 %, and a small group at
    +242 % can turn an aggregate −2 % into a "mean lift" of +26 %.

    Interval: `clusters` names each cell's cluster (e.g. (seed, product): the groups of one product share
    its images and noise, so they are not independent draws).  Each of `resamples` draws takes as many
    clusters as there are, with replacement, and recomputes both statistics over the cells they hold; the
    interval is the (1 − level)/2 and (1 + level)/2 percentiles.  Without `clusters` the intervals are NaN.

    Args: treatment_ctr, control_ctr: array-likes of n cells, values in (0, 1]; weights: n values ≥ 0,
    not all 0 (default: all 1).  Raises ValueError for different lengths, no cells, a control CTR ≤ 0,
    negative weights or weights summing to 0.
    """
    t, c = _arrays(treatment_ctr, control_ctr)
    w = np.ones_like(t) if weights is None else _arrays(weights, t)[0]
    if len(t) == 0:
        raise ValueError("aggregate_ctr_lift: no cells")
    if np.any(c <= 0) or not np.all(np.isfinite(t)) or not np.all(np.isfinite(c)):
        raise ValueError("aggregate_ctr_lift: control CTRs must be > 0 and every CTR finite")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("aggregate_ctr_lift: weights must be ≥ 0 and not all 0")
    lift = float(np.sum(w * t) / np.sum(w * c) - 1.0)
    ratios = t / c - 1.0
    ci, ratio_ci, n_clusters = (math.nan, math.nan), (math.nan, math.nan), 0
    if clusters is not None:
        keys = list(clusters)
        if len(keys) != len(t):
            raise ValueError(f"aggregate_ctr_lift: {len(keys)} cluster labels for {len(t)} cells")
        ids = np.asarray(pd.factorize(pd.Series(keys, dtype=object))[0])
        n_clusters = int(ids.max()) + 1
        # Per-cluster sums: a draw's statistics are sums of its clusters' sums, so one matrix product each.
        wt = np.bincount(ids, weights=w * t, minlength=n_clusters)
        wc = np.bincount(ids, weights=w * c, minlength=n_clusters)
        rs = np.bincount(ids, weights=ratios, minlength=n_clusters)
        ns = np.bincount(ids, minlength=n_clusters).astype(np.float64)
        draws = np.random.default_rng(seed).integers(0, n_clusters, size=(resamples, n_clusters))
        rows = np.repeat(np.arange(resamples), n_clusters) * n_clusters
        counts = np.bincount(rows + draws.ravel(), minlength=resamples * n_clusters).reshape(resamples, n_clusters)
        counts = counts.astype(np.float64)  # counts[r, k]: how often draw r took cluster k
        with np.errstate(divide="ignore", invalid="ignore"):
            lifts = (counts @ wt) / (counts @ wc) - 1.0
        mors = (counts @ rs) / (counts @ ns)
        lifts = lifts[np.isfinite(lifts)]  # a draw of only zero-weight clusters has no aggregate
        q = ((1 - level) / 2, (1 + level) / 2)
        ci = tuple(float(v) for v in np.quantile(lifts, q)) if len(lifts) else ci
        ratio_ci = tuple(float(v) for v in np.quantile(mors, q))
    return CtrLift(lift=lift, ci95=ci, treatment_ctr=float(np.sum(w * t) / w.sum()),
                   control_ctr=float(np.sum(w * c) / w.sum()), mean_of_ratios=float(ratios.mean()),
                   mean_of_ratios_ci95=ratio_ci, cells=int(len(t)), clusters=n_clusters)


def pick_over_original(rewards: Sequence[float], original_reward: float, *,
                       expansions: Optional[Sequence[float]] = None,
                       max_expansion: Optional[float] = None) -> Optional[int]:
    """Which candidate to show: the index of the highest reward, or None (show the original image) unless that
    reward is strictly above the original's.  The original is always a candidate, so a pick can only replace
    it when the reward model prefers the creative; ties and an empty list keep the original.  Ties among
    creatives go to the first (generation order).

    max_expansion (a fraction of the image in [0, 1], or None: no filter): creatives whose object expansion
    `expansions[i]` (see `object_expansion`) is above it are no candidates; a NaN expansion counts as above.
    Raises ValueError when max_expansion is given without one expansion per reward, or outside [0, 1]."""
    if len(rewards) == 0:
        return None
    values = np.asarray(rewards, dtype=np.float64)
    if max_expansion is not None:
        if not 0.0 <= float(max_expansion) <= 1.0:  # False for NaN too
            raise ValueError(f"max_expansion must be a fraction in [0, 1], got {max_expansion!r}")
        if expansions is None or len(expansions) != len(values):
            raise ValueError("max_expansion needs one expansion per reward")
        allowed = np.asarray(expansions, dtype=np.float64) <= float(max_expansion)  # NaN: not allowed
        if not allowed.any():
            return None
        values = np.where(allowed, values, -np.inf)
    best = int(np.argmax(values))
    return best if float(values[best]) > float(original_reward) else None


# --------------------------------------------------------------------------------------------
# Object expansion: does the output show more "product" than the input had?
# --------------------------------------------------------------------------------------------

SaliencyLike = Union["torch.nn.Module", Callable]  # noqa: F821 - torch is imported lazily


def _product_region(mask, shape: tuple[int, int], what: str) -> np.ndarray:
    """A product mask as an H x W bool array, True = product.

    bool arrays: True = product.  PIL images and integer arrays: diffusers' convention, < 128 = product
    (keep), >= 128 = background (repaint), as `Product.mask` and `Creative.mask` hold it."""
    from PIL import Image

    from cg4ctr_fast.errors import InputError

    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    array = np.asarray(mask)
    if array.ndim != 2:
        raise InputError(f"{what} must be 2-D (H x W), got shape {array.shape}")
    if array.shape != tuple(shape):
        raise InputError(f"{what} is {array.shape[1]}x{array.shape[0]} px, the output {shape[1]}x{shape[0]}")
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{what}: expected a bool array (True = product) or 8-bit mask (< 128 = product), "
                         f"got dtype {array.dtype}")
    return array < 128


def salient_region(saliency: SaliencyLike, image) -> np.ndarray:
    """Where the saliency net sees a product in `image`: H x W bool (True = salient), no dilation.

    saliency: a U2NetP (run by `predict_saliency` at its own `config.size`, thresholded at its
    `config.threshold`), or any callable image -> H x W array: bool (True = salient), or floats in [0, 1]
    thresholded at 0.5.  image: PIL image (converted to RGB).  Raises InputError when the callable returns
    another shape.
    """
    from PIL import Image

    from cg4ctr_fast.errors import InputError

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    image = image.convert("RGB")
    shape = (image.height, image.width)
    config = getattr(saliency, "config", None)
    if hasattr(saliency, "parameters") and config is not None:
        from cg4ctr_fast.models.saliency import predict_saliency

        return predict_saliency(saliency, image, size=config.size) >= config.threshold
    region = np.asarray(saliency(image))
    if region.shape != shape:
        raise InputError(f"saliency function returned shape {region.shape} for a {shape[1]}x{shape[0]} image")
    return region if region.dtype == np.bool_ else region >= 0.5


def object_expansion(saliency: SaliencyLike, output, input_mask) -> float:
    """Object expansion E: how much of the output the saliency net sees as product beyond the input's product.

        E = (area(S(output) ∪ M) − area(M)) / area(image) = |S(output) \ M| / (H·W)

    with S(output) the output's salient region (`salient_region`: the net run on the output, no dilation)
    and M the input's product mask.  Inpainting tends to grow the product's outline into the background
    (a ghost rim) or paint a second product; both are salient pixels outside M.  E is a fraction of the
    image in [0, 1]: 0 when nothing salient lies outside M (e.g. the output equals the input and M is the
    salient region the same net found on the input, as the pipeline's undilated saliency mask is).

    saliency: a U2NetP or a callable image -> H x W mask (see `salient_region`).
    output: PIL image (any mode; RGB is used) of H x W px.
    input_mask: H x W: a bool array (True = product), or a PIL "L" image / 8-bit array in diffusers'
        convention (< 128 = product kept, >= 128 = background), e.g. `Creative.mask` or `Product.mask`.
    Returns a Python float.  Raises InputError for a mask of another size or shape.
    """
    region = salient_region(saliency, output)
    product = _product_region(input_mask, region.shape, "input mask")
    return float(np.count_nonzero(region & ~product)) / float(region.size)
