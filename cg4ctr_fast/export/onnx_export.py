"""`cg4ctr-export onnx`: torch modules (LoRA fused) → validated ONNX folder, written atomically.

Layout (like optimum's), everything the pipeline needs to run from the folder alone:

    DIR/text_encoder/model.onnx   DIR/unet/model.onnx (+ model.onnx.data when over 2 GB)
    DIR/vae_encoder/model.onnx    DIR/vae_decoder/model.onnx    DIR/saliency/{model.onnx,config.json} (--saliency)
    DIR/reward_image/model.onnx   DIR/reward_head/model.onnx    DIR/reward/{config,vocab}.json (with --reward)
    DIR/tokenizer/  DIR/scheduler/  DIR/model_info.json  DIR/validation.json  DIR/manifest.json (written last)

The saliency net is exported at its own size: the side its config records (a `cg4ctr-train saliency` folder's
config.json or the safetensors metadata; 320 px for the official u2netp.pth) is the profile's opt, and
saliency/config.json carries that size and its threshold to the runtimes, which run the graph with them as the
torch path runs the net (`load_saliency`).

The manifest lists every one of these files with its size and sha256 (export/manifest.py), and records the
source by content: the model folder's `folder_sha256`, the LoRA's file hash and scale, the saliency and reward
weights' sha256. Source paths are kept, made absolute, as hints for `cg4ctr-export verify`.

Exporter: torch.onnx's TorchScript-based exporter (`dynamo=False`) with `dynamic_axes` from the contracts. On
this machine it exported the tiny UNet in 0.8 s against 42 s for the dynamo exporter, with the same accuracy
(≈1e-6), and it writes one file unless the model is over 2 GB (DESIGN.md §12).

The UNet is traced at an odd latent size. diffusers' UNet decides in Python whether to pass explicit upsample
sizes (only when a latent side is not a multiple of 2^upsamplers); a trace at a multiple bakes in
`scale_factor=2` upsampling, whose graph then fails at other sizes (measured: Concat mismatch at 15×15). Traced
at an odd size, the graph takes every upsample size from the skip tensors' shapes and runs at any size; at the
multiples, nearest upsampling to twice the size equals scale 2, so the outputs are the same.

The reward model (--reward, a folder written by `RewardModel.save`) exports as two graphs, as it is served:
`reward_image` (embed_images, once per creative) and `reward_head` (score on stored embeddings, calibration
included). The graphs carry its weights; its config.json and vocab.json are copied to DIR/reward/ so the runtime
can size images and encode titles and captions exactly as the torch model does (model.safetensors is not).
"""
from __future__ import annotations

import copy
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.fileio import check_out_dir
from cg4ctr_fast.export.contracts import (
    COMPONENTS,
    REWARD_COMPONENTS,
    SALIENCY_SIDE,
    ComponentContract,
    ExportSettings,
    RewardDims,
    StackDims,
    build_contracts,
)
from cg4ctr_fast.export.validate import ValidationFailed

# Over this many bytes of weights, a component goes to model.onnx + model.onnx.data: protobuf caps one
# message at 2 GiB, and the graph itself needs some room beside the weights.
EXTERNAL_DATA_BYTES = 2**31 - 2**27
EXTERNAL_DATA_NAME = "model.onnx.data"
MIN_OPSET, MAX_OPSET = 14, 20  # scaled_dot_product_attention needs 14; the TorchScript exporter stops at 20


@dataclass(frozen=True)
class ExportRequest:
    out: str
    preset: str = "tiny"
    model: Optional[str] = None
    random_weights: bool = False
    seed: int = 0
    saliency: Optional[str] = None
    lora: Optional[str] = None
    lora_scale: float = 1.0
    loras: tuple[tuple[str, float], ...] = ()  # several LoRAs fused together (path, scale); or lora/lora_scale
    precision: str = "fp32"
    batch: tuple[int, int, int] = (1, 1, 8)
    height: Optional[tuple[int, int, int] | int] = None  # pixels MIN:OPT:MAX, an int = fixed; None = the model's
    width: Optional[tuple[int, int, int] | int] = None
    opset: int = 17
    unet_channels: Optional[int] = None
    components: Optional[tuple[str, ...]] = None
    reward: Optional[str] = None  # a RewardModel folder: exports reward_image and reward_head
    overwrite: bool = False  # replace a non-empty `out` (atomically, once everything is validated)
    recipe: Optional[dict[str, Any]] = None  # the manifest's "recipe" section (manifest.recipe_record), if any


