"""The manifest beside exported models: what was exported from what, with hashes, profiles and versions.

`manifest.json` is written last, so a folder without one is an interrupted export and never loads. Readers
check the format and its version, then every file's size and sha256 against the manifest, and refuse with one
line that says what to do. Pure Python: nothing here imports torch, onnx or tensorrt.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export.contracts import REWARD_COMPONENTS, ComponentContract

ONNX_FORMAT = "cg4ctr-onnx"
ENGINE_FORMAT = "cg4ctr-tensorrt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VALIDATION = "validation.json"
MODEL_INFO = "model_info.json"
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "onnxscript", "tensorrt", "triton")
REEXPORT = "re-export with `cg4ctr-export onnx`"
REWARD_DIR = "reward"  # the reward model's config.json and vocab.json, beside reward_image/ and reward_head/


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, Optional[str]]:
    versions: dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_description() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def file_record(root: Path, relative: str) -> dict[str, Any]:
    path = root / relative
    return {"path": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def read_manifest(folder: str | Path, *, expect: str = ONNX_FORMAT) -> dict[str, Any]:
    """The folder's manifest, after checking its format and version (InputError, one line, otherwise)."""
    root = Path(folder)
    what = "engine" if expect == ENGINE_FORMAT else "ONNX"
    again = (
        "rebuild with `cg4ctr-export engine --onnx DIR --out DIR`" if expect == ENGINE_FORMAT else REEXPORT
    )
    if not root.is_dir():
        raise InputError(f"{root}: no such {what} folder")
    path = root / MANIFEST
    if not path.is_file():
        raise InputError(f"{root}: not a complete {what} folder (no {MANIFEST}; an interrupted export leaves none): {again}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest ({type(exc).__name__}): {again}") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: unreadable manifest (not a JSON object): {again}")
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if fmt != expect:
        raise InputError(f"{path}: format {fmt!r}, expected {expect!r}: {again}")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path}: manifest format version {version!r}, this cg4ctr_fast reads version {FORMAT_VERSION}: {again}"
        )
    components = manifest.get("components")
    if not isinstance(components, dict) or not components:
        raise InputError(f"{path}: manifest lists no components: {again}")
    return manifest


def check_files(
    folder: str | Path, manifest: Mapping[str, Any], components: Optional[Iterable[str]] = None, *, hashes: bool = True
) -> None:
    """Every listed file of the components exists with the recorded size and sha256 (InputError otherwise).

    The reward components also need the reward model's config and vocabularies (manifest "reward" → "files"):
    the head's embedding tables are indexed by one vocabulary's ids, so a swapped vocab.json would score wrong
    without any error.
    """
    root = Path(folder)
    again = "rebuild with `cg4ctr-export engine`" if manifest.get("format") == ENGINE_FORMAT else REEXPORT
    names = list(components) if components is not None else list(manifest["components"])
    records: list[Mapping[str, Any]] = []
    for name in names:
        entry = manifest["components"].get(name)
        if entry is None:
            raise InputError(f"{root}: the manifest has no component {name!r} (it has {', '.join(manifest['components'])})")
        records.extend(entry.get("files", []))
    if any(name in REWARD_COMPONENTS for name in names):
        reward = manifest.get("reward")
        if not isinstance(reward, dict) or not reward.get("files"):
            raise InputError(f"{root}: the manifest lists reward components but no reward model files: {again}")
        records.extend(reward["files"])
    for record in records:
        path = root / record["path"]
        if not path.is_file():
            raise InputError(f"{path}: missing (the manifest lists it): {again}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise InputError(
                f"{path}: {size} bytes, the manifest says {record['bytes']} (truncated or modified): {again}"
            )
        if hashes and sha256_file(path) != record["sha256"]:
            raise InputError(f"{path}: sha256 differs from the manifest (modified after export): {again}")


def contract_of(manifest: Mapping[str, Any], name: str) -> ComponentContract:
    try:
        return ComponentContract.from_dict(manifest["components"][name]["contract"])
    except KeyError:
        raise InputError(f"the manifest has no contract for component {name!r}") from None


def gpu_description() -> Optional[str]:
    """'NVIDIA H100 80GB HBM3 (compute capability 9.0)' or None; imports torch, touches CUDA only if present."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (compute capability {props.major}.{props.minor})"
