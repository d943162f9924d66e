"""TensorRT backend: the same `Components` slots, filled from a `cg4ctr-export engine` folder.

Each slot runs one deserialized engine on torch's current CUDA stream: inputs are torch CUDA tensors (shape-
checked against the contract profile the engine was built with), outputs are allocated by torch at the shapes
the execution context reports. The folder is refused with one "rebuild with …" line when it was built for
another TensorRT version or GPU (see cg4ctr_fast.export.tensorrt_build.check_engine_manifest).

A folder built from an ONNX export with --reward carries reward_image / reward_head engines and reward/:
`tensorrt_reward(DIR)` serves them behind the same `PipelineReward` callable as ONNX Runtime.

Needs tensorrt and an NVIDIA GPU; elsewhere it stops with TRT_UNAVAILABLE. It has not run on the development
machine (no GPU, no tensorrt); its pure-Python checks are tested there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import PIPELINE_COMPONENTS, REWARD_COMPONENTS
from cg4ctr_fast.export.tensorrt_engine import TrtComponent
from cg4ctr_fast.runtime.slots import Components

def _components(root: Path, manifest: dict[str, Any], names) -> dict[str, TrtComponent]:
    device = torch.device("cuda", torch.cuda.current_device())
    return {
        name: TrtComponent.from_plan(
            (root / manifest["components"][name]["file"]).read_bytes(), mf.contract_of(manifest, name), device
        )
        for name in names
    }


def tensorrt_components(folder: str | Path, *, scheduler: Optional[str] = None) -> Components:
    """Components whose slots run the folder's TensorRT engines (checked against this machine first)."""
    from cg4ctr_fast.export.tensorrt_build import load_engine_manifest
    from cg4ctr_fast.runtime.onnxruntime_backend import engine_components

    root = Path(folder)
    manifest = load_engine_manifest(root)  # TRT_UNAVAILABLE without tensorrt or a GPU; "rebuild with …" on mismatch
    missing = [c for c in PIPELINE_COMPONENTS if c not in manifest["components"]]
    if missing:
        raise InputError(f"{root}: no {', '.join(missing)} engine in this folder: rebuild from a full ONNX export")
    parts = _components(root, manifest, PIPELINE_COMPONENTS)
    # The ORT slot adapters only call component.run(**inputs): the same argument plumbing serves both backends.
    return engine_components(root, parts, backend="tensorrt", device=parts["unet"].device, scheduler=scheduler)


def tensorrt_saliency(folder: str | Path):
    """The folder's saliency engine behind predict_saliency's interface, with the net's own config (size,
    threshold, from saliency/config.json, copied from the ONNX folder and hashed by the manifest), or None."""
    from cg4ctr_fast.export.tensorrt_build import load_engine_manifest
    from cg4ctr_fast.runtime.onnxruntime_backend import OrtSaliency, saliency_config_or_refusal

    root = Path(folder)
    manifest = load_engine_manifest(root)  # every file checked, saliency/config.json included
    if "saliency" not in manifest["components"]:
        return None
    config, refusal = saliency_config_or_refusal(root, manifest)  # an older folder: the net refuses to run
    return OrtSaliency(_components(root, manifest, ["saliency"])["saliency"], config, refusal).eval()


def tensorrt_reward(folder: str | Path):
    """The folder's reward engines as the pipeline's reward callable (PipelineReward), or None without them."""
    from cg4ctr_fast.export.tensorrt_build import load_engine_manifest
    from cg4ctr_fast.runtime.onnxruntime_backend import OrtRewardEngine, PipelineReward, _read_reward_files

    root = Path(folder)
    manifest = load_engine_manifest(root)
    if not all(name in manifest["components"] for name in REWARD_COMPONENTS):
        return None
    config, title_vocab, caption_vocab = _read_reward_files(root)
    parts = _components(root, manifest, REWARD_COMPONENTS)
    # OrtRewardEngine only calls component.run(**inputs) and reads its contract and device: TrtComponent has both.
    engine = OrtRewardEngine(parts["reward_image"], parts["reward_head"], config, title_vocab, caption_vocab)
    return PipelineReward(engine)
