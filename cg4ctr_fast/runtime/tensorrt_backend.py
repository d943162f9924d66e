"""TensorRT backend: the same `Components` slots, filled from a `cg4ctr-export engine` folder.

Each slot runs one deserialized engine on torch's current CUDA stream: inputs are torch CUDA tensors (shape-
checked against the contract profile the engine was built with), outputs are allocated by torch at the shapes
the execution context reports. The folder is refused with one "rebuild with …" line when it was built for
another TensorRT version or GPU (see cg4ctr_fast.export.tensorrt_build.check_engine_manifest).

Needs tensorrt and an NVIDIA GPU; elsewhere it stops with TRT_UNAVAILABLE. It has not run on the development
machine (no GPU, no tensorrt); its pure-Python checks are tested there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import PIPELINE_COMPONENTS, ComponentContract
from cg4ctr_fast.runtime.slots import Components

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class TrtComponent:
    """One engine + execution context with its contract."""

    def __init__(self, engine, contract: ComponentContract, device: torch.device):
        self.engine = engine
        self.context = engine.create_execution_context()
        self.contract = contract
        self.device = device
        self.name = contract.name
        self.input_dtypes = {s.name: s.dtype for s in contract.inputs}
        self.output_dtypes = {s.name: s.dtype for s in contract.outputs}

    @classmethod
    def from_plan(cls, plan: bytes, contract: ComponentContract, device: torch.device) -> "TrtComponent":
        import tensorrt as trt

        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise InputError(f"{contract.name}: TensorRT cannot deserialize the engine (another TensorRT version?)")
        component = cls(engine, contract, device)
        component._keep = logger  # the logger must outlive the engine
        return component

    def run(self, **feeds: torch.Tensor) -> list[torch.Tensor]:
        self.contract.check_shapes({k: tuple(v.shape) for k, v in feeds.items()}, where=f"{self.name} (tensorrt)")
        alive = []
        for spec in self.contract.inputs:
            tensor = feeds[spec.name].to(device=self.device, dtype=_TORCH_DTYPES[spec.dtype]).contiguous()
            alive.append(tensor)
            self.context.set_input_shape(spec.name, tuple(tensor.shape))
            self.context.set_tensor_address(spec.name, tensor.data_ptr())
        outputs = []
        for spec in self.contract.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            out = torch.empty(shape, dtype=_TORCH_DTYPES[spec.dtype], device=self.device)
            self.context.set_tensor_address(spec.name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        return outputs


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
    """The folder's saliency engine behind predict_saliency's interface, or None."""
    from cg4ctr_fast.export.tensorrt_build import load_engine_manifest
    from cg4ctr_fast.runtime.onnxruntime_backend import OrtSaliency

    root = Path(folder)
    manifest = load_engine_manifest(root)
    if "saliency" not in manifest["components"]:
        return None
    return OrtSaliency(_components(root, manifest, ["saliency"])["saliency"]).eval()
