"""Preview decoders (AutoencoderTiny / TAESD): the slot contract, loading refusals, `cg4ctr-train taesd`."""
from __future__ import annotations

import json

import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.models.preview import (
    build_preview_decoder,
    build_preview_for,
    load_preview_decoder,
    preview_config,
    preview_scale_factor,
)
from cg4ctr_fast.runtime.preview import PreviewDecoderSlot, attach_preview_decoder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------------ geometry


def test_sd15_config_is_taesd_architecture():
    """Scale factor 8, 4 channels: diffusers' AutoencoderTiny defaults (TAESD), so published weights load."""
    import inspect

    from diffusers import AutoencoderTiny

    params = inspect.signature(AutoencoderTiny.__init__).parameters
    config = preview_config(4, 8)
    for key in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                "num_decoder_blocks", "latent_channels", "upsampling_scaling_factor", "scaling_factor"):
        assert config[key] == params[key].default, key
    assert preview_scale_factor(config) == 8


@pytest.mark.parametrize("channels,scale", [(4, 4), (4, 8), (3, 2), (6, 1)])
def test_scale_factor_and_channels(channels, scale):
    model = build_preview_decoder(channels, scale, channels=8 if scale == 8 else None)
    assert preview_scale_factor(model.config) == scale
    z = torch.randn(2, channels, 5, 3)
    out = model.decode(z).sample
    assert out.shape == (2, 3, 5 * scale, 3 * scale)


def test_bad_geometry_is_one_line():
    with pytest.raises(InputError) as exc:
        preview_config(4, 6)
    assert "power of two" in _one_line(exc)
    with pytest.raises(InputError) as exc:
        preview_config(4, 4, blocks=(1, 1))
    assert "3 stages" in _one_line(exc)


# ------------------------------------------------------------------------------------------ slot contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 7, 13)])
def test_slot_contract_against_diffusers_convention(dtype, shape):
    """slot(latents / s) == clamp(AutoencoderTiny.decode(latents)) (diffusers feeds TAESD the scaled latents);
    images (B, 3, 4h, 4w) in [-1, 1], in the module's dtype."""
    torch.manual_seed(sum(shape))
    module = build_preview_decoder(4, 4, seed=3).to(dtype)
    scaling = 0.37 + torch.rand(()).item()  # any main-VAE factor, not SD's alone
    slot = PreviewDecoderSlot(module, scaling)
    b, h, w = shape
    latents = 2.5 * torch.randn(b, 4, h, w)  # the UNet's (scaled) latents, std ~1 and tails
    got = slot(latents / scaling)
    assert got.shape == (b, 3, 4 * h, 4 * w) and got.dtype == dtype
    assert float(got.min()) >= -1.0 and float(got.max()) <= 1.0
    with torch.no_grad():
        want = module.decode(latents.to(dtype)).sample.float().clamp(-1, 1)
    # fp32: the division and multiplication by `scaling` round (~1e-6); bf16: 8-bit mantissa through ~20 convs.
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.allclose(got.float(), want, atol=tol), float((got.float() - want).abs().max())
    # The untrained decoder is not a constant: the contract is tested on varied images.
    assert float(got.float().std()) > 1e-3


def test_slot_output_is_clamped():
    """Raw AutoencoderTiny output exceeds [-1, 1] (2·x − 1 of an unclamped conv); the slot clamps it."""
    module = build_preview_decoder(4, 4, seed=0)
    with torch.no_grad():
        module.decoder.layers[-1].bias.fill_(3.0)  # pushes every pixel to 2·3 − 1 + ... > 1
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        raw = module.decode(latents).sample
    assert float(raw.max()) > 1.0
    got = PreviewDecoderSlot(module, 0.5)(latents / 0.5)
    assert float(got.max()) == 1.0 and torch.equal(got, raw.clamp(-1, 1))


# ------------------------------------------------------------------------------------------ loading


