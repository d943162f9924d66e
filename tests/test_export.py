"""cg4ctr-export: ONNX folders validated against torch, the ONNX Runtime backend running the same loop,
LoRA fusing through diffusers/peft, bad input refused in one line, TensorRT logic without TensorRT.

Pipeline tolerance (ONNX Runtime vs torch, same tiny weights, scheduler and seeds, composite off): 5e-4 on images
in [0, 1]. The two backends differ by float reordering inside each component (≤ 6e-6 per call, validation.json);
through a 4-step loop and the VAE decoder that measured ≤ 5e-5 here, so 5e-4 leaves 10× margin while a wrong
slot (a misrouted timestep, a missing quant_conv, a different noise draw) moves pixels by > 1e-2. With composite
on, product pixels must equal the input's bit for bit and the repainted pixels may differ by one uint8 level.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import (
    COMPONENTS,
    ComponentContract,
    ExportSettings,
    StackDims,
    Tolerance,
    build_contracts,
    parse_batch,
    parse_components,
    RewardDims,
    reward_contracts,
)
from cg4ctr_fast.export.tensorrt_build import (
    TRT_UNAVAILABLE,
    cache_key,
    cache_key_fields,
    check_dtypes,
    check_engine_manifest,
    tensorrt_unavailable_reason,
    trt_profile,
)
from tests.conftest import make_product

PIPE_TOL = 5e-4
NO_TRT = tensorrt_unavailable_reason() is not None


def export_cli(*args: str) -> int:
    from cg4ctr_fast.cli.export import main

    try:
        return main(list(args))
    except SystemExit as exc:  # argparse usage errors
        return int(exc.code)


def one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[cg4ctr-export]")]
    assert code == expected_code, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def saliency_file(tmp_path_factory):
    from cg4ctr_fast.models.saliency import U2NetP, save_saliency

    torch.manual_seed(0)
    return save_saliency(U2NetP().eval(), tmp_path_factory.mktemp("sal") / "u2netp.safetensors")


@pytest.fixture(scope="module")
def tiny9(tmp_path_factory, saliency_file):
    out = tmp_path_factory.mktemp("exports") / "tiny9"
    assert export_cli("onnx", "--preset", "tiny", "--saliency", str(saliency_file), "--batch", "1:2:4",
                      "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny4"
    assert export_cli("onnx", "--preset", "tiny", "--unet-channels", "4", "--batch", "1:1:4", "--out", str(out)) == 0
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


# ------------------------------------------------------------------------------------------------ the folder
def test_export_writes_every_component_with_manifest_and_validation(tiny9):
    import onnx
    import onnxruntime as ort

    manifest = json.loads((tiny9 / "manifest.json").read_text())
    assert manifest["format"] == mf.ONNX_FORMAT and manifest["format_version"] == mf.FORMAT_VERSION
    assert list(manifest["components"]) == list(COMPONENTS)
    assert manifest["source"]["model_id"] == "preset:tiny:random-seed0" and manifest["lora"] is None
    assert manifest["libraries"]["torch"] and manifest["libraries"]["onnxruntime"]
    for name, entry in manifest["components"].items():
        path = tiny9 / entry["file"]
        assert path == tiny9 / name / "model.onnx" and path.is_file()
        assert entry["sha256"] == mf.sha256_file(path) and entry["files"][0]["bytes"] == path.stat().st_size
        onnx.checker.check_model(str(path))
        contract = ComponentContract.from_dict(entry["contract"])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == contract.input_names
        assert [o.name for o in session.get_outputs()] == contract.output_names
        assert entry["profile"]["batch"] == [contract.dim("batch").min, contract.dim("batch").opt, contract.dim("batch").max]
    # The UNet's batch: creatives 1..4 → 1..8 with guidance.
    assert manifest["components"]["unet"]["profile"]["batch"] == [1, 4, 8]
    validation = json.loads((tiny9 / "validation.json").read_text())
    assert validation["ok"]
    for name, record in validation["components"].items():
        assert record["ok"] and len(record["checks"]) == 2 and record["tolerance"]["why"]
        for check in record["checks"]:
            for out in check["outputs"].values():
                assert out["max_abs_error"] <= out["allowed"]
                assert out["max_abs_error"] < 1e-4  # fp32: reordered float math only (measured ≤ 6e-6)
    info = json.loads((tiny9 / "model_info.json").read_text())
    assert info["unet_in_channels"] == 9 and info["vae_scale_factor"] == 4
    assert (tiny9 / "tokenizer").is_dir() and (tiny9 / "scheduler" / "scheduler_config.json").is_file()
    assert not [p for p in tiny9.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_verify_reruns_validation(tiny4, capsys):
    assert export_cli("verify", "--engines", str(tiny4)) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert export_cli("verify", str(tiny4)) == 0  # the older positional form still works
    capsys.readouterr()
    code = export_cli("verify", str(tiny4), "--engines", str(tiny4.parent))
    assert "two engine folders given" in one_line_error(capsys, code)


# ------------------------------------------------------------------------------------------------ the runtime
@pytest.mark.parametrize("which", ["tiny9", "tiny4"])
def test_onnxruntime_pipeline_equals_torch_pipeline(request, which):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = request.getfixturevalue(which)
    channels = 9 if which == "tiny9" else 4
    ours = CreativePipeline.from_engines(str(folder))
    torch_pipe = CreativePipeline.from_preset("tiny", unet_in_channels=channels)
    assert ours.components.backend == "onnxruntime" and ours.components.modules is None
    image, mask = make_product(seed=channels)
    prompts = ["warm beach at sunset", "cool blue studio"]
    # 9 channels: guided, full strength; 4 channels: guided, strength < 1 (image latents + masked blending).
    kwargs = {"guidance_scale": 7.5} if channels == 9 else {"guidance_scale": 5.0, "strength": 0.6}
    got = ours(prompts, image, mask, num_inference_steps=3, output_type="np", composite=False,
               show_progress=False, **kwargs)
    want = torch_pipe(prompts, image, mask, num_inference_steps=3, output_type="np", composite=False,
                      show_progress=False, **kwargs)
    err = max(float(np.abs(a.image - b.image).max()) for a, b in zip(got, want))
    assert err <= PIPE_TOL, f"{which} {kwargs}: max abs error {err:.2e} > {PIPE_TOL}"
    assert float(np.abs(got[0].image - got[1].image).max()) > 1e-3  # the prompts steer the groups
    got = ours(prompts, image, mask, num_inference_steps=3, show_progress=False, **kwargs)
    want = torch_pipe(prompts, image, mask, num_inference_steps=3, show_progress=False, **kwargs)
    keep = np.asarray(mask) < 128
    for a, b in zip(got, want):
        ga, wb = np.asarray(a.image).astype(int), np.asarray(b.image).astype(int)
        assert np.array_equal(ga[keep], np.asarray(image)[keep])  # product pixels bit for bit
        # 8-bit images: the float outputs above differ by ≤ 5e-5, so rounding to uint8 can split by exactly one
        # level where a value sits near a rounding boundary, and by no more.
        assert np.abs(ga - wb).max() <= 1
        assert a.seed == b.seed


def test_dynamic_batch_1_and_3(tiny9):
    from cg4ctr_fast.export.modules import export_module
    from cg4ctr_fast.models.diffusion import build_modules
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.runtime.onnxruntime_backend import onnxruntime_components

    comps = onnxruntime_components(tiny9)
    modules = build_modules(get_preset("tiny"))
    manifest = json.loads((tiny9 / "manifest.json").read_text())
    for name, slot in (("unet", comps.unet), ("text_encoder", comps.text_encoder), ("vae_decoder", comps.vae_decoder)):
        contract = mf.contract_of(manifest, name)
        module = export_module(name, modules)
        for batch in (1, 3):
            inputs = contract.sample_inputs(contract.values("opt", batch=batch), seed=batch)
            with torch.no_grad():
                want = module(*inputs.values())
            if name == "unet":  # the loop passes a 0-dim timestep; the slot broadcasts it
                inputs["timestep"] = inputs["timestep"][0]
                with torch.no_grad():
                    want = module(inputs["sample"], inputs["timestep"].expand(batch), inputs["encoder_hidden_states"])
            got = slot(*inputs.values())
            assert got.shape == want.shape and got.shape[0] == batch
            assert float((got - want).abs().max()) <= contract.tolerance.allowed(float(want.abs().max()))


def test_non_square_and_outside_profile(tiny9):
    from cg4ctr_fast.pipeline import CreativePipeline

    pipe = CreativePipeline.from_engines(str(tiny9))
    image, mask = make_product(width=64, height=48, seed=3)
    creatives = pipe(["a"], image, mask, num_inference_steps=2, height=48, width=64, show_progress=False)
    assert creatives[0].image.size == (64, 48)
    with pytest.raises(InputError, match="outside the exported profile"):
        pipe(["a", "b", "c", "d", "e"], image, mask, num_inference_steps=1, show_progress=False)  # UNet batch 10 > 8
    with pytest.raises(InputError, match=r"unet \(onnxruntime\): input 'sample' has shape"):
        pipe.components.unet(torch.zeros(1, 4, 16, 16), torch.tensor(1), torch.zeros(1, 77, 32))


def test_exported_saliency_makes_the_mask(tiny9, saliency_file):
    from PIL import Image

    from cg4ctr_fast.models.saliency import load_saliency, predict_saliency
    from cg4ctr_fast.pipeline import CreativePipeline

    pipe = CreativePipeline.from_engines(str(tiny9))
    assert pipe.saliency is not None
    image, _ = make_product(seed=4)
    got = predict_saliency(pipe.saliency, image)
    want = predict_saliency(load_saliency(saliency_file), image)
    assert got.shape == (64, 64) and float(np.abs(got - want).max()) < 1e-4
    rgba = Image.new("RGB", (64, 64))  # no alpha, no mask: the exported saliency net decides
    rgba.paste(image)
    # A random-weight saliency net may mark everything or nothing; the mask check then refuses it clearly.
    try:
        creatives = pipe(["a"], rgba, num_inference_steps=1, show_progress=False)
        assert creatives[0].mask.size == (64, 64)
    except InputError as exc:
        assert "mask" in str(exc)


# ------------------------------------------------------------------------------------------------ LoRA
def random_unet_lora(seed: int, *, rank: int = 4, alpha: float = 8,
                     targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"), unet_channels: int = 9):
    """A LoRA with random non-zero weights (peft's init_lora_weights=False, seeded) on the tiny preset's UNet
    (`unet_channels` in-channels): (the peft-wrapped UNet, its state dict with diffusers' keys, its LoraConfig)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from cg4ctr_fast.config import get_preset, with_unet_channels
    from cg4ctr_fast.models.diffusion import build_modules

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=list(targets))
        peft_unet = get_peft_model(build_modules(with_unet_channels(get_preset("tiny"), unet_channels)).unet, config)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(peft_unet).items()}
    return peft_unet, state, config


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """One LoRA (r=4, alpha=8, non-zero weights) on the tiny UNet, saved as diffusers, peft and kohya files."""
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("lora")
    peft_unet, state, config = random_unet_lora(3)
    peft_unet.save_pretrained(str(root / "peft"))
    # With its metadata: without it diffusers reloads alpha = r (DESIGN.md §12).
    StableDiffusionInpaintPipeline.save_lora_weights(str(root / "diffusers"), unet_lora_layers=state,
                                                     unet_lora_adapter_metadata=config.to_dict())
    kohya = {}
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        kohya[base + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = value.contiguous()
        kohya[base + ".alpha"] = torch.tensor(8.0)
    save_file(kohya, str(root / "kohya.safetensors"))
    wrong = {f"unet.{k}": (torch.randn(8, v.shape[1]) if ".lora_A." in k else v).contiguous() for k, v in state.items()}
    save_file(wrong, str(root / "other_arch.safetensors"))  # rank 8 A against rank 4 B: another model's shapes
    return {"diffusers": root / "diffusers" / "pytorch_lora_weights.safetensors", "peft": root / "peft",
            "kohya": root / "kohya.safetensors", "other": root / "other_arch.safetensors"}


def _unet_onnx(folder: Path, inputs: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def test_lora_fused_export_equals_diffusers_fused_unet(loras, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules

    scale = 0.7
    out = tmp_path / "lora"
    assert export_cli("onnx", "--preset", "tiny", "--components", "unet", "--lora", str(loras["diffusers"]),
                      "--lora-scale", str(scale), "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lora"]["scale"] == scale and manifest["lora"]["format"] == "diffusers"
    assert "+lora:" in manifest["model_info"]["model_id"]

    m = build_modules(get_preset("tiny"))
    reference = StableDiffusionInpaintPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                                               unet=m.unet, scheduler=m.scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
    contract = mf.contract_of(manifest, "unet")
    inputs = contract.sample_inputs(contract.values("opt", batch=2), seed=7)
    with torch.no_grad():
        base = m.unet(*inputs.values(), return_dict=False)[0]
        reference.load_lora_weights(str(loras["diffusers"]))
        reference.fuse_lora(lora_scale=scale)
        want = reference.unet(*inputs.values(), return_dict=False)[0].numpy()
    got = _unet_onnx(out, inputs)
    assert np.abs(want - base.numpy()).max() > 1e-2  # the LoRA really changes the UNet
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    # The same adapter as a peft folder and with kohya keys fuses to the same UNet.
    for kind in ("peft", "kohya"):
        other = tmp_path / kind
        assert export_cli("onnx", "--preset", "tiny", "--components", "unet", "--lora", str(loras[kind]),
                          "--lora-scale", str(scale), "--out", str(other)) == 0
        assert json.loads((other / "manifest.json").read_text())["lora"]["format"] == kind
        assert np.abs(_unet_onnx(other, inputs) - got).max() <= 1e-5


def test_lora_for_another_architecture_is_refused(loras, tmp_path, capsys):
    out = tmp_path / "bad"
    code = export_cli("onnx", "--preset", "tiny", "--components", "unet", "--lora", str(loras["other"]),
                      "--out", str(out))
    line = one_line_error(capsys, code)
    assert "does not fit this model" in line and "size mismatch" in line
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


# ------------------------------------------------------------------------------------------------ precision
def test_fp16_export_validates_with_fp16_tolerance(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "fp16"
    assert export_cli("onnx", "--preset", "tiny", "--dtype", "fp16", "--components", "unet,vae_decoder",
                      "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["dtype"] == "fp16"
    assert manifest["components"]["vae_decoder"]["dtype"] == "fp32"  # SD's VAE overflows in fp16
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    assert types == {"sample": "tensor(float16)", "timestep": "tensor(float)",
                     "encoder_hidden_states": "tensor(float16)"}
    record = json.loads((out / "validation.json").read_text())["components"]["unet"]
    assert record["ok"] and record["tolerance"]["rtol"] == 3e-2


# ------------------------------------------------------------------------------------------------ failure paths
def test_validation_failure_exits_1_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from cg4ctr_fast.export import contracts

    monkeypatch.setitem(contracts.TOLERANCES["unet"], "fp32", Tolerance(0.0, 0.0, "impossible"))
    out = tmp_path / "out"
    code = export_cli("onnx", "--preset", "tiny", "--components", "unet", "--out", str(out))
    assert "unet" in one_line_error(capsys, code, expected_code=1)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, capsys):
    from cg4ctr_fast.export import validate

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "compare", interrupt)
    code = export_cli("onnx", "--preset", "tiny", "--components", "text_encoder", "--out", str(tmp_path / "out"))
    assert code == 130 and list(tmp_path.iterdir()) == []
    capsys.readouterr()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--components", "unet,bogus"], "unknown component 'bogus'"),
        (["--components", "reward_head"], "needs --reward DIR"),
        (["--preset", "sd99"], "unknown preset 'sd99'"),
        (["--preset", "sd15-inpaint"], "--random-weights"),
        (["--batch", "4:2:8"], "--batch"),
        (["--height", "60"], "multiple of 8"),
        (["--height", "64:72:100"], "--height must be a multiple of 8 at min, opt and max, got 100"),
        (["--width", "64:x:128"], "--width must be MIN:OPT:MAX (e.g. 64:64:128) or one number, got '64:x:128'"),
        (["--height", "64:128"], "--height must be MIN:OPT:MAX"),
        (["--width", "128:64:64"], "--width must be MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX, got 128:64:64"),
        (["--height", "0"], "--height must be MIN:OPT:MAX with 1 ≤ MIN"),
        (["--opset", "9"], "--opset"),
        (["--components", "saliency"], "--saliency"),
        (["--lora", "/nonexistent/lora.safetensors"], "no such file"),
    ],
)
def test_bad_export_requests(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    code = export_cli("onnx", "--out", str(out), *args)
    assert needle in one_line_error(capsys, code)
    assert not out.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "modified", "version", "hash", "no-manifest"])
