"""Procedurally drawn products with exact masks.

A product is drawn in two steps: `product_spec` takes every random decision (shape, colours, pattern,
size, position, price, rating) from a numpy Generator, in image-relative coordinates; `rasterize` draws
the spec at any pixel size with Pillow's non-antialiased primitives, so the mask is exactly the set of
pixels the product was painted on: `image[mask == 0]` are the product's pixels, nothing else was touched.
The same spec gives the same geometry at every size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "SHAPE_CATEGORY",
    "PATTERNS",
    "COLOURS",
    "ITEM_FEATURE_NAMES",
    "ProductSpec",
    "Product",
    "product_spec",
    "rasterize",
    "draw_product",
]

SHAPES: tuple[str, ...] = ("bottle", "box", "can", "shoe", "jar", "phone", "lamp", "mug")
SHAPE_CATEGORY: dict[str, str] = {
    "bottle": "drinks",
    "can": "drinks",
    "box": "snacks",
    "shoe": "fashion",
    "jar": "beauty",
    "phone": "electronics",
    "lamp": "home",
    "mug": "kitchen",
}
# Width / height of the bounding box.
_ASPECT = {"bottle": 0.42, "box": 0.85, "can": 0.58, "shoe": 1.9, "jar": 1.0, "phone": 0.52, "lamp": 0.72, "mug": 1.15}
_CYLINDER = {"bottle", "can", "jar", "mug", "lamp"}
# Typical price per category (currency units): the log-normal median.
_PRICE = {"drinks": 3.0, "snacks": 4.5, "fashion": 80.0, "beauty": 25.0, "electronics": 400.0, "home": 60.0, "kitchen": 15.0}

PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "gradient", "label")
_PATTERN_WORD = {"solid": "", "stripes": "striped", "dots": "dotted", "gradient": "gradient", "label": "labelled"}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (196, 38, 44),
    "orange": (236, 120, 30),
    "yellow": (240, 200, 40),
    "green": (46, 150, 70),
    "teal": (20, 140, 140),
    "blue": (40, 80, 190),
    "purple": (120, 60, 160),
    "pink": (230, 110, 160),
    "brown": (120, 75, 40),
    "black": (34, 34, 38),
    "white": (236, 236, 230),
    "silver": (175, 178, 185),
}
_SILVER = (190, 192, 198)
_DARK = (30, 30, 34)
_CREAM = (246, 240, 224)
PLAIN_BACKGROUND = (255, 255, 255)

ITEM_FEATURE_NAMES: tuple[str, ...] = (
    "log_price",
    "rating",
    "popularity",
    "area",
    "aspect",
    "lightness",
    "center_x",
    "center_y",
)

# Parts in bounding-box coordinates (u, v in [0, 1]): (role, kind, geometry[, radius]).
# Roles: body (gets the pattern), body_light / body_dark (shaded body colour), accent, silver, dark,
# hole (erases from the part drawn just before it: the mug handle's opening).
_PARTS: dict[str, list[tuple]] = {
    "bottle": [
        ("body", "rrect", (0.08, 0.36, 0.92, 1.0), 0.18),
        ("body", "poly", ((0.08, 0.44), (0.36, 0.2), (0.64, 0.2), (0.92, 0.44))),
        ("body", "rect", (0.36, 0.09, 0.64, 0.26)),
        ("accent", "rect", (0.32, 0.0, 0.68, 0.11)),
    ],
    "box": [
        ("body", "rect", (0.0, 0.18, 0.8, 1.0)),
        ("body_light", "poly", ((0.0, 0.18), (0.2, 0.0), (1.0, 0.0), (0.8, 0.18))),
        ("body_dark", "poly", ((0.8, 0.18), (1.0, 0.0), (1.0, 0.82), (0.8, 1.0))),
    ],
    "can": [
        ("body", "rect", (0.0, 0.07, 1.0, 0.93)),
        ("silver", "ellipse", (0.0, 0.0, 1.0, 0.14)),
        ("silver", "ellipse", (0.0, 0.86, 1.0, 1.0)),
    ],
    "shoe": [
        ("body", "poly", ((0.02, 0.8), (0.04, 0.3), (0.3, 0.24), (0.44, 0.0), (0.62, 0.02), (0.7, 0.36),
                          (0.96, 0.52), (1.0, 0.8))),
        ("accent", "poly", ((0.44, 0.04), (0.6, 0.06), (0.66, 0.36), (0.5, 0.34))),
        ("silver", "rect", (0.0, 0.8, 1.0, 1.0)),
    ],
    "jar": [
        ("body", "rrect", (0.0, 0.26, 1.0, 1.0), 0.22),
        ("accent", "rect", (0.08, 0.04, 0.92, 0.3)),
    ],
    "phone": [
        ("dark", "rrect", (0.0, 0.0, 1.0, 1.0), 0.16),
        ("body", "rect", (0.1, 0.08, 0.9, 0.86)),
        ("silver", "ellipse", (0.42, 0.89, 0.58, 0.96)),
    ],
    "lamp": [
        ("silver", "rect", (0.45, 0.4, 0.55, 0.92)),
        ("accent", "ellipse", (0.14, 0.86, 0.86, 1.0)),
        ("body", "poly", ((0.22, 0.0), (0.78, 0.0), (1.0, 0.46), (0.0, 0.46))),
    ],
    "mug": [
        ("body", "ellipse", (0.58, 0.22, 1.0, 0.78)),
        ("hole", "ellipse", (0.7, 0.36, 0.9, 0.64)),
        ("body", "rrect", (0.0, 0.04, 0.78, 1.0), 0.08),
    ],
}


@dataclass(frozen=True)
class ProductSpec:
    """Every random decision about one product, in image-relative coordinates (no pixels)."""

    item_id: int
    shape: str
    colour: str
    accent_colour: str
    pattern: str
    base_rgb: tuple[int, int, int]
    accent_rgb: tuple[int, int, int]
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]
    pattern_period: float
    pattern_phase: float
    price: float
    rating: float
    popularity: float

    @property
    def category(self) -> str:
        return SHAPE_CATEGORY[self.shape]

    @property
    def title(self) -> str:
        word = _PATTERN_WORD[self.pattern]
        return " ".join(w for w in (self.colour, word, self.shape) if w)


@dataclass
class Product:
    """A drawn product: `image` (RGB, product on a plain white background) and its exact `mask`.

    `mask` is mode "L" in diffusers' convention: 255 = background to repaint, 0 = product to keep.
    """

    spec: ProductSpec
    image: Image.Image
    mask: Image.Image
    area: float
    lightness: float
    features: np.ndarray = field(repr=False)

    @property
    def item_id(self) -> int:
        return self.spec.item_id

    @property
    def title(self) -> str:
        return self.spec.title

    @property
    def category(self) -> str:
        return self.spec.category

    @property
    def shape(self) -> str:
        return self.spec.shape

    @property
    def size(self) -> int:
        return self.image.width

    def record(self) -> dict:
        """The product's row in items.parquet (without the file columns)."""
        s = self.spec
        x0, y0, x1, y1 = s.bbox
        return {
            "item_id": s.item_id,
            "title": s.title,
            "category": s.category,
            "shape": s.shape,
            "colour": s.colour,
            "accent_colour": s.accent_colour,
            "pattern": s.pattern,
            "price": round(s.price, 2),
            "rating": s.rating,
            "popularity": s.popularity,
            "area": self.area,
            "aspect": (y1 - y0) / (x1 - x0),
            "lightness": self.lightness,
            "center_x": (x0 + x1) / 2,
            "center_y": (y0 + y1) / 2,
        }


