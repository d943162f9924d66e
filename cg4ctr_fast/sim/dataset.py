"""Writing and reading a simulated dataset folder (the layout `cg4ctr-sim logs` produces).

    DIR/
      world.json          seed, image size, vocabulary, config, fingerprint: World.load(DIR) rebuilds the world
      groups.json         [{group_id, age_band, gender, region, interest, features}]  (public attributes only)
      items.parquet       one row per product (ITEM_COLUMNS)
      creatives.parquet   creative_id, item_id, caption, title, file
      logs.parquet        creative_id, item_id, group_id, day, impressions, clicks
      products/<item_id>.png     RGB product on plain white
      masks/<item_id>.png        mode L: 255 = background to repaint, 0 = product
      creatives/<creative_id>.png

The folder is written atomically (fileio.atomic_dir): it appears complete or not at all.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.fileio import atomic_dir
from cg4ctr_fast.sim.groups import GROUP_FEATURE_NAMES
from cg4ctr_fast.sim.world import CREATIVE_COLUMNS, ITEM_COLUMNS, LOG_COLUMNS, SimLogs, World

__all__ = ["save_dataset", "write_dataset", "load_dataset", "SimDataset", "check_output_dir", "DATASET_FILES"]

DATASET_FILES = ("world.json", "groups.json", "items.parquet", "creatives.parquet", "logs.parquet")
MAX_CREATIVES = 1_000_000
MAX_LOG_ROWS = 100_000_000


def check_output_dir(out: Union[str, os.PathLike]) -> Path:
    """Refuse an output folder that exists and is not empty (or is a file)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path}: output folder exists and is not empty; choose another --out")
    return path


def save_dataset(logs: SimLogs, out: Union[str, os.PathLike], progress: Optional[Callable[[int], None]] = None) -> Path:
    """Write `logs` (from World.sample_logs) in the dataset layout, atomically. Returns the folder."""
    world = logs.world
    out = Path(out)
    with atomic_dir(out) as tmp:
        for sub in ("products", "masks", "creatives"):
            (tmp / sub).mkdir()
        for product in logs.products:
            product.image.save(tmp / "products" / f"{product.item_id}.png")
            product.mask.save(tmp / "masks" / f"{product.item_id}.png")
            if progress is not None:
                progress(1)
        for creative in logs.creatives:
            creative.image.save(tmp / creative.file)
            if progress is not None:
                progress(1)
        (tmp / "world.json").write_text(json.dumps(world.to_json(), indent=2) + "\n")
        (tmp / "groups.json").write_text(json.dumps([g.record() for g in world.groups], indent=2) + "\n")
        logs.items_frame().to_parquet(tmp / "items.parquet", index=False)
        logs.creatives_frame().to_parquet(tmp / "creatives.parquet", index=False)
        logs.logs.to_parquet(tmp / "logs.parquet", index=False)
    return out


def write_dataset(out: Union[str, os.PathLike], *, seed: int = 0, n_products: int = 48, creatives_per_product: int = 8,
                  days: int = 14, image_size: int = 64, n_groups: int = 8,
                  progress: Optional[Callable[[int], None]] = None,
                  on_start: Optional[Callable[[int], None]] = None) -> dict:
    """Build World(seed, image_size, n_groups), sample its logs and write the dataset folder.

    Every argument is checked before any work (InputError, one line). `on_start(total)` receives the
    number of progress steps (creatives drawn + images written) before the first `progress(1)`.
    Returns a summary dict (counts, CTR range, seconds).
    """
    started = time.perf_counter()
    for name, value in (("--products", n_products), ("--creatives-per-product", creatives_per_product), ("--days", days)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    n_creatives = n_products * creatives_per_product
    if n_creatives > MAX_CREATIVES:
        raise InputError(f"{n_creatives} creatives is over the {MAX_CREATIVES} limit; lower --products or --creatives-per-product")
    out = check_output_dir(out)
    world = World(seed=seed, image_size=image_size, n_groups=n_groups)
    rows = n_creatives * world.n_groups * days
    if rows > MAX_LOG_ROWS:
        raise InputError(f"{rows} log rows is over the {MAX_LOG_ROWS} limit; lower --days or the counts")
    if on_start is not None:
        on_start(2 * n_creatives + n_products)
    logs = world.sample_logs(n_products, creatives_per_product, days, world.logs_rng(), progress=progress)
    save_dataset(logs, out, progress=progress)
    frame = logs.logs
    return {
        "out": str(out),
        "seed": world.seed,
        "products": n_products,
        "creatives": n_creatives,
        "groups": world.n_groups,
        "days": days,
        "rows": int(len(frame)),
        "impressions": int(frame["impressions"].sum()),
        "clicks": int(frame["clicks"].sum()),
        "true_ctr_min": float(logs.true_ctr.min()),
        "true_ctr_max": float(logs.true_ctr.max()),
        "seconds": time.perf_counter() - started,
    }


@dataclass
class SimDataset:
    """A dataset folder read back: the rebuilt world, the groups and the three tables."""

    root: Path
    world: World
    groups: list[dict]
    items: Any  # pandas.DataFrame
    creatives: Any
    logs: Any

    def product_image(self, item_id: int) -> Image.Image:
        return Image.open(self.root / "products" / f"{int(item_id)}.png").convert("RGB")

    def mask(self, item_id: int) -> Image.Image:
        return Image.open(self.root / "masks" / f"{int(item_id)}.png").convert("L")

    def creative_image(self, creative_id: int) -> Image.Image:
        return Image.open(self.root / "creatives" / f"{int(creative_id)}.png").convert("RGB")

    @property
    def group_features(self) -> np.ndarray:
        """(n_groups, len(GROUP_FEATURE_NAMES)) one-hot attribute matrix, rows in group_id order."""
        ordered = sorted(self.groups, key=lambda g: g["group_id"])
        return np.array([g["features"] for g in ordered], dtype=np.float32)


def load_dataset(path: Union[str, os.PathLike]) -> SimDataset:
    """Read a folder written by `cg4ctr-sim logs` / `save_dataset`; rebuilds the world from world.json."""
    import pandas as pd

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: no such dataset folder")
    missing = [name for name in DATASET_FILES if not (root / name).is_file()]
    if missing:
        raise InputError(f"{root}: not a cg4ctr-sim dataset (missing {', '.join(missing)})")
    world = World.load(root)
    groups = json.loads((root / "groups.json").read_text())
    items = pd.read_parquet(root / "items.parquet")
    creatives = pd.read_parquet(root / "creatives.parquet")
    logs = pd.read_parquet(root / "logs.parquet")
    for name, frame, columns in (("items", items, ITEM_COLUMNS), ("creatives", creatives, CREATIVE_COLUMNS),
                                 ("logs", logs, LOG_COLUMNS)):
        if tuple(frame.columns) != tuple(columns):
            raise InputError(f"{root}/{name}.parquet: columns {list(frame.columns)}, expected {list(columns)}")
    if groups and len(groups[0].get("features", [])) != len(GROUP_FEATURE_NAMES):
        raise InputError(f"{root}/groups.json: feature vectors do not match GROUP_FEATURE_NAMES")
    return SimDataset(root=root, world=world, groups=groups, items=items, creatives=creatives, logs=logs)
