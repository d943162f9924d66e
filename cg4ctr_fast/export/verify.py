"""`cg4ctr-export verify DIR`: re-run an ONNX folder's validation against its manifest.

1. the manifest's format and version; every file's size and sha256, graphs and runtime files alike (tokenizer/,
   scheduler/, model_info.json, reward/, validation.json), and no unlisted file: any difference is refused in one
   line naming the file (exit 2);
2. `onnx.checker.check_model` (path form) on every component;
3. the torch modules rebuilt from the manifest's source and compared with ONNX Runtime exactly as at export
   time. Sources are recognised by content: the model folder by its content hash, the LoRA, saliency and reward
   files by sha256. The manifest's absolute paths are only where to look first; --model / --lora / --saliency /
   --reward name a source that moved, and a different file is refused. The reward components are compared with
   the RewardModel's own embed_images / score.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import REWARD_COMPONENTS


def _log(message: str) -> None:
    print(f"[cg4ctr-export] {message}", file=sys.stderr, flush=True)


def verify_folder(
    folder: str | Path,
    *,
    model: Optional[str] = None,
    lora: Optional[str | Sequence[str]] = None,
    saliency: Optional[str] = None,
    reward: Optional[str] = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    import onnx
    import torch

    from cg4ctr_fast.export.lora import fuse_loras, lora_record, recorded_loras
    from cg4ctr_fast.export.modules import export_module
    from cg4ctr_fast.export.onnx_export import (
        check_reward_folder,
        reward_fingerprint,
        reward_module,
        saliency_config_dict,
        saliency_sha256,
    )
    from cg4ctr_fast.export.validate import ValidationFailed, compare, open_session, reference_cases, table

    root = Path(folder)
    manifest = mf.read_manifest(root)
    mf.check_files(root, manifest)  # every file, hashed whatever its size
    mf.read_model_info(root)  # the fields the runtime reads, checked as from_engines checks them
    log(f"{root}: {len(manifest['components'])} components and {len(manifest['files'])} runtime files, "
        "sizes and sha256 match the manifest")
    for name, entry in manifest["components"].items():
        try:
            onnx.checker.check_model(str(root / entry["file"]))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{root / entry['file']}: onnx.checker rejects it: {first}") from None

    source = manifest["source"]
    modules = _source_modules(source, model)
    records = recorded_loras(manifest.get("lora"))
    given = [lora] if isinstance(lora, (str, Path)) else list(lora or [])
    if len(records) == 1 and len(given) > 1:
        raise InputError(f"this folder was exported with one LoRA, {len(given)} --lora given")
    pairs = []
    for recorded in records:
        if len(records) == 1:
            candidate = given[0] if given else None
        else:  # several: each --lora is matched to its record by content
            candidate = next((g for g in given if Path(g).exists()
                              and lora_record(g, recorded["scale"])["sha256"] == recorded["sha256"]), None)
        lora_path = _found(candidate, recorded.get("source"), "LoRA", "--lora FILE")
        if lora_record(lora_path, recorded["scale"])["sha256"] != recorded["sha256"]:
            raise InputError(f"LoRA {lora_path} is not the one this folder was exported with (its sha256 differs)")
        pairs.append((lora_path, recorded["scale"]))
    fuse_loras(modules, pairs)
    saliency_net = None
    if "saliency" in manifest["components"]:
        from cg4ctr_fast.models.saliency import load_saliency

        sal_path = _found(saliency, source.get("saliency"), "saliency weights", "--saliency FILE")
        if saliency_sha256(sal_path) != source.get("saliency_sha256"):
            raise InputError(f"saliency weights {sal_path} differ from the ones this folder was exported with (sha256)")
        saliency_net = load_saliency(sal_path)
        # The size and threshold the runtimes use must be the weights' own (the file's hash is checked above).
        expected = saliency_config_dict(saliency_net.config)
        config_file = root / mf.SALIENCY_CONFIG
        recorded = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
        if recorded != expected:
            raise InputError(f"{config_file}: {recorded or 'missing'}, but the saliency weights it was exported "
                             f"from run with {expected}: {mf.REEXPORT}")
    reward_model = None
    if any(name in REWARD_COMPONENTS for name in manifest["components"]):
        from cg4ctr_fast.models.reward import RewardModel

        reward_path = _found(reward, source.get("reward"), "reward model", "--reward DIR")
        check_reward_folder(reward_path)
        if reward_fingerprint(reward_path) != source.get("reward_sha256"):
            raise InputError(f"reward model {reward_path} differs from the one this folder was exported with (sha256)")
        reward_model = RewardModel.load(reward_path)

    report: dict[str, Any] = {"precision": manifest["settings"]["precision"], "components": {}, "ok": True}
    with torch.no_grad():
        for name, entry in manifest["components"].items():
            contract = mf.contract_of(manifest, name)
            if name in REWARD_COMPONENTS:
                module = reward_module(name, reward_model)
            else:
                module = export_module(name, modules, saliency_net)
            cases = reference_cases(contract, module)
            record = compare(contract, open_session(root / entry["file"]), cases)
            report["components"][name] = record
            report["ok"] = report["ok"] and record["ok"]
    print(table(report), flush=True)
    if not report["ok"]:
        bad = [n for n, r in report["components"].items() if not r["ok"]]
        raise ValidationFailed(f"{root}: {', '.join(bad)} out of tolerance", report)
    return report


def _found(given: Optional[str], hint: Optional[str], what: str, flag: str) -> str:
    """The path to a source file: the one given on the command line, else the manifest's hint if it is there."""
    if given is not None:
        if not Path(given).exists():
            raise InputError(f"{what} {given}: not found")
        return given
    if hint and Path(hint).exists():
        return hint
    raise InputError(f"{what} not found at {hint} (where it was exported from): pass {flag} "
                     "(it is recognised by its sha256, not its path)")


def _source_modules(source: dict[str, Any], model: Optional[str]):
    """The torch modules the folder was exported from: the model folder (checked by content hash) or the preset."""
    from cg4ctr_fast.config import get_preset, with_unet_channels
    from cg4ctr_fast.models.diffusion import build_modules, load_modules

    if source.get("model_sha256") is None:  # a built-in preset: rebuilt from its name and seed
        if model is not None:
            raise InputError(f"this folder was exported from preset {source.get('preset')!r}, not a model folder: "
                             "drop --model")
        preset = with_unet_channels(get_preset(source["preset"]), int(source["unet_channels"]))
        modules = build_modules(preset, seed=int(source.get("seed", 0)))
        if modules.model_id != source["model_id"]:
            raise InputError(f"the rebuilt source is {modules.model_id}, the manifest says {source['model_id']}")
        return modules
    path = _found(model, source.get("model"), "source model folder", "--model DIR")
    if not Path(path).is_dir():
        raise InputError(f"source model folder {path}: not a folder")
    if mf.folder_sha256(path) != source["model_sha256"]:
        raise InputError(f"source model folder {path} differs from the one this folder was exported with "
                         "(its content hash differs)")
    return load_modules(path)