def test_damaged_folder_is_refused(tiny9, tmp_path, capsys, damage):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = _copy(tiny9, tmp_path)
    model = folder / "unet" / "model.onnx"
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "missing":
        model.unlink()
        needle = "missing"
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:1000])
        needle = "truncated"
    elif damage == "modified":
        data = bytearray(model.read_bytes())
        data[-100] ^= 0xFF
        model.write_bytes(bytes(data))
        needle = "sha256"
    elif damage == "version":
        manifest["format_version"] = 99
        manifest_path.write_text(json.dumps(manifest))
        needle = "format version 99"
    elif damage == "hash":
        manifest["components"]["unet"]["files"][0]["sha256"] = "0" * 64
        manifest_path.write_text(json.dumps(manifest))
        needle = "sha256"
    else:
        manifest_path.unlink()
        needle = "no manifest.json"
    with pytest.raises(InputError, match=needle):
        CreativePipeline.from_engines(str(folder))
    assert needle in one_line_error(capsys, export_cli("verify", str(folder)))

    from cg4ctr_fast.cli.main import main as cg4ctr_main

    image, mask = make_product()
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    code = cg4ctr_main(["generate", "--engines", str(folder), "--image", str(tmp_path / "p.png"), "--mask",
                        str(tmp_path / "m.png"), "--prompt", "x", "--out", str(tmp_path / "gen"), "--quiet"])
    assert needle in one_line_error(capsys, code) and not (tmp_path / "gen").exists()


