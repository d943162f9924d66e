"""`cg4ctr-export engine` / `refit`: TensorRT engines from a validated ONNX folder, built in process.

- Strongly typed networks: precision comes from the ONNX graph (fp16 export), not from builder flags (TensorRT
  11 always types strongly and has no fp16 flag). After a build, the engine's I/O tensor dtypes are checked
  against the contract.
- One optimization profile per component, from the contract's min/opt/max (export/contracts.py): every component
  the ONNX folder lists, the reward model's reward_image / reward_head included (batch-only profiles).
- A timing cache (--timing-cache FILE) is read before and written after the builds.
- Engine cache key = sha256 over (TensorRT version, GPU compute capability, ONNX sha256, LoRA id, profile,
  refittable). At load, a key that no longer matches this machine is refused with one line: rebuild with …
- Refit swaps LoRA weights without a rebuild (OnnxParserRefitter over a re-export with the new LoRA fused);
  refittable engines can be slower and TensorRT documents accuracy issues with REFIT, so a refitted engine
  passes the same validation before it is written.
- Validation: each engine against ONNX Runtime running the folder's ONNX (itself validated against torch at
  export), on the contract's validation inputs, with the component's tolerance.

tensorrt cannot be installed on the development machine and it has no GPU, so this module is complete but has
only run its pure-Python parts there (cache keys, refusal logic, profiles, dtype checks: tests/test_export.py).
Without tensorrt or a GPU the commands stop with TRT_UNAVAILABLE; no fake engine is ever written.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import ComponentContract, contract_digest

TRT_UNAVAILABLE = "TensorRT needs an NVIDIA GPU and the tensorrt package; `cg4ctr-export onnx` works here"
PLAN_NAME = "model.plan"
WORKSPACE_BYTES = 8 << 30
LORA_COMPONENTS = ("unet", "text_encoder")  # what a LoRA can change; the others' keys carry no LoRA id


class TensorRTUnavailable(InputError):
    """No tensorrt package or no CUDA GPU: the message is TRT_UNAVAILABLE, printed as it is."""


def _log(message: str) -> None:
    print(f"[cg4ctr-export] {message}", file=sys.stderr, flush=True)


def tensorrt_unavailable_reason() -> Optional[str]:
    """None when tensorrt imports and torch sees a CUDA GPU; TRT_UNAVAILABLE otherwise."""
    if importlib.util.find_spec("tensorrt") is None:
        return TRT_UNAVAILABLE
    import torch

    if not torch.cuda.is_available():
        return TRT_UNAVAILABLE
    try:
        import tensorrt  # noqa: F401
    except Exception:  # the bindings without their libraries do not import
        return TRT_UNAVAILABLE
    return None


def require_tensorrt() -> None:
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailable(reason)


# ---------------------------------------------------------------------------------------------------------
# Pure Python: cache keys, refusal, profiles, dtypes
# ---------------------------------------------------------------------------------------------------------


def cache_key_fields(
    *,
    tensorrt_version: str,
    compute_capability: str,
    onnx_sha256: str,
    lora_id: Optional[str],
    contract: ComponentContract,
    refittable: bool,
) -> dict[str, Any]:
    return {
        "tensorrt": tensorrt_version,
        "compute_capability": compute_capability,
        "onnx_sha256": onnx_sha256,
        "lora_id": lora_id,
        "profile": contract.profile_dict(),
        "contract_sha256": contract_digest(contract),
        "refittable": bool(refittable),
    }


def cache_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rebuild_hint(manifest: Mapping[str, Any], folder: str | Path) -> str:
    onnx_dir = (manifest.get("onnx") or {}).get("path", "ONNX_DIR")
    refit = " --refittable" if manifest.get("refittable") else ""
    return f"rebuild with `cg4ctr-export engine --onnx {onnx_dir} --out {folder}{refit}`"


def check_engine_manifest(
    manifest: Mapping[str, Any],
    folder: str | Path,
    *,
    tensorrt_version: str,
    compute_capability: str,
    lora_id: Optional[str] = ...,  # type: ignore[assignment]
) -> None:
    """Refuse (InputError, one line) an engine folder built for another TensorRT, GPU, ONNX, LoRA or profile.

    Each component's recorded key fields must hash to its recorded key (else the manifest was edited), and the
    same fields with this machine's TensorRT version and compute capability must give the same key. When
    `lora_id` is given, the engines must carry that LoRA.
    """
    hint = rebuild_hint(manifest, folder)
    for name, entry in manifest["components"].items():
        fields = dict(entry.get("key_fields") or {})
        needed = ("tensorrt", "compute_capability", "onnx_sha256", "lora_id", "profile", "contract_sha256")
        if any(k not in fields for k in needed) or cache_key(fields) != entry.get("cache_key"):
            raise InputError(f"{folder}: {name}: engine cache key does not match its recorded fields: {hint}")
        if fields["tensorrt"] != tensorrt_version or fields["compute_capability"] != compute_capability:
            raise InputError(
                f"{folder}: {name} was built for TensorRT {fields['tensorrt']} on compute capability "
                f"{fields['compute_capability']}, this machine has TensorRT {tensorrt_version} on "
                f"{compute_capability}: {hint}"
            )
        contract = mf.contract_of(manifest, name)
        if fields["contract_sha256"] != contract_digest(contract) or fields["profile"] != contract.profile_dict():
            raise InputError(f"{folder}: {name}: the engine's profile differs from the manifest's contract: {hint}")
        if lora_id is not ... and name in LORA_COMPONENTS and fields["lora_id"] != lora_id:
            raise InputError(f"{folder}: {name} carries LoRA {fields['lora_id']}, expected {lora_id}: {hint}")


def check_onnx_source(manifest: Mapping[str, Any], folder: str | Path) -> None:
    """When the engines' ONNX folder still exists, it must be the one they were built from."""
    onnx_info = manifest.get("onnx") or {}
    onnx_dir = Path(onnx_info.get("path", ""))
    if not onnx_info.get("path") or onnx_info.get("refitted") or not (onnx_dir / mf.MANIFEST).is_file():
        return
    onnx_manifest = json.loads((onnx_dir / mf.MANIFEST).read_text())
    for name, entry in manifest["components"].items():
        source = onnx_manifest.get("components", {}).get(name)
        if source is not None and source.get("sha256") != entry["key_fields"]["onnx_sha256"]:
            raise InputError(f"{folder}: {name}: {onnx_dir} was re-exported since this engine was built: "
                             f"{rebuild_hint(manifest, folder)}")


