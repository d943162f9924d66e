"""Fuse a LoRA into the torch modules before export, through diffusers or peft (never hand-written merging).

Accepted:
- diffusers `pytorch_lora_weights.safetensors` (or a folder holding it), with its `lora_adapter_metadata`;
- kohya / A1111 keys (`lora_unet_…`, `lora_te_…`): diffusers' `lora_state_dict` converts them on load;
- a peft folder (`adapter_model.safetensors` + `adapter_config.json`) of a UNet adapter: peft's
  `PeftModel.from_pretrained` + `set_scale` + `merge_and_unload`.

A LoRA made for another architecture (keys that match no layer, or shapes that differ) is refused with one line.
The LoRA id (sha256 of the file(s) + the scale) goes into the manifest and the TensorRT engine cache key.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Optional

from cg4ctr_fast.errors import InputError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER = "cg4ctr_export"


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
    try:
        # The same conversion load_lora_weights applies (kohya keys → diffusers keys, alphas apart).
        state_dict, _alphas = pipe.lora_state_dict(str(file))
    except Exception as exc:  # SafetensorError, OSError, ValueError: unreadable either way
        raise InputError(f"LoRA {file}: cannot read ({_first_line(exc)})") from None
    expected = sum(v.numel() for k, v in state_dict.items() if "lora" in k and not k.endswith(".alpha"))
    if expected == 0:
        raise InputError(f"LoRA {file}: holds no LoRA weights")
    before = _lora_numel(modules.unet, modules.text_encoder)
    try:
        pipe.load_lora_weights(str(file), adapter_name=ADAPTER)
    except Exception as exc:  # RuntimeError (shapes), ValueError / NoMatchingPeftModuleError (keys)
        raise _mismatch(file, _first_line(exc)) from None
    loaded = _lora_numel(modules.unet, modules.text_encoder) - before
    if loaded != expected:
        raise _mismatch(file, f"{expected - loaded} of its {expected} LoRA parameters match no layer")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[ADAPTER])
    # The fused weights stay; the LoRA layers go, so the exported graph is the plain architecture.
    pipe.unload_lora_weights()


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


def describe(record: Optional[dict[str, Any]]) -> str:
    if not record:
        return "none"
    return f"{record['source']} ({record['format']}, scale {record['scale']:g}, id {record['id'][:12]})"
