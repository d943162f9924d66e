"""Online selection: rank a product's stored creatives for one user group, the original image always among them.

Two parts:

- `RewardHead`: the reward model's `score` (towers → 5-token transformer → CLS → MLP → Platt calibration) in
  numpy float32 on stored image embeddings, weights copied once out of a `RewardModel` (eval mode, no dropout).
  It runs only for creatives whose score for the asked group was not stored nearline.
- `Selector`: an in-memory index per (product, group) filled from `CreativeStore.candidates` and refreshed when
  that product's `store.product_version()` changes (a write to another product leaves it valid); `select` ranks the original and the creatives of one model id and returns the
  best k, or the original and why (`fallback`: "original_better", "none_stored", "budget").

Measured (64 candidates, one thread, shared 2-core machine): `Selector.select` with stored scores p50 0.011 ms,
p99 0.03 ms (of which the version lookup ≈ 0.006 ms); re-reading an index after a write to its product 0.5–0.9 ms;
`RewardHead.score` live 2.5 ms p50 where torch's eager `RewardModel.score` took 2.6 ms.

Nothing here imports torch at module import (`RewardHead.from_model` reads a torch model it is given; the
tokenizer is imported from `cg4ctr_fast.models.reward` on first use).
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from cg4ctr_fast.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from cg4ctr_fast.models.reward import RewardModel

__all__ = ["RewardHead", "Choice", "Selection", "Selector", "erf", "gelu", "LIVE_CHUNK"]

# --------------------------------------------------------------------------------------------
# GELU with the exact erf (torch's nn.GELU() default, approximate="none")
# --------------------------------------------------------------------------------------------

# numpy has no erf and scipy is not installed, so erf is a rational approximation fitted here (linearised least
# squares with Sanathanan–Koerner reweighting against math.erf on 40 000 points of [0, 4]):
#     erf(z) ≈ s · z · P(z²) / Q(z²),  z clipped to [−4, 4],  P degree 6, Q degree 5,
# with s = 1 / (that ratio at z = 4) so that the clipped tails are ±1 up to float64 rounding (the rescale costs
# 1 − erf(4) = 1.5e-8).  Max |error| against math.erf: 1.5e-8 measured in float64 on [−7, 7] (tests assert 1e-7).  Evaluated in float32 the same formula is off by up to 4e-7 (each Horner step rounds at 6e-8
# relative and the result sits near 1), so it is evaluated in float64 and the GELU rounded to float32 once.
# A linearly interpolated float32 table of Φ (24 k entries, two gathers) was tried instead: np.take ran at
# 3 ns per element here, no faster than the float64 polynomial, and the offset index lost precision.
# The float64 GELU is ≈ 40 % of a 64-candidate live score (cProfile: 1.0 of 2.4 ms on the shared 2-core machine).
# torch's own float32 GELU kernel is further from the exact function (measured: up to 1.2e-6 off on [−8, 8]).
_ERF_P = (1.1283791793149631, 0.1847513903981272, 0.05432341405275623, 0.0038394478796473465,
          0.00038209938916233707, 4.762975429961298e-06, -1.3575815383054936e-08)
_ERF_Q = (1.0, 0.49706517818511897, 0.11383036151995261, 0.01545104646928661, 0.0013087927024922274,
          6.384614002032996e-05)
_ERF_CLIP = 4.0


def _poly(coeffs: Sequence[float], t: float) -> float:
    return sum(c * t ** i for i, c in enumerate(coeffs))


_ERF_SCALE = 1.0 / (_ERF_CLIP * _poly(_ERF_P, _ERF_CLIP ** 2) / _poly(_ERF_Q, _ERF_CLIP ** 2))
# GELU(x) = x · (1/2 + erf(x/√2)/2) = x · (1/2 + x_c · P̃(x_c²) / Q̃(x_c²)), x_c = clip(x, ±4√2),
# P̃_i = s · p_i / (2√2 · 2^i), Q̃_i = q_i / 2^i: the constants folded into the coefficients.
_GELU_P = tuple(_ERF_SCALE * c / (2.0 * math.sqrt(2.0) * 2.0 ** i) for i, c in enumerate(_ERF_P))
_GELU_Q = tuple(c / 2.0 ** i for i, c in enumerate(_ERF_Q))
_GELU_CLIP = _ERF_CLIP * math.sqrt(2.0)


def _horner(coeffs: Sequence[float], t: np.ndarray) -> np.ndarray:
    out = t * coeffs[-1]
    out += coeffs[-2]
    for c in coeffs[-3::-1]:
        out *= t
        out += c
    return out


def erf(z) -> np.ndarray:
    """erf of an array as float64, |error| ≤ 2e-8 against math.erf; see the comment above."""
    z = np.clip(np.asarray(z, dtype=np.float64), -_ERF_CLIP, _ERF_CLIP)
    t = z * z
    out = _horner(_ERF_P, t)
    out *= z * _ERF_SCALE
    out /= _horner(_ERF_Q, t)
    return out


# GELU runs on blocks of this many values: the float64 temporaries of a block (5 × 64 KiB) stay in L2; on a
# 64-candidate head call (40 960 values in the first feed-forward) blocks of 8192 took 0.56 ms against 0.92 ms
# for one pass over the whole array (4096: 0.65 ms, 16384: 0.75 ms).
_GELU_BLOCK = 8192


def _gelu_block(x: np.ndarray, out: np.ndarray) -> None:
    xd = x.astype(np.float64)
    xc = np.clip(xd, -_GELU_CLIP, _GELU_CLIP)
    t = xc * xc
    p = _horner(_GELU_P, t)
    p *= xc
    p /= _horner(_GELU_Q, t)
    # Φ = 1/2 + erf/2 less 2^-50, floored at 0: in the clipped tails 1/2 + erf/2 rounds to ±6e-17, not 0, which
    # would make GELU(−1e30) = −5.5e13; the 9e-16 shift is far below float32 resolution everywhere else.
    p += 0.5 - 2.0 ** -50
    np.maximum(p, 0.0, out=p)
    np.multiply(p, xd, out=out, casting="same_kind")


def gelu(x: np.ndarray) -> np.ndarray:
    """torch's exact GELU (nn.GELU(), approximate="none"), x · Φ(x) = x/2 · (1 + erf(x/√2)), of an array →
    float32 of the same shape.  Computed in float64 and rounded once; see the module comment for the accuracy.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _GELU_BLOCK):
        _gelu_block(flat_in[start:start + _GELU_BLOCK], flat_out[start:start + _GELU_BLOCK])
    return out


