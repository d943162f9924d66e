"""The caption vocabulary of the synthetic world: 24 style tokens in 4 categories.

A caption is at most one token per category, written in the canonical category order
(palette, texture, scene, lighting) and separated by spaces, e.g. "warm stripes beach golden".
Every token belongs to exactly one category, so a caption parses without ambiguity.
"""
from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Union

from cg4ctr_fast.errors import InputError

__all__ = [
    "CATEGORIES",
    "STYLE_VOCAB",
    "TOKEN_CATEGORY",
    "ALL_TOKENS",
    "Caption",
    "parse_caption",
    "caption_text",
    "all_captions",
    "stable_int",
]

CATEGORIES: tuple[str, ...] = ("palette", "texture", "scene", "lighting")

STYLE_VOCAB: dict[str, tuple[str, ...]] = {
    "palette": ("warm", "cool", "pastel", "neon", "earthy", "monochrome"),
    "texture": ("smooth", "grainy", "stripes", "checker", "waves", "bokeh"),
    "scene": ("studio", "beach", "forest", "city", "kitchen", "sky"),
    "lighting": ("bright", "dim", "golden", "soft", "dramatic", "backlit"),
}

TOKEN_CATEGORY: dict[str, str] = {
    token: category for category, tokens in STYLE_VOCAB.items() for token in tokens
}
ALL_TOKENS: tuple[str, ...] = tuple(token for category in CATEGORIES for token in STYLE_VOCAB[category])

# Checked at import: a token in two categories would make captions ambiguous.
assert len(TOKEN_CATEGORY) == len(ALL_TOKENS), "style tokens must be unique across categories"

Caption = Union[str, Sequence[str]]


def parse_caption(caption: Caption) -> dict[str, str]:
    """Map a caption (a space-separated string or a sequence of tokens) to {category: token}.

    Categories without a token are absent from the result. Raises InputError (one line) for an
    unknown token or for two tokens of the same category. Case and extra spaces are ignored.
    """
    if isinstance(caption, str):
        tokens = caption.split()
    else:
        tokens = [str(t) for t in caption]
    chosen: dict[str, str] = {}
    for raw in tokens:
        token = raw.strip().lower()
        if not token:
            continue
        category = TOKEN_CATEGORY.get(token)
        if category is None:
            raise InputError(
                f"unknown style token {raw!r}; the vocabulary is: {' '.join(ALL_TOKENS)}"
            )
        if category in chosen and chosen[category] != token:
            raise InputError(
                f"caption has two {category} tokens ({chosen[category]!r} and {token!r}); use at most one per category"
            )
        chosen[category] = token
    return chosen


def caption_text(caption: Caption) -> str:
    """The canonical text of a caption: its tokens in category order, separated by single spaces."""
    chosen = parse_caption(caption)
    return " ".join(chosen[c] for c in CATEGORIES if c in chosen)


def all_captions() -> list[tuple[str, ...]]:
    """Every full caption (one token per category), in a fixed order: 6**4 = 1296 of them."""
    return [tuple(combo) for combo in itertools.product(*(STYLE_VOCAB[c] for c in CATEGORIES))]


def stable_int(*parts: object) -> int:
    """A 63-bit integer from hashlib over the parts' text: the same in every process (unlike hash())."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1
