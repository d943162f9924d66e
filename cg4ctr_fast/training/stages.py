"""A-stage against B-stage (the paper's open question 1), simulated: where should creative selection sit?

A request brings N candidate items (distinct, drawn from a pool of P products) and one user group (drawn by
the world's traffic shares, `World.group_traffic`). Every item has a bid (cost per click, `World.bid`). The ad
ranker orders the items by predicted CTR × bid and shows the top slot; revenue = bid × clicks (cost per click),
expected clicks = the oracle's true CTR of what is shown.

Nearline, every (item, group) holds C = 1 + K stored candidates: slot 0 is the original photo (always a
candidate), slots 1..K are creatives generated offline by the toy generator (prompts from the prompt model).
Each has a predicted CTR (the reward model, calibrated) and a true CTR (the world's oracle).

Arms (stage × predictor):
    photo       no creatives: the ranker scores each item's photo, the photo is shown (the reference)
    A           creative chosen per (item, group) before ranking: the predictor's best slot, the photo kept
                unless a creative scores strictly above it; the ranker orders items by the photo's
                prediction × bid (it sees only the original image); the winner is shown with its chosen creative
    B           the ranker scores each item with its best stored candidate: max over slots of prediction × bid;
                the winner is shown with that candidate (the same one A would show for that item)
    A_perfect,  the same with the oracle's true CTR as the prediction: an upper bound for each stage. B_perfect
    B_perfect   maximises expected revenue over every (item, candidate) pair of the request, so no arm beats it
                on any request

Online scoring cost per request: A (and photo) run the ranker on N candidates (the creative choice is a
nearline lookup); B runs it on N × C (every stored candidate of every item, for the request's group). The time
is measured with the reward model's head on stored image embeddings (DESIGN.md §10: image embeddings are
computed when a creative is stored, online ranking runs only the small head), one request at a time, A and B
interleaved on the same requests.

Uncertainty: requests share products, so the 95 % intervals come from a bootstrap over products that re-draws
the requests: each resample draws P products with replacement from each seed's pool, draws fresh requests on
that pool, serves every arm on those same requests (paired) and sums over seeds; the interval is the 2.5 and
97.5 percentiles. Ratios (B/A, ...) are computed per resample, so they are paired too.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from cg4ctr_fast.errors import InputError

__all__ = [
    "ARMS", "STAGES", "RANKERS", "StageTable", "Requests", "Served", "draw_requests", "serve", "serve_arms",
    "totals", "bootstrap_arms", "noisy_oracle", "ranker_noise_sweep", "model_log_error", "ScoringBank", "time_scoring", "run_stages", "results_markdown", "plot_stages",
]

STAGES = ("photo", "A", "B")
RANKERS = ("model", "oracle")
# arm name → (stage, ranker)
ARMS = {"photo": ("photo", "model"), "A": ("A", "model"), "B": ("B", "model"),
        "A_perfect": ("A", "oracle"), "B_perfect": ("B", "oracle")}
METRICS = ("expected_clicks", "revenue", "sampled_clicks", "sampled_revenue")
# (numerator, denominator): paired ratios reported with their CIs
RATIOS = (("B", "A"), ("B_perfect", "A_perfect"), ("A", "photo"), ("B", "photo"), ("B_perfect", "B"))
CACHE_DIR = "cache"
RESULT_FILES = frozenset({CACHE_DIR, "results.json", "results.md", "results.png"})
TABLE_FORMAT = 1  # bump when a cached table's content changes meaning
# Rankers of known quality for the sweep: log-normal noise on the oracle's CTR (sigma = 0: the perfect ranker).
SWEEP_SIGMAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
SWEEP_NOISE_DRAWS = 8


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class StageTable:
    """The stored candidates of one product pool.

    item_ids: int64 [P]; bids: float64 [P] (cost per click, > 0); pred, true: float64 [P, G, C] in (0, 1],
    the predicted (reward model) and true (oracle) CTR of candidate slot c of item p shown to group g;
    slot 0 is the original photo. Raises InputError on inconsistent shapes or values outside those ranges.
    """

    item_ids: np.ndarray
    bids: np.ndarray
    pred: np.ndarray
    true: np.ndarray

    def __post_init__(self) -> None:
        pred, true = np.asarray(self.pred, np.float64), np.asarray(self.true, np.float64)
        bids = np.asarray(self.bids, np.float64)
        if pred.ndim != 3 or pred.shape != true.shape or pred.shape[2] < 1:
            raise InputError(f"stage table: pred and true must both be [P, G, C], got {pred.shape} and {true.shape}")
        if bids.shape != (pred.shape[0],) or np.asarray(self.item_ids).shape != (pred.shape[0],):
            raise InputError(f"stage table: one bid and one item id per product ({pred.shape[0]}), got "
                             f"{bids.shape} and {np.asarray(self.item_ids).shape}")
        if not (np.all(bids > 0) and np.all(np.isfinite(bids))):
            raise InputError("stage table: bids must be finite and > 0")
        for name, values in (("pred", pred), ("true", true)):
            if not (np.all(values >= 0) and np.all(values <= 1)):
                raise InputError(f"stage table: {name} CTRs must lie in [0, 1]")
        object.__setattr__(self, "pred", pred)
        object.__setattr__(self, "true", true)
        object.__setattr__(self, "bids", bids)
        object.__setattr__(self, "item_ids", np.asarray(self.item_ids, np.int64))

    @property
    def n_products(self) -> int:
        return int(self.pred.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.pred.shape[1])

    @property
    def n_slots(self) -> int:
        return int(self.pred.shape[2])

    def take(self, index: np.ndarray) -> "StageTable":
        """The pool made of products `index` (int [P'], repeats allowed: a bootstrap resample)."""
        return StageTable(self.item_ids[index], self.bids[index], self.pred[index], self.true[index])


@dataclass(frozen=True)
class Requests:
    """candidates: int64 [R, N], indices into a table's products, distinct within a row; groups: int64 [R];
    uniforms: float64 [R] in [0, 1), one per request, shared by every arm (a click is sampled when
    uniform < true CTR of what is shown: common random numbers, so sampled clicks are paired across arms)."""

    candidates: np.ndarray
    groups: np.ndarray
    uniforms: np.ndarray

    @property
    def n(self) -> int:
        return int(self.candidates.shape[0])


def draw_requests(n_products: int, traffic: np.ndarray, n_requests: int, n_candidates: int,
                  rng: np.random.Generator) -> Requests:
    """`n_requests` requests, each `n_candidates` distinct products of a pool of `n_products` (uniform) and
    one group drawn with probabilities `traffic` (float [G], ≥ 0, summing to 1).
    Raises InputError when n_candidates > n_products or any count is < 1."""
    if n_products < 1 or n_requests < 1 or n_candidates < 1:
        raise InputError("requests: products, requests and candidates must be ≥ 1")
    if n_candidates > n_products:
        raise InputError(f"requests: {n_candidates} candidates per request need a pool of at least as many products, "
                         f"the pool has {n_products}")
    p = np.asarray(traffic, np.float64)
    # Distinct candidates: the first N of a random permutation per row (argsort of uniforms).
    candidates = np.argsort(rng.random((n_requests, n_products)), axis=1)[:, :n_candidates].astype(np.int64)
    groups = rng.choice(len(p), size=n_requests, p=p / p.sum()).astype(np.int64)
    return Requests(candidates, groups, rng.random(n_requests))


@dataclass(frozen=True)
class Served:
    """What one arm shows for each request: winner: int64 [R] (index into the table's products), slot:
    int64 [R] (0 = photo), ctr: float64 [R] (true CTR of what is shown = expected clicks), revenue: float64 [R]
    (bid × ctr, expected), clicked: bool [R] (sampled), scored: candidates the ranker scored per request."""

    winner: np.ndarray
    slot: np.ndarray
    ctr: np.ndarray
    revenue: np.ndarray
    clicked: np.ndarray
    bid: np.ndarray
    scored: int


def _serve_gathered(stage: str, score: np.ndarray, true: np.ndarray, bids: np.ndarray, requests: Requests) -> Served:
    """score, true: [R, N, C] gathered for each request's candidates and group; bids: [R, N]."""
    rows = np.arange(requests.n)
    n, c = score.shape[1], score.shape[2]
    # The stored choice per (item, group): argmax takes the first of equals, and the photo sits in slot 0,
    # so the photo is kept unless a creative scores strictly above it (as metrics.pick_over_original).
    choice = np.argmax(score, axis=2)  # [R, N]
    if stage == "photo":
        rank, shown, scored = score[:, :, 0] * bids, np.zeros_like(choice), n
    elif stage == "A":
        rank, shown, scored = score[:, :, 0] * bids, choice, n
    elif stage == "B":
        rank, shown, scored = np.max(score, axis=2) * bids, choice, n * c
    else:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    winner = np.argmax(rank, axis=1)  # ties: the first candidate of the request
    slot = shown[rows, winner]
    ctr = true[rows, winner, slot]
    bid = bids[rows, winner]
    return Served(winner=requests.candidates[rows, winner], slot=slot, ctr=ctr, revenue=bid * ctr,
                  clicked=requests.uniforms < ctr, bid=bid, scored=scored)


def _gather(table: StageTable, requests: Requests) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if requests.candidates.size and (requests.candidates.max() >= table.n_products or requests.candidates.min() < 0):
        raise InputError("requests: a candidate index lies outside the table's products")
    if requests.groups.size and (requests.groups.max() >= table.n_groups or requests.groups.min() < 0):
        raise InputError("requests: a group index lies outside the table's groups")
    g = requests.groups[:, None]
    return table.pred[requests.candidates, g], table.true[requests.candidates, g], table.bids[requests.candidates]


def serve(table: StageTable, requests: Requests, stage: str, ranker: str = "model") -> Served:
    """Serve every request with `stage` ("photo", "A", "B") and `ranker` ("model": the reward model's predicted
    CTR; "oracle": the true CTR, a perfect ranker). See the module docstring for what each stage does."""
    if ranker not in RANKERS:
        raise ValueError(f"ranker must be one of {RANKERS}, got {ranker!r}")
    pred, true, bids = _gather(table, requests)
    return _serve_gathered(stage, pred if ranker == "model" else true, true, bids, requests)


def serve_arms(table: StageTable, requests: Requests, arms: Sequence[str] = tuple(ARMS)) -> dict[str, Served]:
    """`serve` for several arms (names of ARMS), gathering the table once."""
    pred, true, bids = _gather(table, requests)
    out = {}
    for arm in arms:
        stage, ranker = ARMS[arm]
        out[arm] = _serve_gathered(stage, pred if ranker == "model" else true, true, bids, requests)
    return out


def totals(served: Served) -> dict[str, float]:
    """Sums over the requests: expected clicks (Σ true CTR shown), expected revenue (Σ bid × true CTR),
    sampled clicks and their revenue."""
    return {"expected_clicks": float(served.ctr.sum()), "revenue": float(served.revenue.sum()),
            "sampled_clicks": float(served.clicked.sum()), "sampled_revenue": float((served.bid * served.clicked).sum())}


def _sum_arms(parts: Sequence[dict[str, Served]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for part in parts:
        for arm, served in part.items():
            acc = out.setdefault(arm, dict.fromkeys(METRICS, 0.0))
            for k, v in totals(served).items():
                acc[k] += v
    return out


def bootstrap_arms(tables: Sequence[StageTable], traffic: np.ndarray, n_requests: int, n_candidates: int, *,
                   resamples: int, seed: int, progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """The bootstrap distribution of every arm's totals: {arm: {metric: float64 [resamples]}}.

    Per resample and per table (a seed's product pool of P products): P products drawn with replacement,
    `n_requests` fresh requests on that pool, every arm served on the same requests; totals summed over the
    tables. The draws come from numpy's Generator seeded with `seed`."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    out = {arm: {m: np.empty(resamples) for m in METRICS} for arm in ARMS}
    for b in tqdm(range(resamples), desc="bootstrap", disable=not progress, leave=False):
        parts = []
        for table in tables:
            pool = table.take(rng.integers(0, table.n_products, table.n_products))
            requests = draw_requests(pool.n_products, traffic, n_requests, n_candidates, rng)
            parts.append(serve_arms(pool, requests))
        for arm, values in _sum_arms(parts).items():
            for m, v in values.items():
                out[arm][m][b] = v
    return out


def noisy_oracle(table: StageTable, sigma: float, noise: np.ndarray) -> StageTable:
    """The table with a ranker of known quality: pred = clip(true · exp(sigma · noise), 0, 1), noise float [P, G, C]
    (standard normal). sigma = 0 is the perfect ranker."""
    return StageTable(table.item_ids, table.bids, np.clip(table.true * np.exp(sigma * noise), 0.0, 1.0), table.true)


def _selection_lift(tables: Sequence[StageTable], traffic: np.ndarray) -> float:
    """Aggregate true-CTR lift of the predictor's pick (photo kept unless beaten) over the photo, every
    (table, product, group) cell weighted by its group's traffic share."""
    picked, photo, weight = 0.0, 0.0, 0.0
    for t in tables:
        choice = np.argmax(t.pred, axis=2)
        chosen = np.take_along_axis(t.true, choice[..., None], axis=2)[..., 0]
        picked += float((chosen * traffic[None]).sum())
        photo += float((t.true[..., 0] * traffic[None]).sum())
    return picked / photo - 1.0


def ranker_noise_sweep(tables: Sequence[StageTable], traffic: np.ndarray, sigmas: Sequence[float], n_requests: int,
                       n_candidates: int, *, resamples: int, seed: int, noise_draws: int = SWEEP_NOISE_DRAWS,
                       progress: bool = False) -> list[dict[str, Any]]:
    """B/A ratios (expected clicks, revenue) when the predictor is the oracle with multiplicative log-normal noise
    of standard deviation sigma (`noisy_oracle`): how good must the ranker be for B-stage to pay?

    A ranker of noise sigma is a random draw, so the point estimate averages B and A totals over `noise_draws`
    draws on each pool's seeded requests, and each bootstrap resample (products with replacement, requests
    re-drawn, as `bootstrap_arms`, A and B paired) draws its own noise: the interval covers products, requests
    and the noise. The same noise (scaled by sigma) serves every sigma. Also returns the selection lift of the
    noisy predictor (`_selection_lift`, mean over the draws) to set beside the reward model's. One dict per sigma."""
    from tqdm.auto import tqdm

    master = np.random.default_rng([seed, 0])
    draws = [[master.standard_normal(t.pred.shape) for t in tables] for _ in range(noise_draws)]
    boot_noise_seed = int(master.integers(2**62))
    out = []
    for sigma in tqdm(sigmas, desc="ranker noise sweep", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, 1])
        requests = [draw_requests(t.n_products, traffic, n_requests, n_candidates, rng) for t in tables]
        sums = {arm: dict.fromkeys(("expected_clicks", "revenue"), 0.0) for arm in ("A", "B")}
        lifts = []
        for noise in draws:
            noisy = [noisy_oracle(t, sigma, e) for t, e in zip(tables, noise)]
            lifts.append(_selection_lift(noisy, traffic))
            for arm, values in _sum_arms([serve_arms(t, r, ("A", "B")) for t, r in zip(noisy, requests)]).items():
                for m in sums[arm]:
                    sums[arm][m] += values[m]
        boot = {arm: {m: np.empty(resamples) for m in ("expected_clicks", "revenue")} for arm in ("A", "B")}
        noise_rng = np.random.default_rng(boot_noise_seed)  # the same noise stream for every sigma
        for b in range(resamples):
            parts = []
            for t in tables:
                index = rng.integers(0, t.n_products, t.n_products)
                pool = noisy_oracle(t, sigma, noise_rng.standard_normal(t.pred.shape)).take(index)
                parts.append(serve_arms(pool, draw_requests(pool.n_products, traffic, n_requests, n_candidates, rng),
                                        ("A", "B")))
            for arm, values in _sum_arms(parts).items():
                for m in ("expected_clicks", "revenue"):
                    boot[arm][m][b] = values[m]
        entry: dict[str, Any] = {"sigma": float(sigma), "selection_lift": float(np.mean(lifts))}
        for m in ("expected_clicks", "revenue"):
            entry[m] = {"ratio": sums["B"][m] / sums["A"][m], "ci95": _interval(boot["B"][m] / boot["A"][m])}
        out.append(entry)
    return out


def model_log_error(tables: Sequence[StageTable]) -> float:
    """The reward model's error on the sweep's scale: the standard deviation of log(pred / true) over every
    (product, slot) after removing each (seed, group)'s mean (a per-group offset does not change a ranking)."""
    residuals = []
    for t in tables:
        r = np.log(np.maximum(t.pred, 1e-12)) - np.log(np.maximum(t.true, 1e-12))
        residuals.append((r - r.mean(axis=(0, 2), keepdims=True)).ravel())
    return float(np.std(np.concatenate(residuals)))


def _interval(values: np.ndarray) -> list[float]:
    finite = values[np.isfinite(values)]
    return [float(v) for v in np.quantile(finite, (0.025, 0.975))] if len(finite) else [math.nan, math.nan]


# ------------------------------------------------------------------------------------------------ online cost
@dataclass(frozen=True)
class ScoringBank:
    """What the online ranker reads per candidate, stored nearline.

    embeddings: float32 [P, G, C, D] (the reward model's image embedding of slot c; the photo's repeats over
    groups); title_ids: int64 [P, Lt]; caption_ids: int64 [P, G, C, Lc]; group_features: float32 [G, Dg]."""

    embeddings: Any
    title_ids: Any
    caption_ids: Any
    group_features: Any


def _score_request(reward, bank: ScoringBank, candidates, group: int, all_slots: bool):
    import torch

    cand = torch.as_tensor(candidates)
    if all_slots:
        emb = bank.embeddings[cand, group].reshape(-1, bank.embeddings.shape[-1])
        captions = bank.caption_ids[cand, group].reshape(-1, bank.caption_ids.shape[-1])
        titles = bank.title_ids[cand].repeat_interleave(bank.embeddings.shape[2], dim=0)
    else:
        emb = bank.embeddings[cand, group, 0]
        captions = bank.caption_ids[cand, group, 0]
        titles = bank.title_ids[cand]
    return reward.score(emb, titles, captions, bank.group_features[group:group + 1])


def time_scoring(reward, bank: ScoringBank, requests: Requests, *, warmup: int = 20) -> dict[str, np.ndarray]:
    """Wall time (ms, float64 [R]) of the online ranker's scoring for each request, per stage.

    "A": the reward head on the N photos' stored embeddings; "B": on all N × C stored candidates. Each time
    covers the gather of the stored tensors and the head's forward (torch.inference_mode), one request per call,
    A and B interleaved on the same request so that load on the machine hits both alike. `warmup` requests
    run first, untimed. Torch's thread count is the caller's (the CLI sets it)."""
    import torch

    reward.eval()
    out = {"A": np.empty(requests.n), "B": np.empty(requests.n)}
    with torch.inference_mode():
        for r in range(min(warmup, requests.n)):
            for all_slots in (False, True):
                _score_request(reward, bank, requests.candidates[r], int(requests.groups[r]), all_slots)
        for r in range(requests.n):
            for stage, all_slots in (("A", False), ("B", True)):
                started = time.perf_counter()
                _score_request(reward, bank, requests.candidates[r], int(requests.groups[r]), all_slots)
                out[stage][r] = (time.perf_counter() - started) * 1e3
    return out


def _mean_ci(values: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return {"mean": float(values.mean()), "ci95": _interval(means), "p50": float(np.median(values)),
            "p95": float(np.quantile(values, 0.95))}


# ------------------------------------------------------------------------------------------------ the stored creatives
def _models_digest(paths: dict[str, str]) -> str:
    """sha256 over the four model folders' content hashes (`export.manifest.folder_sha256`): a cached table is
    reused only with the very models that made it."""
    from cg4ctr_fast.export.manifest import folder_sha256

    digest = hashlib.sha256()
    for name in ("world", "generator", "reward", "prompt"):
        digest.update(f"{name}\0{folder_sha256(paths[name])}\n".encode())
    return digest.hexdigest()


def _item_key(models_digest: str, seed: int, item_id: int, settings: dict[str, Any]) -> str:
    text = json.dumps({"format": TABLE_FORMAT, "models": models_digest, "seed": seed, "item": item_id, **settings},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _generate_item(ctx, item_id: int, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Generate, score and embed one product's stored candidates for every group (one batched call)."""
    import torch

    from cg4ctr_fast.pipeline import derive_seed
    from cg4ctr_fast.training.cycle import generate_for_groups, score_originals

    started = time.perf_counter()
    world, reward = ctx.world, ctx.reward
    n_groups, per = len(ctx.group_ids), settings["prompts_per_group"]
    item = np.repeat(ctx.item_features(item_id)[None], n_groups * per, axis=0)
    groups = np.repeat(ctx.group_features, per, axis=0)
    sampler = torch.Generator().manual_seed(derive_seed(seed, "stages-propose", item_id) % (2**63))
    proposals = ctx.prompt_model.propose(groups, item, top_p=settings["top_p"], sample=True, generator=sampler)
    group_prompts = [proposals[g * per:(g + 1) * per] for g in range(n_groups)]
    rows = generate_for_groups(ctx, item_id, group_prompts, images_per_prompt=settings["images_per_prompt"],
                               steps=settings["steps"], seed=derive_seed(seed, "stages-generate", item_id))
    k = per * settings["images_per_prompt"]
    product = world.product(item_id)
    slots = 1 + k
    pred = np.empty((n_groups, slots))
    true = np.empty((n_groups, slots))
    pred[:, 0] = score_originals(ctx, item_id)
    photo_true = world.true_ctr_groups(product.image, item_id=item_id)
    true[:, 0] = [photo_true[gid] for gid in ctx.group_ids]
    prompts: list[list[str]] = [[] for _ in range(n_groups)]
    images: list[list[Any]] = [[] for _ in range(n_groups)]
    for row in rows:
        g = row["group"]
        images[g].append(row["image"])
        prompts[g].append(row["prompt"])
        pred[g, len(images[g])] = row["reward"]
        true[g, len(images[g])] = world.true_ctr(row["image"], ctx.group_ids[g], item_id=item_id)
    if any(len(x) != k for x in images):
        raise RuntimeError(f"item {item_id}: expected {k} creatives per group, got {[len(x) for x in images]}")
    with torch.inference_mode():
        flat = [product.image] + [im for group in images for im in group]
        emb = reward.embed_images(reward.prepare_images(flat)).float()
        embeddings = torch.empty((n_groups, slots, emb.shape[1]))
        embeddings[:, 0] = emb[0]
        embeddings[:, 1:] = emb[1:].reshape(n_groups, k, -1)
        captions = [[""] + [p if ctx.config.generate.reward_sees_prompt else "" for p in prompts[g]]
                    for g in range(n_groups)]
        caption_ids = reward.encode_captions([c for group in captions for c in group])
        caption_ids = caption_ids.reshape(n_groups, slots, -1)
        title_ids = reward.encode_titles([product.title])[0]
        # The online path (stored embedding → head) must give the very score the table holds.
        check = reward.score(embeddings.reshape(n_groups * slots, -1), title_ids[None],
                             caption_ids.reshape(n_groups * slots, -1),
                             torch.as_tensor(np.repeat(ctx.group_features, slots, axis=0)))
    gap = float(np.max(np.abs(check.numpy().reshape(n_groups, slots) - pred)))
    if gap > 1e-5:
        raise RuntimeError(f"item {item_id}: the head on stored embeddings differs from score_images by {gap:.2e}")
    return {"pred": pred, "true": true, "embeddings": embeddings.numpy(), "caption_ids": caption_ids.numpy(),
            "title_ids": title_ids.numpy(), "prompts": prompts, "seconds": time.perf_counter() - started}


def _load_item(path: Path, key: str) -> Optional[dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            meta = handle.metadata() or {}
        if meta.get("key") != key:
            return None
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged cache file is regenerated
    return {**data, "prompts": json.loads(meta["prompts"]), "seconds": float(meta["seconds"]), "cached": True}


def _save_item(path: Path, key: str, item: dict[str, Any]) -> None:
    from safetensors.numpy import save

    from cg4ctr_fast.fileio import atomic_write_bytes

    tensors = {k: np.ascontiguousarray(item[k]) for k in ("pred", "true", "embeddings", "caption_ids", "title_ids")}
    meta = {"key": key, "prompts": json.dumps(item["prompts"]), "seconds": repr(item["seconds"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=meta))


def build_pool(ctx, item_ids: Sequence[int], *, seed: int, settings: dict[str, Any], cache: Path, models_digest: str,
               progress: bool = False) -> tuple[StageTable, dict[str, np.ndarray], dict[str, Any]]:
    """The stored candidates of products `item_ids`: each generated once and cached in `cache` (one safetensors
    file per product, written atomically; reused when its key — models, seed, item, settings — matches).
    Returns the StageTable, the arrays of the scoring bank and build stats (seconds per product, cache hits)."""
    from tqdm.auto import tqdm

    items, hits, seconds = [], 0, []
    for item_id in tqdm(item_ids, desc=f"seed {seed}: creatives", disable=not progress, leave=False):
        key = _item_key(models_digest, seed, item_id, settings)
        path = cache / f"seed_{seed}" / f"item_{item_id}.safetensors"
        item = _load_item(path, key)
        if item is None:
            item = _generate_item(ctx, item_id, seed, settings)
            _save_item(path, key, item)
        else:
            hits += 1
        seconds.append(item["seconds"])
        items.append(item)
    table = StageTable(np.asarray(item_ids), np.array([ctx.world.bid(i) for i in item_ids]),
                       np.stack([x["pred"] for x in items]), np.stack([x["true"] for x in items]))
    bank = {k: np.stack([x[k] for x in items]) for k in ("embeddings", "caption_ids", "title_ids")}
    prompts = [x["prompts"] for x in items]
    return table, bank, {"generate_seconds_per_product": seconds, "cache_hits": hits, "prompts": prompts}


# ------------------------------------------------------------------------------------------------ diagnostics
def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def reward_quality(tables: Sequence[StageTable], traffic: np.ndarray) -> dict[str, Any]:
    """How well the reward model does the two jobs the stages give it, over every (seed, item, group) cell:
    selection (its pick against the photo, in true CTR) and ranking (Spearman correlation, within a group
    and a seed, between predicted and true CTR across items — of the photos for A, of the best stored
    candidates for B — and of predicted × bid against true × bid, the ranker's actual key)."""
    from cg4ctr_fast.training.metrics import aggregate_ctr_lift

    picked_true, oracle_true, photo_true, weights, clusters, replaced, better = [], [], [], [], [], [], []
    rho = {"photo": [], "best": [], "photo_x_bid": [], "best_x_bid": []}
    for s, t in enumerate(tables):
        choice = np.argmax(t.pred, axis=2)  # [P, G]
        chosen_true = np.take_along_axis(t.true, choice[..., None], axis=2)[..., 0]
        for g in range(t.n_groups):
            picked_true += list(chosen_true[:, g])
            oracle_true += list(t.true[:, g].max(axis=1))
            photo_true += list(t.true[:, g, 0])
            weights += [float(traffic[g])] * t.n_products
            clusters += [(s, int(i)) for i in t.item_ids]
            replaced += list(choice[:, g] > 0)
            better += list(chosen_true[:, g] > t.true[:, g, 0])
            best_pred = t.pred[:, g].max(axis=1)
            best_true = chosen_true[:, g]
            rho["photo"].append(_spearman(t.pred[:, g, 0], t.true[:, g, 0]))
            rho["best"].append(_spearman(best_pred, best_true))
            rho["photo_x_bid"].append(_spearman(t.pred[:, g, 0] * t.bids, t.true[:, g, 0] * t.bids))
            rho["best_x_bid"].append(_spearman(best_pred * t.bids, best_true * t.bids))
    replaced_a, better_a = np.array(replaced), np.array(better)
    model = aggregate_ctr_lift(picked_true, photo_true, weights, clusters=clusters, seed=3)
    oracle = aggregate_ctr_lift(oracle_true, photo_true, weights, clusters=clusters, seed=3)
    return {
        "cells": len(picked_true),
        "photo_replaced_share": float(replaced_a.mean()),
        "replacement_truly_better_share": float(better_a[replaced_a].mean()) if replaced_a.any() else math.nan,
        "selection_aggregate_lift_model": model.to_dict(),
        "selection_aggregate_lift_oracle": oracle.to_dict(),
        "spearman_within_group": {k: float(np.nanmean(v)) for k, v in rho.items()},
    }


# ------------------------------------------------------------------------------------------------ the run
def check_out(out: Path) -> None:
    """--out may be new, empty, or a folder this command wrote before (its cache is then reused)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in RESULT_FILES)
        if foreign:
            raise InputError(f"{out}: not a `cg4ctr-sim stages` folder (it holds {', '.join(foreign[:3])}); "
                             "choose another --out")


def check_settings(*, products: int, candidates: int, requests: int, seeds: Sequence[int], prompts_per_group: int,
                   images_per_prompt: int, steps: int, resamples: int, timed_requests: int) -> None:
    """Raises InputError (one line) for a setting the run cannot use."""
    for name, value, low in (("--products", products, 1), ("--candidates", candidates, 1),
                             ("--requests", requests, 1), ("--prompts-per-group", prompts_per_group, 1),
                             ("--images-per-prompt", images_per_prompt, 1), ("--steps", steps, 1),
                             ("--resamples", resamples, 20), ("--timed-requests", timed_requests, 1)):
        if value < low:
            raise InputError(f"{name} must be ≥ {low}, got {value}")
    if candidates > products:
        raise InputError(f"--candidates ({candidates}) cannot exceed --products ({products}): a request's "
                         "candidates are distinct products of the pool")
    if not seeds:
        raise InputError("--seeds needs at least one seed")
    if any(s < 0 for s in seeds):
        raise InputError(f"--seeds must be non-negative integers, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must be distinct, got {list(seeds)}")


def pool_items(seed: int, products: int) -> list[int]:
    """A seed's product pool: held-out products (never in the reward model's logs), a different block per seed."""
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE

    start = HELD_OUT_ITEM_BASE + seed * products
    return list(range(start, start + products))


def run_stages(out: str | Path, *, products: int = 16, candidates: int = 8, requests: int = 2000,
               seeds: Sequence[int] = (0,), prompts_per_group: int = 2, images_per_prompt: int = 2, steps: int = 15,
               resamples: int = 1000, timed_requests: int = 300, model_paths: Optional[dict[str, str]] = None,
               progress: bool = True, log: Callable[[str], Any] = print, command: Optional[str] = None) -> dict[str, Any]:
    """Build (or reuse) the stored creatives, serve every arm, bootstrap, time the scoring; write results.json,
    results.md and results.png into `out` (atomically, each) and return the results. See the module docstring.
    Raises InputError for bad settings or an `out` that is not this command's folder (before any work)."""
    import torch

    from cg4ctr_fast.fileio import atomic_write_bytes
    from cg4ctr_fast.pipeline import derive_seed
    from cg4ctr_fast.training.cycle import build_context, resolve_models
    from cg4ctr_fast.training.cycle_config import CycleConfig

    check_settings(products=products, candidates=candidates, requests=requests, seeds=seeds,
                   prompts_per_group=prompts_per_group, images_per_prompt=images_per_prompt, steps=steps,
                   resamples=resamples, timed_requests=timed_requests)
    out = Path(out)
    check_out(out)
    started = time.perf_counter()
    # No LoRA adapter and no training: the cycle's context is used read-only, for its loaded models.
    config = CycleConfig().replace(run={"update_lora": False, "update_prompt": False})
    paths = model_paths or resolve_models(config, log=log)
    ctx = build_context(config, log=log, model_paths=paths)
    settings = {"prompts_per_group": prompts_per_group, "images_per_prompt": images_per_prompt, "steps": steps,
                "guidance": config.generate.guidance, "top_p": config.generate.top_p,
                "reward_sees_prompt": config.generate.reward_sees_prompt}
    digest = _models_digest(paths)
    traffic = np.array([ctx.world.group_traffic()[g] for g in ctx.group_ids])
    out.mkdir(parents=True, exist_ok=True)
    tables, banks, builds = [], [], []
    for seed in seeds:
        table, bank, build = build_pool(ctx, pool_items(seed, products), seed=seed, settings=settings,
                                        cache=out / CACHE_DIR, models_digest=digest, progress=progress)
        tables.append(table)
        banks.append(bank)
        builds.append(build)
        log(f"[stages] seed {seed}: {products} products ready ({build['cache_hits']} from the cache, "
            f"{np.mean(build['generate_seconds_per_product']):.1f} s per product to generate)")
    # The point estimate: each seed's own pool and its own requests.
    point_requests = [draw_requests(products, traffic, requests, candidates,
                                    np.random.default_rng(derive_seed(seed, "stages-requests") % (2**63)))
                      for seed in seeds]
    parts = [serve_arms(t, r) for t, r in zip(tables, point_requests)]
    point = _sum_arms(parts)
    total_requests = requests * len(seeds)
    boot = bootstrap_arms(tables, traffic, requests, candidates, resamples=resamples,
                          seed=derive_seed(*seeds, "stages-bootstrap") % (2**63), progress=progress)
    arms: dict[str, Any] = {}
    for arm, (stage, ranker) in ARMS.items():
        arms[arm] = {"stage": stage, "ranker": ranker,
                     "candidates_scored_per_request": parts[0][arm].scored}
        for m in METRICS:
            arms[arm][m] = {"total": point[arm][m], "ci95": _interval(boot[arm][m]),
                            "per_1000_requests": point[arm][m] * 1000 / total_requests}
    ratios = {}
    for num, den in RATIOS:
        entry = {}
        for m in ("expected_clicks", "revenue"):
            entry[m] = {"ratio": point[num][m] / point[den][m],
                        "ci95": _interval(boot[num][m] / boot[den][m])}
        entry["winner_differs_share"] = float(np.mean(np.concatenate(
            [p[num].winner != p[den].winner for p in parts])))
        entry["revenue_higher_share"] = float(np.mean(np.concatenate(
            [p[num].revenue > p[den].revenue + 1e-15 for p in parts])))
        entry["revenue_lower_share"] = float(np.mean(np.concatenate(
            [p[num].revenue < p[den].revenue - 1e-15 for p in parts])))
        entry["per_seed"] = {str(seed): {m: totals(p[num])[m] / totals(p[den])[m] for m in ("expected_clicks", "revenue")}
                             for seed, p in zip(seeds, parts)}
        ratios[f"{num}/{den}"] = entry
    sweep = ranker_noise_sweep(tables, traffic, SWEEP_SIGMAS, requests, candidates,
                               resamples=max(20, resamples // 5), seed=derive_seed(*seeds, "stages-sweep") % (2**63),
                               progress=progress)
    # Online cost: the reward head on stored embeddings, one thread as set by the caller, A and B interleaved.
    timed = []
    for seed, bank, req in zip(seeds, banks, point_requests):
        n = max(1, timed_requests // len(seeds))
        sub = Requests(req.candidates[:n], req.groups[:n], req.uniforms[:n])
        torch_bank = ScoringBank(torch.as_tensor(bank["embeddings"]), torch.as_tensor(bank["title_ids"]),
                                 torch.as_tensor(bank["caption_ids"]),
                                 torch.as_tensor(ctx.group_features, dtype=torch.float32))
        timed.append(time_scoring(ctx.reward, torch_bank, sub))
    ms = {stage: np.concatenate([t[stage] for t in timed]) for stage in ("A", "B")}
    cost = {stage: {"candidates_scored_per_request": candidates * (1 if stage == "A" else tables[0].n_slots),
                    "ms_per_request": _mean_ci(ms[stage], resamples, seed=11)} for stage in ("A", "B")}
    rng = np.random.default_rng(12)
    idx = rng.integers(0, len(ms["A"]), (resamples, len(ms["A"])))
    cost["B/A"] = {"ms_ratio": float(ms["B"].mean() / ms["A"].mean()),
                   "ci95": _interval(ms["B"][idx].mean(axis=1) / ms["A"][idx].mean(axis=1)),
                   "timed_requests": int(len(ms["A"])), "torch_threads": torch.get_num_threads()}
    results = {
        "question": "A-stage (creative chosen before ranking, ranker sees the photo) against B-stage (ranker "
                    "scores each item with its best stored creative)",
        "command": command,
        "settings": {"products": products, "candidates": candidates, "requests_per_seed": requests,
                     "seeds": list(seeds), "groups": len(ctx.group_ids), "slots_per_item_group": tables[0].n_slots,
                     "resamples": resamples, "timed_requests": int(len(ms["A"])), **settings},
        "models": {k: str(v) for k, v in paths.items()}, "models_sha256": digest,
        "bids": {"formula": "BID_MEDIAN · exp(BID_SIGMA · z), z ~ N(0,1) from numpy Generator([world seed, 9, "
                            "item_id])", "median": _bid_constants()[0], "sigma": _bid_constants()[1],
                 "pool_mean": float(np.mean(np.concatenate([t.bids for t in tables])))},
        "traffic": traffic.tolist(),
        "arms": arms, "ratios": ratios, "cost": cost,
        "reward_quality": {**reward_quality(tables, traffic), "log_error_sd": model_log_error(tables)},
        "ranker_noise_sweep": {"sigmas": list(SWEEP_SIGMAS), "resamples": max(20, resamples // 5), "rows": sweep,
                               "noise_draws": SWEEP_NOISE_DRAWS,
                               "predictor": "clip(true CTR · exp(sigma · N(0, 1)), 0, 1), independent noise per "
                                            "(product, group, slot)"},
        "build": {"generate_seconds_per_product_mean": float(np.mean(np.concatenate(
                      [b["generate_seconds_per_product"] for b in builds]))),
                  "cache_hits": int(sum(b["cache_hits"] for b in builds)), "products": products * len(seeds)},
        "bootstrap": {"resamples": resamples, "unit": "products of each seed's pool, with replacement; requests "
                      "re-drawn on each resample; every arm served on the same requests (paired)", "level": 0.95},
        "seconds": time.perf_counter() - started,
        "torch_version": torch.__version__,
    }
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    atomic_write_bytes(out / "results.md", results_markdown(results).encode())
    try:
        atomic_write_bytes(out / "results.png", plot_stages(results))
    except ImportError:  # matplotlib is optional; the JSON and Markdown have everything
        pass
    return results


def _bid_constants() -> tuple[float, float]:
    from cg4ctr_fast.sim.world import BID_MEDIAN, BID_SIGMA

    return BID_MEDIAN, BID_SIGMA


ARM_LABELS = {"photo": "photo only", "A": "A-stage", "B": "B-stage", "A_perfect": "A-stage, perfect ranker",
              "B_perfect": "B-stage, perfect ranker"}


def _ci(cell: dict[str, Any], fmt: str) -> str:
    return f"{format(cell['total'], fmt)} [{format(cell['ci95'][0], fmt)}, {format(cell['ci95'][1], fmt)}]"


def results_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    n_req = s["requests_per_seed"] * len(s["seeds"])
    lines = ["# A-stage against B-stage (simulated)", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        f"Seeds {s['seeds']}: per seed a pool of {s['products']} held-out products, {s['requests_per_seed']} requests "
        f"of {s['candidates']} candidate items and one user group (by traffic share); {s['slots_per_item_group']} "
        f"stored candidates per (item, group): the photo + {s['prompts_per_group']} prompts × "
        f"{s['images_per_prompt']} images, {s['steps']} steps. Expected clicks = Σ true CTR of the shown creative; "
        "revenue = Σ bid × true CTR (cost per click). 95 % intervals: bootstrap over each seed's products with "
        f"requests re-drawn, {s['resamples']} resamples, all arms paired.", "",
        "| arm | expected clicks [95 % CI] | per 1000 requests | revenue [95 % CI] | per 1000 requests | "
        "sampled clicks [95 % CI] | candidates scored / request |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, cell in results["arms"].items():
        lines.append(f"| {ARM_LABELS[arm]} | {_ci(cell['expected_clicks'], '.1f')} | "
                     f"{cell['expected_clicks']['per_1000_requests']:.2f} | {_ci(cell['revenue'], '.1f')} | "
                     f"{cell['revenue']['per_1000_requests']:.2f} | {_ci(cell['sampled_clicks'], '.0f')} | "
                     f"{cell['candidates_scored_per_request']} |")
    lines += ["", f"Total requests: {n_req}.", "", "## Paired ratios", "",
              "| ratio | expected clicks [95 % CI] | revenue [95 % CI] | revenue per seed | winner differs | "
              "revenue higher / lower |",
              "|---|---|---|---|---|---|"]
    for name, r in results["ratios"].items():
        num, den = name.split("/")
        c, v = r["expected_clicks"], r["revenue"]
        per_seed = ", ".join(f"{x['revenue']:.3f}" for x in r["per_seed"].values())
        lines.append(f"| {ARM_LABELS[num]} / {ARM_LABELS[den]} | {c['ratio']:.4f} [{c['ci95'][0]:.4f}, "
                     f"{c['ci95'][1]:.4f}] | {v['ratio']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | "
                     f"{per_seed} | {r['winner_differs_share']:.1%} | {r['revenue_higher_share']:.1%} / {r['revenue_lower_share']:.1%} |")
    cost = results["cost"]
    lines += ["", "## Online scoring cost (reward head on stored embeddings)", "",
              f"{cost['B/A']['timed_requests']} requests timed one at a time, A and B interleaved, "
              f"{cost['B/A']['torch_threads']} torch thread(s); mean with a bootstrap 95 % CI over the timed requests.", "",
              "| stage | candidates scored / request | ms / request [95 % CI] | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for stage in ("A", "B"):
        c = cost[stage]
        m = c["ms_per_request"]
        lines.append(f"| {stage} | {c['candidates_scored_per_request']} | {m['mean']:.3f} [{m['ci95'][0]:.3f}, "
                     f"{m['ci95'][1]:.3f}] | {m['p50']:.3f} | {m['p95']:.3f} |")
    lines.append(f"| B/A | {cost['B']['candidates_scored_per_request'] / cost['A']['candidates_scored_per_request']:.1f}× "
                 f"| {cost['B/A']['ms_ratio']:.2f}× [{cost['B/A']['ci95'][0]:.2f}, {cost['B/A']['ci95'][1]:.2f}] | | |")
    q = results["reward_quality"]
    sel_m, sel_o = q["selection_aggregate_lift_model"], q["selection_aggregate_lift_oracle"]
    rho = q["spearman_within_group"]
    lines += ["", "## The reward model's two jobs", "",
              f"Selection over {q['cells']} (seed, item, group) cells: the photo replaced in "
              f"{q['photo_replaced_share']:.1%}, the replacement truly better in "
              f"{q['replacement_truly_better_share']:.1%}; aggregate true-CTR lift of its pick over the photo "
              f"{sel_m['lift']:+.1%} [{sel_m['ci95'][0]:+.1%}, {sel_m['ci95'][1]:+.1%}] (oracle's pick "
              f"{sel_o['lift']:+.1%} [{sel_o['ci95'][0]:+.1%}, {sel_o['ci95'][1]:+.1%}]).", "",
              "Ranking, Spearman ρ between predicted and true across the items of a pool, within a group "
              f"(mean over groups and seeds): photos {rho['photo']:.3f}, best stored candidates {rho['best']:.3f}; "
              f"with the bid multiplied in (the ranker's key): photos {rho['photo_x_bid']:.3f}, best candidates "
              f"{rho['best_x_bid']:.3f}.", ""]
    sweep = results["ranker_noise_sweep"]
    lines += ["## How good must the ranker be? B/A with a ranker of known quality", "",
              f"Predictor = {sweep['predictor']}; sigma = 0 is the perfect ranker. The reward model's own error on "
              f"this scale: sd of log(pred / true) after removing each group's mean = {q['log_error_sd']:.3f}. "
              f"Point: mean over {sweep['noise_draws']} noise draws; {sweep['resamples']} bootstrap resamples per "
              "sigma, each with its own noise.", "",
              "| sigma | B/A expected clicks [95 % CI] | B/A revenue [95 % CI] | selection lift over the photo |",
              "|---|---|---|---|"]
    for row in sweep["rows"]:
        c, v = row["expected_clicks"], row["revenue"]
        lines.append(f"| {row['sigma']:.2f} | {c['ratio']:.4f} [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}] | "
                     f"{v['ratio']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | {row['selection_lift']:+.1%} |")
    b_a = results["ratios"]["B/A"]
    lines.append(f"| reward model (sd {q['log_error_sd']:.3f}) | {b_a['expected_clicks']['ratio']:.4f} | "
                 f"{b_a['revenue']['ratio']:.4f} | {sel_m['lift']:+.1%} |")
    lines.append("")
    b = results["build"]
    lines += [f"Stored creatives: {b['products']} products, {b['generate_seconds_per_product_mean']:.1f} s per "
              f"product to generate (all groups in one batch), {b['cache_hits']} reused from the cache. "
              f"Run time {results['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_stages(results: dict[str, Any]) -> bytes:
    """Five panels: expected clicks and revenue per 1000 requests by arm, the paired ratios, the scoring time
    per request, B/A against the ranker's noise (the sweep). Error bars and bands: 95 % CIs. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    n_req = s["requests_per_seed"] * len(s["seeds"])
    arms = list(results["arms"])
    colors = {"photo": "#999999", "A": "#4C72B0", "B": "#DD8452", "A_perfect": "#A1C2E8", "B_perfect": "#F4C29B"}
    fig, axes = plt.subplots(1, 5, figsize=(21, 4.0))
    for ax, metric, title in ((axes[0], "expected_clicks", "expected clicks / 1000 requests"),
                              (axes[1], "revenue", "revenue / 1000 requests (CPC)")):
        vals = np.array([results["arms"][a][metric]["total"] for a in arms]) * 1000 / n_req
        lo = np.array([results["arms"][a][metric]["ci95"][0] for a in arms]) * 1000 / n_req
        hi = np.array([results["arms"][a][metric]["ci95"][1] for a in arms]) * 1000 / n_req
        ax.bar(range(len(arms)), vals, yerr=[vals - lo, hi - vals], color=[colors[a] for a in arms], capsize=3)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([ARM_LABELS[a].replace(", ", "\n") for a in arms], fontsize=7)
        ax.set_ylim(0, max(hi) * 1.05)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    names = [n for n in results["ratios"] if n in ("B/A", "B_perfect/A_perfect", "A/photo", "B/photo")]
    for k, metric in enumerate(("expected_clicks", "revenue")):
        vals = np.array([results["ratios"][n][metric]["ratio"] for n in names])
        lo = np.array([results["ratios"][n][metric]["ci95"][0] for n in names])
        hi = np.array([results["ratios"][n][metric]["ci95"][1] for n in names])
        x = np.arange(len(names)) + (k - 0.5) * 0.35
        ax.errorbar(x, vals, yerr=[vals - lo, hi - vals], fmt="o", capsize=3,
                    label="clicks" if metric == "expected_clicks" else "revenue")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_perfect", "*") for n in names], fontsize=8)
    ax.set_title("paired ratios (* = perfect ranker)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[3]
    cost = results["cost"]
    vals = np.array([cost[s_]["ms_per_request"]["mean"] for s_ in ("A", "B")])
    lo = np.array([cost[s_]["ms_per_request"]["ci95"][0] for s_ in ("A", "B")])
    hi = np.array([cost[s_]["ms_per_request"]["ci95"][1] for s_ in ("A", "B")])
    ax.bar([0, 1], vals, yerr=[vals - lo, hi - vals], color=[colors["A"], colors["B"]], capsize=3)
    ax.set_xticks([0, 1])
    ax.set_xticklabels([f"A ({cost['A']['candidates_scored_per_request']} scored)",
                        f"B ({cost['B']['candidates_scored_per_request']} scored)"], fontsize=8)
    ax.set_title("online scoring ms / request (reward head)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[4]
    sweep = results["ranker_noise_sweep"]
    sig = np.array([r["sigma"] for r in sweep["rows"]])
    for metric, label in (("expected_clicks", "clicks"), ("revenue", "revenue")):
        vals = np.array([r[metric]["ratio"] for r in sweep["rows"]])
        lo = np.array([r[metric]["ci95"][0] for r in sweep["rows"]])
        hi = np.array([r[metric]["ci95"][1] for r in sweep["rows"]])
        line, = ax.plot(sig, vals, "-o", ms=3, label=f"B/A {label}")
        ax.fill_between(sig, lo, hi, color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="k", lw=0.8)
    sd = results["reward_quality"]["log_error_sd"]
    ax.axvline(sd, color="grey", ls="--", lw=1, label="reward model's error")
    for metric, marker in (("expected_clicks", "*"), ("revenue", "P")):
        ax.plot([sd], [results["ratios"]["B/A"][metric]["ratio"]], marker, color="k", ms=8,
                label=f"reward model's B/A ({'clicks' if metric == 'expected_clicks' else 'revenue'})")
    ax.set_xlabel("ranker noise sigma (log-normal on true CTR)")
    ax.set_title("B/A against ranker quality", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from cg4ctr_fast.training.figures import png_bytes

    return png_bytes(fig)
