"""Which way imports run (DESIGN.md §3): export is read by the runtime and driven by the command lines, never
the reverse; models know no backend. Every import statement counts, the lazy ones inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cg4ctr_fast

PACKAGE = Path(cg4ctr_fast.__file__).parent

# package folder or module → the packages it must not import
FORBIDDEN = {
    "export": ("cg4ctr_fast.cli", "cg4ctr_fast.runtime", "cg4ctr_fast.pipeline"),
    "models": ("cg4ctr_fast.cli", "cg4ctr_fast.runtime", "cg4ctr_fast.export", "cg4ctr_fast.pipeline"),
    "fileio.py": ("cg4ctr_fast.cli", "cg4ctr_fast.runtime", "cg4ctr_fast.export", "cg4ctr_fast.models"),
    # The serving engine knows nothing of HTTP (DESIGN.md §10): only the HTTP layer imports the server libraries.
    "serving/runtime.py": ("cg4ctr_fast.serving.http", "cg4ctr_fast.serving.protocol", "cg4ctr_fast.serving.metrics",
                           "cg4ctr_fast.cli", "fastapi", "starlette", "uvicorn", "prometheus_client", "ray"),
    "serving/store.py": ("cg4ctr_fast.serving.runtime", "cg4ctr_fast.serving.http", "cg4ctr_fast.cli", "fastapi",
                         "torch"),
    "training": ("cg4ctr_fast.cli", "cg4ctr_fast.serving"),
    "serving/select.py": ("cg4ctr_fast.serving.runtime", "cg4ctr_fast.serving.http", "cg4ctr_fast.cli", "fastapi"),
}


def _imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, a module of `package`; relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def _file_imports(path: Path) -> list[tuple[int, str]]:
    package = ".".join(("cg4ctr_fast", *path.relative_to(PACKAGE).parent.parts))
    return _imports(path.read_text(encoding="utf-8"), package)


@pytest.mark.parametrize("where", sorted(FORBIDDEN))
def test_no_upward_imports(where):
    root = PACKAGE / where
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    assert files
    bad = [
        f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        for path in files
        for line, module in _file_imports(path)
        if any(module == banned or module.startswith(banned + ".") for banned in FORBIDDEN[where])
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports():
    """So the test above can fail: a function-level import and a relative one are both found."""
    source = "def f():\n    from cg4ctr_fast.cli.common import check_out_dir\n    from ..runtime import slots\n"
    modules = [module for _, module in _imports(source, "cg4ctr_fast.export")]
    assert "cg4ctr_fast.cli.common" in modules and "cg4ctr_fast.runtime.slots" in modules
