"""Fuse a LoRA into the torch modules before export, through diffusers or peft (never hand-written merging).

Accepted:
- diffusers `pytorch_lora_weights.safetensors` (or a folder holding it), with its `lora_adapter_metadata`;
- kohya / A1111 keys (`lora_unet_…`, `lora_te_…`): diffusers' `lora_state_dict` converts them on load;
- a peft folder (`adapter_model.safetensors` + `adapter_config.json`) of a UNet adapter: peft's
  `PeftModel.from_pretrained` + `set_scale` + `merge_and_unload`.

A LoRA made for another architecture (keys that match no layer, or shapes that differ) is refused with one line.
The LoRA id (sha256 of the file(s) + the scale) goes into the manifest and the TensorRT engine cache key.

Several LoRAs (`fuse_loras`, e.g. an LCM/TCD-LoRA with a style or cycle LoRA) are fused together through
diffusers' multi-adapter API: each is loaded as its own adapter, `set_adapters(names, adapter_weights=scales)`,
one `fuse_lora`, then `unload_lora_weights`, so the modules end as the plain architecture. An SD1.5 LCM/TCD-LoRA
leaves `conv_in` alone, so it applies to the 9-channel inpainting UNet; one that adapts `conv_in` for another
number of input channels is refused with one line. One LoRA goes through `fuse_lora` exactly as before (same
record, same id). The manifest's `lora` section is `manifest_lora(records)`: the record itself for one LoRA, a
combined record holding the list for several (`recorded_loras` reads either back).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from cg4ctr_fast.errors import InputError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER = "cg4ctr_export"
MULTI_FORMAT = "fused"  # the combined record of several LoRAs (manifest_lora)


def resolve_lora(path: str | Path) -> tuple[str, list[Path]]:
    """('diffusers' | 'peft', the files that make it up); InputError for anything else."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_WEIGHTS).is_file() and (path / PEFT_CONFIG).is_file():
            return "peft", [path / PEFT_WEIGHTS, path / PEFT_CONFIG]
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return "diffusers", [path / DIFFUSERS_WEIGHT_NAME]
        raise InputError(
            f"LoRA {path}: a folder needs {DIFFUSERS_WEIGHT_NAME} (diffusers) or {PEFT_WEIGHTS} + {PEFT_CONFIG} (peft)"
        )
    if not path.exists():
        raise InputError(f"LoRA {path}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"LoRA {path}: expected a .safetensors file (pickled LoRAs are not loaded)")
    return "diffusers", [path]


def lora_record(path: str | Path, scale: float) -> dict[str, Any]:
    """The LoRA's identity for manifests and cache keys, by content: sha256 over its files' sha256, plus the scale.

    Keys: id (sha256 of "sha256:scale"), sha256 (the content), scale, format (diffusers | kohya | peft), files
    (each file's role and sha256) and source, the absolute path it was read from: a hint for finding it again,
    never part of its identity. A renamed or moved file keeps its id; one changed byte or another scale does not.
    """
    kind, files = resolve_lora(path)
    digest = hashlib.sha256()
    shas = [_sha256(file) for file in files]
    # A peft folder's two files have fixed names; a single .safetensors file may be called anything.
    roles = [file.name for file in files] if kind == "peft" else ["weights"]
    for role, sha in zip(roles, shas):
        digest.update(f"{role}\0{sha}\n".encode())
    files_sha = digest.hexdigest()
    if kind == "diffusers" and _has_kohya_keys(files[0]):
        kind = "kohya"
    lora_id = hashlib.sha256(f"{files_sha}:{float(scale)!r}".encode()).hexdigest()
    return {"id": lora_id, "sha256": files_sha, "scale": float(scale), "format": kind,
            "files": [{"role": role, "sha256": sha} for role, sha in zip(roles, shas)],
            "source": str(Path(path).resolve())}


def _has_kohya_keys(file: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in handle.keys())
    except Exception:  # unreadable: fuse_lora says why
        return False


def _sha256(path: Path) -> str:
    from cg4ctr_fast.export.manifest import sha256_file

    return sha256_file(path)


def check_scale(scale: float) -> float:
    """The LoRA scale as a float; InputError (one line) for NaN or ±inf, which would fuse NaN into every
    adapted weight. Any finite value is accepted (0 = no LoRA, negative = the LoRA's opposite direction)."""
    if not math.isfinite(scale):
        raise InputError(f"--lora-scale must be a finite number, got {scale}")
    return float(scale)


def fuse_lora(modules, path: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Fuse the LoRA into `modules` (DiffusionModules) in place; returns its record (see lora_record)."""
    scale = check_scale(scale)
    record = lora_record(path, scale)
    _kind, files = resolve_lora(path)
    if record["format"] == "peft":
        _fuse_peft(modules, Path(path), files[0], scale)
    else:
        _fuse_diffusers(modules, files[0], scale)
    return record


def _lora_numel(*models) -> int:
    return sum(p.numel() for model in models for name, p in model.named_parameters() if ".lora_" in name)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    pick = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)
    return pick if len(pick) <= 220 else pick[:219] + "…"


def _mismatch(file: Path, detail: str) -> InputError:
    return InputError(f"LoRA {file} does not fit this model (a LoRA for another architecture?): {detail}")


def _fuse_diffusers(modules, file: Path, scale: float) -> None:
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    pipe = diffusers_inpaint_pipeline(modules)
    _load_diffusers(pipe, modules, file, ADAPTER)
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[ADAPTER])
    # The fused weights stay; the LoRA layers go, so the exported graph is the plain architecture.
    pipe.unload_lora_weights()


def _load_diffusers(pipe, modules, file: Path, adapter_name: str) -> None:
    """Load a diffusers / kohya LoRA file as the unfused adapter `adapter_name` of `pipe` (on `modules`).

    InputError (one line) when unreadable, empty, adapting conv_in for other in-channels, or when its
    parameters do not all land in the UNet / text encoder (a LoRA for another architecture).
    """
    try:
        # The same conversion load_lora_weights applies (kohya keys → diffusers keys, alphas apart).
        state_dict, _alphas = pipe.lora_state_dict(str(file))
    except Exception as exc:  # SafetensorError, OSError, ValueError: unreadable either way
        raise InputError(f"LoRA {file}: cannot read ({_first_line(exc)})") from None
    expected = sum(v.numel() for k, v in state_dict.items() if "lora" in k and not k.endswith(".alpha"))
    if expected == 0:
        raise InputError(f"LoRA {file}: holds no LoRA weights")
    _check_conv_in(file, state_dict, modules.unet)
    before = _lora_numel(modules.unet, modules.text_encoder)
    try:
        pipe.load_lora_weights(str(file), adapter_name=adapter_name)
    except Exception as exc:  # RuntimeError (shapes), ValueError / NoMatchingPeftModuleError (keys)
        raise _mismatch(file, _first_line(exc)) from None
    loaded = _lora_numel(modules.unet, modules.text_encoder) - before
    if loaded != expected:
        raise _mismatch(file, f"{expected - loaded} of its {expected} LoRA parameters match no layer")


# The down (A) matrix of a LoRA on conv_in is a Conv2d(in_channels, rank): its dim 1 is the UNet's in-channels.
_CONV_IN_DOWN = ("conv_in.lora_A.", "conv_in.lora.down.", "conv_in.lora_down.")


def _check_conv_in(file: Path, state_dict: dict, unet) -> None:
    """Refuse (one line) a LoRA that adapts conv_in for another number of input channels.

    SD1.5 LCM/TCD-LoRAs leave conv_in alone, so they fit the 9-channel inpainting UNet (4 latent + 1 mask + 4
    masked-image latent channels); a LoRA trained on a 4-channel text-to-image UNet's conv_in has 4 there.
    """
    want = int(unet.config.in_channels)  # not conv_in.in_channels: conv_in may already hold another adapter
    for key, value in state_dict.items():
        if "conv_in" in key and any(marker in key for marker in _CONV_IN_DOWN) and value.ndim >= 2:
            if int(value.shape[1]) != want:
                raise InputError(
                    f"LoRA {file} adapts conv_in for {int(value.shape[1])} input channels, this UNet's conv_in "
                    f"takes {want}: use a LoRA that leaves conv_in alone (as SD1.5 LCM/TCD-LoRAs do) or one made "
                    "for this UNet")


def _fuse_peft(modules, folder: Path, weights: Path, scale: float) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise InputError(f"LoRA {weights}: cannot read as safetensors ({_first_line(exc)})") from None
    expected = sum(v.numel() for k, v in state.items() if "lora_" in k)
    if expected == 0:
        raise InputError(f"LoRA {weights}: holds no LoRA weights")
    _check_conv_in(folder, state, modules.unet)
    try:
        model = PeftModel.from_pretrained(modules.unet, str(folder), adapter_name=ADAPTER, is_trainable=False)
    except Exception as exc:
        raise _mismatch(folder, _first_line(exc)) from None
    injected = _lora_numel(model)
    if injected != expected:
        raise _mismatch(folder, f"its {expected} LoRA parameters fill {injected} in this UNet's adapter layers")
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, scale)  # scale × lora_alpha / r, as peft defines it
    modules.unet = model.merge_and_unload().eval()


def fuse_loras(modules, loras: Sequence[tuple[str | Path, float]]) -> list[dict[str, Any]]:
    """Fuse one or more LoRAs into `modules` (DiffusionModules: unet, text_encoder) in place, each at its scale.

    loras: (path, scale) pairs; path as `resolve_lora` takes it (diffusers / kohya .safetensors, a folder holding
    one, or a peft folder), scale any finite float (the adapter weight: 1.0 = as trained, 0 = off).
    Returns one `lora_record` per LoRA, in the order given. One LoRA is `fuse_lora` (same weights, same record);
    several are loaded as adapters of one diffusers pipeline, weighted by `set_adapters`, fused by one
    `fuse_lora` and unloaded (`unload_lora_weights`): the modules end as the plain architecture. The UNet keeps
    its in-channels: a LoRA that leaves conv_in alone fits the 9-channel inpainting UNet.

    The fused sum W + Σ scale_i·ΔW_i does not depend on the order mathematically; to make it bitwise
    independent too (so `manifest_lora`'s order-free combined id names one set of weights), the adapters are
    loaded and fused sorted by record id, whatever order the caller gives.

    Raises InputError (one line) for a missing or unreadable file, a non-finite scale, or a LoRA that does not
    fit (other shapes, keys that match no layer, conv_in for other in-channels); with several LoRAs the
    modules are then left without any adapter and unchanged (every file is resolved before any loads).
    """
    pairs = [(path, check_scale(float(scale))) for path, scale in loras]
    if len(pairs) <= 1:
        return [fuse_lora(modules, path, scale) for path, scale in pairs]
    records = [lora_record(path, scale) for path, scale in pairs]  # every file resolved before any loads
    order = sorted(range(len(pairs)), key=lambda i: records[i]["id"])
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    pipe = diffusers_inpaint_pipeline(modules)
    names = [f"{ADAPTER}_{rank}" for rank in range(len(order))]
    try:
        for name, i in zip(names, order):
            path = Path(pairs[i][0])
            _kind, files = resolve_lora(path)
            if records[i]["format"] == "peft":
                _load_peft_adapter(modules, path, files[0], name)
            else:
                _load_diffusers(pipe, modules, files[0], name)
        pipe.set_adapters(names, adapter_weights=[pairs[i][1] for i in order])
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=names)
    except BaseException:
        pipe.unload_lora_weights()  # no half-applied adapters left behind (unfused layers are simply dropped)
        raise
    pipe.unload_lora_weights()
    return records


def _load_peft_adapter(modules, folder: Path, weights: Path, adapter_name: str) -> None:
    """A peft folder's UNet adapter loaded through diffusers (`unet.load_lora_adapter`) with its own config
    (rank, alpha, targets) as metadata, so set_adapters / fuse_lora treat it like any diffusers LoRA."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
        config = LoraConfig.from_pretrained(str(folder)).to_dict()
    except Exception as exc:
        raise InputError(f"LoRA {folder}: cannot read as a peft folder ({_first_line(exc)})") from None
    state = {key.removeprefix("base_model.model."): value for key, value in state.items()}
    expected = sum(v.numel() for k, v in state.items() if "lora_" in k)
    if expected == 0:
        raise InputError(f"LoRA {weights}: holds no LoRA weights")
    _check_conv_in(folder, state, modules.unet)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    before = _lora_numel(modules.unet)
    try:
        modules.unet.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
    except Exception as exc:
        raise _mismatch(folder, _first_line(exc)) from None
    loaded = _lora_numel(modules.unet) - before
    if loaded != expected:
        raise _mismatch(folder, f"{expected - loaded} of its {expected} LoRA parameters match no layer")


def lora_pairs(lora: Any, lora_scale: Any = 1.0) -> list[tuple[str, float]]:
    """(path, scale) pairs from the shapes callers hold: None -> []; one path -> [(path, lora_scale)];
    a sequence of paths with one scale each (a sequence) or one for all (a float); or (path, scale) pairs.
    InputError (one line) when the counts of paths and scales differ or a scale is not finite."""
    if lora is None:
        return []
    if isinstance(lora, (str, Path)):
        return [(str(lora), check_scale(float(lora_scale)))]
    items = list(lora)
    if all(isinstance(item, tuple) and len(item) == 2 for item in items):
        return [(str(path), check_scale(float(scale))) for path, scale in items]
    scales = list(lora_scale) if isinstance(lora_scale, (list, tuple)) else [lora_scale] * len(items)
    if len(scales) != len(items):
        raise InputError(f"{len(scales)} LoRA scales for {len(items)} LoRAs: give one scale per LoRA, in the same "
                         "order, or none (all 1.0)")
    return [(str(path), check_scale(float(scale))) for path, scale in zip(items, scales)]


def manifest_lora(records: Sequence[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The manifest's `lora` section for the LoRAs fused: None for none, the record itself for one (the
    format and id manifests and engine cache keys had before several were possible), else a combined record:
    {id, format: "fused", source (the sources joined by " + "), loras: the records in the order given}.

    The combined id is sha256 over the sorted record ids: it changes when any file's content or any scale
    changes, and not with the order, since `fuse_loras` fuses in one canonical order."""
    records = list(records)
    if not records:
        return None
    if len(records) == 1:
        return records[0]
    ids = "\n".join(sorted(record["id"] for record in records))
    return {"id": hashlib.sha256(f"{MULTI_FORMAT}\n{ids}".encode()).hexdigest(), "format": MULTI_FORMAT,
            "source": " + ".join(record["source"] for record in records), "loras": list(records)}


def recorded_loras(section: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-LoRA records of a manifest's `lora` section (see manifest_lora): [] for None."""
    if not section:
        return []
    return list(section["loras"]) if section.get("format") == MULTI_FORMAT else [section]


def describe(record: Optional[dict[str, Any]]) -> str:
    if not record:
        return "none"
    if record.get("format") == MULTI_FORMAT:
        return " + ".join(describe(one) for one in record["loras"]) + f" (fused, id {record['id'][:12]})"
    return f"{record['source']} ({record['format']}, scale {record['scale']:g}, id {record['id'][:12]})"
