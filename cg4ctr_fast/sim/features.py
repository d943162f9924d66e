"""Measurable features of a creative's background, computed from pixels only.

Any image can be scored, whatever made it (the world's renderer, a diffusion model, a photo): the
features read the background region (mask >= 128 in diffusers' convention, or the whole image when no
mask is given), and the product region only for the contrast feature.

By default the image is first brought to the analysis resolution (64×64: area average when shrinking,
bilinear when enlarging; the mask follows as the fraction of product pixels per cell), so the numbers do
not depend on the image size. A cell counts as background when it holds no product pixel at all and as
product when at least half of it is product, so the seam never leaks into either mean.

Feature definitions (RGB in [0, 1]; Y = 0.299 R + 0.587 G + 0.114 B; sums over background pixels):

    a = R - (G + B) / 2,  b = (√3 / 2)(G - B),  chroma = √(a² + b²)          (opponent hue plane)
    hue_cos, hue_sin   = Σa / Σchroma, Σb / Σchroma   chroma-weighted mean hue direction (0 when grey);
                         cos/sin of the mean hue angle scaled by how concentrated the hue is (≤ 1)
    saturation         = mean (max - min) / max            HSV saturation
    brightness         = mean Y
    texture            = mean |4-neighbour Laplacian of Y| over pixels whose 3×3 neighbourhood is background
    contrast           = ‖mean RGB(product) - mean RGB(background)‖ / √3   (0 when there is no product)
    brightness_spread  = standard deviation of Y
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
from PIL import Image

__all__ = ["FEATURE_NAMES", "ANALYSIS_SIZE", "image_features", "prepare", "features_batch"]

FEATURE_NAMES: tuple[str, ...] = (
    "hue_cos",
    "hue_sin",
    "saturation",
    "brightness",
    "texture",
    "contrast",
    "brightness_spread",
)
CONTRAST = FEATURE_NAMES.index("contrast")
ANALYSIS_SIZE = 64

ImageLike = Union[Image.Image, np.ndarray]


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"image_features: expected an (H, W, 3) image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _product_fraction(mask, shape: tuple[int, int]) -> Optional[np.ndarray]:
    """Fraction of product (mask < 128) per pixel as float32, or None for no mask."""
    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        values = np.asarray(mask if mask.mode == "L" else mask.convert("L"))
        keep = values < 128
    else:
        values = np.asarray(mask)
        keep = ~values if values.dtype == bool else values < 128  # bool arrays: True = background
    if keep.shape != shape:
        raise ValueError(f"image_features: mask is {keep.shape[1]}×{keep.shape[0]} but the image is {shape[1]}×{shape[0]}")
    return keep.astype(np.float32)


def prepare(image: ImageLike, mask=None, size: Optional[int] = ANALYSIS_SIZE):
    """(RGB float32 array in [0, 1], background bool map, product bool map) at the analysis size.

    `mask`: a mode "L" image or uint8 array (255 = background, 0 = product) or a bool array
    (True = background), the image's size; None means the whole image is background.
    """
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    fraction = _product_fraction(mask, (height, width))
    if size is not None and (height, width) != (size, size):
        pil = Image.fromarray(rgb, "RGB")
        method = Image.Resampling.BOX if min(height, width) >= size else Image.Resampling.BILINEAR
        rgb = np.asarray(pil.resize((size, size), method))
        if fraction is not None:
            fraction = np.asarray(Image.fromarray(fraction, "F").resize((size, size), Image.Resampling.BOX))
    rgb_f = rgb.astype(np.float32) / 255.0
    if fraction is None:
        background = np.ones(rgb.shape[:2], bool)
        product = np.zeros(rgb.shape[:2], bool)
    else:
        background = fraction <= 1e-6
        product = fraction >= 0.5
        if not background.any():  # a mask with no background at all: measure everything
            background = ~product if (~product).any() else np.ones_like(product)
    return rgb_f, background, product


def features_batch(rgb: np.ndarray, background: np.ndarray, product: np.ndarray) -> np.ndarray:
    """Features of N images sharing one mask: rgb (N, H, W, 3) float in [0, 1] -> (N, len(FEATURE_NAMES))."""
    rgb = np.asarray(rgb, np.float32)
    n = rgb.shape[0]
    bg = background.astype(np.float32).ravel()
    count = max(float(bg.sum()), 1.0)

    def bg_sum(values: np.ndarray) -> np.ndarray:  # Σ over background pixels, per image (a mat-vec product)
        return values.reshape(n, -1) @ bg

    r, g, b = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))  # contiguous planes: reshapes stay views
    luma = 0.299 * r + 0.587 * g + 0.114 * b

    opp_a = r - 0.5 * (g + b)
    opp_b = np.float32(np.sqrt(3.0) / 2.0) * (g - b)
    chroma = np.sqrt(opp_a * opp_a + opp_b * opp_b)
    denom = np.maximum(bg_sum(chroma), 1e-3 * count)  # grey images: the hue vector shrinks to 0
    hue_cos = bg_sum(opp_a) / denom
    hue_sin = bg_sum(opp_b) / denom

    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    sat = (high - low) / np.maximum(high, 1e-6)
    saturation = bg_sum(sat) / count

    brightness = bg_sum(luma) / count
    spread = np.sqrt(np.maximum(bg_sum((luma - brightness[:, None, None]) ** 2) / count, 0.0))

    # Laplacian on interior pixels whose 3×3 neighbourhood is all background (no product edge).
    lap = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1]
           - luma[:, 1:-1, :-2] - luma[:, 1:-1, 2:])
    inner = background
    eroded = (inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
              & inner[:-2, :-2] & inner[:-2, 2:] & inner[2:, :-2] & inner[2:, 2:])
    if eroded.any():
        weight = eroded.astype(np.float32).ravel()
        texture = np.abs(lap).reshape(n, -1) @ weight / float(weight.sum())
    else:
        texture = np.zeros(n, np.float32)

    if product.any():
        pw = product.astype(np.float32).ravel()
        flat = rgb.reshape(n, -1, 3)
        prod_mean = np.einsum("npc,p->nc", flat, pw) / float(pw.sum())
        bg_mean = np.einsum("npc,p->nc", flat, bg) / count
        contrast = np.sqrt(((prod_mean - bg_mean) ** 2).sum(axis=-1) / 3.0)
    else:
        contrast = np.zeros(n, np.float32)

    out = np.stack([hue_cos, hue_sin, saturation, brightness, texture, contrast, spread], axis=-1)
    return out.astype(np.float64)


def image_features(image: ImageLike, mask=None, *, size: Optional[int] = ANALYSIS_SIZE) -> np.ndarray:
    """The background features of one image, in FEATURE_NAMES order, as a float64 array.

    `image`: PIL image or (H, W, 3) array (uint8, or float in [0, 1]). `mask`: diffusers convention
    (mode "L": 255 = background, 0 = product; or a bool array, True = background), the image's size;
    None measures the whole image as background (contrast is then 0). `size`: the analysis resolution
    (64 by default; None measures at the image's own size).
    """
    rgb, background, product = prepare(image, mask, size)
    return features_batch(rgb[None], background, product)[0]
