"""Several LoRAs fused together (cg4ctr_fast.export.lora.fuse_loras) equal diffusers' own multi-adapter fusion.

Reference: diffusers' StableDiffusionInpaintPipeline on a second copy of the same tiny modules,
`load_lora_weights` once per LoRA (adapter names a, b), `set_adapters([a, b], adapter_weights=[1.0, 0.7])`,
`fuse_lora`, `unload_lora_weights`. Tolerance on every fused weight: 1e-6 absolute (float32 weights of magnitude
≤ ~1; both sides add the same two deltas, so at most a few ulp from the order of the two additions; measured 0.0);
on UNet outputs: 1e-5 × max |output|. Each LoRA moves the UNet's output by > 1e-3 × max |output| (checked), so
dropping one or swapping its weight fails the comparison.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cg4ctr_fast.export import manifest as mf
from tests.test_export import export_cli, loras, one_line_error, random_unet_lora  # noqa: F401 - loras: fixture

WEIGHT_TOL = 1e-6
OUTPUT_RTOL = 1e-5
SCALES = (1.0, 0.7)


def _tiny():
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules

    return build_modules(get_preset("tiny"))  # seeded: every call builds the same weights


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two random diffusers-format LoRAs for the tiny 9-channel stack, neither touching conv_in:
    a: attention projections, made on the 4-channel tiny UNet (same layer shapes except conv_in);
    b: other UNet layers (resnet convs, proj_in, feed-forward, one shared with a) plus a text-encoder LoRA.
    Also c: a LoRA that adapts conv_in of the 4-channel UNet (4 input channels)."""
    from diffusers import StableDiffusionInpaintPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("loras")
    _, state_a, config_a = random_unet_lora(5, unet_channels=4)
    StableDiffusionInpaintPipeline.save_lora_weights(str(root / "a"), unet_lora_layers=state_a,
                                                     unet_lora_adapter_metadata=config_a.to_dict())
    _, state_b, config_b = random_unet_lora(11, rank=2, alpha=3, targets=("to_k", "proj_in", "ff.net.2", "conv1"))
    with torch.random.fork_rng():
        torch.manual_seed(12)
        te_config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        te = get_peft_model(_tiny().text_encoder, te_config)
    te_state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(te).items()}
    StableDiffusionInpaintPipeline.save_lora_weights(
        str(root / "b"), unet_lora_layers=state_b, unet_lora_adapter_metadata=config_b.to_dict(),
        text_encoder_lora_layers=te_state, text_encoder_lora_adapter_metadata=te_config.to_dict())
    _, state_c, config_c = random_unet_lora(7, targets=("conv_in", "to_q"), unet_channels=4)
    StableDiffusionInpaintPipeline.save_lora_weights(str(root / "c"), unet_lora_layers=state_c,
                                                     unet_lora_adapter_metadata=config_c.to_dict())
    name = "pytorch_lora_weights.safetensors"
    assert not any("conv_in" in key for key in (*state_a, *state_b)) and any("conv_in" in k for k in state_c)
    return {"a": root / "a" / name, "b": root / "b" / name, "c": root / "c" / name}


def _diffusers_fused(paths, weights):
    """The reference: diffusers' own load_lora_weights per LoRA + set_adapters + fuse_lora on fresh modules."""
    from cg4ctr_fast.models.diffusion import diffusers_inpaint_pipeline

    modules = _tiny()
    pipe = diffusers_inpaint_pipeline(modules)
    names = [f"adapter{i}" for i in range(len(paths))]
    for name, path in zip(names, paths):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=list(weights))
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    return modules