def _log(message: str) -> None:
    print(f"[cg4ctr-export] {message}", file=sys.stderr, flush=True)


def check_request(req: ExportRequest) -> tuple[Any, ExportSettings, tuple[str, ...]]:
    """Every check that needs no model: bad input fails in milliseconds, before anything loads."""
    from cg4ctr_fast.config import get_preset, with_unet_channels
    from cg4ctr_fast.export.lora import check_scale, resolve_lora

    preset = get_preset(req.preset)
    if req.unet_channels is not None:
        if req.model is not None:
            raise InputError("--unet-channels applies to built-in presets; a --model folder has its own UNet")
        preset = with_unet_channels(preset, req.unet_channels)
    if req.model is None and not req.random_weights and not preset.buildable:
        raise InputError(f"preset {preset.name!r} needs --model PATH (a local diffusers folder) or --random-weights")
    if not (MIN_OPSET <= req.opset <= MAX_OPSET):
        raise InputError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {req.opset}")
    settings = ExportSettings(
        precision=req.precision, batch=tuple(req.batch), height=req.height, width=req.width, opset=req.opset
    )
    components = tuple(req.components) if req.components else (
        *(c for c in COMPONENTS if c != "saliency" or req.saliency),
        *(REWARD_COMPONENTS if req.reward else ()),
    )
    if "saliency" in components and not req.saliency:
        raise InputError("component 'saliency' needs --saliency WEIGHTS (a U2NetP .pth or .safetensors, or a "
                         "`cg4ctr-train saliency` folder)")
    if req.saliency and not Path(req.saliency).exists():
        raise InputError(f"saliency checkpoint {req.saliency}: no such file or folder")
    for name in components:
        if name in REWARD_COMPONENTS and not req.reward:
            raise InputError(f"component {name!r} needs --reward DIR (a folder written by RewardModel.save)")
    if req.reward:
        check_reward_folder(req.reward)
    for path, scale in request_loras(req):
        resolve_lora(path)
        check_scale(scale)
    check_out_dir(req.out, overwrite=req.overwrite)  # the one --out rule of every command
    return preset, settings, components


def request_loras(req: ExportRequest) -> list[tuple[str, float]]:
    """The (path, scale) pairs to fuse: `loras`, or the one `lora` at `lora_scale`; InputError if both."""
    if req.loras and req.lora is not None:
        raise InputError("give the LoRAs either as lora/lora_scale or as loras, not both")
    return [(str(p), float(s)) for p, s in req.loras] if req.loras else (
        [(req.lora, req.lora_scale)] if req.lora is not None else [])


def check_reward_folder(path: str) -> None:
    """A RewardModel folder has its three files; their contents are checked when the model loads."""
    from cg4ctr_fast.models.reward import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE

    root = Path(path)
    if not root.is_dir():
        raise InputError(f"reward model {root}: no such directory (--reward takes a folder written by RewardModel.save)")
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE) if not (root / name).is_file()]
    if missing:
        raise InputError(f"reward model {root}: not a RewardModel folder ({', '.join(missing)} missing)")


def saliency_sha256(path: str | Path) -> str:
    """Content hash of saliency weights: the file's sha256, or for a `cg4ctr-train saliency` folder (weights +
    config.json, whose size and threshold change the mask) `folder_sha256`, as `cg4ctr generate` records it."""
    return mf.folder_sha256(path) if Path(path).is_dir() else mf.sha256_file(path)


def saliency_config_dict(config) -> dict[str, Any]:
    """A SaliencyConfig as saliency/config.json holds it: the format `cg4ctr-train saliency` writes, so
    `load_saliency` reads it too. size: input side in px (int ≥ 1); threshold: in [0, 1]; dilate_px: int ≥ 0,
    or null: scaled with the image (`saliency.default_dilate_px`)."""
    return {"architecture": "u2netp", "size": int(config.size), "threshold": float(config.threshold),
            "dilate_px": None if config.dilate_px is None else int(config.dilate_px)}