@pytest.fixture(scope="module")
def saved_preview(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd") / "toy"
    model = build_preview_decoder(4, 4, seed=5)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder, model


def test_load_round_trip(saved_preview):
    folder, model = saved_preview
    loaded = load_preview_decoder(folder, latent_channels=4, scale_factor=4)
    z = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, model.decode(z).sample)


def test_float16_storage_loads_as_float32(tmp_path):
    """Weights stored as float16 (the shipped toy TAESD) load into float32 modules: computation stays fp32."""
    from safetensors.torch import load_file

    model = build_preview_decoder(4, 4, seed=6)
    half = build_preview_decoder(4, 4, seed=6).half()
    half.save_pretrained(str(tmp_path / "half"), safe_serialization=True)
    stored = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    loaded = load_preview_decoder(tmp_path / "half", latent_channels=4, scale_factor=4)
    assert loaded.dtype == torch.float32
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[name].half().float()), name


def test_load_refusals_are_one_line(saved_preview, tmp_path):
    folder, _ = saved_preview
    with pytest.raises(InputError) as exc:
        load_preview_decoder(tmp_path / "nowhere")
    assert "not found" in _one_line(exc)
    with pytest.raises(InputError) as exc:
        load_preview_decoder(folder, latent_channels=16, scale_factor=4)
    assert "4 latent channels" in _one_line(exc) and "16" in str(exc.value)
    with pytest.raises(InputError) as exc:
        load_preview_decoder(folder, latent_channels=4, scale_factor=8)
    assert "scale factor 4" in _one_line(exc)
    # A pickled checkpoint only: refused, not loaded.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InputError) as exc:
        load_preview_decoder(pickled)
    assert "diffusion_pytorch_model.safetensors" in _one_line(exc) and ".bin" in str(exc.value)
    # Another diffusers model's folder.
    other = tmp_path / "kl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    with pytest.raises(InputError) as exc:
        load_preview_decoder(other)
    assert "AutoencoderKL" in _one_line(exc)
    # Damaged weights.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((folder / "config.json").read_text())
    (damaged / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError) as exc:
        load_preview_decoder(damaged)
    assert "cannot load" in _one_line(exc)


def test_attach_to_pipeline(saved_preview):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder, model = saved_preview
    pipe = CreativePipeline.from_preset("tiny")
    info = pipe.components.info
    slot = attach_preview_decoder(pipe, folder)
    assert pipe.components.preview_decoder is slot
    latents = torch.randn(2, info.latent_channels, 16, 16)
    with torch.no_grad():
        want = model.decode(latents).sample.clamp(-1, 1)
    assert torch.allclose(slot(latents / info.scaling_factor), want, atol=1e-5)
    # A module too; one of the wrong scale factor is refused and leaves the attached slot as it was.
    assert isinstance(attach_preview_decoder(pipe, build_preview_for(info)), PreviewDecoderSlot)
    kept = pipe.components.preview_decoder
    with pytest.raises(InputError) as exc:
        attach_preview_decoder(pipe, build_preview_decoder(4, 8, channels=8))
    assert "scale factor 8" in _one_line(exc)
    assert pipe.components.preview_decoder is kept
    with pytest.raises(InputError):
        attach_preview_decoder(pipe, object())


# ------------------------------------------------------------------------------------------ cg4ctr-train taesd


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """The tiny preset's VAE (scale factor 4, 4 channels) with seeded random weights, as a diffusers folder."""
    from diffusers import AutoencoderKL

    from cg4ctr_fast.config import get_preset

    folder = tmp_path_factory.mktemp("tiny") / "vae"
    torch.manual_seed(0)
    AutoencoderKL(**get_preset("tiny").vae.to_kwargs()).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _world_dir():
    from cg4ctr_fast.training.toy_set import PACKAGE_SET

    world = PACKAGE_SET / "world"
    if not (world / "world.json").is_file():
        pytest.skip("the shipped toy set's world/ is not in this checkout")
    return world