def _max_weight_diff(one, other) -> float:
    a, b = one.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _unet_inputs(unet, seed: int):
    """Odd batch, non-square latents, 9 input channels, text of the tiny cross-attention width."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(3, unet.config.in_channels, 16, 12, generator=g)
    timestep = torch.tensor([17.0, 503.0, 981.0])
    text = torch.randn(3, 7, unet.config.cross_attention_dim, generator=g)
    return sample, timestep, text


def _unet_out(unet, inputs) -> np.ndarray:
    with torch.no_grad():
        return unet(*inputs, return_dict=False)[0].numpy()


def test_two_loras_fuse_as_diffusers_set_adapters_and_fuse_lora(pair):
    from cg4ctr_fast.export.lora import fuse_loras, lora_record

    modules = _tiny()
    records = fuse_loras(modules, [(pair["a"], SCALES[0]), (pair["b"], SCALES[1])])
    assert [r["id"] for r in records] == [lora_record(pair["a"], 1.0)["id"], lora_record(pair["b"], 0.7)["id"]]
    assert not any(".lora_" in n for n, _ in modules.unet.named_parameters())  # a plain UNet again
    assert not any(".lora_" in n for n, _ in modules.text_encoder.named_parameters())
    reference = _diffusers_fused([pair["a"], pair["b"]], SCALES)
    assert _max_weight_diff(modules.unet, reference.unet) <= WEIGHT_TOL
    assert _max_weight_diff(modules.text_encoder, reference.text_encoder) <= WEIGHT_TOL
    assert _max_weight_diff(modules.text_encoder, _tiny().text_encoder) > 1e-3  # b's text-encoder part landed

    inputs = _unet_inputs(modules.unet, seed=4)
    got, want = _unet_out(modules.unet, inputs), _unet_out(reference.unet, inputs)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= OUTPUT_RTOL * scale
    # Each LoRA matters at its weight: a alone or b at another weight is far outside the tolerance.
    only_a = _tiny()
    fuse_loras(only_a, [(pair["a"], 1.0)])
    assert np.abs(_unet_out(only_a.unet, inputs) - want).max() > 1e-3 * scale
    other_weight = _tiny()
    fuse_loras(other_weight, [(pair["a"], 1.0), (pair["b"], 0.4)])
    assert np.abs(_unet_out(other_weight.unet, inputs) - want).max() > 1e-3 * scale


def test_combined_id_follows_content_and_weights_not_order(pair):
    from cg4ctr_fast.export.lora import fuse_loras, manifest_lora, recorded_loras

    forward, backward = _tiny(), _tiny()
    ab = fuse_loras(forward, [(pair["a"], 1.0), (pair["b"], 0.7)])
    ba = fuse_loras(backward, [(pair["b"], 0.7), (pair["a"], 1.0)])
    # Fused in one canonical order: the same weights bit for bit, so one id may name both.
    assert _max_weight_diff(forward.unet, backward.unet) == 0.0
    assert manifest_lora(ab)["id"] == manifest_lora(ba)["id"]
    assert recorded_loras(manifest_lora(ab)) == ab and [r["source"] for r in ba] == [str(pair["b"]), str(pair["a"])]
    ids = {manifest_lora(ab)["id"]}
    for other in ([(pair["a"], 1.0), (pair["b"], 0.8)], [(pair["a"], 1.0), (pair["c"], 0.7)],
                  [(pair["a"], 1.0)], [(pair["a"], 1.0), (pair["b"], 0.7), (pair["b"], 0.7)]):
        from cg4ctr_fast.export.lora import lora_record

        ids.add(manifest_lora([lora_record(p, s) for p, s in other])["id"])
    assert len(ids) == 5


def test_one_lora_is_the_single_path(loras):  # noqa: F811
    from cg4ctr_fast.export.lora import fuse_lora, fuse_loras, manifest_lora, recorded_loras

    single, listed = _tiny(), _tiny()
    record = fuse_lora(single, loras["diffusers"], 0.6)
    (listed_record,) = fuse_loras(listed, [(loras["diffusers"], 0.6)])
    assert listed_record == record and manifest_lora([record]) is record and recorded_loras(record) == [record]
    assert _max_weight_diff(single.unet, listed.unet) == 0.0
    assert manifest_lora([]) is None and recorded_loras(None) == []


def test_peft_and_kohya_files_join_a_multi_fusion(loras, pair):  # noqa: F811
    from cg4ctr_fast.export.lora import fuse_loras

    want = _diffusers_fused([loras["diffusers"], pair["b"]], SCALES)
    for kind in ("peft", "kohya"):
        modules = _tiny()
        records = fuse_loras(modules, [(loras[kind], SCALES[0]), (pair["b"], SCALES[1])])
        assert records[0]["format"] == kind
        assert _max_weight_diff(modules.unet, want.unet) <= WEIGHT_TOL, kind


def test_conv_in_lora_for_other_channels_is_refused_and_nothing_stays(pair):
    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.export.lora import fuse_loras

    modules, base = _tiny(), _tiny()
    with pytest.raises(InputError) as info:
        fuse_loras(modules, [(pair["a"], 1.0), (pair["c"], 1.0)])
    message = str(info.value)
    assert "\n" not in message and "adapts conv_in for 4 input channels" in message and "takes 9" in message
    assert not any(".lora_" in n for n, _ in modules.unet.named_parameters())  # a's adapter was unloaded
    assert _max_weight_diff(modules.unet, base.unet) == 0.0
    with pytest.raises(InputError, match="adapts conv_in for 4 input channels"):
        fuse_loras(modules, [(pair["c"], 1.0)])  # the one-LoRA path says the same


def test_conv_in_lora_made_for_this_unet_is_fused(pair, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from cg4ctr_fast.export.lora import fuse_loras

    _, state, config = random_unet_lora(9, rank=2, targets=("conv_in",))  # on the 9-channel UNet itself
    StableDiffusionInpaintPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                                     unet_lora_adapter_metadata=config.to_dict())
    conv_in = tmp_path / "pytorch_lora_weights.safetensors"
    modules = _tiny()
    fuse_loras(modules, [(conv_in, 0.5), (pair["a"], 1.0)])
    reference = _diffusers_fused([conv_in, pair["a"]], (0.5, 1.0))
    assert _max_weight_diff(modules.unet, reference.unet) <= WEIGHT_TOL
    assert float((modules.unet.conv_in.weight - _tiny().unet.conv_in.weight).abs().max()) > 1e-3


def test_export_cli_with_two_loras_records_both_and_verifies(pair, tmp_path, capsys):
    import shutil

    from cg4ctr_fast.export.lora import fuse_loras, lora_record

    copies = {k: tmp_path / f"{k}.safetensors" for k in ("a", "b")}
    for key, copy in copies.items():
        shutil.copy2(pair[key], copy)
    out = tmp_path / "two"
    assert export_cli("onnx", "--preset", "tiny", "--components", "unet", "--lora", str(copies["a"]),
                      "--lora", str(copies["b"]), "--lora-scale", "1.0", "--lora-scale", "0.7", "--out", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    section = manifest["lora"]
    assert section["format"] == "fused" and [r["id"] for r in section["loras"]] == [
        lora_record(pair["a"], 1.0)["id"], lora_record(pair["b"], 0.7)["id"]]
    assert manifest["model_info"]["model_id"].endswith(f"+lora:{section['id'][:16]}")

    import onnxruntime as ort

    torch_modules = _tiny()
    fuse_loras(torch_modules, [(pair["a"], 1.0), (pair["b"], 0.7)])
    contract = mf.contract_of(manifest, "unet")
    inputs = contract.sample_inputs(contract.values("opt", batch=2), seed=3)
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    want = _unet_out(torch_modules.unet, tuple(inputs.values()))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # the export's own ONNX-vs-torch bound
    capsys.readouterr()
    for copy in copies.values():
        copy.unlink()  # moved away: verify finds each LoRA by content among the --lora given, in any order
    assert "LoRA not found at" in one_line_error(capsys, export_cli("verify", "--engines", str(out)))
    assert export_cli("verify", "--engines", str(out), "--lora", str(pair["b"]), "--lora", str(pair["a"])) == 0


@pytest.mark.parametrize("scales", [["0.5"], ["1", "0.5", "0.2"]])
def test_scale_count_must_match_lora_count(pair, tmp_path, capsys, scales):
    out = tmp_path / "bad"
    argv = ["onnx", "--preset", "tiny", "--components", "unet", "--lora", str(pair["a"]), "--lora", str(pair["b"]),
            *[arg for s in scales for arg in ("--lora-scale", s)], "--out", str(out)]
    line = one_line_error(capsys, export_cli(*argv))
    assert f"{len(scales)} --lora-scale for 2 --lora" in line
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_refit_with_two_loras_is_one_line(pair, tmp_path, capsys):
    code = export_cli("refit", "--engines", str(tmp_path), "--lora", str(pair["a"]), "--lora", str(pair["b"]))
    assert "refit swaps in one LoRA, 2 given" in one_line_error(capsys, code)


def test_lora_pairs_reads_every_caller_shape():
    from cg4ctr_fast.errors import InputError
    from cg4ctr_fast.export.lora import lora_pairs

    assert lora_pairs(None) == [] and lora_pairs("a.safetensors", 0.5) == [("a.safetensors", 0.5)]
    assert lora_pairs(["a", "b"], [1, 0.25]) == [("a", 1.0), ("b", 0.25)]
    assert lora_pairs(["a", "b"], 0.5) == [("a", 0.5), ("b", 0.5)]
    assert lora_pairs([("a", 2), ("b", -1)]) == [("a", 2.0), ("b", -1.0)]
    with pytest.raises(InputError, match="1 LoRA scales for 2 LoRAs"):
        lora_pairs(["a", "b"], [1.0])
    with pytest.raises(InputError, match="finite"):
        lora_pairs([("a", float("inf"))])


def test_pipeline_takes_several_loras_as_diffusers_fuses_them(pair):
    """CreativePipeline.from_modules(lora=[a, b], lora_scale=[1.0, 0.7]) fuses what diffusers' multi-adapter
    fusion gives (the pipeline's own UNet and text encoder, same tolerance)."""
    from cg4ctr_fast.pipeline import CreativePipeline

    pipe = CreativePipeline.from_modules(_tiny(), lora=[pair["a"], pair["b"]], lora_scale=list(SCALES))
    reference = _diffusers_fused([pair["a"], pair["b"]], SCALES)
    assert _max_weight_diff(pipe.components.unet.module, reference.unet) <= WEIGHT_TOL
    assert _max_weight_diff(pipe.components.text_encoder.module, reference.text_encoder) <= WEIGHT_TOL
    # and differs from the base weights, so the comparison can fail
    assert _max_weight_diff(pipe.components.unet.module, _tiny().unet) > 1e-4