# --------------------------------------------------------------------------------------------
# The reward head in numpy
# --------------------------------------------------------------------------------------------


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32, copy=False))


@dataclass(frozen=True)
class _Mlp:
    """Linear → GELU → (dropout: identity in eval) → Linear, weights as [in, out] for x @ w."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    @classmethod
    def of(cls, seq) -> "_Mlp":
        return cls(_np(seq[0].weight).T.copy(), _np(seq[0].bias), _np(seq[3].weight).T.copy(), _np(seq[3].bias))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = x @ self.w1
        h += self.b1
        out = gelu(h) @ self.w2
        out += self.b2
        return out


@dataclass(frozen=True)
class _Layer:
    """One pre-norm `nn.TransformerEncoderLayer` (norm_first=True, GELU), weights as [in, out]."""

    ln1_w: np.ndarray
    ln1_b: np.ndarray
    ln1_eps: float
    w_qkv: np.ndarray  # [d, 3d]: q | k | v (torch's in_proj_weight, transposed)
    b_qkv: np.ndarray
    w_out: np.ndarray
    b_out: np.ndarray
    ln2_w: np.ndarray
    ln2_b: np.ndarray
    ln2_eps: float
    ff: _Mlp

    @classmethod
    def of(cls, layer) -> "_Layer":
        attn = layer.self_attn
        if not getattr(layer, "norm_first", False):
            raise ValueError("RewardHead expects the reward model's pre-norm (norm_first=True) encoder layers")
        ff = _Mlp(_np(layer.linear1.weight).T.copy(), _np(layer.linear1.bias),
                  _np(layer.linear2.weight).T.copy(), _np(layer.linear2.bias))
        return cls(_np(layer.norm1.weight), _np(layer.norm1.bias), float(layer.norm1.eps),
                   _np(attn.in_proj_weight).T.copy(), _np(attn.in_proj_bias),
                   _np(attn.out_proj.weight).T.copy(), _np(attn.out_proj.bias),
                   _np(layer.norm2.weight), _np(layer.norm2.bias), float(layer.norm2.eps), ff)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """torch's LayerNorm over the last axis (biased variance).  The means are matmuls with a [d, 1] column of
    1/d: numpy's reduce over a short last axis is slower than BLAS (measured 2× on [320, 64])."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    col = np.full((shape[-1], 1), 1.0 / shape[-1], dtype=np.float32)
    centred = x2 - x2 @ col
    var = (centred * centred) @ col
    var += np.float32(eps)
    centred *= 1.0 / np.sqrt(var)
    centred *= w
    centred += b
    return centred.reshape(shape)


