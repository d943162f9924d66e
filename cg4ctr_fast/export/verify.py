"""`cg4ctr-export verify DIR`: re-run an ONNX folder's validation against its manifest.

1. the manifest's format and version; every file's size and sha256 (a modified or truncated model is refused);
2. `onnx.checker.check_model` (path form) on every component;
3. the torch modules rebuilt from the manifest's source (preset + seed, or the model folder; LoRA, saliency and
   reward model files checked against their recorded sha256) and compared with ONNX Runtime exactly as at export
   time. The reward components are compared with the RewardModel's own embed_images / score.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import REWARD_COMPONENTS


def _log(message: str) -> None:
    print(f"[cg4ctr-export] {message}", file=sys.stderr, flush=True)


def verify_folder(
    folder: str | Path,
    *,
    model: Optional[str] = None,
    lora: Optional[str] = None,
    saliency: Optional[str] = None,
    reward: Optional[str] = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    import onnx
    import torch

    from cg4ctr_fast.config import get_preset, with_unet_channels
    from cg4ctr_fast.export.lora import fuse_lora, lora_record
    from cg4ctr_fast.export.modules import export_module
    from cg4ctr_fast.export.onnx_export import check_reward_folder, reward_fingerprint, reward_module
    from cg4ctr_fast.export.validate import ValidationFailed, compare, open_session, reference_cases, table
    from cg4ctr_fast.models.diffusion import build_modules, load_modules

    root = Path(folder)
    manifest = mf.read_manifest(root)
    mf.check_files(root, manifest)
    log(f"{root}: {len(manifest['components'])} components, sizes and sha256 match the manifest")
    for name, entry in manifest["components"].items():
        try:
            onnx.checker.check_model(str(root / entry["file"]))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"{root / entry['file']}: onnx.checker rejects it: {first}") from None

    source = manifest["source"]
    model_path = model or source.get("model")
    if model_path:
        if not Path(model_path).is_dir():
            raise InputError(f"source model folder {model_path} not found: pass --model PATH to compare against torch")
        modules = load_modules(model_path)
    else:
        preset = get_preset(source["preset"])
        preset = with_unet_channels(preset, int(source["unet_channels"]))
        modules = build_modules(preset, seed=int(source.get("seed", 0)))
    if modules.model_id != source["model_id"] and not model:
        raise InputError(f"the rebuilt source is {modules.model_id}, the manifest says {source['model_id']}")
    recorded_lora = manifest.get("lora")
    if recorded_lora:
        lora_path = lora or recorded_lora["source"]
        if not Path(lora_path).exists():
            raise InputError(f"LoRA {lora_path} not found: pass --lora FILE (the one this folder was exported with)")
        if lora_record(lora_path, recorded_lora["scale"])["id"] != recorded_lora["id"]:
            raise InputError(f"LoRA {lora_path} is not the one this folder was exported with (sha256 differs)")
        fuse_lora(modules, lora_path, recorded_lora["scale"])
    saliency_net = None
    if "saliency" in manifest["components"]:
        from cg4ctr_fast.models.saliency import load_saliency

        sal_path = saliency or source.get("saliency")
        if not sal_path or not Path(sal_path).is_file():
            raise InputError(f"saliency weights {sal_path} not found: pass --saliency FILE")
        if mf.sha256_file(sal_path) != source.get("saliency_sha256"):
            raise InputError(f"saliency weights {sal_path} differ from the ones this folder was exported with")
        saliency_net = load_saliency(sal_path)
    reward_model = None
    if any(name in REWARD_COMPONENTS for name in manifest["components"]):
        from cg4ctr_fast.models.reward import RewardModel

        reward_path = reward or source.get("reward")
        if not reward_path or not Path(reward_path).is_dir():
            raise InputError(f"reward model {reward_path} not found: pass --reward DIR (the one this folder was exported with)")
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