def test_generate_and_bench_from_engines(tiny9, tiny4, tmp_path, capsys):
    from cg4ctr_fast.cli.bench import main as bench_main
    from cg4ctr_fast.cli.main import main as cg4ctr_main

    image, mask = make_product()
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    out = tmp_path / "gen"
    assert cg4ctr_main(["generate", "--engines", str(tiny9), "--backend", "onnxruntime", "--image",
                        str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png"), "--prompt", "a", "--prompt",
                        "b", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "creatives.json").read_text())
    assert meta["backend"] == "onnxruntime" and len(meta["creatives"]) == 2

    report = tmp_path / "bench.json"
    assert bench_main(["--preset", "tiny", "--engines", str(tiny9), "--backends", "torch,onnxruntime", "--groups",
                       "1", "--steps", "2", "--runs", "1", "--warmup", "0", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["results"]
    assert [r["name"] for r in rows] == ["diffusers", "torch", "onnxruntime"]
    assert rows[2]["backend"] == "onnxruntime" and rows[2]["stages"]["unet"]["p50"] > 0
    capsys.readouterr()
    # A folder exported from other weights (4-channel UNet) does not stand in for the bench's model.
    code = bench_main(["--preset", "tiny", "--engines", str(tiny4), "--backends", "onnxruntime", "--json",
                       str(tmp_path / "x.json")])
    assert "exported from" in one_line_error(capsys, code)


def test_env_lists_versions_and_gpu(capsys):
    assert export_cli("env") == 0
    out = capsys.readouterr().out
    for name in ("torch", "diffusers", "peft", "onnx", "onnxruntime", "tensorrt", "triton", "gpu"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    if not torch.cuda.is_available():
        assert any(line.split() == ["gpu", "none"] for line in out.splitlines())


# ------------------------------------------------------------------------------------------------ contracts
def _contracts(**settings):
    from cg4ctr_fast.config import get_preset

    return build_contracts(StackDims.from_preset(get_preset("tiny")), ExportSettings(**settings))


def test_contracts_are_data():
    contracts = _contracts(batch=(1, 2, 4))
    unet = contracts["unet"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.input("timestep").dtype == "float32" and unet.input("timestep").shape == ("batch",)
    assert unet.dynamic_axes()["sample"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert ComponentContract.from_dict(json.loads(json.dumps(unet.to_dict()))) == unet
    a = unet.sample_inputs(seed=5)
    b = unet.sample_inputs(seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["sample"].shape == (4, 9, 16, 16)
    assert [p["batch"] for p in unet.validation_points()] == [1, 4]
    assert [p["batch"] for p in contracts["vae_encoder"].validation_points()] == [1, 3]
    assert contracts["vae_encoder"].values("opt")["latent_height"] == 16
    unet.check_shapes({"sample": (3, 9, 12, 16), "timestep": (3,), "encoder_hidden_states": (3, 77, 32)})
    with pytest.raises(InputError, match="axis batch is 3 in one input and 2"):
        unet.check_shapes({"sample": (3, 9, 16, 16), "timestep": (2,), "encoder_hidden_states": (3, 77, 32)})
    with pytest.raises(InputError, match="latent_height 17 is outside"):
        unet.check_shapes({"sample": (1, 9, 17, 16), "timestep": (1,), "encoder_hidden_states": (1, 77, 32)})
    with pytest.raises(InputError, match="expected rank"):
        unet.check_shapes({"sample": (1, 9, 16), "timestep": (1,), "encoder_hidden_states": (1, 77, 32)})
    fp16 = _contracts(precision="fp16")
    assert fp16["unet"].input("sample").dtype == "float16" and fp16["vae_decoder"].precision == "fp32"
    assert parse_batch("2") == (2, 2, 2)
    with pytest.raises(InputError):
        parse_batch("1:x:3")
    assert parse_components("vae_decoder,unet") == ("unet", "vae_decoder")
    assert parse_components("reward_head,unet,reward_image") == ("unet", "reward_image", "reward_head")
    dims = RewardDims(image_size=64, image_dim=128, max_title_tokens=24, max_caption_tokens=16, group_dim=8,
                      title_vocab_size=500, caption_vocab_size=300)
    reward = reward_contracts(dims, ExportSettings())
    assert set(reward) == {"reward_image", "reward_head"} and reward["reward_head"].output_names == ["score"]


def test_export_modules_import_no_onnx_or_tensorrt():
    code = (
        "import sys, cg4ctr_fast.export.contracts, cg4ctr_fast.export.manifest, cg4ctr_fast.export.tensorrt_build;"
        "print([m for m in ('onnx', 'onnxruntime', 'tensorrt', 'triton') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ TensorRT
def _engine_manifest(contract, *, trt="10.8.0", cc="9.0", lora=None):
    fields = cache_key_fields(tensorrt_version=trt, compute_capability=cc, onnx_sha256="ab" * 32, lora_id=lora,
                              contract=contract, refittable=False)
    return {"format": mf.ENGINE_FORMAT, "format_version": 1, "onnx": {"path": "/x/onnx"}, "refittable": False,
            "components": {"unet": {"cache_key": cache_key(fields), "key_fields": fields,
                                    "contract": contract.to_dict()}}}


def test_engine_cache_key_and_refusal():
    contract = _contracts()["unet"]
    fields = cache_key_fields(tensorrt_version="10.8.0", compute_capability="9.0", onnx_sha256="ab" * 32,
                              lora_id=None, contract=contract, refittable=False)
    key = cache_key(fields)
    assert key == cache_key(dict(reversed(list(fields.items()))))  # canonical JSON
    for field, value in (("tensorrt", "10.9.0"), ("compute_capability", "8.0"), ("onnx_sha256", "cd" * 32),
                         ("lora_id", "ef" * 32), ("profile", {"batch": [1, 2, 3]}), ("refittable", True)):
        assert cache_key({**fields, field: value}) != key, field

    manifest = _engine_manifest(contract)
    check_engine_manifest(manifest, "eng", tensorrt_version="10.8.0", compute_capability="9.0")
    with pytest.raises(InputError, match=r"built for TensorRT 10.8.0 on compute capability 9.0.*rebuild with "
                                         r"`cg4ctr-export engine --onnx /x/onnx --out eng`"):
        check_engine_manifest(manifest, "eng", tensorrt_version="10.9.0", compute_capability="9.0")
    with pytest.raises(InputError, match="compute capability 9.0, this machine has TensorRT 10.8.0 on 8.6"):
        check_engine_manifest(manifest, "eng", tensorrt_version="10.8.0", compute_capability="8.6")
    with pytest.raises(InputError, match="carries LoRA None"):
        check_engine_manifest(manifest, "eng", tensorrt_version="10.8.0", compute_capability="9.0", lora_id="ff")
    edited = json.loads(json.dumps(manifest))
    edited["components"]["unet"]["key_fields"]["tensorrt"] = "10.9.0"  # key no longer matches its fields
    with pytest.raises(InputError, match="does not match its recorded fields"):
        check_engine_manifest(edited, "eng", tensorrt_version="10.9.0", compute_capability="9.0")
    other_profile = json.loads(json.dumps(manifest))
    other_profile["components"]["unet"]["contract"] = _contracts(batch=(1, 1, 2))["unet"].to_dict()
    with pytest.raises(InputError, match="profile differs"):
        check_engine_manifest(other_profile, "eng", tensorrt_version="10.8.0", compute_capability="9.0")


def test_tensorrt_profile_and_dtypes_from_contracts():
    unet = _contracts(batch=(1, 2, 4))["unet"]
    profile = {name: shapes for name, *shapes in [(p[0], p[1], p[2], p[3]) for p in trt_profile(unet)]}
    assert profile["sample"] == [(1, 9, 2, 2), (4, 9, 16, 16), (8, 9, 16, 16)]
    assert profile["timestep"] == [(1,), (4,), (8,)]
    assert profile["encoder_hidden_states"] == [(1, 77, 32), (4, 77, 32), (8, 77, 32)]
    good = {"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32", "out_sample": "float32"}
    check_dtypes(good, unet)
    with pytest.raises(InputError, match="out_sample: engine float16, contract float32"):
        check_dtypes({**good, "out_sample": "float16"}, unet)


def test_side_ranges_reach_contracts_validation_and_tensorrt_profiles():
    ranged = _contracts(batch=(1, 1, 2), height=(48, 64, 96), width=(64, 64, 96))
    unet, encoder, decoder = ranged["unet"], ranged["vae_encoder"], ranged["vae_decoder"]
    # tiny: VAE scale 4, so 48:64:96 pixels are 12:16:24 latents.
    assert encoder.profile_dict() == {"batch": [1, 1, 2], "height": [48, 64, 96], "width": [64, 64, 96]}
    assert unet.profile_dict()["latent_height"] == [12, 16, 24] and unet.profile_dict()["latent_width"] == [16, 16, 24]
    profile = {name: shapes for name, *shapes in trt_profile(unet)}
    assert profile["sample"] == [(1, 9, 12, 16), (2, 9, 16, 16), (4, 9, 24, 24)]
    # Validation covers the range: batch min and opt at opt, then batch min at the max and at the min sides.
    points = [(p["batch"], p["latent_height"], p["latent_width"]) for p in unet.validation_points()]
    assert points == [(1, 16, 16), (2, 16, 16), (1, 24, 24), (1, 12, 16)]
    assert [(p["height"], p["width"]) for p in decoder.validation_points()][2:] == [(96, 96), (48, 64)]
    encoder.check_shapes({"image": (1, 3, 96, 72)})
    with pytest.raises(InputError, match="height 104 is outside the exported profile 48..96"):
        encoder.check_shapes({"image": (1, 3, 104, 64)})
    # One number is a fixed side: nothing else runs, and nothing else is validated.
    fixed = _contracts(height=64, width=64)["vae_encoder"]
    assert fixed.profile_dict()["height"] == [64, 64, 64] and len(fixed.validation_points()) == 2
    with pytest.raises(InputError, match="height 48 is outside the exported profile 64..64"):
        fixed.check_shapes({"image": (1, 3, 48, 64)})
    # The default keeps every aspect ratio the pipeline makes (longer side = the resolution) and validates at opt.
    default = _contracts()["vae_encoder"]
    assert default.profile_dict()["height"] == [8, 64, 64] and len(default.validation_points()) == 2


@pytest.mark.skipif(not NO_TRT, reason="TensorRT is available here: the GPU tests cover the real path")
def test_engine_commands_without_tensorrt(tiny9, tmp_path, capsys):
    for args in (["engine", "--engines", str(tiny9), "--out", str(tmp_path / "trt")],
                 ["engine", "--onnx", str(tiny9), "--out", str(tmp_path / "trt")],  # the older spelling
                 ["refit", "--engines", str(tmp_path / "trt"), "--lora", "x.safetensors"],
                 ["refit", "--engine", str(tmp_path / "trt"), "--lora", "x.safetensors"]):
        code = export_cli(*args)
        assert one_line_error(capsys, code) == f"cg4ctr-export: error: {TRT_UNAVAILABLE}"
    assert not (tmp_path / "trt").exists()
    from cg4ctr_fast.pipeline import CreativePipeline

    with pytest.raises(InputError, match="TensorRT needs an NVIDIA GPU"):
        CreativePipeline.from_engines(str(tiny9), backend="tensorrt")


@pytest.mark.gpu
@pytest.mark.skipif(NO_TRT, reason=TRT_UNAVAILABLE)
def test_tensorrt_engines_run_the_same_loop(tiny9, tmp_path):  # pragma: no cover - needs a GPU and tensorrt
    from cg4ctr_fast.pipeline import CreativePipeline

    engines = tmp_path / "trt"
    assert export_cli("engine", "--engines", str(tiny9), "--out", str(engines), "--timing-cache",
                      str(tmp_path / "cache.bin")) == 0
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["format"] == mf.ENGINE_FORMAT and (tmp_path / "cache.bin").is_file()
    image, mask = make_product()
    got = CreativePipeline.from_engines(str(engines), backend="tensorrt")(
        ["a", "b"], image, mask, num_inference_steps=4, output_type="np", composite=False, show_progress=False)
    want = CreativePipeline.from_engines(str(tiny9))(
        ["a", "b"], image, mask, num_inference_steps=4, output_type="np", composite=False, show_progress=False)
    assert max(float(np.abs(a.image - b.image).max()) for a, b in zip(got, want)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(NO_TRT, reason=TRT_UNAVAILABLE)
def test_tensorrt_refit_swaps_the_lora(tiny9, loras, tmp_path):  # pragma: no cover - needs a GPU and tensorrt
    engines = tmp_path / "trt"
    assert export_cli("engine", "--engines", str(tiny9), "--out", str(engines), "--refittable") == 0
    assert export_cli("refit", "--engines", str(engines), "--lora", str(loras["diffusers"])) == 0
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["lora"]["format"] == "diffusers"
    assert manifest["components"]["unet"]["key_fields"]["lora_id"] == manifest["lora"]["id"]
