"""Lazy package attributes (PEP 562): `import cg4ctr_fast` and its subpackages load heavy modules on first use."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict) -> Callable[[str], Any]:
    """A module-level `__getattr__` that imports `table[name]` (a module; relative to `package` when it starts
    with ".") on first access, caches the attribute in `namespace` (the package's globals()) and returns it.
    Raises AttributeError, as Python does, for a name not in the table."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__
