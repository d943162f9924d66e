"""TOML recipes read into frozen dataclasses: the checks every training config file shares.

The recipes live in the repository's top-level `training/` folder (docs/cycle.md, "Recipes"):
    cycle.toml, cycle_pixel_reward.toml   `cg4ctr-train cycle` / `ablate` (training.cycle_config)
    ablation.toml                         `cg4ctr-train ablate`: a cycle config plus [ablation]
    toy.toml, toy-small.toml              `cg4ctr-train toy` (training.toy.load_toy_config)
    lcm.toml                              `cg4ctr-train lcm` (training.lcm.load_lcm_config)

`from_mapping(cls, data)` builds a (possibly nested) dataclass from a TOML mapping: a table per nested
dataclass, a list per tuple, `Optional[X]` fields left out of the file stay None (TOML has no null). An unknown
key, a value of the wrong type or a non-finite number fails with one line naming it (InputError, exit 2 in the
CLIs); the dataclass's own `__post_init__` checks the ranges. `load_recipe(cls, path)` reads the file and
prefixes every such line with the file's path.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cg4ctr_fast.errors import InputError

T = TypeVar("T")


def convert(value: Any, hint: Any, where: str) -> Any:
    """`value` (as tomllib returns it) checked against the type hint `hint`; `where` names it in errors."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise InputError(f"config: [{where}] must be a table, got {type(value).__name__}")
        return from_mapping(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        # Only Optional[X]: a key present in the file is an X (None is the value of a key left out).
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) != 1:
            raise TypeError(f"unsupported config type {hint!r} at {where}")
        return convert(value, options[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config: {where} must be a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(convert(v, item_hint, f"{where}[{k}]") for k, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"config: {where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config: {where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config: {where} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan literals; no key here means either
            raise InputError(f"config: {where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"config: {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def from_mapping(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a (TOML) mapping; unknown keys and wrong types fail with one line."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        place = f"[{where}]" if where else "the top level"
        raise InputError(f"config: unknown key {unknown[0]!r} in {place} (known: {', '.join(names)})")
    kwargs = {name: convert(data[name], hints[name], f"{where}.{name}" if where else name)
              for name in names if name in data}
    return cls(**kwargs)


def read_toml(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(the path, the file's mapping); a missing file or invalid TOML fails with one line."""
    import tomllib

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: config file not found")
    try:
        return file, tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: not valid TOML ({exc})") from None


def build(cls: type[T], data: dict[str, Any], file: Path, where: str = "") -> T:
    """`from_mapping`, with the file's path in front of any error (the dataclass's range checks included)."""
    try:
        if where:
            return convert(data, cls, where)
        return from_mapping(cls, data)
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None


def load_recipe(cls: type[T], path: str | os.PathLike) -> T:
    """Dataclass `cls` read from the TOML file at `path`. Raises InputError (one line) for a missing file,
    invalid TOML, an unknown key, a wrong type, a value out of range, or a file with no keys (an empty recipe
    would run every default, e.g. the 50-minute toy set, where a wrong file was the likelier mistake)."""
    file, data = read_toml(path)
    if not data:
        raise InputError(f"{file}: holds no keys; a recipe sets some of: "
                         f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    return build(cls, data, file)
