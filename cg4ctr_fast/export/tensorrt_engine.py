"""One deserialized TensorRT engine with its execution context, run on torch CUDA tensors.

Export validates every engine it builds with this runner, and the TensorRT backend
(`cg4ctr_fast.runtime.tensorrt_backend`) fills the pipeline's slots with it, so both sides run an
engine the same way. It lives in `export/` because the runtime reads what export defines, never the
other way round.

Needs tensorrt and an NVIDIA GPU at call time; importing this module needs neither.
"""
from __future__ import annotations

import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export.contracts import ComponentContract

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
