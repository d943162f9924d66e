"""Validation of an exported component: ONNX Runtime against the fp32 torch module on random inputs.

For each component: the contract's two validation points (batch = profile min and opt, or min + 2), random
inputs from the contract's sample builder, the fp32 torch module's outputs as the reference, and the max
absolute error of every output against the contract's scale-relative tolerance. Inputs are drawn in the
component's precision and upcast for the reference, so both sides see the same values.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from cg4ctr_fast.export.contracts import ComponentContract


class ValidationFailed(Exception):
    """An exported component is out of tolerance (exit code 1; the export leaves no folder)."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass
class Case:
    values: dict[str, int]
    inputs: dict[str, torch.Tensor]
    reference: dict[str, np.ndarray] = field(default_factory=dict)


def case_seed(component: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"validate:{component}:{index}".encode()).digest()[:4], "big")


@torch.no_grad()
def reference_cases(contract: ComponentContract, module: torch.nn.Module) -> list[Case]:
    """Inputs at the validation points and the fp32 torch module's outputs (module must be fp32)."""
    cases = []
    for index, values in enumerate(contract.validation_points()):
        inputs = contract.sample_inputs(values, seed=case_seed(contract.name, index))
        args = [t.float() if t.is_floating_point() else t for t in inputs.values()]
        out = module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        reference = {name: o.detach().float().cpu().numpy() for name, o in zip(contract.output_names, outs)}
        cases.append(Case(values=values, inputs=inputs, reference=reference))
    return cases


def validation_providers() -> list[str]:
    """CUDA when ONNX Runtime has it, else CPU. Not TensorRT's EP: it would build engines just to validate."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_session(path, providers: Optional[Sequence[str]] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers or validation_providers()))


def compare(contract: ComponentContract, session, cases: list[Case]) -> dict[str, Any]:
    """Run the session on every case; the component's validation record."""
    tol = contract.tolerance
    checks = []
    ok = True
    for case in cases:
        feeds = {name: case.inputs[name].cpu().numpy() for name in contract.input_names}
        outputs = session.run(contract.output_names, feeds)
        record: dict[str, Any] = {"batch": case.values["batch"], "values": case.values, "outputs": {}}
        for spec, got in zip(contract.outputs, outputs):
            ref = case.reference[spec.name]
            expected_shape = contract.shape(spec, case.values)
            got32 = np.asarray(got, dtype=np.float32)
            shape_ok = tuple(got32.shape) == tuple(ref.shape) == expected_shape
            finite = bool(np.isfinite(got32).all())
            err = float(np.abs(got32 - ref).max()) if shape_ok else float("inf")
            ref_max = float(np.abs(ref).max())
            allowed = tol.allowed(ref_max)
            passed = shape_ok and finite and err <= allowed
            ok = ok and passed
            record["outputs"][spec.name] = {
                "max_abs_error": err if np.isfinite(err) else None,
                "max_abs_reference": ref_max,
                "allowed": allowed,
                "shape": list(got32.shape),
                "expected_shape": list(expected_shape),
                "finite": finite,
                "ok": passed,
            }
        checks.append(record)
    return {
        "component": contract.name,
        "precision": contract.precision,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "rule": "max|err| <= atol + rtol * max|reference|", "why": tol.why},
        "checks": checks,
        "ok": ok,
    }


def table(report: dict[str, Any]) -> str:
    """A readable fixed-width table of a validation report (all components)."""
    head = (f"{'component':<14}{'output':<20}{'dtype':>6}{'batch':>6}{'size':>9}{'max|err|':>11}{'allowed':>11}"
            f"{'max|ref|':>10}  result")
    lines = [head, "-" * len(head)]
    for name, comp in report["components"].items():
        for check in comp["checks"]:
            values = check.get("values") or {}
            # The spatial point checked (image pixels, or latents for the UNet / VAE decoder): sides run over a range.
            sides = [values[k] for k in ("height", "width") if k in values] or \
                [values[k] for k in ("latent_height", "latent_width") if k in values]
            size = "x".join(str(v) for v in sides) if len(sides) == 2 else "-"
            for out_name, out in check["outputs"].items():
                err = out["max_abs_error"]
                err_text = f"{err:.2e}" if err is not None else "shape!"
                lines.append(
                    f"{name:<14}{out_name:<20}{comp['precision']:>6}{check['batch']:>6}{size:>9}{err_text:>11}"
                    f"{out['allowed']:>11.2e}{out['max_abs_reference']:>10.3g}  {'ok' if out['ok'] else 'FAIL'}"
                )
    lines.append(f"validation: {'passed' if report['ok'] else 'FAILED'} (rule: max|err| ≤ atol + rtol × max|ref|, "
                 "reference: the fp32 torch module)")
    return "\n".join(lines)
