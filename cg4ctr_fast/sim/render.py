"""Backgrounds drawn from a caption: numpy only, well under 1 ms for a 64×64 image.

Each category of the vocabulary controls one family of measurable features (see `features.py`):

- palette  -> the two base colours: hue and saturation (and some brightness);
- scene    -> the layout: regions (horizon, floor, counter, trunks, skyline, clouds) and their tints;
- texture  -> a high- or low-frequency pattern: texture energy (mean |Laplacian|) and spread;
- lighting -> a brightness field and tone curve: brightness, brightness spread, and a warm cast (golden).

Patterns are defined in image-relative coordinates (noise on a grid of at most 64×64 cells, upsampled by
nearest neighbour), so a 512-pixel render looks like a sharper 64-pixel one and its features measured at
64×64 match. Everything random comes from the numpy Generator passed in, in a fixed order.
"""
from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import Union

import numpy as np
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.sim.vocab import CATEGORIES, STYLE_VOCAB, Caption, parse_caption

__all__ = ["render_background", "render_background_array", "resolve_caption", "MIN_SIZE", "MAX_SIZE"]

MIN_SIZE = 8
MAX_SIZE = 2048
_NOISE_GRID = 64

RngLike = Union[np.random.Generator, int, None]

# palette: (hue°, hue jitter°, saturation, value) of the primary colour, then (hue offset°, saturation,
# value) of the secondary colour used by the scene's second region.
_PALETTES: dict[str, tuple[float, float, float, float, float, float, float]] = {
    "warm": (16.0, 8.0, 0.80, 0.92, 22.0, 0.85, 0.95),
    "cool": (212.0, 8.0, 0.70, 0.85, -28.0, 0.60, 0.72),
    "pastel": (320.0, 20.0, 0.26, 0.97, -50.0, 0.24, 0.95),
    "neon": (302.0, 8.0, 1.00, 1.00, 38.0, 1.00, 0.90),
    "earthy": (32.0, 6.0, 0.58, 0.52, 40.0, 0.52, 0.40),
    "monochrome": (0.0, 0.0, 0.00, 0.64, 0.0, 0.00, 0.32),
}


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and int(rng) >= 0:
        return np.random.default_rng(int(rng))
    raise InputError(f"rng must be a numpy Generator or a non-negative integer seed, got {rng!r}")


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise InputError(f"image size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}")
    return int(size)


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] as a column (y) and a row (x), and the noise-grid index."""
    coords = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
    cells = min(size, _NOISE_GRID)
    index = (np.arange(size) * cells) // size
    y = coords[:, None].copy()
    x = coords[None, :].copy()
    for a in (y, x, index):
        a.setflags(write=False)
    return y, x, index


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    dtype=np.float32)


def resolve_caption(caption: Caption, rng: RngLike) -> tuple[str, ...]:
    """A full caption: the given tokens, and for each missing category one drawn from `rng` (in category order)."""
    chosen = parse_caption(caption)
    gen = _rng(rng)
    tokens = []
    for category in CATEGORIES:
        if category in chosen:
            tokens.append(chosen[category])
        else:
            options = STYLE_VOCAB[category]
            tokens.append(options[int(gen.integers(len(options)))])
    return tuple(tokens)


def _smoothstep(edge: float, width: float, t: np.ndarray) -> np.ndarray:
    return np.clip((t - edge) / width + 0.5, 0.0, 1.0)


def _scene(scene: str, gen: np.random.Generator, y: np.ndarray, x: np.ndarray, size: int):
    """(region map R in [0,1] mixing primary -> secondary, tint colour map, tint alpha map)."""
    shape = (size, size)
    if scene == "studio":
        floor = 0.70 + gen.uniform(-0.05, 0.05)
        region = np.broadcast_to(_smoothstep(floor, 0.06, y), shape).astype(np.float32)
        # A faint sweep: the backdrop is lighter in the middle.
        tint = np.broadcast_to(np.array([1.0, 1.0, 1.0], np.float32), shape + (3,))
        alpha = np.broadcast_to(0.12 * np.exp(-((x - 0.5) ** 2) / 0.08) * (1 - region), shape)
        return region, tint, alpha.astype(np.float32)
    if scene == "beach":
        horizon = 0.48 + gen.uniform(-0.05, 0.05)
        shore = horizon + 0.13 + gen.uniform(-0.03, 0.03)
        sky = np.array([0.55, 0.78, 0.98], np.float32)
        sea = np.array([0.10, 0.45, 0.70], np.float32)
        sand = np.array([0.93, 0.83, 0.60], np.float32)
        yy = np.broadcast_to(y, shape)
        band = np.where(yy < horizon, 0, np.where(yy < shore, 1, 2))
        tint = np.stack([sky, sea, sand])[band]
        alpha = np.choose(band, [0.45, 0.55, 0.50]).astype(np.float32)
        region = (band == 2).astype(np.float32)
        return region, tint, alpha
    if scene == "forest":
        n = int(gen.integers(4, 7))
        centres = gen.uniform(0.03, 0.97, n).astype(np.float32)
        widths = gen.uniform(0.025, 0.06, n).astype(np.float32)
        trunks = (np.abs(x[..., None] - centres) < widths).any(axis=-1)  # (1, size)
        ground = y > 0.86
        trunk_map = np.broadcast_to(trunks, shape) & ~np.broadcast_to(ground, shape)
        green = np.array([0.16, 0.46, 0.18], np.float32)
        bark = np.array([0.26, 0.17, 0.10], np.float32)
        tint = np.where(trunk_map[..., None], bark, green)
        alpha = np.where(trunk_map, 0.75, 0.42).astype(np.float32)
        region = np.broadcast_to(ground, shape).astype(np.float32)
        return region, tint, alpha
    if scene == "city":
        n = int(gen.integers(5, 9))
        edges = np.sort(gen.uniform(0.0, 1.0, n - 1)).astype(np.float32)
        tops = gen.uniform(0.22, 0.62, n).astype(np.float32)
        column = np.searchsorted(edges, x[0])  # which building each x falls in
        building = y > tops[column][None, :]
        region = building.astype(np.float32)
        steel = np.array([0.42, 0.46, 0.56], np.float32)
        dusk = np.array([0.70, 0.72, 0.82], np.float32)
        tint = np.where(building[..., None], steel, dusk)
        alpha = np.where(building, 0.45, 0.25).astype(np.float32)
        return region, tint, alpha
    if scene == "kitchen":
        counter = 0.62 + gen.uniform(-0.04, 0.04)
        yy = np.broadcast_to(y, shape)
        band = np.where(yy < counter - 0.03, 0, np.where(yy < counter, 1, 2))
        wall = np.array([0.93, 0.90, 0.83], np.float32)
        edge = np.array([0.20, 0.16, 0.12], np.float32)
        wood = np.array([0.56, 0.36, 0.20], np.float32)
        tint = np.stack([wall, edge, wood])[band]
        alpha = np.choose(band, [0.40, 0.80, 0.55]).astype(np.float32)
        region = (band == 2).astype(np.float32)
        return region, tint, alpha
    if scene == "sky":
        top = np.array([0.40, 0.64, 1.00], np.float32)
        low = np.array([0.82, 0.90, 1.00], np.float32)
        tint = np.broadcast_to(top + (low - top) * y[..., None], shape + (3,))
        n = int(gen.integers(3, 6))
        cx = gen.uniform(0.0, 1.0, n).astype(np.float32)
        cy = gen.uniform(0.1, 0.8, n).astype(np.float32)
        rx = gen.uniform(0.10, 0.22, n).astype(np.float32)
        ry = rx * gen.uniform(0.35, 0.6, n).astype(np.float32)
        d2 = ((x - cx[:, None, None]) / rx[:, None, None]) ** 2 + ((y - cy[:, None, None]) / ry[:, None, None]) ** 2
        cloud = np.clip(1.3 - d2, 0.0, 1.0).max(axis=0)
        white = np.array([1.0, 1.0, 1.0], np.float32)
        tint = tint + (white - tint) * cloud[..., None]
        alpha = (0.50 + 0.35 * cloud).astype(np.float32)
        region = np.broadcast_to(y, shape).astype(np.float32)
        return region, tint.astype(np.float32), alpha
    raise AssertionError(scene)  # pragma: no cover - parse_caption only yields known tokens


def _texture(texture: str, gen: np.random.Generator, y: np.ndarray, x: np.ndarray, index: np.ndarray,
             img: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    if texture == "smooth":
        return img
    if texture == "grainy":
        cells = min(img.shape[0], _NOISE_GRID)
        noise = gen.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
        return img + 0.11 * noise[index][:, index][..., None]
    if texture == "stripes":
        angle = float(gen.choice([0.0, 45.0, 90.0, 135.0])) * np.pi / 180.0
        freq = gen.uniform(5.0, 7.0)
        phase = gen.uniform(0.0, 2 * np.pi)
        t = x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle))
        pattern = np.sign(np.sin(np.float32(2 * np.pi * freq) * t + np.float32(phase)))
        return img + 0.10 * pattern[..., None]
    if texture == "checker":
        cells = gen.uniform(6.0, 8.0)
        px, py = gen.uniform(0.0, 2 * np.pi, 2)
        pattern = np.sign(np.sin(np.float32(np.pi * cells) * x + np.float32(px))
                          * np.sin(np.float32(np.pi * cells) * y + np.float32(py)))
        return img + 0.10 * pattern[..., None]
    if texture == "waves":
        f1, f2 = gen.uniform(2.5, 3.5), gen.uniform(1.5, 2.5)
        p1, p2 = gen.uniform(0.0, 2 * np.pi, 2)
        pattern = np.sin(np.float32(2 * np.pi * f1) * (y + 0.10 * np.sin(np.float32(2 * np.pi * f2) * x + np.float32(p1)))
                         + np.float32(p2))
        return img + 0.13 * pattern[..., None]
    if texture == "bokeh":
        n = int(gen.integers(7, 12))
        cx = gen.uniform(0.0, 1.0, n).astype(np.float32)
        cy = gen.uniform(0.0, 1.0, n).astype(np.float32)
        r = gen.uniform(0.05, 0.10, n).astype(np.float32)
        level = gen.uniform(0.6, 1.0, n).astype(np.float32)
        r, level = r[:, None, None], level[:, None, None]
        d = np.sqrt((x - cx[:, None, None]) ** 2 + (y - cy[:, None, None]) ** 2)
        disks = (np.clip((r - d) / (0.2 * r), 0.0, 1.0) * level).max(axis=0)
        light = (0.75 + 0.25 * secondary).astype(np.float32)
        return img + 0.7 * disks[..., None] * (light - img)
    raise AssertionError(texture)  # pragma: no cover


def _lighting(lighting: str, gen: np.random.Generator, y: np.ndarray, x: np.ndarray, img: np.ndarray) -> np.ndarray:
    if lighting == "bright":
        return 1.0 - (1.0 - img) * 0.5
    if lighting == "dim":
        return img * 0.42
    if lighting == "golden":
        lx = float(gen.choice([0.0, 1.0])) + gen.uniform(-0.1, 0.1)
        ly = gen.uniform(-0.1, 0.15)
        glow = np.clip(1.0 - 0.75 * np.sqrt((x - lx) ** 2 + (y - ly) ** 2), 0.0, 1.0)
        amber = np.array([0.50, 0.30, 0.02], np.float32)
        return img * 0.78 + glow[..., None] * amber
    if lighting == "soft":
        mean = img.mean(axis=(0, 1), keepdims=True)
        return mean + 0.5 * (img - mean) + 0.07
    if lighting == "dramatic":
        cx, cy = 0.5 + gen.uniform(-0.15, 0.15), 0.35 + gen.uniform(-0.1, 0.1)
        spot = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / np.float32(2 * 0.17 ** 2))
        lit = img * (0.12 + 1.1 * spot[..., None])
        return (lit - 0.5) * 1.25 + 0.5
    if lighting == "backlit":
        cx, cy = 0.5 + gen.uniform(-0.06, 0.06), 0.45 + gen.uniform(-0.06, 0.06)
        glow = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / np.float32(2 * 0.24 ** 2))
        halo = np.array([1.0, 0.96, 0.86], np.float32)
        return img * 0.45 + 0.75 * glow[..., None] * halo
    raise AssertionError(lighting)  # pragma: no cover


def render_background_array(caption: Caption, rng: RngLike, size: int = 64) -> np.ndarray:
    """Like `render_background`, returning a (size, size, 3) uint8 array."""
    size = _check_size(size)
    gen = _rng(rng)
    palette, texture, scene, lighting = resolve_caption(caption, gen)
    y, x, index = _grid(size)

    hue, jitter, sat, val, offset, sat2, val2 = _PALETTES[palette]
    hue = hue + gen.uniform(-jitter, jitter) if jitter else hue
    primary = _hsv(hue, sat + gen.uniform(-0.05, 0.05) * (sat > 0), val + gen.uniform(-0.04, 0.04))
    secondary = _hsv(hue + offset, sat2, val2)

    region, tint, alpha = _scene(scene, gen, y, x, size)
    img = primary + (secondary - primary) * region[..., None]
    img = img + (tint - img) * alpha[..., None]
    img = _texture(texture, gen, y, x, index, img, secondary)
    img = _lighting(lighting, gen, y, x, img)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_background(caption: Caption, rng: RngLike, size: int = 64) -> Image.Image:
    """Draw a size×size RGB background whose measurable features follow the caption's tokens.

    `caption` is a space-separated string or a sequence of style tokens, at most one per category;
    a missing category gets a token drawn from `rng` (so a partial caption is a mixture). `rng` is a
    numpy Generator (or a non-negative int seed); the same caption and generator state give the same
    pixels. Raises InputError for an unknown token or a size outside 8..2048.
    """
    return Image.fromarray(render_background_array(caption, rng, size), "RGB")
