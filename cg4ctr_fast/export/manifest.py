"""The manifest beside exported models: what was exported from what, with hashes, profiles and versions.

`manifest.json` is written last, so a folder without one is an interrupted export and never loads. Readers
check the format and its version, then every file's size and sha256 against the manifest, and refuse with one
line that says what to do. Pure Python: nothing here imports torch, onnx or tensorrt.

Every file the folder holds is listed: the components' graphs (and external data, and the saliency net's
config.json, SALIENCY_CONFIG) under "components", and
everything else the runtime reads (tokenizer/, scheduler/, model_info.json, reward/, validation.json) under
"files". A file the manifest does not list is refused too: an added tokenizer/added_tokens.json would change
tokenisation as surely as an edited vocab.json.

Cost at load (`check_files(..., hash_limit=LOAD_HASH_BYTES)`): sha256 ran at 1.19 GB/s on the development CPU,
so an SD1.5 fp32 folder (≈4.3 GB of graphs) would add ≈3.6 s to every load. Loading hashes every file up to
LOAD_HASH_BYTES (all tokenizer, scheduler, config and reward files; every graph of the tiny stack) and checks
larger ones by size; `cg4ctr-export verify` hashes every file.

Settings come from flags or from a recipe file (`cg4ctr-export onnx --recipe FILE`): "settings" holds the
values in effect either way, and "recipe" (`recipe_record`) the file behind them. It is optional: a folder
exported without --recipe has null, one exported before recipes existed has none, and readers treat both
alike, so adding it did not change FORMAT_VERSION.

Provenance is content, not paths: the source model folder's content hash (`folder_sha256`), the LoRA's file
hash and scale (`lora`: one record, or for several LoRAs fused together a combined record whose `loras` lists
each; see export.lora.manifest_lora), the saliency and reward weights' sha256. Paths are kept as hints only (made absolute), so a
folder verifies from any directory, and a moved source is named with --model / --lora / --saliency / --reward.
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
# 2: every file is listed ("files" beside "components"); the source is recorded by content hash. A version-1
# folder left its tokenizer/scheduler/model_info unchecked, so it is refused: re-export.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# Files a measurement writes into an engine folder after export: the planner's cost table (`cg4ctr-bench
# --calibrate --engines`). They describe this machine, not the engines, so the manifest does not list them and
# verification neither requires nor refuses them.
COST_TABLE = "cost_table.json"
MEASURED_AFTER_EXPORT = (COST_TABLE,)
VALIDATION = "validation.json"
MODEL_INFO = "model_info.json"
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "onnxscript", "tensorrt", "triton")
REEXPORT = "re-export with `cg4ctr-export onnx`"
REWARD_DIR = "reward"  # the reward model's config.json and vocab.json, beside reward_image/ and reward_head/
LOAD_HASH_BYTES = 256 << 20  # at load, files over this are size-checked only (see the module docstring)
# The saliency net's own config beside its graph: {"architecture", "size" (px), "threshold", "dilate_px"}, the
# format `cg4ctr-train saliency` writes (models/saliency.py). Listed with the saliency component's files, so it
# is hashed like the graph; the runtimes run the graph at this size and threshold.
SALIENCY_CONFIG = "saliency/config.json"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: str | Path) -> str:
    """Content hash of a folder (e.g. a diffusers model): sha256 over its sorted (relative path, file sha256).

    Hidden files and folders (a name starting with ".", e.g. .cache/, .git/) are skipped: they are not the
    model. Moving or renaming the folder keeps the hash; editing, adding or removing a file changes it.
    """
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def runtime_file_records(root: Path, components: Iterable[str]) -> list[dict[str, Any]]:
    """Records (path, bytes, sha256) of every file under `root` that is not a component's and not the manifest:
    tokenizer/, scheduler/, model_info.json, reward/, validation.json. Call it last, just before the manifest."""
    skip = set(components)
    records = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST or relative.split("/", 1)[0] in skip:
            continue
        records.append(file_record(root, relative))
    return records


def recipe_record(path: str, sha256: str, keys: Mapping[str, Any], overridden: Iterable[str]) -> dict[str, Any]:
    """The manifest's "recipe" section for an export run with `--recipe FILE`.

    {"path": the file as given on the command line (a hint, relative to where the command ran), "sha256": of the
    file's bytes (hex), "keys": the settings it holds (the TOML keys and values, components as a list),
    "overridden": the keys a command-line flag replaced, in recipe order (the values used are "settings")}.
    """
    keys = dict(keys)
    overridden = list(overridden)
    unknown = [key for key in overridden if key not in keys]
    if unknown:  # a flag can only override a key the recipe sets
        raise ValueError(f"overridden keys {unknown} are not in the recipe's keys {list(keys)}")
    return {"path": str(path), "sha256": sha256, "keys": keys, "overridden": overridden}


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
    if type(version) is not int or version != FORMAT_VERSION:  # "2" (a string) is not version 2
        raise InputError(
            f"{path}: manifest format version {json.dumps(version)}, this cg4ctr_fast reads version "
            f"{FORMAT_VERSION} (an integer): {again}"
        )
    components = manifest.get("components")
    if not isinstance(components, dict) or not components:
        raise InputError(f"{path}: manifest lists no components: {again}")
    return manifest


def check_files(
    folder: str | Path,
    manifest: Mapping[str, Any],
    components: Optional[Iterable[str]] = None,
    *,
    hashes: bool = True,
    hash_limit: Optional[int] = None,
) -> None:
    """The folder holds exactly what its manifest lists, byte for byte (InputError, one line naming the file).

    Checked: the files of `components` (default: all), every runtime file (manifest "files": tokenizer/,
    scheduler/, model_info.json, reward/, validation.json), and that no file the manifest does not list was
    added. Each file's size always; its sha256 when `hashes`, for files up to `hash_limit` bytes (None: all).
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
    runtime = manifest.get("files")
    if not isinstance(runtime, list):
        raise InputError(f"{root / MANIFEST}: lists no runtime files (tokenizer, scheduler, ...): {again}")
    records.extend(runtime)
    for record in records:
        relative = record.get("path") if isinstance(record, Mapping) else None
        # Entries name files inside the folder: an absolute path, "..", or a symlink would make verify vouch
        # for bytes the folder does not hold.
        if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or \
                ".." in Path(relative).parts:
            raise InputError(f"{root / MANIFEST}: file entry {relative!r} is not a path inside the folder: {again}")
        path = root / relative
        if path.is_symlink():
            raise InputError(f"{path}: a symbolic link; an export folder holds its own files: {again}")
        if not path.is_file():
            raise InputError(f"{path}: missing (the manifest lists it): {again}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise InputError(
                f"{path}: {size} bytes, the manifest says {record['bytes']} (truncated or modified): {again}"
            )
        if hashes and (hash_limit is None or size <= hash_limit) and sha256_file(path) != record["sha256"]:
            raise InputError(f"{path}: sha256 differs from the manifest (modified after export): {again}")
    listed = {r["path"] for r in runtime} | {
        f["path"] for entry in manifest["components"].values() for f in entry.get("files", [])
    } | {f["path"] for f in ((manifest.get("reward") or {}).get("files") or [])}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative != MANIFEST and relative not in listed and relative not in MEASURED_AFTER_EXPORT:
            raise InputError(f"{path}: not listed in the manifest (added after export): remove it or {again}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_model_info(root: Path) -> "ModelInfo":
    """The folder's model_info.json as a ModelInfo, every field checked for its type and range.

    The manifest's sha256 only shows the file is the one recorded; a hand-edited file re-hashed to match
    would otherwise fail deep in the loop (a null scaling_factor: TypeError).  Ranges: channels and
    sample_size positive integers; unet_in_channels = latent_channels (masked blending) or
    2 × latent_channels + 1 (an inpainting UNet: latents, mask, masked-image latents); vae_scale_factor a
    power of two (2 ** (VAE blocks - 1), 8 for SD); scaling_factor a finite number > 0 (0.18215 for SD1.x);
    model_id a string.  Raises InputError, one line naming the file and the field.
    """
    import math
    from dataclasses import fields

    from cg4ctr_fast.models.diffusion import ModelInfo

    path = root / MODEL_INFO
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({type(exc).__name__}): {REEXPORT}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a JSON object: {REEXPORT}")
    names = [f.name for f in fields(ModelInfo)]
    missing = [n for n in names if n not in data]
    extra = sorted(set(data) - set(names))
    if missing or extra:
        what = f"missing {', '.join(missing)}" if missing else f"unknown field {', '.join(extra)}"
        raise InputError(f"{path}: {what}: {REEXPORT}")

    def bad(field: str, expected: str) -> InputError:
        return InputError(f"{path}: {field} must be {expected}, got {data[field]!r}: {REEXPORT}")

    for field in ("latent_channels", "sample_size", "unet_in_channels", "vae_scale_factor"):
        if not _is_int(data[field]) or data[field] <= 0:
            raise bad(field, "a positive integer")
    latent = data["latent_channels"]
    if data["unet_in_channels"] not in (latent, 2 * latent + 1):
        raise bad("unet_in_channels", f"{latent} or {2 * latent + 1} (latent_channels {latent})")
    scale = data["vae_scale_factor"]
    if scale & (scale - 1):
        raise bad("vae_scale_factor", "a power of two")
    factor = data["scaling_factor"]
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
            and factor > 0):
        raise bad("scaling_factor", "a finite number > 0")
    if not isinstance(data["model_id"], str):
        raise bad("model_id", "a string")
    return ModelInfo(**{**data, "scaling_factor": float(factor)})


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