def reward_fingerprint(path: str | Path) -> dict[str, str]:
    """sha256 of each file of a RewardModel folder: weights, and config (its calibration) and vocabularies."""
    from cg4ctr_fast.models.reward import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE

    return {name: mf.sha256_file(Path(path) / name) for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE)}


def _load_modules(req: ExportRequest, preset):
    from cg4ctr_fast.models.diffusion import build_modules, load_modules

    if req.model is not None:
        return load_modules(req.model)
    return build_modules(preset, seed=req.seed)


def export_onnx(req: ExportRequest, *, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Export, validate and write the folder; returns the manifest. InputError / ValidationFailed otherwise."""
    from cg4ctr_fast.export.contracts import image_sides
    from cg4ctr_fast.export.lora import describe, fuse_loras, manifest_lora
    from cg4ctr_fast.export.modules import export_module
    from cg4ctr_fast.export.validate import compare, open_session, reference_cases, table
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.models.diffusion import model_info

    preset, settings, components = check_request(req)
    started = time.perf_counter()
    modules = _load_modules(req, preset)
    lora = manifest_lora(fuse_loras(modules, request_loras(req)))  # None, one record, or the combined one
    if lora is not None:
        log(f"fused LoRA {describe(lora)}")
    saliency_net = None
    saliency_sha = None
    if "saliency" in components:
        from cg4ctr_fast.models.saliency import load_saliency

        saliency_net = load_saliency(req.saliency)  # its config: the size it runs at, its threshold
        saliency_sha = saliency_sha256(req.saliency)
    reward_model = None
    reward_files = None
    if any(name in REWARD_COMPONENTS for name in components):
        from cg4ctr_fast.models.reward import RewardModel

        reward_model = RewardModel.load(req.reward)  # InputError (one line) for broken files
        reward_files = reward_fingerprint(req.reward)
    model_sha = mf.folder_sha256(req.model) if req.model is not None else None
    stack = StackDims.from_modules(modules)
    heights, widths = image_sides(stack, settings)
    reward_dims = RewardDims.from_config(reward_model.config) if reward_model is not None else None
    saliency_size = int(saliency_net.config.size) if saliency_net is not None else SALIENCY_SIDE
    contracts = build_contracts(stack, settings, components, reward=reward_dims, saliency_size=saliency_size)
    info = model_info(modules)
    if lora is not None:
        info = type(info)(**{**asdict(info), "model_id": f"{info.model_id}+lora:{lora['id'][:16]}"})

    entries: dict[str, Any] = {}
    report: dict[str, Any] = {"precision": settings.precision, "components": {}, "ok": True}
    out = Path(req.out)
    with torch.no_grad(), atomic_dir(out) as tmp:
        for name in components:
            contract = contracts[name]
            if name in REWARD_COMPONENTS:
                # References from the model's own methods; the traced module is their ONNX-exportable twin.
                reference, module = reward_module(name, reward_model), reward_module(name, reward_model, traceable=True)
            else:
                reference = module = export_module(name, modules, saliency_net)
            t0 = time.perf_counter()
            cases = reference_cases(contract, reference)  # fp32 references before any cast
            del reference
            if contract.precision != "fp32":
                module = copy.deepcopy(module).to(dtype=torch.float16)
            files = export_component(contract, module, tmp, settings.opset)
            export_s = time.perf_counter() - t0
            del module
            try:
                session = open_session(tmp / name / "model.onnx")
            except Exception as exc:  # onnxruntime's Fail / InvalidGraph: the export is unusable
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise ValidationFailed(f"{name}: ONNX Runtime cannot load the exported graph: {first}", report) from None
            record = compare(contract, session, cases)
            del session
            record["export_seconds"] = round(export_s, 2)
            report["components"][name] = record
            report["ok"] = report["ok"] and record["ok"]
            worst = max(
                (o["max_abs_error"] if o["max_abs_error"] is not None else float("inf"))
                for c in record["checks"]
                for o in c["outputs"].values()
            )
            log(f"{name}: exported in {export_s:.1f} s, max |onnx - torch| {worst:.2e} ({'ok' if record['ok'] else 'OUT OF TOLERANCE'})")
            entries[name] = {
                "file": f"{name}/model.onnx",
                "sha256": files[0]["sha256"],
                "files": files,
                "dtype": contract.precision,
                "inputs": [asdict(s) for s in contract.inputs],
                "outputs": [asdict(s) for s in contract.outputs],
                "profile": contract.profile_dict(),
                "contract": contract.to_dict(),
            }
            if name == "saliency":
                # The size and threshold the torch path runs this net with, hashed with its graph.
                config = saliency_config_dict(saliency_net.config)
                mf.write_json(tmp / mf.SALIENCY_CONFIG, config)
                entries[name]["files"].append(mf.file_record(tmp, mf.SALIENCY_CONFIG))
                entries[name]["config"] = config
        print(table(report), flush=True)
        if not report["ok"]:
            bad = [n for n, r in report["components"].items() if not r["ok"]]
            raise ValidationFailed(f"{', '.join(bad)} out of tolerance: nothing written to {out}", report)

        modules.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        modules.scheduler.save_pretrained(str(tmp / "scheduler"))
        reward_section = None
        if reward_model is not None:
            reward_section = _copy_reward_files(Path(req.reward), tmp, reward_model)
        mf.write_json(tmp / mf.MODEL_INFO, asdict(info))
        mf.write_json(tmp / mf.VALIDATION, report)
        runtime_files = mf.runtime_file_records(tmp, entries)
        manifest = {
            "format": mf.ONNX_FORMAT,
            "format_version": mf.FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {
                "preset": req.preset,
                "model": str(Path(req.model).resolve()) if req.model else None,  # a hint: model_sha256 decides
                "model_sha256": model_sha,
                "model_id": modules.model_id,
                "seed": req.seed,
                "random_weights": req.model is None,
                "unet_channels": stack.unet_in_channels,
                "saliency": str(Path(req.saliency).resolve()) if saliency_net is not None else None,
                "saliency_sha256": saliency_sha,
                "reward": str(Path(req.reward).resolve()) if reward_model is not None else None,
                "reward_sha256": reward_files,
            },
            "lora": lora,
            "settings": {
                "precision": settings.precision,
                "batch": list(settings.batch),
                "height": list(heights),  # pixels MIN, OPT, MAX
                "width": list(widths),
                "opset": settings.opset,
            },
            "recipe": req.recipe,  # `--recipe FILE`: path, sha256, keys, overridden; null without one
            "stack": asdict(stack),
            "model_info": asdict(info),
            "components": entries,
            "files": runtime_files,
            "reward": reward_section,
            "validation": {"file": mf.VALIDATION, "ok": True},
            "exporter": "torch.onnx.export(dynamo=False, dynamic_axes from the contracts)",
            "libraries": mf.library_versions(),
            "host": mf.host_description(),
            "seconds": round(time.perf_counter() - started, 1),
        }
        mf.write_json(tmp / mf.MANIFEST, manifest)  # last: its presence marks a complete folder
    log(f"wrote {out} ({', '.join(components)}) in {time.perf_counter() - started:.1f} s")
    return manifest


def _copy_reward_files(source: Path, tmp: Path, model) -> dict[str, Any]:
    """The reward model's non-weight files into tmp/reward/; the manifest's "reward" section listing them."""
    from cg4ctr_fast.models.reward import CONFIG_FILE, FORMAT, VOCAB_FILE

    (tmp / mf.REWARD_DIR).mkdir()
    for name in (CONFIG_FILE, VOCAB_FILE):
        shutil.copy2(source / name, tmp / mf.REWARD_DIR / name)
    return {
        "format": FORMAT,
        "folder": mf.REWARD_DIR,
        "files": [mf.file_record(tmp, f"{mf.REWARD_DIR}/{name}") for name in (CONFIG_FILE, VOCAB_FILE)],
        "config": model.config.to_dict(),
    }


# ---------------------------------------------------------------------------------------------------------
# The reward model's two graphs
# ---------------------------------------------------------------------------------------------------------


class RewardImageExport(torch.nn.Module):
    """reward_image: RewardModel.embed_images, images [B, 3, S, S] in [0, 1] → embeddings [B, D]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        return self.model.embed_images(image)


class RewardHeadExport(torch.nn.Module):
    """reward_head: RewardModel.score, the calibrated CTR [B] from stored embeddings, token ids and group features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embedding, title_ids, caption_ids, group_features):
        return self.model.score(image_embedding, title_ids, caption_ids, group_features)


class MaskedMeanEmbedding(torch.nn.Module):
    """nn.EmbeddingBag(mode="mean", padding_idx=p) over [B, L] ids, in ops the ONNX exporter has.

    torch.onnx refuses embedding_bag with a padding_idx. The same mean written out: gather the rows, drop the
    padding positions, divide by the number left; a row of padding only gives zeros, as EmbeddingBag does.
    """

    def __init__(self, bag: torch.nn.EmbeddingBag):
        super().__init__()
        if bag.mode != "mean" or bag.max_norm is not None:
            raise ValueError(f"only EmbeddingBag(mode='mean') without max_norm exports, got mode={bag.mode!r}")
        self.weight = bag.weight
        self.padding_idx = bag.padding_idx

    def forward(self, ids):
        vectors = torch.nn.functional.embedding(ids, self.weight)
        if self.padding_idx is None:
            return vectors.mean(dim=1)
        keep = (ids != self.padding_idx).unsqueeze(-1).to(vectors.dtype)
        return (vectors * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def reward_module(name: str, model, *, traceable: bool = False) -> torch.nn.Module:
    """The torch module of reward component `name` over a RewardModel (eval mode).

    traceable=False: the model's own methods, the reference validation compares with. traceable=True: the same
    over a copy whose EmbeddingBags are MaskedMeanEmbedding, which the exporter can trace (validation then checks
    the two agree, through ONNX Runtime).
    """
    if name == "reward_image":
        return RewardImageExport(model).eval()
    if name != "reward_head":
        raise ValueError(f"unknown reward component {name!r}")
    if not traceable:
        return RewardHeadExport(model).eval()
    twin = copy.deepcopy(model)  # a few MB: the towers and a small transformer
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.EmbeddingBag):
                setattr(parent, child_name, MaskedMeanEmbedding(child))
    return RewardHeadExport(twin).eval()


def trace_values(contract: ComponentContract) -> dict[str, int]:
    """The shapes the exporter traces at: batch 2 (no size-1 specialisation), the UNet at an odd latent size."""
    values = contract.values("opt", batch=2)
    if contract.name == "unet":
        for axis in ("latent_height", "latent_width"):
            values[axis] = values[axis] if values[axis] % 2 else values[axis] + 1
    return values


def export_component(contract: ComponentContract, module, root: Path, opset: int) -> list[dict[str, Any]]:
    """Trace `module` into root/<name>/model.onnx (+ one external data file when large); check it; hash it."""
    import onnx

    folder = root / contract.name
    scratch = root / f".scratch-{contract.name}"
    folder.mkdir(parents=True)
    scratch.mkdir()
    try:
        inputs = contract.sample_inputs(trace_values(contract), seed=0)
        args = tuple(inputs[name] for name in contract.input_names)
        # nn.TransformerEncoderLayer (the reward head) takes a fused native kernel in eval mode, which has no
        # ONNX symbolic; off during the trace, it records the same math as plain ops.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                torch.onnx.export(
                    module,
                    args,
                    str(scratch / "model.onnx"),
                    dynamo=False,
                    input_names=contract.input_names,
                    output_names=contract.output_names,
                    dynamic_axes=contract.dynamic_axes(),
                    opset_version=opset,
                    do_constant_folding=True,
                )
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        written = sorted(p.name for p in scratch.iterdir())
        if written == ["model.onnx"] and weight_bytes < EXTERNAL_DATA_BYTES:
            shutil.move(str(scratch / "model.onnx"), str(folder / "model.onnx"))
        else:
            # Over 2 GB the exporter writes one file per tensor beside the graph; gather them into one.
            model = onnx.load(str(scratch / "model.onnx"), load_external_data=True)
            onnx.save_model(
                model,
                str(folder / "model.onnx"),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=EXTERNAL_DATA_NAME,
                size_threshold=1024,
            )
            del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        onnx.checker.check_model(str(folder / "model.onnx"))  # path form: works over 2 GB
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValidationFailed(f"{contract.name}: onnx.checker rejects the exported graph: {first}", {}) from None
    names = ["model.onnx"] + ([EXTERNAL_DATA_NAME] if (folder / EXTERNAL_DATA_NAME).is_file() else [])
    return [mf.file_record(root, f"{contract.name}/{n}") for n in names]