def product_spec(item_id: int, rng: np.random.Generator) -> ProductSpec:
    """Draw a product's spec. The order of draws is fixed, so (item_id, generator state) fixes the product."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    others = [n for n in names if n != colour]
    accent = others[int(rng.integers(len(others)))]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    jitter = rng.integers(-14, 15, 3)
    base = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
    accent_rgb = COLOURS[accent]

    height = rng.uniform(0.42, 0.78)
    width = height * _ASPECT[shape]
    limit = rng.uniform(0.72, 0.86)
    if width > limit:
        height, width = height * limit / width, limit
    margin = 0.04
    cx = rng.uniform(margin + width / 2, 1 - margin - width / 2)
    cy = rng.uniform(margin + height / 2, 1 - margin - height / 2)
    bbox = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)

    period = rng.uniform(0.12, 0.22)
    phase = rng.uniform(0.0, 1.0)
    price = _PRICE[SHAPE_CATEGORY[shape]] * float(np.exp(rng.normal(0.0, 0.35)))
    rating = float(np.round(np.clip(rng.normal(4.1, 0.45), 1.0, 5.0), 1))
    popularity = float(np.round(rng.normal(0.0, 1.0), 3))
    return ProductSpec(
        item_id=int(item_id), shape=shape, colour=colour, accent_colour=accent, pattern=pattern,
        base_rgb=base, accent_rgb=accent_rgb, bbox=tuple(float(v) for v in bbox),
        pattern_period=float(period), pattern_phase=float(phase), price=float(price), rating=rating,
        popularity=popularity,
    )


def _body_colours(spec: ProductSpec, size: int) -> np.ndarray:
    """The body role's colour at every pixel (size, size, 3) float, pattern and shading applied."""
    x0, y0, x1, y1 = spec.bbox
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = ((coords - x0) / (x1 - x0))[None, :]
    v = ((coords - y0) / (y1 - y0))[:, None]
    base = np.array(spec.base_rgb, np.float32)
    accent = np.array(spec.accent_rgb, np.float32)
    shape = (size, size, 3)
    if spec.pattern == "solid":
        out = np.broadcast_to(base, shape)
    elif spec.pattern == "stripes":
        stripe = (np.mod(v / spec.pattern_period + spec.pattern_phase, 1.0) < 0.5)
        out = np.where(np.broadcast_to(stripe, (size, size))[..., None], accent, base)
    elif spec.pattern == "dots":
        step = spec.pattern_period * 1.3
        du = np.mod(u / step + spec.pattern_phase, 1.0) - 0.5
        dv = np.mod(v * (y1 - y0) / (x1 - x0) / step, 1.0) - 0.5
        dot = du * du + dv * dv < 0.09
        out = np.where(dot[..., None], accent, base)
    elif spec.pattern == "gradient":
        t = np.clip(v, 0.0, 1.0)[..., None]
        out = np.broadcast_to(base + (accent - base) * t, shape)
    else:  # label
        band = (v > 0.48) & (v < 0.78)
        line = (v > 0.6) & (v < 0.66)
        out = np.where(np.broadcast_to(line, (size, size))[..., None], accent,
                       np.where(np.broadcast_to(band, (size, size))[..., None], np.array(_CREAM, np.float32), base))
    if spec.shape in _CYLINDER:
        shade = 0.74 + 0.26 * np.sin(np.pi * np.clip(u, 0.0, 1.0))
        out = out * shade[..., None]
    return np.asarray(out, np.float32)


