"""Creative click logs: three folder layouts, read into one checked form (`AdLog`).

Layouts, detected from the folder's contents (`detect_layout`):

``sim`` — the project's synthetic world (`cg4ctr_fast.sim` writes it):
    logs.parquet       creative_id, group_id, impressions, clicks [, item_id, day]
    creatives.parquet  creative_id, item_id, file [, caption, title]   (file: relative to the folder
                       or to its creatives/ sub-folder; caption: space-separated style tokens)
    groups.json        [{group_id, features: [float, ...], ...}, ...]   (or {"groups": [...]})
    items.parquet      optional: item_id, title (used when creatives.parquet has no title)

``creative_ranking`` — the public CreativeRanking data (Alibaba): one or more list files
    (``*.list``; or ``*.csv`` / ``*.tsv`` / ``*.txt`` whose first line has 5 fields) with lines
    ``item_id, image, ds, pv, clk`` (comma or tab separated, an optional header line), and the images
    in ``images/`` (or ``imgs/``, ``image/``, ``img/``) beside them.  The image name is the creative
    id.  No user groups (one group, features [1.0]), no captions, no titles.

``cg4ctr_json`` — the CG4CTR paper's JSON: ``{"<item>_<sol>": [{"creative_id", "creative_image_hash",
    "exp_impression_cnt", "exp_click_cnt", ...}, ...]}`` in one or more ``*.json`` files (merged),
    images named by creative_image_hash (else creative_id), with or without an extension, in an
    images folder as above.  The item id is the key before its first "_".  A creative listed twice
    under one key counts once (as in the paper's loader); under different keys its counts add up.
    Optional "title" and "caption" fields are used when present.  One group.

Everything a user can get wrong becomes an `InputError` with one line naming the file: a layout
that cannot be recognised or read, missing columns, negative / NaN / non-numeric counts, clicks >
impressions, a group id unknown to groups.json, a creative id unknown to creatives.parquet, missing
image files, no log rows.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from cg4ctr_fast.errors import InputError

__all__ = [
    "LAYOUTS",
    "AdLog",
    "detect_layout",
    "load_ad_log",
    "split_items",
    "load_creative_images",
]

LAYOUTS = ("sim", "creative_ranking", "cg4ctr_json")
IMAGE_DIRS = ("images", "imgs", "image", "img")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_LIST_FIELDS = ("item_id", "image", "ds", "pv", "clk")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@dataclass
class AdLog:
    """Checked click logs of creatives, whatever layout they came from.

    creatives: one row per creative (RangeIndex = the creative's index): creative_id, item_id,
        title, caption (str; "" when absent), path (absolute image path).
    group_ids: the user groups' ids (str), group_features: [n_groups, group_dim] float32.
    logs: creative (int index into creatives), group (int index into group_ids), day (str),
        impressions, clicks (float64, checked: finite, ≥ 0, clicks ≤ impressions).
    """

    layout: str
    root: Path
    creatives: pd.DataFrame
    group_ids: list
    group_features: np.ndarray
    logs: pd.DataFrame

    def aggregate(self) -> pd.DataFrame:
        """Counts summed over days: one row per (creative, group) with impressions > 0.

        Columns: creative, group, item_id, impressions, clicks; sorted by (item_id, group, creative).
        """
        agg = self.logs.groupby(["creative", "group"], as_index=False, sort=True)[["impressions", "clicks"]].sum()
        agg = agg[agg["impressions"] > 0].copy()
        agg["item_id"] = self.creatives["item_id"].to_numpy()[agg["creative"].to_numpy()]
        agg = agg.sort_values(["item_id", "group", "creative"], kind="stable").reset_index(drop=True)
        return agg[["creative", "group", "item_id", "impressions", "clicks"]]


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------


def _list_files(root: Path) -> list[Path]:
    lists = sorted(p for p in root.glob("*.list") if p.is_file())
    if lists:
        return lists
    found = []
    for path in sorted(root.iterdir()):
        if path.is_file() and path.suffix.lower() in (".csv", ".tsv", ".txt"):
            first = _first_line(path)
            if first is not None and len(_split(first)) == len(_LIST_FIELDS):
                found.append(path)
    return found


def _first_line(path: Path) -> Optional[str]:
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            for line in handle:
                if line.strip():
                    return line
    except OSError:
        return None
    return None


def _split(line: str) -> list[str]:
    sep = "\t" if "\t" in line else ","
    return [field.strip() for field in line.rstrip("\r\n").split(sep)]


def detect_layout(root: Union[str, os.PathLike]) -> str:
    """'sim', 'creative_ranking' or 'cg4ctr_json'; InputError when the folder holds none of them."""
    path = Path(root)
    if not path.is_dir():
        raise InputError(f"{path}: no such data folder")
    if (path / "logs.parquet").exists() or (path / "creatives.parquet").exists():
        return "sim"
    if _list_files(path):
        return "creative_ranking"
    if any(p.is_file() for p in path.glob("*.json")):
        return "cg4ctr_json"
    raise InputError(
        f"{path}: unrecognised data layout: expected logs.parquet + creatives.parquet + groups.json (sim), "
        "a CreativeRanking list file (*.list: item_id,image,ds,pv,clk) or a CG4CTR JSON (*.json)"
    )


def load_ad_log(root: Union[str, os.PathLike], layout: Optional[str] = None) -> AdLog:
    """Read and check the logs in `root` (layout auto-detected unless given)."""
    path = Path(root)
    layout = layout or detect_layout(path)
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not path.is_dir():
        raise InputError(f"{path}: no such data folder")
    loader = {"sim": _load_sim, "creative_ranking": _load_creative_ranking, "cg4ctr_json": _load_cg4ctr_json}[layout]
    return loader(path)


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _norm_id(value) -> str:
    """Ids as strings, with integral numbers written without a decimal point (3.0 and 3 → "3")."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return str(value)
    return str(value)


def _norm_ids(values, label: str, column: str) -> np.ndarray:
    series = pd.Series(values)
    if series.isna().any():
        first = int(np.flatnonzero(series.isna().to_numpy())[0])
        raise InputError(f"{label}: column {column!r} has a missing value (row {first})")
    return np.array([_norm_id(v) for v in series.tolist()], dtype=object)


def _require_columns(frame: pd.DataFrame, columns, label: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(
            f"{label}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(has: {', '.join(map(str, frame.columns)) or 'none'})"
        )


def _check_counts(impressions, clicks, label: str, row_names=None) -> tuple[np.ndarray, np.ndarray]:
    """Counts as float64, or an InputError naming the first bad row (and its count of bad rows)."""
    def name(i: int) -> str:
        return f"row {i}" if row_names is None else str(row_names[i])

    out = []
    for values, column in ((impressions, "impressions"), (clicks, "clicks")):
        raw = pd.Series(values)
        numeric = pd.to_numeric(raw, errors="coerce").astype("float64").to_numpy()
        bad_type = np.isnan(numeric) & raw.notna().to_numpy()
        if bad_type.any():
            i = int(np.flatnonzero(bad_type)[0])
            raise InputError(f"{label}: {column} count is not a number at {name(i)}: {_one_line(raw.iloc[i])!r}")
        checks = (
            (np.isnan(numeric), "missing (NaN)"),
            (np.isinf(numeric), "infinite"),
            (numeric < 0, "negative"),
        )
        for mask, what in checks:
            if mask.any():
                i = int(np.flatnonzero(mask)[0])
                raise InputError(
                    f"{label}: {int(mask.sum())} {what} {column} count(s), first at {name(i)}"
                )
        out.append(numeric)
    imp, clk = out
    over = clk > imp
    if over.any():
        i = int(np.flatnonzero(over)[0])
        raise InputError(
            f"{label}: clicks > impressions in {int(over.sum())} row(s), first at {name(i)} "
            f"({clk[i]:g} clicks, {imp[i]:g} impressions)"
        )
    return imp, clk


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: missing (the sim layout needs logs.parquet, creatives.parquet and groups.json)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types on a corrupt file
        raise InputError(f"{path}: cannot read as parquet: {type(exc).__name__}: {_one_line(exc)[:200]}") from exc


def _find_image_dir(root: Path) -> Path:
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    raise InputError(f"{root}: no images folder ({', '.join(n + '/' for n in IMAGE_DIRS)}) beside the logs")


def _check_images_exist(paths: list, creative_ids: list, label: str) -> None:
    missing = [i for i, p in enumerate(paths) if p is None or not Path(p).is_file()]
    if missing:
        i = missing[0]
        where = paths[i] if paths[i] is not None else f"{label}/{creative_ids[i]}.*"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"{where}: image file missing for creative {creative_ids[i]!r}{more}")


def _finish(layout: str, root: Path, creatives: pd.DataFrame, group_ids: list, group_features: np.ndarray,
            log_creative_ids: np.ndarray, log_group_ids: np.ndarray, days, impressions, clicks,
            logs_label: str, known_groups_label: str) -> AdLog:
    """Join logs to creatives and groups by id, check everything, build the AdLog."""
    if len(log_creative_ids) == 0:
        raise InputError(f"{logs_label}: no log rows")
    creative_index = {cid: i for i, cid in enumerate(creatives["creative_id"].tolist())}
    group_index = {gid: i for i, gid in enumerate(group_ids)}
    c_idx = np.array([creative_index.get(cid, -1) for cid in log_creative_ids], dtype=np.int64)
    if (c_idx < 0).any():
        i = int(np.flatnonzero(c_idx < 0)[0])
        raise InputError(f"{logs_label}: creative id {log_creative_ids[i]!r} (row {i}) is not among the creatives")
    g_idx = np.array([group_index.get(gid, -1) for gid in log_group_ids], dtype=np.int64)
    if (g_idx < 0).any():
        i = int(np.flatnonzero(g_idx < 0)[0])
        known = ", ".join(group_ids[:10]) + (", ..." if len(group_ids) > 10 else "")
        raise InputError(
            f"{logs_label}: group id {log_group_ids[i]!r} (row {i}) is not in {known_groups_label} (known: {known})"
        )
    # Only the creatives that appear in the logs matter (and must have an image).
    used = np.unique(c_idx)
    remap = np.full(len(creatives), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    creatives = creatives.iloc[used].reset_index(drop=True)
    _check_images_exist(creatives["path"].tolist(), creatives["creative_id"].tolist(), str(root))
    logs = pd.DataFrame(
        {
            "creative": remap[c_idx],
            "group": g_idx,
            "day": [str(d) for d in days],
            "impressions": impressions,
            "clicks": clicks,
        }
    )
    return AdLog(layout, root, creatives, list(group_ids), np.asarray(group_features, dtype=np.float32), logs)


def _text_column(frame: pd.DataFrame, column: str) -> list[str]:
    if column not in frame.columns:
        return [""] * len(frame)
    return ["" if (v is None or (isinstance(v, float) and math.isnan(v))) else str(v) for v in frame[column].tolist()]


# --------------------------------------------------------------------------------------------
# (a) the synthetic world
# --------------------------------------------------------------------------------------------


def _load_groups_json(path: Path) -> tuple[list, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: missing (the sim layout needs logs.parquet, creatives.parquet and groups.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read as JSON: {_one_line(exc)}") from exc
    if isinstance(data, dict) and isinstance(data.get("groups"), list):
        data = data["groups"]
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty list of groups ({{group_id, features, ...}})")
    ids, features = [], []
    for i, group in enumerate(data):
        if not isinstance(group, dict) or "group_id" not in group or "features" not in group:
            raise InputError(f"{path}: group {i} needs 'group_id' and 'features'")
        feats = group["features"]
        if not isinstance(feats, list) or not feats or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in feats
        ):
            raise InputError(f"{path}: group {group['group_id']!r}: 'features' must be a non-empty list of finite numbers")
        ids.append(_norm_id(group["group_id"]))
        features.append([float(x) for x in feats])
    if len(set(ids)) != len(ids):
        dup = next(g for g in ids if ids.count(g) > 1)
        raise InputError(f"{path}: group id {dup!r} appears more than once")
    lengths = {len(f) for f in features}
    if len(lengths) > 1:
        raise InputError(f"{path}: groups have feature vectors of different lengths {sorted(lengths)}")
    return ids, np.asarray(features, dtype=np.float32)


def _load_sim(root: Path) -> AdLog:
    logs_path, creatives_path = root / "logs.parquet", root / "creatives.parquet"
    logs = _read_parquet(logs_path)
    creatives = _read_parquet(creatives_path)
    group_ids, group_features = _load_groups_json(root / "groups.json")
    _require_columns(logs, ("creative_id", "group_id", "impressions", "clicks"), str(logs_path))
    _require_columns(creatives, ("creative_id", "item_id", "file"), str(creatives_path))

    creative_ids = _norm_ids(creatives["creative_id"], str(creatives_path), "creative_id")
    if len(set(creative_ids)) != len(creative_ids):
        dup = pd.Series(creative_ids).duplicated()
        raise InputError(f"{creatives_path}: creative id {creative_ids[int(np.flatnonzero(dup)[0])]!r} appears more than once")
    item_ids = _norm_ids(creatives["item_id"], str(creatives_path), "item_id")
    titles = _text_column(creatives, "title")
    if "title" not in creatives.columns and (root / "items.parquet").is_file():
        items = _read_parquet(root / "items.parquet")
        if "item_id" in items.columns and "title" in items.columns:
            lookup = dict(zip(_norm_ids(items["item_id"], str(root / "items.parquet"), "item_id"), _text_column(items, "title")))
            titles = [lookup.get(i, "") for i in item_ids]
    paths = []
    for rel in creatives["file"].tolist():
        if not isinstance(rel, str) or not rel:
            paths.append(None)
            continue
        direct, nested = root / rel, root / "creatives" / rel
        paths.append(str((direct if direct.is_file() or not nested.is_file() else nested).resolve()))
    table = pd.DataFrame(
        {
            "creative_id": creative_ids,
            "item_id": item_ids,
            "title": titles,
            "caption": _text_column(creatives, "caption"),
            "path": paths,
        }
    )

    label = str(logs_path)
    log_cids = _norm_ids(logs["creative_id"], label, "creative_id")
    log_gids = _norm_ids(logs["group_id"], label, "group_id")
    imp, clk = _check_counts(logs["impressions"], logs["clicks"], label)
    if "item_id" in logs.columns:
        item_of = dict(zip(creative_ids, item_ids))
        log_items = _norm_ids(logs["item_id"], label, "item_id")
        for i, (cid, item) in enumerate(zip(log_cids, log_items)):
            if cid in item_of and item_of[cid] != item:
                raise InputError(
                    f"{label}: row {i}: creative {cid!r} is logged under item {item!r} but belongs to item {item_of[cid]!r}"
                )
    days = logs["day"].tolist() if "day" in logs.columns else ["all"] * len(logs)
    return _finish("sim", root, table, group_ids, group_features, log_cids, log_gids, days, imp, clk,
                   label, str(root / "groups.json"))


# --------------------------------------------------------------------------------------------
# (b) CreativeRanking list files
# --------------------------------------------------------------------------------------------


def _is_header(fields: list[str]) -> bool:
    try:
        float(fields[3])
        float(fields[4])
    except ValueError:
        return True
    return False


def _load_creative_ranking(root: Path) -> AdLog:
    files = _list_files(root)
    if not files:
        raise InputError(f"{root}: no CreativeRanking list file (*.list with item_id,image,ds,pv,clk lines)")
    image_dir = _find_image_dir(root)
    rows: list[list[str]] = []
    names: list[str] = []
    for path in files:
        try:
            with open(path, encoding="utf-8-sig") as handle:
                lines = handle.readlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read list file: {_one_line(exc)}") from exc
        first = True
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = _split(line)
            if len(fields) != len(_LIST_FIELDS):
                raise InputError(
                    f"{path}:{number}: {len(fields)} fields, expected 5 ({', '.join(_LIST_FIELDS)})"
                )
            if first and _is_header(fields):
                first = False
                continue
            first = False
            rows.append(fields)
            names.append(f"{path.name}:{number}")
    label = ", ".join(str(p) for p in files)
    if not rows:
        raise InputError(f"{label}: no log rows")
    item_ids = np.array([r[0] for r in rows], dtype=object)
    images = np.array([r[1] for r in rows], dtype=object)
    for i, (item, image) in enumerate(zip(item_ids, images)):
        if not item or not image:
            raise InputError(f"{names[i]}: empty item_id or image field")
    imp, clk = _check_counts([r[3] for r in rows], [r[4] for r in rows], label, names)

    item_of: dict[str, str] = {}
    for i, (item, image) in enumerate(zip(item_ids, images)):
        previous = item_of.setdefault(image, item)
        if previous != item:
            raise InputError(f"{names[i]}: image {image!r} is listed under items {previous!r} and {item!r}")
    creative_ids = list(item_of)
    creatives = pd.DataFrame(
        {
            "creative_id": creative_ids,
            "item_id": [item_of[c] for c in creative_ids],
            "title": [""] * len(creative_ids),
            "caption": [""] * len(creative_ids),
            "path": [str((image_dir / c).resolve()) for c in creative_ids],
        }
    )
    return _finish("creative_ranking", root, creatives, ["0"], np.ones((1, 1), np.float32), images,
                   np.array(["0"] * len(rows), dtype=object), [r[2] for r in rows], imp, clk, label, "the single group")


# --------------------------------------------------------------------------------------------
# (c) CG4CTR JSON
# --------------------------------------------------------------------------------------------


def _resolve_image(image_dir: Path, names: list[str]) -> Optional[str]:
    for name in names:
        if not name:
            continue
        candidate = image_dir / name
        if candidate.is_file():
            return str(candidate.resolve())
        for ext in IMAGE_EXTS:
            candidate = image_dir / f"{name}{ext}"
            if candidate.is_file():
                return str(candidate.resolve())
    return None


def _load_cg4ctr_json(root: Path) -> AdLog:
    files = sorted(p for p in root.glob("*.json") if p.is_file())
    if not files:
        raise InputError(f"{root}: no CG4CTR JSON file (*.json)")
    image_dir = _find_image_dir(root)
    merged: dict[str, list] = {}
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read as JSON: {_one_line(exc)}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise InputError(f'{path}: expected {{"<item>_<sol>": [creative, ...], ...}}')
        for key, records in data.items():
            merged.setdefault(str(key), []).extend((path, r) for r in records)

    label = ", ".join(str(p) for p in files)
    info: dict[str, dict] = {}
    log_cids, imps, clks, names = [], [], [], []
    for key, records in merged.items():
        item = key.split("_", 1)[0]
        seen: set[str] = set()
        for position, (path, record) in enumerate(records):
            where = f"{path}: {key}[{position}]"
            if not isinstance(record, dict):
                raise InputError(f"{where}: a creative must be an object")
            missing = [f for f in ("creative_id", "exp_impression_cnt", "exp_click_cnt") if f not in record]
            if missing:
                raise InputError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            cid = _norm_id(record["creative_id"])
            if cid in seen:
                continue
            seen.add(cid)
            if cid not in info:
                image_names = [str(record.get("creative_image_hash") or ""), cid]
                info[cid] = {
                    "item_id": item,
                    "title": str(record.get("title") or ""),
                    "caption": str(record.get("caption") or ""),
                    "path": _resolve_image(image_dir, image_names),
                    "expected": image_dir / (image_names[0] or cid),
                }
            elif info[cid]["item_id"] != item:
                raise InputError(f"{where}: creative {cid!r} also appears under item {info[cid]['item_id']!r}")
            log_cids.append(cid)
            imps.append(record["exp_impression_cnt"])
            clks.append(record["exp_click_cnt"])
            names.append(where)
    if not log_cids:
        raise InputError(f"{label}: no creatives")
    imp, clk = _check_counts(imps, clks, label, names)
    for cid, rec in info.items():
        if rec["path"] is None:
            raise InputError(f"{rec['expected']}: image file missing for creative {cid!r} (tried .png, .jpg, ... too)")
    creative_ids = list(info)
    creatives = pd.DataFrame(
        {
            "creative_id": creative_ids,
            "item_id": [info[c]["item_id"] for c in creative_ids],
            "title": [info[c]["title"] for c in creative_ids],
            "caption": [info[c]["caption"] for c in creative_ids],
            "path": [info[c]["path"] for c in creative_ids],
        }
    )
    return _finish("cg4ctr_json", root, creatives, ["0"], np.ones((1, 1), np.float32),
                   np.array(log_cids, dtype=object), np.array(["0"] * len(log_cids), dtype=object),
                   ["all"] * len(log_cids), imp, clk, label, "the single group")


# --------------------------------------------------------------------------------------------
# Splits and images
# --------------------------------------------------------------------------------------------


def split_items(item_ids, test_fraction: float, val_fraction: float, seed: int) -> tuple[list, list, list]:
    """Held-out items: (fit, val, test) lists of item ids, disjoint, deterministic under `seed`.

    test = round(test_fraction · n) items (InputError when that is 0 or n: an empty split);
    val = round(val_fraction · n_train) of the rest, kept only while ≥ 1 item is left to fit on
    (val may be empty: the caller then calibrates on the fitting items).
    """
    items = sorted({str(i) for i in item_ids})
    n = len(items)
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_test = int(round(test_fraction * n))
    if n_test == 0:
        raise InputError(
            f"the test split is empty: {n} item(s) with logged impressions × test fraction {test_fraction:g} "
            "rounds to 0 items; add items or raise --test-fraction"
        )
    if n_test >= n:
        raise InputError(
            f"the train split is empty: all {n} item(s) go to the test split at test fraction {test_fraction:g}; "
            "add items or lower --test-fraction"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [items[i] for i in order]
    test, train = shuffled[:n_test], shuffled[n_test:]
    n_val = min(int(round(val_fraction * len(train))), len(train) - 1)
    val, fit = train[:n_val], train[n_val:]
    return sorted(fit), sorted(val), sorted(test)


def load_creative_images(paths, size: int, progress: bool = False) -> np.ndarray:
    """uint8 [n, 3, size, size]: each image checked (`imaging.load_image`), RGB, resized to size×size."""
    from PIL import Image
    from tqdm.auto import tqdm

    from cg4ctr_fast.imaging import load_image, to_rgb_and_alpha_mask

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc="images", unit="img", disable=not progress, leave=False)):
        rgb, _ = to_rgb_and_alpha_mask(load_image(path, what="creative image"))
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return out