def _softmax_(scores: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along `axis`, in place."""
    scores -= scores.max(axis=axis, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=axis, keepdims=True)
    return scores


class RewardHead:
    """numpy float32 copy of `RewardModel.score` for serving: stored image embeddings in, calibrated CTR out.

    Build it with `from_model` (weights are copied; later changes to the torch model are not seen).  Shapes:
    embeddings float [N, D] (D = config.image_dim); title_ids / caption_ids int [N or 1, L] (0 = padding; any L,
    as `encode_titles` / `encode_captions` give); group_features float [N or 1, group_dim].  Inputs with batch 1
    are broadcast to N and their tower runs once.  The result matches `RewardModel.score` in eval mode to float32
    rounding (tests/test_serve_select.py states the tolerance).  Thread-safe: nothing changes after construction.
    ValueError on shapes that do not fit (a programming error, as torch's RewardModel raises).
    """

    def __init__(self, *, config, weights: Mapping[str, Any], title_tokens: Sequence[str],
                 caption_tokens: Sequence[str]):
        self.config = config
        self.d_model = int(config.d_model)
        self.n_heads = int(config.n_heads)
        self.image_dim = int(config.image_dim)
        self.group_dim = int(config.group_dim)
        self.calib_scale = float(config.calib_scale)
        self.calib_bias = float(config.calib_bias)
        self._image: _Mlp = weights["image_tower"]
        self._group: _Mlp = weights["group_tower"]
        self._title_embed: np.ndarray = weights["title_embed"]
        self._title: _Mlp = weights["title_tower"]
        self._caption_embed: np.ndarray = weights["caption_embed"]
        self._caption: _Mlp = weights["caption_tower"]
        self._type: np.ndarray = weights["type_embed"]
        self._layers: tuple[_Layer, ...] = tuple(weights["layers"])
        self._norm = weights["norm"]
        self._head: _Mlp = weights["head"]
        self._title_index = {tok: i for i, tok in enumerate(title_tokens)}
        self._caption_index = {tok: i for i, tok in enumerate(caption_tokens)}
        # The CLS token is the type embedding alone (the model stacks zeros + type_embed[0]): one row for all.
        self._cls = self._type[0][None, :].copy()

    @classmethod
    def from_model(cls, model: "RewardModel") -> "RewardHead":
        """Copy the weights of a `RewardModel` (any mode: the copy always runs as eval, without dropout)."""
        def embed(tower) -> np.ndarray:
            table = _np(tower.embed.weight).copy()
            # EmbeddingBag(mode="mean", padding_idx=0) leaves padding out of the sum and the count; a zero row 0
            # takes it out of the sum, the count below takes it out of the mean.
            table[0] = 0.0
            return table

        if model.fusion.layers[0].self_attn.in_proj_weight is None:
            raise ValueError("RewardHead expects packed q/k/v projections (d_model = kdim = vdim)")
        weights = {
            "image_tower": _Mlp.of(model.image_tower),
            "group_tower": _Mlp.of(model.group_tower),
            "title_embed": embed(model.title_tower),
            "title_tower": _Mlp.of(model.title_tower.mlp),
            "caption_embed": embed(model.caption_tower),
            "caption_tower": _Mlp.of(model.caption_tower.mlp),
            "type_embed": _np(model.type_embed),
            "layers": [_Layer.of(layer) for layer in model.fusion.layers],
            "norm": (_np(model.norm.weight), _np(model.norm.bias), float(model.norm.eps)),
            "head": _Mlp.of(model.head),
        }
        if model.fusion.norm is not None:  # the reward model applies its own final norm; TransformerEncoder has none
            raise ValueError("RewardHead expects nn.TransformerEncoder without its own final norm")
        return cls(config=model.config, weights=weights, title_tokens=model.title_vocab.tokens,
                   caption_tokens=model.caption_vocab.tokens)

    # -- text --------------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], index: Mapping[str, int], max_len: int) -> np.ndarray:
        from cg4ctr_fast.models.reward import UNK_ID, tokenize

        out = np.zeros((len(texts), max_len), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [index.get(tok, UNK_ID) for tok in tokenize(text)[:max_len]]
            out[row, : len(ids)] = ids
        return out

    def encode_titles(self, titles: Sequence[str]) -> np.ndarray:
        """int64 [B, max_title_tokens] ids in the model's title vocabulary (0-padded; unknown words → 1)."""
        return self._encode(titles, self._title_index, self.config.max_title_tokens)

    def encode_captions(self, captions: Sequence[str]) -> np.ndarray:
        """int64 [B, max_caption_tokens] ids in the model's caption vocabulary (0-padded; unknown words → 1)."""
        return self._encode(captions, self._caption_index, self.config.max_caption_tokens)

    # -- network -----------------------------------------------------------------------------

    @staticmethod
    def _bag_mean(table: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what} must be an integer array [B, L], got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise ValueError(f"{what} holds ids outside [0, {table.shape[0]})")
        counts = np.count_nonzero(ids, axis=1).astype(np.float32)
        summed = table[ids].sum(axis=1)  # row 0 of the table is zero: padding adds nothing
        summed /= np.maximum(counts, 1.0)[:, None]  # no tokens → zeros, as EmbeddingBag
        return summed

    def _check_batch(self, x: np.ndarray, batch: int, name: str) -> None:
        if x.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {x.shape[0]}, expected {batch} or 1")

    def logits(self, embeddings, title_ids, caption_ids, group_features) -> np.ndarray:
        """Uncalibrated logits float32 [N] (see the class docstring for the shapes).  ValueError on bad shapes."""
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.image_dim:
            raise ValueError(f"embeddings must be [N, {self.image_dim}], got {emb.shape}")
        n = emb.shape[0]
        title_ids = np.asarray(title_ids)
        caption_ids = np.asarray(caption_ids)
        groups = np.asarray(group_features, dtype=np.float32)
        if groups.ndim != 2 or groups.shape[1] != self.group_dim:
            raise ValueError(f"group_features must be [N or 1, {self.group_dim}], got {groups.shape}")
        for x, name in ((title_ids, "title_ids"), (caption_ids, "caption_ids"), (groups, "group_features")):
            if x.ndim < 1:
                raise ValueError(f"{name} must be 2-D")
            self._check_batch(x, n, name)
        if n == 0:
            return np.zeros((0,), dtype=np.float32)
        d = self.d_model
        # 5 tokens [N, 5, d]: CLS, image, title, caption, group, each plus its type embedding.  Towers whose
        # input has batch 1 run once and broadcast (a request's title and group are the same for all candidates).
        x = np.empty((n, 5, d), dtype=np.float32)
        x[:, 0] = self._cls
        x[:, 1] = self._image(emb)
        x[:, 2] = self._title(self._bag_mean(self._title_embed, title_ids, "title_ids"))
        x[:, 3] = self._caption(self._bag_mean(self._caption_embed, caption_ids, "caption_ids"))
        x[:, 4] = self._group(groups)
        x[:, 1:] += self._type[1:]
        for layer in self._layers[:-1]:
            x = self._block(layer, x)
        cls = self._block_cls(self._layers[-1], x)
        w, b, eps = self._norm
        return self._head(_layer_norm(cls, w, b, eps))[:, 0]

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """q [N, Tq, d], k/v [N, Tk, d] → attention output before out_proj, [N, Tq, d].

        numpy's matmul over [N, heads] stacks of (Tq × d_head) @ (d_head × Tk); measured 0.20 ms for N = 64,
        5 tokens, against 0.55 ms broadcasting q·k over [N, 5, 5, d] and 0.34 ms with einsum.
        """
        n, tq, d = q.shape
        tk = k.shape[1]
        h = self.n_heads
        dh = d // h
        qh = q.reshape(n, tq, h, dh).transpose(0, 2, 1, 3)
        kt = k.reshape(n, tk, h, dh).transpose(0, 2, 3, 1)
        scores = qh @ kt  # [N, h, Tq, Tk]
        scores *= np.float32(1.0 / math.sqrt(dh))
        _softmax_(scores, axis=-1)
        vh = v.reshape(n, tk, h, dh).transpose(0, 2, 1, 3)
        return (scores @ vh).transpose(0, 2, 1, 3).reshape(n, tq, d)

    def _block(self, layer: _Layer, x: np.ndarray) -> np.ndarray:
        n, t, d = x.shape
        hx = _layer_norm(x, layer.ln1_w, layer.ln1_b, layer.ln1_eps)
        qkv = hx.reshape(n * t, d) @ layer.w_qkv
        qkv += layer.b_qkv
        qkv = qkv.reshape(n, t, 3 * d)
        ctx = self._attention(qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:])
        attn = ctx.reshape(n * t, d) @ layer.w_out
        attn += layer.b_out
        x = x + attn.reshape(n, t, d)
        ff = layer.ff(_layer_norm(x, layer.ln2_w, layer.ln2_b, layer.ln2_eps).reshape(n * t, d))
        x += ff.reshape(n, t, d)
        return x

    def _block_cls(self, layer: _Layer, x: np.ndarray) -> np.ndarray:
        """The last layer for the CLS row only ([N, 5, d] → [N, d]): its keys and values need every token, but
        the query, out_proj and feed-forward run on one row of five (the others are never read).  Measured for 64
        candidates (default config, one thread, p50): this layer 0.46 ms against 1.26 ms for all five rows, the
        whole `logits` 2.27 ms against 3.00 ms (−24 %)."""
        n, t, d = x.shape
        hx = _layer_norm(x, layer.ln1_w, layer.ln1_b, layer.ln1_eps)
        kv = hx.reshape(n * t, d) @ layer.w_qkv[:, d:]
        kv += layer.b_qkv[d:]
        kv = kv.reshape(n, t, 2 * d)
        q = hx[:, 0] @ layer.w_qkv[:, :d]
        q += layer.b_qkv[:d]
        ctx = self._attention(q[:, None, :], kv[..., :d], kv[..., d:])[:, 0]
        attn = ctx @ layer.w_out
        attn += layer.b_out
        cls = x[:, 0] + attn
        cls += layer.ff(_layer_norm(cls, layer.ln2_w, layer.ln2_b, layer.ln2_eps))
        return cls

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated CTR float32 in (0, 1): sigmoid(calib_scale · logit + calib_bias)."""
        z = np.asarray(logits, dtype=np.float64) * self.calib_scale + self.calib_bias
        return np.exp(-np.logaddexp(0.0, -z)).astype(np.float32)  # sigmoid in float64, no overflow for any z

    def score(self, embeddings, title_ids, caption_ids, group_features) -> np.ndarray:
        """Calibrated CTR float32 [N] in (0, 1), the same as `RewardModel.score` in eval mode."""
        return self.calibrate(self.logits(embeddings, title_ids, caption_ids, group_features))


# --------------------------------------------------------------------------------------------
# Online selection
# --------------------------------------------------------------------------------------------

# Missing scores are computed in chunks of this many candidates and the clock is read between chunks, so a budget
# is overrun by at most one chunk: 16 candidates take 0.77 ms p50 in RewardHead on one core, 64 take 2.5 ms
# (measured on the shared 2-core development machine, where torch's RewardModel.score takes 2.6 ms for 64).
LIVE_CHUNK = 16

# The clock the budget is measured with (seconds, monotonic); a module attribute so tests can drive it.
_clock = time.perf_counter


@dataclass(frozen=True)
class Choice:
    """One ranked candidate.  creative_id: the creative's sha256, None for the product's original image;
    score: calibrated CTR in [0, 1] for the asked group (NaN when the original's score is unknown: no stored score
    and no stored embedding to compute it from); prompt: the creative's prompt, None for the original."""

    creative_id: Optional[str]
    score: float
    prompt: Optional[str]

    def to_dict(self) -> dict:
        return {"id": "original" if self.creative_id is None else self.creative_id,
                "score": self.score if math.isfinite(self.score) else None, "prompt": self.prompt}


@dataclass(frozen=True)
class Selection:
    """What `Selector.select` answers.

    chosen: best first, at most k; the original image (creative_id None) is among the candidates and wins ties.
    fallback: None (a creative ranks first), "original_better" (the original ranks first), "none_stored" (no
    creative of this model id has a score or an embedding to compute one) or "budget" (the budget ran out while
    missing scores were computed; chosen is the original alone).  original_score: the original's calibrated CTR
    (None when unknown).  candidates: how many were (or would have been) ranked, the original included.
    elapsed_ms: wall time of the call in ms.
    """

    product_id: str
    group_id: str
    chosen: tuple[Choice, ...]
    fallback: Optional[str]
    original_score: Optional[float]
    candidates: int
    elapsed_ms: float

    def to_dict(self) -> dict:
        """JSON-ready: chosen creatives as {"id": sha256 or "original", "score": float or None, "prompt"}."""
        return {"product_id": self.product_id, "group_id": self.group_id,
                "chosen": [c.to_dict() for c in self.chosen], "fallback": self.fallback,
                "original_score": self.original_score, "candidates": self.candidates,
                "elapsed_ms": self.elapsed_ms}


class _Entry:
    """The index of one (product, group): stored scores, what is still to be scored live, and the ranking once
    every score is known.  Mutated only under its own lock."""

    __slots__ = ("generation", "version", "ids", "prompts", "scores", "embeddings", "original_embedding", "original_score",
                 "pending", "ranked", "candidates", "lock")

    def __init__(self, generation: int):
        self.generation = generation
        self.version = -1  # the store's product_version when read
        self.ids: list = []
        self.prompts: list = []
        self.scores = np.zeros((0,), dtype=np.float32)      # NaN = not known (yet)
        self.embeddings: Optional[np.ndarray] = None         # kept only while scores are pending
        self.original_embedding: Optional[np.ndarray] = None
        self.original_score = np.float32(np.nan)
        self.pending: list = []                              # candidate rows to score live; -1 = the original
        self.ranked: tuple = ()                              # every candidate, best first, once pending is empty
        self.candidates = 0
        self.lock = threading.Lock()


class Selector:
    """Online selection over a `CreativeStore` with an in-memory index per (product, group).

    store: a CreativeStore (or anything with `candidates`, `product`, and `product_version` or `data_version`
    as it has); head: the `RewardHead` of the reward model `reward_id` names; groups: group id → float
    [group_dim] features; model_id: only creatives of this generator are candidates (never another model's);
    title_for: the product title used when a score has to be computed live (default: the stored product's title).

    The index of a (product, group) is read from the store on first use and read again once that product's
    `product_version()` moved (a committed write touching it, from any process) or after `invalidate`; at most
    `max_entries` are kept (least recently used dropped).  Thread-safe.
    """

    max_entries = 65536

    def __init__(self, store, head: RewardHead, groups: Mapping[str, np.ndarray], *, model_id: str,
                 reward_id: str, title_for: Optional[Callable[[str], str]] = None):
        self.store = store
        self.head = head
        self.model_id = model_id
        self.reward_id = reward_id
        table = {}
        for group_id, features in dict(groups).items():
            row = np.asarray(features, dtype=np.float32).reshape(-1)
            if row.shape[0] != head.group_dim:
                raise ValueError(f"group {group_id!r} has {row.shape[0]} features, the reward head takes "
                                 f"{head.group_dim}")
            table[str(group_id)] = row[None, :].copy()
        self._groups = table
        self._title_for = title_for if title_for is not None else self._stored_title
        self._lock = threading.Lock()
        self._entries: "OrderedDict[tuple[str, str], _Entry]" = OrderedDict()
        self._generation = 0
        self._invalidations = 0  # an index read while invalidate ran is used once, never cached

    def _stored_title(self, product_id: str) -> str:
        row = self.store.product(product_id)
        return "" if row is None else row.title

    # -- index -------------------------------------------------------------------------------

    def invalidate(self, product_id: Optional[str] = None) -> None:
        """Forget the index of one product (every group), or of every product when None; the next `select`
        reads it from the store again."""
        with self._lock:
            self._invalidations += 1
            if product_id is None:
                self._generation += 1
                self._entries.clear()
            else:
                for key in [key for key in self._entries if key[0] == product_id]:
                    del self._entries[key]

    def _product_version(self, product_id: str) -> int:
        # Per product where the store keeps it: a write to another product leaves this index valid.
        reader = getattr(self.store, "product_version", None)
        return reader(product_id) if reader is not None else self.store.data_version()

    def _entry(self, product_id: str, group_id: str) -> _Entry:
        version = self._product_version(product_id)
        key = (product_id, group_id)
        with self._lock:
            generation = self._generation
            invalidations = self._invalidations
            entry = self._entries.get(key)
            if entry is not None and entry.generation == generation and entry.version == version:
                self._entries.move_to_end(key)
                return entry
        entry = self._fill(product_id, group_id, generation)  # outside the lock: a store read (NotFound here)
        # Read before the fill: a write landing in between gives newer rows under an older version, so the
        # next select reads again; never older rows under a newer version.
        entry.version = version
        with self._lock:
            if invalidations != self._invalidations:
                return entry  # invalidated while it was read: it may predate the write that caused that
            current = self._entries.get(key)
            if current is not None and (current.generation, current.version) >= (entry.generation, entry.version):
                return current  # another thread filled it meanwhile
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry

    def _fill(self, product_id: str, group_id: str, generation: int) -> _Entry:
        cands = self.store.candidates(product_id, self.model_id, group_id, self.reward_id)
        entry = _Entry(generation)
        entry.ids = list(cands.creative_ids)
        entry.prompts = list(cands.prompts)
        # Every score is compared in float32, the precision creatives' scores come in: an original stored as
        # 0.3 (float64) must tie, not lose, against a creative stored as float32(0.3) = 0.30000001.
        entry.scores = np.array(cands.scores, dtype=np.float32).reshape(-1)
        entry.original_score = np.float32(cands.original_score)
        embeddings = np.asarray(cands.embeddings, dtype=np.float32)
        usable = (embeddings.ndim == 2 and embeddings.shape[1] == self.head.image_dim
                  and embeddings.shape[0] == len(entry.ids))
        has_embedding = (np.isfinite(embeddings).all(axis=1) if usable
                         else np.zeros(len(entry.ids), dtype=bool))
        missing = np.isnan(entry.scores)
        pending = [int(i) for i in np.flatnonzero(missing & has_embedding)]
        original = cands.original_embedding
        if original is not None:
            original = np.asarray(original, dtype=np.float32).reshape(-1)
            if original.shape[0] != self.head.image_dim or not np.isfinite(original).all():
                original = None
        if np.isnan(entry.original_score) and original is not None:
            pending.insert(0, -1)  # the original first: without its score no creative can be said to beat it
        entry.pending = pending
        if pending:
            entry.embeddings = embeddings
            entry.original_embedding = original
        # Creatives with neither a stored score nor an embedding cannot be ranked: they are no candidates.
        entry.candidates = 1 + int(np.count_nonzero(~missing | has_embedding))
        if not pending:
            self._rank(entry)
        return entry

    @staticmethod
    def _rank(entry: _Entry) -> None:
        """Every candidate, best first: higher score, then the original before any creative (a creative must be
        strictly better to replace the photo, as training.metrics.pick_over_original), then creative id."""
        known = np.flatnonzero(~np.isnan(entry.scores))
        items = [(-float(entry.scores[i]), 1, entry.ids[i], i) for i in known]
        original = float(entry.original_score)
        # An unknown original score (nothing stored, no embedding) ranks the original after every scored creative.
        items.append((-original if math.isfinite(original) else math.inf, 0, "", -1))
        items.sort()
        entry.ranked = tuple(
            Choice(None, original, None) if i < 0 else Choice(entry.ids[i], float(entry.scores[i]), entry.prompts[i])
            for _, _, _, i in items)
        entry.embeddings = None
        entry.original_embedding = None

    def _score_pending(self, entry: _Entry, product_id: str, group_id: str, started: float,
                       budget_ms: Optional[float]) -> bool:
        """Compute the entry's missing scores in chunks of LIVE_CHUNK; False when the budget ran out first (the
        scores computed so far are kept for the next call)."""
        if budget_ms is None:
            entry.lock.acquire()
        elif not entry.lock.acquire(blocking=False):
            # Another request is scoring this entry: wait for it, but only as long as the budget lasts.
            left_s = budget_ms / 1000.0 - (_clock() - started)
            if left_s <= 0 or not entry.lock.acquire(timeout=left_s):
                return False
        try:
            if not entry.pending:
                return True
            title_ids = self.head.encode_titles([self._title_for(product_id) or ""])
            group = self._groups[group_id]
            while entry.pending:
                if budget_ms is not None and (_clock() - started) * 1000.0 >= budget_ms:
                    return False
                chunk = entry.pending[:LIVE_CHUNK]
                rows = [entry.original_embedding if i < 0 else entry.embeddings[i] for i in chunk]
                captions = ["" if i < 0 else entry.prompts[i] for i in chunk]
                scores = self.head.score(np.stack(rows), title_ids, self.head.encode_captions(captions), group)
                for i, s in zip(chunk, scores):
                    if i < 0:
                        entry.original_score = np.float32(s)
                    else:
                        entry.scores[i] = s
                entry.pending = entry.pending[len(chunk):]
            self._rank(entry)
            return True
        finally:
            entry.lock.release()

    # -- selection ---------------------------------------------------------------------------

    def select(self, product_id: str, group_id: str, k: int = 1, budget_ms: Optional[float] = None) -> Selection:
        """Rank the product's stored creatives of `model_id` and its original image for `group_id`.

        k: how many to return (≥ 1), best first.  budget_ms: time budget for the call in ms (> 0; None = none);
        it matters only when scores must be computed live, and is checked before each chunk of LIVE_CHUNK
        candidates.  Raises NotFound (an InputError) for an unknown product, InputError for an unknown group,
        k < 1 or budget_ms ≤ 0.
        """
        started = _clock()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be an integer ≥ 1, got {k!r}")
        if budget_ms is not None:
            if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float, np.number)) \
                    or not budget_ms > 0:
                raise InputError(f"budget_ms must be a number > 0 (milliseconds), got {budget_ms!r}")
            budget_ms = float(budget_ms)
        product_id, group_id = (str(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v
                                for v in (product_id, group_id))  # ints (from JSON) name the same ids as str
        for value, what in ((product_id, "product id"), (group_id, "group id")):
            if not isinstance(value, str):
                raise InputError(f"{what} must be a string, got {type(value).__name__}")
        if group_id not in self._groups:
            known = sorted(self._groups)
            shown = ", ".join(repr(g) for g in known[:8]) + (", …" if len(known) > 8 else "")
            raise InputError(f"unknown group id {group_id!r}; known groups: {shown or 'none'}")
        entry = self._entry(product_id, group_id)
        if entry.pending and not self._score_pending(entry, product_id, group_id, started, budget_ms):
            original = float(entry.original_score)
            return Selection(product_id, group_id, (Choice(None, original, None),), "budget",
                             original if math.isfinite(original) else None, entry.candidates,
                             (_clock() - started) * 1000.0)
        ranked = entry.ranked
        original = float(entry.original_score)
        if len(ranked) == 1:
            fallback = "none_stored"
        elif ranked[0].creative_id is None:
            fallback = "original_better"
        else:
            fallback = None
        return Selection(product_id, group_id, ranked[:k], fallback, original if math.isfinite(original) else None,
                         entry.candidates, (_clock() - started) * 1000.0)