def _draw_part(draw: ImageDraw.ImageDraw, kind: str, geometry, radius, spec: ProductSpec, size: int, fill: int):
    x0, y0, x1, y1 = spec.bbox
    w, h = x1 - x0, y1 - y0

    def px(u: float, v: float) -> tuple[float, float]:
        return ((x0 + u * w) * size, (y0 + v * h) * size)

    if kind == "poly":
        draw.polygon([px(u, v) for u, v in geometry], fill=fill)
        return
    a = px(geometry[0], geometry[1])
    b = px(geometry[2], geometry[3])
    box = [a[0], a[1], max(a[0], b[0] - 1), max(a[1], b[1] - 1)]
    if kind == "rect":
        draw.rectangle(box, fill=fill)
    elif kind == "ellipse":
        draw.ellipse(box, fill=fill)
    elif kind == "rrect":
        r = int(radius * w * size)
        r = max(0, min(r, int((box[2] - box[0]) / 2), int((box[3] - box[1]) / 2)))
        draw.rounded_rectangle(box, radius=r, fill=fill)
    else:  # pragma: no cover
        raise AssertionError(kind)


def rasterize(spec: ProductSpec, size: int) -> tuple[Image.Image, Image.Image]:
    """Draw the spec at size×size: (RGB image on plain white, mask "L": 0 = product, 255 = background)."""
    body = _body_colours(spec, size)
    base = np.array(spec.base_rgb, np.float32)
    role_colour = {
        "body_light": base * 0.55 + 255 * 0.45,
        "body_dark": base * 0.62,
        "accent": np.array(spec.accent_rgb, np.float32),
        "silver": np.array(_SILVER, np.float32),
        "dark": np.array(_DARK, np.float32),
    }
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = PLAIN_BACKGROUND
    covered = np.zeros((size, size), bool)
    parts = _PARTS[spec.shape]
    i = 0
    while i < len(parts):
        role, kind, geometry, *rest = parts[i]
        part = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(part)
        _draw_part(draw, kind, geometry, rest[0] if rest else 0.0, spec, size, 255)
        # A following "hole" part erases from this one (the mug handle's opening).
        while i + 1 < len(parts) and parts[i + 1][0] == "hole":
            _, hkind, hgeom, *hrest = parts[i + 1]
            _draw_part(draw, hkind, hgeom, hrest[0] if hrest else 0.0, spec, size, 0)
            i += 1
        painted = np.asarray(part) > 0
        colour = body if role == "body" else role_colour[role]
        canvas = np.where(painted[..., None], colour, canvas)
        covered |= painted
        i += 1
    pixels = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    pixels[~covered] = PLAIN_BACKGROUND
    mask = np.where(covered, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), Image.fromarray(mask, "L")


def draw_product(item_id: int, rng: np.random.Generator, size: int = 64, spec: Optional[ProductSpec] = None) -> Product:
    """Draw product `item_id` at size×size with the exact mask and its numeric item features."""
    spec = spec or product_spec(item_id, rng)
    image, mask = rasterize(spec, size)
    keep = np.asarray(mask) < 128
    pixels = np.asarray(image)[keep].astype(np.float64) / 255.0
    luma = pixels @ np.array([0.299, 0.587, 0.114]) if len(pixels) else np.zeros(1)
    area = float(keep.mean())
    lightness = float(luma.mean())
    x0, y0, x1, y1 = spec.bbox
    features = np.array(
        [np.log(spec.price), spec.rating, spec.popularity, area, (y1 - y0) / (x1 - x0), lightness,
         (x0 + x1) / 2, (y0 + y1) / 2],
        dtype=np.float64,
    )
    return Product(spec=spec, image=image, mask=mask, area=area, lightness=lightness, features=features)
