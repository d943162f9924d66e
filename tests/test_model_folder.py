"""A model folder is validated before it loads: every unsupported or broken folder is one InputError naming
what was found, and `cg4ctr generate --model` turns it into one line and exit code 2.

The folders are the tiny preset saved by the project's own `save_modules`, then edited: nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cg4ctr_fast.errors import InputError
from tests.conftest import make_product


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules, save_modules

    return save_modules(build_modules(get_preset("tiny"), seed=1), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def folder(tiny_folder, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_folder, copy)
    return copy


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


_DROP = object()


def _sdxl(folder: Path) -> None:
    """The layout of a diffusers SDXL inpainting folder: a second text encoder and tokenizer, text_time embeds."""
    shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2")
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionXLInpaintPipeline",
               text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"])
    _edit_json(folder / "unet" / "config.json", addition_embed_type="text_time", addition_time_embed_dim=256)


def _break(folder: Path, case: str) -> None:
    unet_cfg = folder / "unet" / "config.json"
    if case == "sdxl":
        _sdxl(folder)
    elif case == "addition_embed_type":
        _edit_json(unet_cfg, addition_embed_type="text_time")
    elif case == "cross_attention_dim":
        _edit_json(unet_cfg, cross_attention_dim=2048)
    elif case == "in_channels":
        _edit_json(unet_cfg, in_channels=5)
    elif case == "text_encoder_class":
        _edit_json(folder / "text_encoder" / "config.json", architectures=["CLIPTextModelWithProjection"])
    elif case == "pipeline_class":
        _edit_json(folder / "model_index.json", _class_name="KandinskyInpaintPipeline")
    elif case == "missing_vae":
        shutil.rmtree(folder / "vae")
    elif case == "missing_unet_weights":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif case == "pickle_weights_only":
        weights = folder / "text_encoder" / "model.safetensors"
        weights.rename(weights.with_name("pytorch_model.bin"))
    elif case == "two_variants":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        shutil.copy(weights, weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
        weights.rename(weights.with_name("diffusion_pytorch_model.bf16.safetensors"))
    elif case == "invalid_json":
        unet_cfg.write_text('{"in_channels": 9,')
    elif case == "json_not_object":
        (folder / "vae" / "config.json").write_text("[1, 2]")
    elif case == "missing_config":
        (folder / "text_encoder" / "config.json").unlink()
    elif case == "unknown_scheduler":
        _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="FancyScheduler")
    elif case == "not_a_scheduler":
        _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="UNet2DConditionModel")
    elif case == "bad_train_timesteps":
        _edit_json(folder / "scheduler" / "scheduler_config.json", num_train_timesteps="many")
    elif case in ("beta_schedule", "timestep_spacing", "prediction_type"):
        _edit_json(folder / "scheduler" / "scheduler_config.json", **{case: "foo"})
    elif case == "truncated_weights":
        weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif case == "weights_unlike_config":
        _edit_json(unet_cfg, layers_per_block=3)
    elif case == "no_tokenizer_files":
        for f in (folder / "tokenizer").iterdir():
            if f.name != "tokenizer_config.json":
                f.unlink()
    else:
        raise AssertionError(case)


# (case, words the message must hold: what was found)
BROKEN = [
    ("sdxl", ["two text encoders", "text_encoder_2/", "StableDiffusionXLInpaintPipeline"]),
    ("addition_embed_type", ["addition_embed_type", "'text_time'"]),
    ("cross_attention_dim", ["cross_attention_dim 2048", "hidden_size"]),
    ("in_channels", ["takes 5"]),
    ("text_encoder_class", ["CLIPTextModelWithProjection"]),
    ("pipeline_class", ["KandinskyInpaintPipeline"]),
    ("missing_vae", ["missing vae/"]),
    ("missing_unet_weights", ["unet/diffusion_pytorch_model.safetensors"]),
    ("pickle_weights_only", ["pytorch_model.bin", "safetensors"]),
    ("two_variants", ["bf16", "fp16"]),
    ("invalid_json", ["unet/config.json", "not valid JSON"]),
    ("json_not_object", ["vae/config.json", "JSON object"]),
    ("missing_config", ["text_encoder/config.json"]),
    ("unknown_scheduler", ["'FancyScheduler'", "not a diffusers scheduler"]),
    ("not_a_scheduler", ["'UNet2DConditionModel'", "not a diffusers scheduler"]),
    ("bad_train_timesteps", ["num_train_timesteps", "'many'"]),
    # These three failed only inside the denoising loop (or as NotImplementedError), after the model loaded.
    ("beta_schedule", ["scheduler_config.json", "does not accept this config", "foo"]),
    ("timestep_spacing", ["scheduler_config.json", "cannot run with this config", "foo"]),
    ("prediction_type", ["scheduler_config.json", "cannot run with this config", "foo"]),
    ("truncated_weights", ["cannot load model weights"]),
    ("weights_unlike_config", ["cannot load model weights"]),
    ("no_tokenizer_files", ["tokenizer/", "tokenizer.json"]),
]


@pytest.mark.parametrize("case,needles", BROKEN, ids=[c for c, _ in BROKEN])
def test_broken_or_unsupported_folders_are_refused_naming_what_was_found(folder, case, needles):
    from cg4ctr_fast.models.diffusion import load_modules

    _break(folder, case)
    with pytest.raises(InputError) as info:
        load_modules(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    for needle in needles:
        assert needle in message, message


def test_sdxl_folder_on_the_command_line_is_one_line_before_any_work(folder, tmp_path, capsys):
    """The issue's example: an SDXL inpainting folder passed as --model gave a 38-line traceback in the UNet."""
    from cg4ctr_fast.cli.main import main

    _sdxl(folder)
    image, mask = make_product(40, 32, seed=2)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    code = main(["generate", "--preset", "sd15-inpaint", "--model", str(folder), "--image", str(tmp_path / "p.png"),
                 "--mask", str(tmp_path / "m.png"), "--prompt", "x", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("cg4ctr: error:"), err
    assert "two text encoders" in err and "addition_embed_type" not in err  # the first problem found, named
    assert not (tmp_path / "out").exists()


def test_a_single_weights_variant_loads(folder, tiny_folder):
    """A folder that ships only fp16-named files (variant="fp16" in diffusers) loads those files."""
    import torch

    from cg4ctr_fast.models.diffusion import inspect_model_folder, load_modules

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert inspect_model_folder(folder).variants == {"unet": "fp16", "vae": None, "text_encoder": None}
    loaded, reference = load_modules(folder), load_modules(tiny_folder)
    for a, b in zip(loaded.unet.state_dict().values(), reference.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_tokenizer_without_model_max_length_uses_the_text_encoders_positions(folder, tmp_path):
    """The issue's example: no `model_max_length` left transformers' int(1e30) and an OverflowError."""
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.pipeline import CreativePipeline

    _edit_json(folder / "tokenizer" / "tokenizer_config.json", model_max_length=_DROP)
    modules = load_modules(folder)
    positions = modules.text_encoder.config.max_position_embeddings
    assert modules.tokenizer.model_max_length == positions == 77
    image, mask = make_product(32, 32, seed=5)
    pipe = CreativePipeline.from_modules(modules)
    out = pipe(["a long prompt " * 40], image, mask, num_inference_steps=1, output_type="np", show_progress=False)
    assert out[0].image.shape == (32, 32, 3) and np.isfinite(out[0].image).all()
    assert pipe.encode_prompts(["x"]).shape[1] == positions


def test_tokenizer_longer_than_the_encoder_is_cut_to_its_positions(folder):
    from cg4ctr_fast.models.diffusion import load_modules

    _edit_json(folder / "tokenizer" / "tokenizer_config.json", model_max_length=512)
    assert load_modules(folder).tokenizer.model_max_length == 77
