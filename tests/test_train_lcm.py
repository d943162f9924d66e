"""`cg4ctr-train lcm`: latent consistency distillation of an LCM-LoRA (cg4ctr_fast.training.lcm).

What is checked: the recipe's pieces against diffusers' own (LCMScheduler's boundary scalings and grid), that a
short run on the tiny preset lowers its consistency loss, that the LoRA it writes loads into diffusers'
inpainting pipeline and reproduces the student there, that --resume continues a killed run to the same losses,
and that the command line refuses bad input in one line (exit 2) with nothing written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cg4ctr_fast.training.lcm import (
    DDIMSolver,
    LcmDistillConfig,
    boundary_scalings,
    distill_lcm_lora,
    partial_dir,
    world_creatives,
)
from cg4ctr_fast.training.toy_set import shipped_set_dir

TOY = shipped_set_dir()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_modules(seed: int = 0):
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules

    return build_modules(get_preset("tiny"), seed=seed)


def test_solver_grid_and_scalings_are_lcm_schedulers():
    from diffusers import LCMScheduler

    config = json.loads((TOY / "generator" / "scheduler" / "scheduler_config.json").read_text())
    lcm = LCMScheduler.from_config(config)
    solver = DDIMSolver(lcm.alphas_cumprod, 50)
    assert solver.skip == 20
    lcm.set_timesteps(4, original_inference_steps=50)
    # LCMScheduler samples its few steps from the same 50-point grid the solver distils on.
    assert set(lcm.timesteps.tolist()) <= set(solver.timesteps.tolist())
    t = torch.tensor([0, 19, 499, 999, 7])
    c_skip, c_out = boundary_scalings(t)
    for k, step in enumerate(t.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert float(c_skip[k]) == pytest.approx(float(ref_skip), rel=1e-6, abs=1e-9)
        assert float(c_out[k]) == pytest.approx(float(ref_out), rel=1e-6, abs=1e-9)
    # One solver step from t_i lands on t_{i-1}: the DDIM update with eta 0 in closed form.
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 5, 7, generator=gen), torch.randn(3, 4, 5, 7, generator=gen)
    index = torch.tensor([0, 1, 49])
    a_prev = torch.stack([lcm.alphas_cumprod[0], lcm.alphas_cumprod[19], lcm.alphas_cumprod[979]]).view(-1, 1, 1, 1)
    torch.testing.assert_close(solver.step(x0, eps, index), a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps)


def test_short_run_lowers_its_loss(tmp_path):
    # The tiny preset (the toy generator's architecture) with seeded random weights, 8 creatives of the toy world:
    # the LoRA sees each one often, so 40 steps make the student visibly self-consistent. Fixed seeds, so the
    # curve is reproducible; measured: first 10 steps 0.080, last 10 0.053 (ratio 0.67). LCM-LoRA's target is
    # the student itself, so on the full data the loss need not fall this fast (see training/lcm.py).
    creatives = world_creatives(TOY / "world", 8, seed=0)
    config = LcmDistillConfig(steps=40, batch=8, lr=1e-2, rank=4, alpha=4.0, images=8, warmup=5,
                              checkpoint_every=1000)
    metrics = distill_lcm_lora(_tiny_modules(), creatives, tmp_path / "lora", config, progress=False)
    loss = np.asarray(metrics["loss"])
    assert loss.shape == (40,) and np.isfinite(loss).all()
    first, last = loss[:10].mean(), loss[-10:].mean()
    assert last < 0.8 * first, (first, last)
    saved = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert saved["loss"] == metrics["loss"]


def test_lora_loads_into_diffusers_and_reproduces_the_student(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import load_file

    modules = _tiny_modules(seed=1)
    creatives = world_creatives(TOY / "world", 6, seed=1)
    config = LcmDistillConfig(steps=4, batch=3, lr=5e-2, rank=4, alpha=4.0, images=6, warmup=0)
    distill_lcm_lora(modules, creatives, tmp_path / "lora", config, progress=False)
    student = modules.unet  # carries the trained adapter
    keys = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("unet.") for k in keys)
    assert not any("conv_in" in k for k in keys)
    assert any("time_emb_proj" in k for k in keys) and any("to_q" in k for k in keys)

    fresh = _tiny_modules(seed=1)
    pipe = StableDiffusionInpaintPipeline(vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer,
                                          unet=fresh.unet, scheduler=fresh.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 8, 8, generator=gen)
    t = torch.tensor([999, 259])
    hidden = torch.randn(2, 77, fresh.text_encoder.config.hidden_size, generator=gen)
    with torch.no_grad():
        ours = student(x, t, encoder_hidden_states=hidden).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the LoRA moved the UNet: the comparison above can fail


def test_resume_continues_a_killed_run_to_the_same_losses(tmp_path, monkeypatch):
    from cg4ctr_fast.training import lcm

    creatives = world_creatives(TOY / "world", 6, seed=2)
    config = LcmDistillConfig(steps=6, batch=2, lr=1e-2, rank=2, alpha=2.0, images=6, warmup=2, checkpoint_every=2)
    whole = distill_lcm_lora(_tiny_modules(), creatives, tmp_path / "a", config, progress=False)

    calls = {"n": 0}
    real = lcm.Distiller.loss

    def dies_at_step_five(self, data, draw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, data, draw)

    monkeypatch.setattr(lcm.Distiller, "loss", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        distill_lcm_lora(_tiny_modules(), creatives, tmp_path / "b", config, progress=False)
    assert not (tmp_path / "b").exists()  # nothing half-written
    assert json.loads((partial_dir(tmp_path / "b") / "state.json").read_text())["step"] == 4
    monkeypatch.setattr(lcm.Distiller, "loss", real)
    from cg4ctr_fast.errors import InputError

    other = LcmDistillConfig(**{**config.__dict__, "lr": 2e-2})
    with pytest.raises(InputError, match="other settings"):
        distill_lcm_lora(_tiny_modules(), creatives, tmp_path / "b", other, resume=True, progress=False)
    resumed = distill_lcm_lora(_tiny_modules(), creatives, tmp_path / "b", config, resume=True, progress=False)
    np.testing.assert_allclose(resumed["loss"], whole["loss"], rtol=1e-5, atol=1e-7)
    assert not partial_dir(tmp_path / "b").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--w-min", "9", "--w-max", "2"], "--w-min 9.0 is above --w-max 2.0"),
    (["--w-min", "0.5"], "--w-min must be a finite guidance scale"),
    (["--num-ddim-timesteps", "33"], "--num-ddim-timesteps must divide 1000"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--resume"], "--resume: no checkpoint"),
])
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys, extra, needle):
    from cg4ctr_fast.cli.train import main

    out = tmp_path / "lora"
    code = main(["lcm", "--model", str(TOY / "generator"), "--out", str(out), "--images", "4", "--quiet"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_cli_refuses_missing_model_world_and_a_full_out(tmp_path, capsys):
    from cg4ctr_fast.cli.train import main

    cases = [
        (["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "folder not found"),
        (["--model", str(TOY / "generator"), "--data", str(tmp_path), "--out", str(tmp_path / "o2")],
         "not a synthetic-world folder"),
    ]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    cases.append((["--model", str(TOY / "generator"), "--out", str(full)], "pass --overwrite"))
    for argv, needle in cases:
        assert main(["lcm", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert (full / "keep.txt").read_text() == "x"