def trt_profile(contract: ComponentContract) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(input name, min shape, opt shape, max shape) for every input: one optimization profile."""
    return [(name, *shapes) for name, shapes in contract.profile_shapes().items()]


def expected_dtypes(contract: ComponentContract) -> dict[str, str]:
    return {s.name: s.dtype for s in (*contract.inputs, *contract.outputs)}


def check_dtypes(actual: Mapping[str, str], contract: ComponentContract) -> None:
    """The engine's I/O dtypes (numpy names) must be the contract's: a strongly typed build keeps the graph's."""
    expected = expected_dtypes(contract)
    wrong = [f"{n}: engine {actual.get(n)}, contract {d}" for n, d in expected.items() if actual.get(n) != d]
    if wrong:
        raise InputError(f"{contract.name}: engine tensor dtypes differ from the contract ({'; '.join(wrong)})")


# ---------------------------------------------------------------------------------------------------------
# TensorRT (needs tensorrt and a GPU)
# ---------------------------------------------------------------------------------------------------------


def device_facts() -> tuple[str, str, str]:
    """(tensorrt version, compute capability 'M.m', GPU name)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return trt.__version__, f"{major}.{minor}", torch.cuda.get_device_name(0)


def _np_dtype_name(trt, dtype) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT32: "int32"}
    if hasattr(trt.DataType, "INT64"):
        names[trt.DataType.INT64] = "int64"
    if hasattr(trt.DataType, "BF16"):
        names[trt.DataType.BF16] = "bfloat16"
    return names.get(dtype, str(dtype))


def engine_dtypes(trt, engine) -> dict[str, str]:
    return {
        engine.get_tensor_name(i): _np_dtype_name(trt, engine.get_tensor_dtype(engine.get_tensor_name(i)))
        for i in range(engine.num_io_tensors)
    }


def _build_plan(
    trt, logger, onnx_path: Path, contract: ComponentContract, *, refittable: bool, timing_cache: bytes
) -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache): one strongly typed build with the contract's profile."""
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = (1 << int(strongly_typed)) if strongly_typed is not None else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads model.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is not used
    profile = builder.create_optimization_profile()
    for name, lo, opt, hi in trt_profile(contract):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InputError(f"{contract.name}: TensorRT could not build an engine (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _validate_engine(contract: ComponentContract, plan: bytes, onnx_path: Path) -> dict[str, Any]:
    """The engine against ONNX Runtime on the validated ONNX, with the component's tolerance."""
    from cg4ctr_fast.export.validate import Case, case_seed, compare, open_session
    from cg4ctr_fast.export.tensorrt_engine import TrtComponent

    import torch

    session = open_session(onnx_path)
    engine = TrtComponent.from_plan(plan, contract, torch.device("cuda"))
    cases = []
    for index, values in enumerate(contract.validation_points()):
        inputs = contract.sample_inputs(values, seed=case_seed(contract.name, index))
        feeds = {k: v.cpu().numpy() for k, v in inputs.items()}
        reference = dict(zip(contract.output_names, (o.astype("float32") for o in session.run(contract.output_names, feeds))))
        cases.append(Case(values=values, inputs=inputs, reference=reference))

    class _EngineAsSession:
        def run(self, names, feeds):
            outs = engine.run(**{k: torch.from_numpy(v) for k, v in feeds.items()})
            return [o.float().cpu().numpy() for o in outs]

    return compare(contract, _EngineAsSession(), cases)


def build_engines(
    onnx_dir: str | Path,
    out_dir: str | Path,
    *,
    refittable: bool = False,
    timing_cache: Optional[str] = None,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    require_tensorrt()
    import tensorrt as trt

    from cg4ctr_fast.export.validate import ValidationFailed, table
    from cg4ctr_fast.fileio import atomic_dir, atomic_write_bytes

    onnx_root = Path(onnx_dir).resolve()
    onnx_manifest = mf.read_manifest(onnx_root)
    mf.check_files(onnx_root, onnx_manifest)
    version, capability, gpu = device_facts()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_file = Path(timing_cache) if timing_cache else None
    # One timing cache carried through every build: later builds reuse the tactics timed by earlier ones.
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    lora_id = (onnx_manifest.get("lora") or {}).get("id")
    runtime = trt.Runtime(logger)
    entries: dict[str, Any] = {}
    report: dict[str, Any] = {"precision": onnx_manifest["settings"]["precision"], "components": {}, "ok": True}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for name, source in onnx_manifest["components"].items():
            contract = mf.contract_of(onnx_manifest, name)
            started = time.perf_counter()
            plan, cache_bytes = _build_plan(
                trt, logger, onnx_root / source["file"], contract, refittable=refittable, timing_cache=cache_bytes
            )
            engine = runtime.deserialize_cuda_engine(plan)
            dtypes = engine_dtypes(trt, engine)
            check_dtypes(dtypes, contract)
            del engine
            record = _validate_engine(contract, plan, onnx_root / source["file"])
            report["components"][name] = record
            report["ok"] = report["ok"] and record["ok"]
            (tmp / name).mkdir()
            (tmp / name / PLAN_NAME).write_bytes(plan)
            side_files = _copy_side_files(onnx_root, tmp, source)
            fields = cache_key_fields(
                tensorrt_version=version, compute_capability=capability, onnx_sha256=source["sha256"],
                lora_id=lora_id if name in LORA_COMPONENTS else None, contract=contract, refittable=refittable,
            )
            entries[name] = {
                "file": f"{name}/{PLAN_NAME}",
                "files": [mf.file_record(tmp, f"{name}/{PLAN_NAME}"), *side_files],
                **({"config": source["config"]} if "config" in source else {}),
                "cache_key": cache_key(fields),
                "key_fields": fields,
                "io_dtypes": dtypes,
                "contract": contract.to_dict(),
                "build_seconds": round(time.perf_counter() - started, 1),
            }
            log(f"{name}: engine built in {entries[name]['build_seconds']} s ({'ok' if record['ok'] else 'OUT OF TOLERANCE'})")
        print(table(report), flush=True)
        if not report["ok"]:
            raise ValidationFailed(f"engines out of tolerance: nothing written to {out}", report)
        _copy_runtime_files(onnx_root, tmp)
        mf.write_json(tmp / mf.VALIDATION, report)
        manifest = _engine_manifest(onnx_root, onnx_manifest, entries, version, capability, gpu, refittable)
        manifest["files"] = mf.runtime_file_records(tmp, entries)  # tokenizer, scheduler, ...: all hashed
        mf.write_json(tmp / mf.MANIFEST, manifest)
    if cache_file is not None:
        atomic_write_bytes(cache_file, cache_bytes)
    return manifest


def _copy_side_files(onnx_root: Path, tmp: Path, source: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A component's files other than its graph (the saliency net's config.json: the size and threshold the
    runtime runs it with), copied beside the engine; their records for the engine manifest."""
    if mf.SALIENCY_CONFIG not in {f["path"] for f in source.get("files", [])}:
        return []
    shutil.copy2(onnx_root / mf.SALIENCY_CONFIG, tmp / mf.SALIENCY_CONFIG)
    return [mf.file_record(tmp, mf.SALIENCY_CONFIG)]


def _copy_runtime_files(onnx_root: Path, tmp: Path) -> None:
    for folder in ("tokenizer", "scheduler"):
        shutil.copytree(onnx_root / folder, tmp / folder)
    shutil.copy2(onnx_root / mf.MODEL_INFO, tmp / mf.MODEL_INFO)
    if (onnx_root / mf.REWARD_DIR).is_dir():  # the reward model's config and vocabularies (--reward)
        shutil.copytree(onnx_root / mf.REWARD_DIR, tmp / mf.REWARD_DIR)


def _engine_manifest(onnx_root, onnx_manifest, entries, version, capability, gpu, refittable) -> dict[str, Any]:
    return {
        "format": mf.ENGINE_FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backend": "tensorrt",
        "onnx": {"path": str(onnx_root), "manifest_sha256": mf.sha256_file(onnx_root / mf.MANIFEST)},
        "tensorrt": version,
        "compute_capability": capability,
        "device": gpu,
        "refittable": refittable,
        "source": onnx_manifest["source"],
        "lora": onnx_manifest.get("lora"),
        "settings": onnx_manifest["settings"],
        "model_info": onnx_manifest["model_info"],
        "components": entries,
        "reward": onnx_manifest.get("reward"),  # same relative paths, so check_files covers the copies
        "validation": {"file": mf.VALIDATION, "ok": True},
        "libraries": mf.library_versions(),
        "host": mf.host_description(),
    }


def load_engine_manifest(folder: str | Path) -> dict[str, Any]:
    """The engine folder's manifest, refused unless it fits this machine's TensorRT and GPU (needs both)."""
    require_tensorrt()
    manifest = mf.read_manifest(folder, expect=mf.ENGINE_FORMAT)
    version, capability, _gpu = device_facts()
    check_engine_manifest(manifest, folder, tensorrt_version=version, compute_capability=capability)
    check_onnx_source(manifest, folder)
    mf.check_files(folder, manifest, hash_limit=mf.LOAD_HASH_BYTES)  # graphs over 256 MiB by size only
    return manifest


def refit_engines(
    engine_dir: str | Path, lora: str, *, lora_scale: float = 1.0, log: Callable[[str], None] = _log
) -> dict[str, Any]:
    """Swap the LoRA of a refittable engine folder: re-export with the LoRA fused, refit, validate, write."""
    require_tensorrt()
    import tensorrt as trt
    import torch

    from cg4ctr_fast.export.contracts import ExportSettings
    from cg4ctr_fast.export.lora import fuse_lora, resolve_lora
    from cg4ctr_fast.export.modules import export_module
    from cg4ctr_fast.export.onnx_export import export_component
    from cg4ctr_fast.export.validate import ValidationFailed, compare, reference_cases, table
    from cg4ctr_fast.export.verify import _source_modules
    from cg4ctr_fast.fileio import atomic_dir

    root = Path(engine_dir)
    resolve_lora(lora)
    manifest = load_engine_manifest(root)
    if not manifest.get("refittable"):
        raise InputError(f"{root}: engines were built without --refittable: {rebuild_hint({**manifest, 'refittable': True}, root)}")
    modules = _source_modules(manifest["source"], None)  # the model folder is checked by its content hash
    record = fuse_lora(modules, lora, lora_scale)
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    version, capability, _gpu = device_facts()
    settings = ExportSettings(precision=manifest["settings"]["precision"], opset=manifest["settings"]["opset"])
    report: dict[str, Any] = {"precision": settings.precision, "components": {}, "ok": True}
    entries = dict(manifest["components"])
    out = root
    with torch.no_grad(), atomic_dir(out) as tmp:
        scratch = tmp / ".onnx"
        scratch.mkdir()
        for name in [n for n in LORA_COMPONENTS if n in manifest["components"]]:
            contract = mf.contract_of(manifest, name)
            module = export_module(name, modules)
            cases = reference_cases(contract, module)
            if contract.precision != "fp32":
                module = module.to(dtype=torch.float16)
            files = export_component(contract, module, scratch, settings.opset)
            onnx_path = scratch / name / "model.onnx"
            engine = runtime.deserialize_cuda_engine((root / entries[name]["file"]).read_bytes())
            refitter = trt.Refitter(engine, logger)
            parser_refitter = trt.OnnxParserRefitter(refitter, logger)
            if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
                raise InputError(f"{name}: TensorRT could not refit the engine from the re-export: {rebuild_hint(manifest, root)}")
            plan = bytes(engine.serialize())
            from cg4ctr_fast.export.tensorrt_engine import TrtComponent

            trt_component = TrtComponent.from_plan(plan, contract, torch.device("cuda"))

            class _EngineAsSession:
                def run(self, names, feeds, _c=trt_component):
                    return [o.float().cpu().numpy() for o in _c.run(**{k: torch.from_numpy(v) for k, v in feeds.items()})]

            result = compare(contract, _EngineAsSession(), cases)  # against the fp32 torch module with the LoRA
            report["components"][name] = result
            report["ok"] = report["ok"] and result["ok"]
            (tmp / name).mkdir()
            (tmp / name / PLAN_NAME).write_bytes(plan)
            fields = cache_key_fields(
                tensorrt_version=version, compute_capability=capability, onnx_sha256=files[0]["sha256"],
                lora_id=record["id"], contract=contract, refittable=True,
            )
            entries[name] = {**entries[name], "files": [mf.file_record(tmp, f"{name}/{PLAN_NAME}")],
                             "cache_key": cache_key(fields), "key_fields": fields}
            log(f"{name}: refitted with {lora} ({'ok' if result['ok'] else 'OUT OF TOLERANCE'})")
        shutil.rmtree(scratch)
        print(table(report), flush=True)
        if not report["ok"]:
            raise ValidationFailed(f"refitted engines out of tolerance: {root} left as it was", report)
        for child in root.iterdir():
            if child.name not in (mf.MANIFEST, mf.VALIDATION) and not (tmp / child.name).exists():
                (shutil.copytree if child.is_dir() else shutil.copy2)(child, tmp / child.name)
        mf.write_json(tmp / mf.VALIDATION, report)
        new_manifest = {**manifest, "lora": record, "components": entries,
                        "files": mf.runtime_file_records(tmp, entries),
                        "onnx": {**manifest["onnx"], "refitted": True},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        mf.write_json(tmp / mf.MANIFEST, new_manifest)
    return new_manifest