def test_train_taesd_lowers_loss_and_writes_a_loadable_folder(tiny_vae_dir, tmp_path, capsys):
    from diffusers import AutoencoderTiny

    from cg4ctr_fast.cli.train import main
    from cg4ctr_fast.training.taesd import checkpoint_dir

    out = tmp_path / "taesd"
    code = main(["taesd", "--model", str(tiny_vae_dir), "--data", str(_world_dir()), "--out", str(out),
                 "--steps", "40", "--batch", "8", "--images", "32", "--lr", "3e-3", "--quiet"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_last"] < 0.8 * metrics["loss_first"], metrics
    model = AutoencoderTiny.from_pretrained(str(out))
    assert preview_scale_factor(model.config) == 4 and model.config.latent_channels == 4
    loaded = load_preview_decoder(out, latent_channels=4, scale_factor=4)
    assert loaded.dtype == torch.float32
    assert not checkpoint_dir(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["taesd"]  # nothing half-written beside it


def test_train_taesd_resume_equals_uninterrupted(tiny_vae_dir, tmp_path, monkeypatch):
    """A run stopped after a checkpoint and resumed takes the same steps as one that was never stopped; a
    checkpoint of other options is refused in one line."""
    from dataclasses import replace

    from cg4ctr_fast.training import taesd

    world = _world_dir()
    cfg = taesd.TaesdTrainConfig(steps=6, batch=4, images=8, eval_images=4, checkpoint_every=3, lr=3e-3)
    quiet = {"progress": False, "log": lambda _m: None}
    whole = tmp_path / "whole"
    taesd.train_taesd(tiny_vae_dir, world, whole, cfg, **quiet)

    stopped = tmp_path / "stopped"
    real_save = taesd._save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(taesd, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        taesd.train_taesd(tiny_vae_dir, world, stopped, cfg, **quiet)
    monkeypatch.setattr(taesd, "_save_checkpoint", real_save)
    assert not stopped.exists() and (taesd.checkpoint_dir(stopped) / "state.json").is_file()
    with pytest.raises(InputError) as exc:
        taesd.train_taesd(tiny_vae_dir, world, stopped, replace(cfg, lr=1e-3), resume=True, **quiet)
    assert "another configuration" in _one_line(exc)
    taesd.train_taesd(tiny_vae_dir, world, stopped, cfg, resume=True, **quiet)
    a = load_preview_decoder(whole).decoder.state_dict()
    b = load_preview_decoder(stopped).decoder.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        # Same batches, same AdamW state: equal up to float summation order (none expected; 1e-6 allowed).
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    untrained = build_preview_for(taesd.load_vae(tiny_vae_dir)[0]).decoder.state_dict()
    assert any(not torch.equal(a[name], untrained[name]) for name in a)


@pytest.mark.parametrize("extra,needle", [
    (["--steps", "0"], "--steps"),
    (["--batch", "-1"], "--batch"),
    (["--model", "/nonexistent/generator"], "not found"),
    (["--data", "/nonexistent/world"], "world.json"),
    (["--generated", "-1"], "--generated"),
    (["--generated", "4"], "generator folder"),  # --model is a VAE folder here: nothing to generate with
])
def test_train_taesd_bad_input_exit_2(tiny_vae_dir, tmp_path, capsys, extra, needle):
    from cg4ctr_fast.cli.train import main

    out = tmp_path / "out"
    argv = ["taesd", "--model", str(tiny_vae_dir), "--data", str(_world_dir()), "--out", str(out), "--quiet"]
    code = main(argv + extra)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_train_taesd_refuses_a_folder_without_a_vae(tmp_path, capsys):
    from cg4ctr_fast.cli.train import main

    (tmp_path / "model").mkdir()
    code = main(["taesd", "--model", str(tmp_path / "model"), "--data", str(_world_dir()), "--out",
                 str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "AutoencoderKL" in err, err
