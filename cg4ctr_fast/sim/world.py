"""The synthetic ad world: products, user groups with hidden preferences, a click model and an oracle.

Everything is a deterministic function of (seed, config): products, groups, hidden preferences, the
standardisation statistics and the interaction noise are regenerated from the seed, never stored, so
`World.from_json(world.to_json())` is the identical world. Random streams are numpy Generators seeded
with `[seed, stream, ...]` lists (numpy's SeedSequence), never Python's hash().

Click model (docs/sim.md has the full statement):

    f      = image_features(creative, mask)                      background features, FEATURE_NAMES order
    z      = clip((f - μ) / σ, -3, 3)                            μ, σ: over reference renders of this world
             (z_contrast = 0 when the image has no product region)
    logit  = base + item_i + bias_g + w_g · z + u_{g,i}
    CTR    = sigmoid(logit)

with item_i an item effect (rating, popularity, price against its category, plus noise), bias_g a
group bias, w_g the group's hidden preference vector and u_{g,i} a small group × item interaction
fixed per world.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.fileio import atomic_write_bytes
from cg4ctr_fast.imaging import composite
from cg4ctr_fast.sim.features import ANALYSIS_SIZE, CONTRAST, FEATURE_NAMES, features_batch, prepare
from cg4ctr_fast.sim.groups import ATTRIBUTES, GROUP_FEATURE_NAMES, MAX_GROUPS, UserGroup, draw_groups
from cg4ctr_fast.sim.products import _PRICE, ITEM_FEATURE_NAMES, Product, draw_product, product_spec, rasterize
from cg4ctr_fast.sim.render import render_background, render_background_array, resolve_caption
from cg4ctr_fast.sim.vocab import CATEGORIES, STYLE_VOCAB, Caption, all_captions, caption_text, stable_int

__all__ = ["World", "WorldConfig", "SimCreative", "SimLogs", "compose", "SIM_VERSION", "MIN_IMAGE_SIZE", "MAX_IMAGE_SIZE"]

# Bump when any generator changes the world a seed produces; World.from_json refuses other versions.
SIM_VERSION = 1
FORMAT = "cg4ctr-sim-world"
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 512

# Random streams: each is seeded with [seed, stream, ...].
_GROUPS, _PREFS, _ITEMS, _REFERENCE, _INTERACTION, _CAPTION, _TABLE, _LOGS = range(1, 9)
# The advertiser's bid per item (World.bid): its own stream, so adding it changed no other draw.
_BID = 9
# Bids: lognormal cost per click (currency units per click); the median is 1.0 and σ = 0.5 spreads bids
# by e^±0.5 ≈ ×1.65 per standard deviation, comparable to the spread of true CTR between items.
BID_MEDIAN = 1.0
BID_SIGMA = 0.5
_REFERENCE_PRODUCTS = 32

ImageLike = Union[Image.Image, np.ndarray]


@dataclass(frozen=True)
class WorldConfig:
    """The generator's parameters (all stored in world.json)."""

    base_logit: float = -3.7
    group_bias_scale: float = 0.18
    item_noise_scale: float = 0.15
    item_rating_weight: float = 0.20
    item_popularity_weight: float = 0.10
    item_price_weight: float = -0.10
    pref_norm: float = 0.35
    interaction_scale: float = 0.08
    z_clip: float = 2.5
    reference_renders: int = 256
    mean_impressions: float = 120.0
    creative_volume_sigma: float = 0.6
    group_size_sigma: float = 0.45
    weekly_amplitude: float = 0.15
    partial_caption_rate: float = 0.15

    @classmethod
    def from_dict(cls, data: dict) -> "WorldConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"world.json: unknown config keys {unknown}")
        return cls(**data)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gen(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and int(rng) >= 0:
        return np.random.default_rng(int(rng))
    raise InputError(f"rng must be a numpy Generator or a non-negative integer seed, got {rng!r}")


def _check_int(name: str, value: object, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"≥ {low}"
        raise InputError(f"{name} must be {bound}, got {value}")
    return value


def compose(product: Product, background: ImageLike) -> Image.Image:
    """The creative: the product's own pixels where its mask is 0, the background where it is 255.

    `background` (PIL image or uint8 array) is resized (LANCZOS) to the product's size if needed.
    Uses imaging.composite, so the product's pixels are bit-identical to `product.image`.
    """
    if not isinstance(background, Image.Image):
        background = Image.fromarray(np.asarray(background, np.uint8), "RGB")
    return composite(product.image, background, product.mask)


@dataclass
class SimCreative:
    creative_id: int
    item_id: int
    caption: tuple[str, ...]
    title: str
    image: Image.Image = field(repr=False)

    @property
    def caption_text(self) -> str:
        return " ".join(self.caption)

    @property
    def file(self) -> str:
        return f"creatives/{self.creative_id}.png"

    def record(self) -> dict:
        return {"creative_id": self.creative_id, "item_id": self.item_id, "caption": self.caption_text,
                "title": self.title, "file": self.file}


@dataclass
class SimLogs:
    """What `World.sample_logs` returns. `true_ctr[c, g]` is the oracle CTR of creative c for group g."""

    world: "World"
    products: list[Product]
    creatives: list[SimCreative]
    true_ctr: np.ndarray
    logs: Any  # pandas.DataFrame: creative_id, item_id, group_id, day, impressions, clicks

    def items_frame(self):
        import pandas as pd

        rows = []
        for p in self.products:
            row = p.record()
            row["file"] = f"products/{p.item_id}.png"
            row["mask_file"] = f"masks/{p.item_id}.png"
            rows.append(row)
        return pd.DataFrame(rows, columns=ITEM_COLUMNS)

    def creatives_frame(self):
        import pandas as pd

        return pd.DataFrame([c.record() for c in self.creatives], columns=CREATIVE_COLUMNS)


ITEM_COLUMNS = ("item_id", "title", "category", "shape", "colour", "accent_colour", "pattern", "price", "rating",
                "popularity", "area", "aspect", "lightness", "center_x", "center_y", "file", "mask_file")
CREATIVE_COLUMNS = ("creative_id", "item_id", "caption", "title", "file")
LOG_COLUMNS = ("creative_id", "item_id", "group_id", "day", "impressions", "clicks")


class World:
    """A deterministic synthetic ad world. See the module docstring and docs/sim.md."""

    def __init__(self, seed: int = 0, image_size: int = 64, n_groups: int = 8, config: Optional[WorldConfig] = None):
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        self.image_size = _check_int("image size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        self.n_groups = _check_int("number of groups", n_groups, 1, MAX_GROUPS)
        self.config = config or WorldConfig()
        self.vocab = {c: tuple(STYLE_VOCAB[c]) for c in CATEGORIES}
        self.groups: list[UserGroup] = draw_groups(self.n_groups, self._rng(_GROUPS))
        self._make_preferences()
        self._products: dict[tuple[int, int], Product] = {}
        self._item_effects: dict[int, float] = {}
        self._tables: dict[tuple, tuple[list, np.ndarray]] = {}
        self._make_reference_stats()

    # ----------------------------------------------------------------- construction
    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])

    def _make_preferences(self) -> None:
        cfg = self.config
        n_features = len(FEATURE_NAMES)
        rng = self._rng(_PREFS)
        # A shared taste every group leans towards (product contrast helps, a little brightness helps),
        # attribute effects (so the public one-hot features predict the preferences) and a group residual.
        shared = np.zeros(n_features)
        shared[FEATURE_NAMES.index("contrast")] = 1.0
        shared[FEATURE_NAMES.index("brightness")] = 0.3
        effects = {name: rng.normal(0.0, 0.6, (len(values), n_features)) for name, values in ATTRIBUTES.items()}
        weekly_phase = rng.uniform(0.0, 2 * math.pi)
        prefs = np.zeros((self.n_groups, n_features))
        bias = np.zeros(self.n_groups)
        size = np.zeros(self.n_groups)
        for g, group in enumerate(self.groups):
            grng = self._rng(_PREFS, 1, g)
            w = shared.copy()
            for name, value in group.attributes.items():
                w += effects[name][ATTRIBUTES[name].index(value)]
            w += grng.normal(0.0, 0.5, n_features)
            w *= cfg.pref_norm * grng.uniform(0.8, 1.2) / max(float(np.sqrt(np.sum(w * w))), 1e-9)
            prefs[g] = w
            bias[g] = grng.normal(0.0, cfg.group_bias_scale)
            size[g] = math.exp(grng.normal(-0.5 * cfg.group_size_sigma**2, cfg.group_size_sigma))
        self._prefs = prefs
        self._group_bias = bias
        self._group_size = size
        self._weekly_phase = weekly_phase

    def _make_reference_stats(self) -> None:
        """μ and σ of the features over reference creatives: random full captions on reference products."""
        n = max(int(self.config.reference_renders), 2)
        per = max(n // _REFERENCE_PRODUCTS, 1)
        rows = []
        for k in range(_REFERENCE_PRODUCTS):
            rng = self._rng(_REFERENCE, k)
            spec = product_spec(-1 - k, rng)
            image, mask = rasterize(spec, ANALYSIS_SIZE)
            keep = (np.asarray(mask) < 128)[..., None]
            prod = np.asarray(image)
            batch = np.stack([
                np.where(keep, prod, render_background_array((), rng, ANALYSIS_SIZE)) for _ in range(per)
            ])
            _, background, product = prepare(batch[0], mask, None)
            rows.append(features_batch(batch.astype(np.float32) / 255.0, background, product))
        table = np.concatenate(rows)
        self._mu = table.mean(axis=0)
        self._sigma = np.maximum(table.std(axis=0), 1e-6)

    # ----------------------------------------------------------------- products and groups
    def product(self, item_id: int, size: Optional[int] = None) -> Product:
        """Product `item_id` (any integer ≥ 0), drawn at the world's image size (or `size`); cached."""
        item_id = _check_int("item_id", item_id, 0)
        size = self.image_size if size is None else int(size)
        key = (item_id, size)
        if key not in self._products:
            spec = product_spec(item_id, self._rng(_ITEMS, item_id))
            self._products[key] = draw_product(item_id, None, size, spec=spec)  # type: ignore[arg-type]
        return self._products[key]

    def products(self, n: int) -> list[Product]:
        return [self.product(i) for i in range(n)]

    def group(self, group_id: int) -> UserGroup:
        return self.groups[self._group_index(group_id)]

    def group_traffic(self) -> np.ndarray:
        """Each group's share of impressions, float64 (n_groups,), indexed by group_id, summing to 1.

        s_g / Σs with s_g the group size `sample_logs` draws impressions with, so these are the weights an
        A/B test's aggregate CTR gives the groups (total clicks / total impressions).
        """
        return self._group_size / self._group_size.sum()

    def _group_index(self, group_id: int) -> int:
        return _check_int("group_id", group_id, 0, self.n_groups - 1)

    def item_effect(self, item_id: int) -> float:
        """The item's additive logit effect (rating, popularity, price against its category, noise)."""
        item_id = _check_int("item_id", item_id, 0)
        if item_id not in self._item_effects:
            cfg = self.config
            spec = product_spec(item_id, self._rng(_ITEMS, item_id))
            noise = self._rng(_ITEMS, item_id, 1).normal(0.0, cfg.item_noise_scale)
            effect = (cfg.item_rating_weight * (spec.rating - 4.1) / 0.45
                      + cfg.item_popularity_weight * spec.popularity
                      + cfg.item_price_weight * math.log(spec.price / _PRICE[spec.category])
                      + noise)
            self._item_effects[item_id] = float(effect)
        return self._item_effects[item_id]

    def bid(self, item_id: int) -> float:
        """The advertiser's bid for item `item_id` (cost per click, currency units), float > 0.

        bid = BID_MEDIAN · exp(BID_SIGMA · z), z ~ N(0, 1) drawn from numpy's Generator seeded with
        [world seed, _BID, item_id] (SeedSequence: a stable hash of the world's seed and the item id), so the
        same item has the same bid in any process. Not part of the fingerprint or world.json: a new, separate
        stream that changes no other draw. Raises InputError for an item_id that is not an integer ≥ 0.
        """
        item_id = _check_int("item_id", item_id, 0)
        return float(BID_MEDIAN * math.exp(BID_SIGMA * self._rng(_BID, item_id).standard_normal()))

    def interaction(self, item_id: int) -> np.ndarray:
        """u[g, item] for every group: small group × item noise, fixed per world."""
        return np.array([self._rng(_INTERACTION, g, item_id).normal(0.0, self.config.interaction_scale)
                         for g in range(self.n_groups)])

    def oracle_preferences(self) -> dict:
        """The hidden truth, for analysis and tests only: weights, biases, μ and σ (copies)."""
        return {"feature_names": FEATURE_NAMES, "weights": self._prefs.copy(), "group_bias": self._group_bias.copy(),
                "mu": self._mu.copy(), "sigma": self._sigma.copy(), "base_logit": self.config.base_logit}

    # ----------------------------------------------------------------- the click model
    def features(self, image: ImageLike, mask=None) -> np.ndarray:
        """image_features at the analysis size; a PIL mask of another size is resized (nearest) to the image."""
        rgb, background, product = self._prepare(image, mask)
        return features_batch(rgb[None], background, product)[0]

    def _prepare(self, image: ImageLike, mask):
        if mask is not None and isinstance(mask, Image.Image):
            size = image.size if isinstance(image, Image.Image) else (np.asarray(image).shape[1], np.asarray(image).shape[0])
            if mask.size != size:
                mask = mask.convert("L").resize(size, Image.Resampling.NEAREST)
        return prepare(image, mask, ANALYSIS_SIZE)

    def standardize(self, features: np.ndarray, has_product: Union[bool, np.ndarray] = True) -> np.ndarray:
        """z = clip((f - μ) / σ, ±z_clip); the contrast column is 0 where there is no product."""
        f = np.asarray(features, np.float64)
        z = np.clip((f - self._mu) / self._sigma, -self.config.z_clip, self.config.z_clip)
        has = np.asarray(has_product, bool)
        z[..., CONTRAST] = np.where(has, z[..., CONTRAST], 0.0)
        return z

    def logits(self, features: np.ndarray, item_id: Optional[int] = None, has_product: bool = True) -> np.ndarray:
        """Click logits for every group: (..., n_groups) for features of shape (..., n_features)."""
        z = self.standardize(features, has_product)
        out = self.config.base_logit + self._group_bias + z @ self._prefs.T
        if item_id is not None:
            out = out + self.item_effect(item_id) + self.interaction(item_id)
        return out

    def true_ctr_groups(self, image: ImageLike, item_id: Optional[int] = None, mask=None) -> np.ndarray:
        """The oracle CTR of an image for every group (n_groups,). Same rules as `true_ctr`."""
        if mask is None and item_id is not None:
            mask = self.product(item_id).mask
        rgb, background, product = self._prepare(image, mask)
        f = features_batch(rgb[None], background, product)[0]
        return _sigmoid(self.logits(f, item_id, bool(product.any())))

    def true_ctr(self, image: ImageLike, group_id: int, item_id: Optional[int] = None, mask=None) -> float:
        """The oracle: the true CTR of `image` shown to group `group_id`.

        With `item_id`, the item's effects apply and the mask defaults to the product's mask. Without a
        mask (and no item_id) the features are measured over the whole image and contrast counts as
        average. Any image can be scored: the features come from its pixels.
        """
        g = self._group_index(group_id)
        return float(self.true_ctr_groups(image, item_id, mask)[g])

    # ----------------------------------------------------------------- captions (oracle helpers)
    def render(self, caption: Caption, rng, size: Optional[int] = None) -> Image.Image:
        return render_background(caption, _gen(rng), self.image_size if size is None else size)

    def creative(self, item_id: int, caption: Caption, rng) -> Image.Image:
        """Product `item_id` on a background rendered from `caption`."""
        product = self.product(item_id)
        return compose(product, render_background_array(caption, _gen(rng), self.image_size))

    def caption_ctr_groups(self, caption: Caption, item_id: Optional[int] = None, n_renders: int = 4) -> np.ndarray:
        """Expected CTR of a caption for every group: the mean over `n_renders` renders (seeded by the caption)."""
        text = caption_text(caption)
        n_renders = _check_int("n_renders", n_renders, 1)
        rng = self._rng(_CAPTION, stable_int(text), 0 if item_id is None else 1 + _check_int("item_id", item_id, 0))
        total = np.zeros(self.n_groups)
        for _ in range(n_renders):
            if item_id is None:
                image = render_background_array(text, rng, self.image_size)
                total += self.true_ctr_groups(image)
            else:
                total += self.true_ctr_groups(self.creative(item_id, text, rng), item_id)
        return total / n_renders

    def caption_ctr(self, caption: Caption, group_id: int, item_id: Optional[int] = None, n_renders: int = 4) -> float:
        """Expected true CTR of `caption` for `group_id` (on product `item_id`, or on no product)."""
        g = self._group_index(group_id)
        return float(self.caption_ctr_groups(caption, item_id, n_renders)[g])

    def caption_ctr_table(self, item_id: Optional[int] = None, n_renders: int = 2) -> tuple[list[tuple[str, ...]], np.ndarray]:
        """Expected CTR of every full caption for every group: (captions, array [n_groups, n_captions]).

        Rendered at the analysis size (64×64) for speed, `n_renders` renders per caption; cached.
        """
        n_renders = _check_int("n_renders", n_renders, 1)
        key = (item_id, n_renders)
        if key in self._tables:
            return self._tables[key]
        captions = all_captions()
        rng = self._rng(_TABLE, 0 if item_id is None else 1 + _check_int("item_id", item_id, 0))
        if item_id is None:
            prod = keep = None
            mask = None
        else:
            product = self.product(item_id, ANALYSIS_SIZE)
            prod = np.asarray(product.image)
            keep = (np.asarray(product.mask) < 128)[..., None]
            mask = product.mask
        _, background, product_map = prepare(np.zeros((ANALYSIS_SIZE, ANALYSIS_SIZE, 3), np.uint8), mask, None)
        has_product = bool(product_map.any())
        ctr = np.zeros((self.n_groups, len(captions)))
        chunk = 128
        for start in range(0, len(captions), chunk):
            block = captions[start:start + chunk]
            images = np.empty((len(block) * n_renders, ANALYSIS_SIZE, ANALYSIS_SIZE, 3), np.uint8)
            for i, caption in enumerate(block):
                for r in range(n_renders):
                    images[i * n_renders + r] = render_background_array(caption, rng, ANALYSIS_SIZE)
            if keep is not None:
                images = np.where(keep[None], prod[None], images)
            f = features_batch(images.astype(np.float32) / 255.0, background, product_map)
            p = _sigmoid(self.logits(f, item_id, has_product))  # (n, groups)
            ctr[:, start:start + len(block)] = p.reshape(len(block), n_renders, self.n_groups).mean(axis=1).T
        ctr.setflags(write=False)
        self._tables[key] = (captions, ctr)
        return captions, ctr

    def best_caption(self, group_id: int, item_id: Optional[int] = None) -> tuple[str, ...]:
        """The full caption with the highest expected true CTR for the group (exhaustive over 1296 captions)."""
        g = self._group_index(group_id)
        captions, ctr = self.caption_ctr_table(item_id)
        return captions[int(np.argmax(ctr[g]))]

    # ----------------------------------------------------------------- logs
    def logs_rng(self) -> np.random.Generator:
        """The generator `cg4ctr-sim logs` samples with: seeded by [seed, logs stream]."""
        return self._rng(_LOGS)

    def random_caption(self, rng: np.random.Generator) -> tuple[str, ...]:
        """A random caption: all four categories, or (with probability partial_caption_rate) one left out."""
        tokens = list(resolve_caption((), rng))
        if rng.random() < self.config.partial_caption_rate:
            del tokens[int(rng.integers(len(tokens)))]
        return tuple(tokens)

    def sample_logs(self, n_products: int, creatives_per_product: int, days: int, rng,
                    progress: Optional[Callable[[int], None]] = None) -> SimLogs:
        """Products 0..n_products-1, each with several random-caption creatives, and their click logs.

        Per (creative c, group g, day d): impressions ~ Poisson(mean_impressions · v_c · s_g · weekly(d)),
        v_c ~ LogNormal (mean 1) per creative, s_g the group's size; clicks ~ Binomial(impressions, CTR[c, g]).
        `progress(n)` is called after each creative is drawn and scored.
        """
        import pandas as pd

        n_products = _check_int("number of products", n_products, 1)
        per = _check_int("creatives per product", creatives_per_product, 1)
        days = _check_int("days", days, 1)
        gen = _gen(rng)
        cfg = self.config
        products = self.products(n_products)
        creatives: list[SimCreative] = []
        ctr_rows = []
        for product in products:
            for _ in range(per):
                caption = self.random_caption(gen)
                image = compose(product, render_background_array(caption, gen, self.image_size))
                creatives.append(SimCreative(len(creatives), product.item_id, caption, product.title, image))
                ctr_rows.append(self.true_ctr_groups(image, product.item_id))
                if progress is not None:
                    progress(1)
        true_ctr = np.stack(ctr_rows)
        n_c, n_g = true_ctr.shape
        sigma = cfg.creative_volume_sigma
        volume = np.exp(gen.normal(-0.5 * sigma**2, sigma, n_c))
        weekly = 1.0 + cfg.weekly_amplitude * np.sin(2 * math.pi * np.arange(days) / 7 + self._weekly_phase)
        lam = cfg.mean_impressions * volume[:, None, None] * self._group_size[None, :, None] * weekly[None, None, :]
        impressions = gen.poisson(lam)
        clicks = gen.binomial(impressions, np.broadcast_to(true_ctr[:, :, None], impressions.shape))
        c_idx, g_idx, d_idx = np.meshgrid(np.arange(n_c), np.arange(n_g), np.arange(days), indexing="ij")
        item_of = np.array([c.item_id for c in creatives], np.int64)
        logs = pd.DataFrame({
            "creative_id": c_idx.ravel().astype(np.int64),
            "item_id": item_of[c_idx.ravel()],
            "group_id": g_idx.ravel().astype(np.int64),
            "day": d_idx.ravel().astype(np.int64),
            "impressions": impressions.ravel().astype(np.int64),
            "clicks": clicks.ravel().astype(np.int64),
        }, columns=list(LOG_COLUMNS))
        return SimLogs(world=self, products=products, creatives=creatives, true_ctr=true_ctr, logs=logs)

    # ----------------------------------------------------------------- serialisation
    def fingerprint(self) -> str:
        """sha256 over the (rounded) hidden preferences and groups: checks a rebuilt world is the same."""
        digest = hashlib.sha256()
        digest.update(f"{SIM_VERSION}\0{self.seed}\0{self.n_groups}\0".encode())
        digest.update(np.round(self._prefs, 9).tobytes())
        digest.update(np.round(self._group_bias, 9).tobytes())
        digest.update(json.dumps([g.record() for g in self.groups]).encode())
        return digest.hexdigest()

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "sim_version": SIM_VERSION,
            "seed": self.seed,
            "image_size": self.image_size,
            "n_groups": self.n_groups,
            "vocabulary": {c: list(self.vocab[c]) for c in CATEGORIES},
            "feature_names": list(FEATURE_NAMES),
            "group_feature_names": list(GROUP_FEATURE_NAMES),
            "item_feature_names": list(ITEM_FEATURE_NAMES),
            "config": asdict(self.config),
            "fingerprint": self.fingerprint(),
            "note": ("Synthetic world: hidden group preferences are not stored but are derivable from the seed "
                     "and config by design (World.load rebuilds them). See docs/sim.md."),
        }

    @classmethod
    def from_json(cls, data: Union[dict, str]) -> "World":
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise InputError(f"world.json: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError("world.json: not a cg4ctr-sim world (missing format marker)")
        if data.get("sim_version") != SIM_VERSION:
            raise InputError(f"world.json: written by sim version {data.get('sim_version')}, this is version {SIM_VERSION}")
        vocab = data.get("vocabulary")
        if vocab != {c: list(STYLE_VOCAB[c]) for c in CATEGORIES}:
            raise InputError("world.json: its vocabulary differs from this version's STYLE_VOCAB")
        if data.get("feature_names", list(FEATURE_NAMES)) != list(FEATURE_NAMES):
            raise InputError("world.json: its feature names differ from this version's FEATURE_NAMES")
        try:
            world = cls(seed=data["seed"], image_size=data["image_size"], n_groups=data["n_groups"],
                        config=WorldConfig.from_dict(data.get("config", {})))
        except KeyError as exc:
            raise InputError(f"world.json: missing key {exc.args[0]!r}") from exc
        except TypeError as exc:
            raise InputError(f"world.json: bad value ({exc})") from exc
        expected = data.get("fingerprint")
        if expected is not None and expected != world.fingerprint():
            raise InputError("world.json: the rebuilt world does not match its fingerprint (another sim version?)")
        return world

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write world.json into the folder `path` (or to `path` itself when it ends in .json)."""
        target = Path(path)
        if target.suffix != ".json":
            target.mkdir(parents=True, exist_ok=True)
            target = target / "world.json"
        atomic_write_bytes(target, (json.dumps(self.to_json(), indent=2) + "\n").encode())
        return target

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "World":
        """Rebuild the world from a dataset folder (its world.json) or a world.json file."""
        target = Path(path)
        if target.is_dir():
            target = target / "world.json"
        try:
            text = target.read_text()
        except FileNotFoundError as exc:
            raise InputError(f"{target}: no such file") from exc
        except OSError as exc:
            raise InputError(f"{target}: cannot read ({exc.strerror or exc})") from exc
        return cls.from_json(text)

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, image_size={self.image_size}, n_groups={self.n_groups})"
