"""Self-cyclic training: config checks, the masked loss, one tiny run end to end, kill + resume, the LoRA in
diffusers, and the ablation's statistics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.base import BaseTrainConfig
from cg4ctr_fast.training.cycle_config import CycleConfig, load_cycle_config, to_toml
from cg4ctr_fast.training.lora import masked_denoising_loss
from cg4ctr_fast.training.saliency import SaliencyTrainConfig
from cg4ctr_fast.training.toy import ToyConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = ToyConfig(
    products=8, creatives_per_product=4, days=3,
    generator=BaseTrainConfig(n_images=64, vae_steps=10, vae_batch=8, unet_steps=20, unet_batch=8),
    saliency=SaliencyTrainConfig(steps=2, batch=4), saliency_images=8,
    reward_epochs=1, prompt_epochs=5, eval_items=1, steering_images=2, steering_steps=2,
)
TINY_RUN = {
    "run": {"seed": 0, "cycles": 2, "train_products": 2, "eval_products": 1, "threads": 1},
    "generate": {"prompts_per_group": 2, "images_per_prompt": 1, "steps": 2, "top_k": 1},
    "lora": {"steps": 3, "batch": 2, "rank": 2, "alpha": 2.0},
    "prompt": {"epochs": 2},
    "eval": {"images_per_group": 2, "steps": 2},
}


@pytest.fixture(scope="module")
def toy(cycle_toy):
    return cycle_toy  # built once per session (tests/conftest.py)


def _write_config(path: Path, toy, **changes) -> Path:
    sections = json.loads(json.dumps(TINY_RUN))
    for section, values in changes.items():
        sections.setdefault(section, {}).update(values)
    sections["models"] = {"world": str(toy.world), "generator": str(toy.generator), "reward": str(toy.reward),
                          "prompt": str(toy.prompt)}
    config = CycleConfig().replace(**sections)
    path.write_text(to_toml(config))
    return path


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cg4ctr_fast.cli.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


# ------------------------------------------------------------------------------------------------ config
def test_default_config_file_matches_the_dataclasses():
    config = load_cycle_config(ROOT / "training" / "cycle.toml")
    assert config.replace(run={"threads": 0}) == CycleConfig()
    assert config.run.threads == 1


def test_config_round_trips_through_toml(tmp_path):
    config = CycleConfig().replace(run={"seed": 7, "cycles": 3}, lora={"targets": ("to_q", "to_v"), "lr": 5e-4})
    (tmp_path / "c.toml").write_text(to_toml(config))
    assert load_cycle_config(tmp_path / "c.toml") == config


@pytest.mark.parametrize("text, needle", [
    ("[run]\ncycels = 3\n", "unknown key 'cycels' in [run]"),
    ("[lorra]\nrank = 3\n", "unknown key 'lorra' in the top level"),
    ("[lora]\nrank = 'four'\n", "lora.rank must be an integer"),
    ("[run]\nupdate_lora = 1\n", "run.update_lora must be true or false"),
    ("[generate]\ntop_k = 9\n", "generate.top_k (9) exceeds"),
    ("[generate]\ntop_p = 1.5\n", "generate.top_p must be in (0, 1]"),
    ("[run\ncycles = 3\n", "not valid TOML"),
    ("[lora]\ntrain_on = 'pixels'\n", "lora.train_on must be 'latents' or 'images'"),
    ("[lora]\ncaption_dropout = 1.0\n", "lora.caption_dropout must be in [0, 1)"),
    ("[generate]\nreward_sees_prompt = 'no'\n", "generate.reward_sees_prompt must be true or false"),
    ("[generate]\nguidance = nan\n", "generate.guidance must be a finite number"),
    ("[refresh]\nimpressions = inf\n", "refresh.impressions must be a finite number"),
    ("[lora]\nmax_grad_norm = -1.0\n", "lora.alpha, lora.lr and lora.max_grad_norm must be > 0"),
    ("[lora]\ntargets = []\n", "lora.targets not empty"),
    ("[style]\nloras = 'chosen'\n", "style.loras needs run.update_lora = false"),
    ("[style]\nmode = 'fused'\n", "style.mode must be one of"),
    ("[ablation]\nseeds = 3\n", "[ablation] is read by `cg4ctr-train ablate` only"),
])
def test_bad_config_fails_with_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_cycle_config(path)
    assert needle in str(info.value)
    from cg4ctr_fast.cli.train import main

    assert main(["cycle", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_bad_config_on_the_command_line_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[eval]\nimages = 3\n")
    result = _run_cli("cycle", "--config", str(path), "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown key 'images' in [eval]" in lines[0], result.stderr


# ------------------------------------------------------------------------------------------------ masked loss
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 4, 5, 7)])
def test_masked_loss_ignores_product_latents(shape):
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(shape, generator=gen, requires_grad=True)
    target = torch.randn(shape, generator=gen)
    background = (torch.rand((shape[0], 1, *shape[2:]), generator=gen) > 0.4).float()
    background[0, 0, 0, 0] = 0.0  # at least one product latent
    loss = masked_denoising_loss(pred, target, background)
    loss.backward()
    product = (background == 0).expand(shape)
    assert torch.count_nonzero(pred.grad[product]) == 0  # exactly zero, not small
    assert torch.all(pred.grad[~product] != 0)
    # Changing the target under the product does not change the loss.
    moved = target.clone()
    moved[product] += 100.0
    assert torch.equal(masked_denoising_loss(pred, moved, background), loss)
    # Reference: per example, the mean squared error over its background latents, then the batch mean.
    reference = torch.stack([((pred[b] - target[b])[background[b].expand(shape[1:]) > 0] ** 2).mean()
                             for b in range(shape[0])]).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)


def test_masked_loss_all_background_is_plain_mse():
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 4, 6, 6, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    loss = masked_denoising_loss(pred, target, torch.ones(2, 1, 6, 6))
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target))


# ------------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def tiny_run(toy, tmp_path_factory):
    """One uninterrupted tiny run, in process."""
    from cg4ctr_fast.training.cycle import run_cycles

    root = tmp_path_factory.mktemp("cycle")
    config = load_cycle_config(_write_config(root / "tiny.toml", toy))
    started = time.perf_counter()
    history = run_cycles(config, root / "run", progress=False, log=lambda _m: None)
    return {"root": root, "out": root / "run", "history": history, "config": config,
            "seconds": time.perf_counter() - started}


def test_tiny_cycle_end_to_end(tiny_run):
    out, history = tiny_run["out"], tiny_run["history"]
    # Its wall time (17 s on 2 quiet cores, small toy models included) is not asserted: timings belong to
    # benchmarks, and a busy CI machine would make a timed assertion flaky.
    assert [m["cycle"] for m in history] == [0, 1, 2]
    for m in history:
        e = m["eval"]
        assert e["product_pixels_unchanged"] is True
        assert len(e["rows"]) == 8  # 1 held-out product × 8 groups
        assert all(0 < r["true_ctr"] < 1 and 0 < r["original_true_ctr"] < 1 for r in e["rows"])
        assert e["lift_mean_of_ratios"] == pytest.approx(
            np.mean([r["true_ctr"] / r["original_true_ctr"] - 1 for r in e["rows"]]), rel=1e-12)
        # The headline: traffic-weighted, as an A/B test measures it (the world's group shares).
        w = np.array([r["traffic"] for r in e["rows"]])
        served = np.array([r["true_ctr"] for r in e["rows"]])
        base = np.array([r["original_true_ctr"] for r in e["rows"]])
        assert e["aggregate_lift"] == pytest.approx((w * served).sum() / (w * base).sum() - 1, rel=1e-12)
        assert e["original_kept_share"] == pytest.approx(np.mean([r["kept_original"] for r in e["rows"]]))
        _check_selection_rule(e["rows"])
    for m in history[1:]:
        assert m["train_creatives"] == 2 * 8 * 2  # products × groups × (prompts × images)
        assert m["lora_steps"] == 3 and np.isfinite(m["lora_loss_last"]) and np.isfinite(m["prompt_loss_last"])
        folder = out / "cycles" / f"cycle_{m['cycle']:03d}"
        assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert (folder / "prompt" / "model.safetensors").is_file()
        top = json.loads((folder / "topk.json").read_text())
        assert len(top) == 2 * 8  # top-1 per (product, group)
    summary = json.loads((out / "metrics.json").read_text())
    assert [m["cycle"] for m in summary] == [0, 1, 2] and "rows" not in summary[0]["eval"]
    assert (out / "metrics.png").stat().st_size > 1000
    assert load_cycle_config(out / "config.toml") == tiny_run["config"]


def _check_selection_rule(rows) -> None:
    """The original is always a candidate: a creative is served only when its reward is above the original's."""
    for r in rows:
        if r["kept_original"]:
            assert r["best_generated_reward"] <= r["original_reward"]
            assert r["true_ctr"] == r["original_true_ctr"] and r["lift"] == 0.0 and r["reward"] == r["original_reward"]
        else:
            assert r["best_generated_reward"] > r["original_reward"]
            assert r["true_ctr"] == r["best_generated_true_ctr"] and r["reward"] == r["best_generated_reward"]


class _FakeReward:
    """Scores candidates with `rule(true CTR)` from the world's oracle (title → held-out item, features → group)."""

    def __init__(self, ctx, rule):
        self.ctx, self.rule = ctx, rule
        self.items = {ctx.world.product(i).title: i for i in ctx.eval_items}
        assert len(self.items) == len(ctx.eval_items)  # titles tell the held-out products apart

    def score_images(self, images, titles, captions, group_features):
        out = []
        for image, title, features in zip(images, titles, np.asarray(group_features)):
            g = int(np.flatnonzero((self.ctx.group_features == features).all(axis=1))[0])
            out.append(self.rule(self.ctx.world.true_ctr(image, self.ctx.group_ids[g], item_id=self.items[title])))
        return np.array(out)


@pytest.mark.parametrize("rule, name", [(lambda ctr: ctr, "oracle"), (lambda ctr: -ctr, "inverted"),
                                        (lambda ctr: 0.5, "constant")])
def test_evaluation_keeps_the_original_unless_the_reward_prefers_a_creative(toy, rule, name):
    """With a reward that ranks like the truth, what is served is never worse than the photo (every row and the
    aggregate); with one that cannot tell candidates apart the photo is kept everywhere (lift exactly 0); with an
    inverted one selection can lose, but only by following the reward, and the rule holds in every case."""
    from cg4ctr_fast.training.cycle import build_context, evaluate, prompt_model_prompts

    config = CycleConfig().replace(**{**json.loads(json.dumps(TINY_RUN)), "run": {**TINY_RUN["run"], "eval_products": 2}},
                                   models={"world": str(toy.world), "generator": str(toy.generator),
                                           "reward": str(toy.reward), "prompt": str(toy.prompt)})
    ctx = build_context(config, log=lambda _m: None)
    ctx.reward = _FakeReward(ctx, rule)
    result = evaluate(ctx, prompt_model_prompts(ctx), seed=0)
    rows = result["rows"]
    assert len(rows) == 2 * 8
    _check_selection_rule(rows)
    if name == "oracle":
        assert all(r["true_ctr"] >= r["original_true_ctr"] for r in rows)
        assert result["aggregate_lift"] >= 0.0
        assert all(r["kept_original"] == (r["best_generated_true_ctr"] <= r["original_true_ctr"]) for r in rows)
    if name == "constant":
        assert result["original_kept_share"] == 1.0 and result["aggregate_lift"] == 0.0
    if name == "inverted":  # the reward's "best" is the worst creative: served only where it is worse than the photo
        assert all(r["kept_original"] == (r["best_generated_true_ctr"] >= r["original_true_ctr"]) for r in rows)
        assert all(r["true_ctr"] <= r["original_true_ctr"] for r in rows)


def test_lora_changes_the_unet_and_carries_metadata(tiny_run):
    from safetensors.torch import load_file

    from cg4ctr_fast.training.lora import read_lora_metadata

    file = tiny_run["out"] / "cycles" / "cycle_002" / "lora" / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(file))
    ups = [v for k, v in tensors.items() if "lora.up" in k or "lora_B" in k]
    assert ups and any(float(v.abs().max()) > 0 for v in ups)  # lora_B starts at zero: training moved it
    meta = read_lora_metadata(file)
    assert meta["cycle"] == 2 and meta["seed"] == 0 and "eval" in meta["metrics"]


def test_lora_from_the_loop_loads_in_diffusers_and_in_the_pipeline(tiny_run, toy):
    """diffusers' load_lora_weights on the saved file gives the UNet the loop trained (adapter unfused), and
    CreativePipeline(lora=...) (fused) makes the same images."""
    from diffusers import StableDiffusionInpaintPipeline

    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.lora import LoraTrainConfig, add_lora, load_lora_file

    lora_dir = tiny_run["out"] / "cycles" / "cycle_002" / "lora"
    config = tiny_run["config"]
    # The loop's UNet: base + peft adapter loaded from the checkpoint.
    ours = load_modules(toy.generator)
    add_lora(ours.unet, LoraTrainConfig(rank=config.lora.rank, alpha=config.lora.alpha))
    load_lora_file(ours.unet, lora_dir)
    # diffusers' own loader.
    theirs = load_modules(toy.generator)
    pipe = StableDiffusionInpaintPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer,
                                          unet=theirs.unet, scheduler=theirs.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    base = load_modules(toy.generator)
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 9, 8, 8, generator=gen)
    hidden = torch.randn(2, 77, ours.text_encoder.config.hidden_size, generator=gen)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        a = ours.unet(sample, t, encoder_hidden_states=hidden).sample
        b = pipe.unet(sample, t, encoder_hidden_states=hidden).sample
        c = base.unet(sample, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert float((a - c).abs().max()) > 1e-6  # the LoRA does something

    world = load_dataset(toy.world).world
    product = world.product(100_000)
    # Floats straight from the VAE (composite=False): with the product pasted back the "np" output is 8-bit
    # values / 255, and one value crossing a rounding boundary (thread count, CPU) moves it by 1/255 = 3.9e-3.
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, seed=1, show_progress=False, output_type="np",
                  composite=False)
    looped = CreativePipeline.from_modules(ours)(["warm smooth studio soft"], product.image, product.mask, **kwargs)
    fused = CreativePipeline.from_pretrained(str(toy.generator), lora=str(lora_dir))(
        ["warm smooth studio soft"], product.image, product.mask, **kwargs)
    assert fused[0].image.dtype == np.float32 and fused[0].image.shape == (64, 64, 3)
    # Fused weights (W + scale·B·A) against the unfused adapter differ by float rounding only: measured max
    # abs difference 9.8e-7 on [0, 1] images (2 cores, 1 thread); 1e-5 leaves 10× margin, 390× below one 8-bit step.
    np.testing.assert_allclose(fused[0].image, looped[0].image, rtol=0, atol=1e-5)


def kill_resume_and_compare(config_file: Path, out: Path, reference: Path, cycles: int = 2) -> None:
    """Run the CLI, SIGKILL it once cycle 1 is checkpointed, resume it, and check that every cycle's metrics
    equal those of the uninterrupted run in `reference` (wall times aside)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cg4ctr_fast.cli.train", "cycle", "--config", str(config_file),
                             "--out", str(out), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "cycles" / "cycle_001" / "metrics.json").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "cycles").iterdir() if not p.name.startswith("."))
    assert "cycle_001" in done and f"cycle_{cycles:03d}" not in done or proc.returncode == 0

    result = _run_cli("cycle", "--config", str(config_file), "--out", str(out), "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    for cycle in range(cycles + 1):
        name = f"cycle_{cycle:03d}"
        got = json.loads((out / "cycles" / name / "metrics.json").read_text())
        want = json.loads((reference / "cycles" / name / "metrics.json").read_text())
        assert _comparable(got) == _comparable(want)


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "all-guards"])
def test_resume_after_kill_equals_uninterrupted(tiny_run, toy, tmp_path, guarded):
    """Kill the CLI (SIGKILL) after cycle 1 is checkpointed, resume, compare with the uninterrupted run: plain,
    and with every guard and the refresh on (judge with accept and keep_best, a 2-model ensemble, anchor and
    cap, fresh logs with the reward models retrained)."""
    from safetensors.torch import load_file

    config_file = _write_config(tmp_path / "tiny.toml", toy, **(GUARDED if guarded else {}))
    reference = tiny_run["out"]
    if guarded:
        from cg4ctr_fast.training.cycle import run_cycles

        reference = tmp_path / "reference"
        run_cycles(load_cycle_config(config_file), reference, progress=False, log=lambda _m: None)
    out = tmp_path / "run"
    kill_resume_and_compare(config_file, out, reference)
    files = [("lora", "pytorch_lora_weights.safetensors"), ("prompt", "model.safetensors")]
    if guarded:
        files += [("reward/member_0", "model.safetensors"), ("reward/member_1", "model.safetensors")]
        got, want = (np.load(r / "cycles" / "cycle_002" / "fresh_logs.npz") for r in (out, reference))
        assert got.files == want.files and all(np.array_equal(got[k], want[k]) for k in got.files)
    for sub, file in files:
        got = load_file(str(out / "cycles" / "cycle_002" / sub / file))
        want = load_file(str(reference / "cycles" / "cycle_002" / sub / file))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_run_folder_guards(tiny_run, toy, tmp_path):
    from cg4ctr_fast.cli.train import main

    config_file = _write_config(tmp_path / "tiny.toml", toy)
    out = str(tiny_run["out"])
    assert main(["cycle", "--config", str(config_file), "--out", out]) == 2  # exists, no --resume
    changed = _write_config(tmp_path / "changed.toml", toy, lora={"steps": 4})
    assert main(["cycle", "--config", str(changed), "--out", out, "--resume"]) == 2  # other config


# ------------------------------------------------------------------------------------------------ ablation
def test_ablation_tiny(toy, tmp_path):
    from cg4ctr_fast.training.ablate import BASE_ARMS, run_ablation

    config = load_cycle_config(_write_config(tmp_path / "tiny.toml", toy, run={"cycles": 1}))
    # Two seeds in two worker processes (the --jobs path); one guard arm (its judge built once, in the parent).
    arms = (*BASE_ARMS, "full_judge")
    results = run_ablation(config, 2, tmp_path / "ablate", progress=False, log=lambda _m: None, jobs=2, arms=arms)
    assert results["seeds"] == [0, 1]
    assert set(results["lift"]) == set(arms) and results["arms"] == list(arms)
    judged = json.loads((tmp_path / "ablate" / "seed_0" / "full_judge" / "config.json").read_text())
    assert judged["guard"]["judge"] and judged["guard"]["accept"] and judged["guard"]["keep_best"]
    assert results["comparisons"]["full_judge_over_full"]["a"] == "full_judge@1"
    assert len(list((tmp_path / "ablate" / "guards").glob("world_*/judge_0/reward/model.safetensors"))) == 1
    for arm in arms:
        for cycle in ("0", "1"):
            cell = results["lift"][arm][cycle]
            assert cell["n"] == 2 * 8 and set(cell["per_seed"]) == {"0", "1"}
            assert 0.0 <= cell["original_kept_share"] <= 1.0
            # A cluster-bootstrap interval need not hold the point estimate of a ratio; with 4 clusters it
            # can sit beside it. It must be ordered and finite.
            assert cell["ci95"][0] <= cell["ci95"][1] and np.isfinite(cell["ci95"]).all()
    original = results["lift"]["original"]["1"]
    assert original["lift"] == 0.0 and original["ci95"] == [0.0, 0.0] and original["original_kept_share"] == 1.0
    # The aggregate lift of an arm, recomputed from its stored rows with the world's traffic shares.
    from cg4ctr_fast.sim import load_dataset

    traffic = load_dataset(toy.world).world.group_traffic()
    rows = [r for s in (0, 1) for r in json.loads((tmp_path / "ablate" / f"seed_{s}" / "full" / "cycles" /
                                                   "cycle_001" / "metrics.json").read_text())["eval"]["rows"]]
    w = np.array([traffic[r["group"]] for r in rows])
    want = (w * [r["true_ctr"] for r in rows]).sum() / (w * [r["original_true_ctr"] for r in rows]).sum() - 1
    assert results["lift"]["full"]["1"]["lift"] == pytest.approx(want, rel=1e-12)
    # Cycle 0 is the same starting point in every cyclic arm.
    assert results["lift"]["full"]["0"]["lift"] == results["lift"]["lora_only"]["0"]["lift"] \
        == results["lift"]["prompt_only"]["0"]["lift"]
    assert results["comparisons"]["full_over_global_prompt"]["a"] == "full@1"
    md = (tmp_path / "ablate" / "results.md").read_text()
    assert "| full |" in md and "| global_prompt |" in md and "95 %" in md
    assert md.index("Aggregate true-CTR lift") < md.index("Secondary: mean over") and "original photo was kept" in md
    assert (tmp_path / "ablate" / "lift_per_cycle.png").stat().st_size > 1000
    # A second call reuses every finished run (no new cycle folders, same numbers).
    again = run_ablation(config, 2, tmp_path / "ablate", progress=False, log=lambda _m: None, arms=arms)
    assert again["lift"] == results["lift"]
    # The same seed in one process gives the same numbers as in a worker.
    single = run_ablation(config, 1, tmp_path / "single", progress=False, log=lambda _m: None, arms=BASE_ARMS)
    assert single["lift"]["full"]["1"]["per_seed"]["0"] == results["lift"]["full"]["1"]["per_seed"]["0"]


def test_global_prompt_from_logs(toy):
    from cg4ctr_fast.sim import CATEGORIES, STYLE_VOCAB, load_dataset
    from cg4ctr_fast.training.ablate import global_prompt_from_logs

    words = global_prompt_from_logs(load_dataset(toy.world)).split()
    assert len(words) == len(CATEGORIES)
    assert all(w in STYLE_VOCAB[c] for w, c in zip(words, CATEGORIES))


def test_generate_cli_with_a_cycle_lora(tiny_run, toy, tmp_path):
    from PIL import Image

    from cg4ctr_fast.cli.main import main
    from cg4ctr_fast.sim import load_dataset

    product = load_dataset(toy.world).world.product(100_001)
    product.image.save(tmp_path / "product.png")
    product.mask.save(tmp_path / "mask.png")
    lora = tiny_run["out"] / "cycles" / "cycle_002" / "lora"
    common = ["generate", "--model", str(toy.generator), "--image", str(tmp_path / "product.png"),
              "--mask", str(tmp_path / "mask.png"), "--prompt", "cool rough beach dim", "--steps", "3", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "with"), "--lora", str(lora)]) == 0
    assert main(common + ["--out", str(tmp_path / "without")]) == 0
    with_lora = np.asarray(Image.open(next((tmp_path / "with").glob("creative_*.png"))), dtype=np.int16)
    without = np.asarray(Image.open(next((tmp_path / "without").glob("creative_*.png"))), dtype=np.int16)
    keep = np.asarray(product.mask) < 128
    assert np.array_equal(with_lora[keep], without[keep])  # the product is the photo's in both
    assert np.abs(with_lora - without)[~keep].max() > 0  # the LoRA changed the background
    assert main(common + ["--out", str(tmp_path / "bad"), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert not (tmp_path / "bad").exists()


def test_pipeline_returns_the_latents_it_decoded(toy):
    """return_latents gives the final latents: decoding them and pasting the product back is the creative."""
    from cg4ctr_fast.imaging import composite
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.sim import load_dataset

    modules = load_modules(toy.generator)
    pipe = CreativePipeline.from_modules(modules)
    product = load_dataset(toy.world).world.product(100_002)
    creatives = pipe(["warm smooth studio soft", "cool rough beach dim"], product.image, product.mask,
                     num_inference_steps=3, seed=4, show_progress=False, return_latents=True)
    assert all(c.latents is not None and c.latents.shape == (4, 16, 16) for c in creatives)
    with torch.no_grad():
        decoded = modules.vae.decode(torch.stack([c.latents for c in creatives]) / modules.vae.config.scaling_factor).sample
    # Floats: the same latents through the same decoder, outside the pipeline. Measured max abs difference 0
    # on [0, 1] (same batch, same process); 1e-5 allows another thread count's summation order.
    floats = pipe(["warm smooth studio soft", "cool rough beach dim"], product.image, product.mask,
                  num_inference_steps=3, seed=4, show_progress=False, output_type="np", composite=False)
    for creative, pixels in zip(floats, pipe.image_processor.postprocess(decoded, output_type="np")):
        np.testing.assert_allclose(creative.image, pixels, rtol=0, atol=1e-5)
    # 8-bit: pasting the product back on the decoded pixels is the creative. These are values rounded to
    # 8 bits from floats that differ by ≤ 1e-5, so a value on a rounding boundary may move by exactly one
    # step; the product pixels are copied, never computed, and stay exact.
    keep = np.asarray(product.mask) < 128
    for creative, pixels in zip(creatives, pipe.image_processor.postprocess(decoded, output_type="pil")):
        again = np.asarray(composite(product.image.convert("RGB"), pixels, product.mask), dtype=np.int16)
        got = np.asarray(creative.image, dtype=np.int16)
        assert np.array_equal(again[keep], got[keep])
        assert np.abs(again - got).max() <= 1
    assert pipe(["warm"], product.image, product.mask, num_inference_steps=2, show_progress=False)[0].latents is None


def test_guided_loss_fits_the_guided_prediction(toy):
    """guided_loss trains through eps_u + w (eps_c − eps_u); at w = 1 it is the plain loss, step for step."""
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.training.lora import LoraTrainConfig, add_lora, lora_state, train_lora

    gen = torch.Generator().manual_seed(5)
    examples = {"latents": torch.randn(3, 4, 16, 16, generator=gen),
                "masked_latents": torch.randn(3, 4, 16, 16, generator=gen),
                "masks": (torch.rand(3, 1, 16, 16, generator=gen) > 0.3).float()}
    prompts = ["warm smooth studio soft", "cool rough beach dim", "neon marble city bright"]

    def trained(guided: bool, guidance: float) -> dict:
        modules = load_modules(toy.generator)
        torch.manual_seed(0)
        config = LoraTrainConfig(steps=2, batch=2, guided_loss=guided, caption_dropout=0.0)
        add_lora(modules.unet, config)
        train_lora(modules.unet, modules.text_encoder, modules.tokenizer, modules.scheduler, examples, prompts,
                   config, seed=1, guidance=guidance)
        return lora_state(modules.unet)

    plain = trained(False, 5.0)
    same = trained(True, 1.0)
    guided = trained(True, 5.0)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    assert any(not torch.allclose(plain[k], guided[k]) for k in plain)


# ------------------------------------------------------------------------------------------------ guards
GUARDED = {"guard": {"judge": True, "judge_products": 1, "accept": True, "keep_best": True, "ensemble": 2},
           "refresh": {"enabled": True, "epochs": 2},
           "lora": {"anchor_weight": 1.0, "max_delta": 0.002}}


class _Fixed:
    """A reward 'model' whose score of creative i is table[i] (the ensemble only reads score_images)."""

    def __init__(self, table):
        self.table = np.asarray(table, dtype=np.float64)

    def score_images(self, images, titles, captions, group_features):
        return self.table[np.asarray(images)]


def test_reward_ensemble_rules():
    from cg4ctr_fast.training.cycle import top_k
    from cg4ctr_fast.training.guards import RewardEnsemble

    rng = np.random.default_rng(3)
    table = rng.random((3, 7))
    members = [_Fixed(t) for t in table]
    idx = list(range(7))
    assert np.array_equal(RewardEnsemble(members, "min").score_images(idx, [""] * 7, [""] * 7, None), table.min(0))
    got = RewardEnsemble(members, "mean_std", 1.5).score_images(idx, [""] * 7, [""] * 7, None)
    np.testing.assert_allclose(got, table.mean(0) - 1.5 * table.std(0), rtol=1e-12)
    # A creative one member loves and the others dislike wins alone but loses in the ensemble.
    planted = np.array([[0.9, 0.5], [0.1, 0.5], [0.1, 0.5]])
    rows_alone = [{"item_id": 0, "group": 0, "reward": s} for s in planted[0]]
    ensemble = RewardEnsemble([_Fixed(t) for t in planted], "min").score_images([0, 1], [""] * 2, [""] * 2, None)
    rows_ensemble = [{"item_id": 0, "group": 0, "reward": s, "i": i} for i, s in enumerate(ensemble)]
    assert top_k(rows_alone, 1)[0]["reward"] == 0.9 and top_k(rows_ensemble, 1)[0]["i"] == 1


def test_lora_anchor_and_cap_change_the_update(toy):
    """anchor_weight pulls the adapted UNet's noise prediction towards the base one; max_delta caps each layer's
    ‖ΔW‖_F / ‖W‖_F (and 0 leaves the adapter alone)."""
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.training.lora import (LoraTrainConfig, adapter_disabled, add_lora, cap_lora_delta,
                                           lora_state, train_lora)

    gen = torch.Generator().manual_seed(9)
    examples = {"latents": torch.randn(5, 4, 16, 16, generator=gen),
                "masked_latents": torch.randn(5, 4, 16, 16, generator=gen),
                "masks": (torch.rand(5, 1, 16, 16, generator=gen) > 0.3).float()}
    prompts = ["warm smooth studio soft", "cool grainy beach dim", "neon checker city bright", "pastel", "earthy waves"]
    probe = (torch.cat([torch.randn(3, 4, 16, 16, generator=gen), examples["masks"][:3], examples["masked_latents"][:3]], 1),
             torch.tensor([100, 500, 900]))

    def trained(anchor: float):
        modules = load_modules(toy.generator)
        torch.manual_seed(0)
        config = LoraTrainConfig(steps=12, batch=3, lr=5e-3, caption_dropout=0.0, anchor_weight=anchor)
        add_lora(modules.unet, config)
        train_lora(modules.unet, modules.text_encoder, modules.tokenizer, modules.scheduler, examples, prompts,
                   config, seed=2)
        ids = modules.tokenizer(prompts[:3], padding="max_length", max_length=modules.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
        with torch.no_grad():
            states = modules.text_encoder(ids)[0]
            adapted = modules.unet(*probe, encoder_hidden_states=states).sample
            with adapter_disabled(modules.unet):
                base = modules.unet(*probe, encoder_hidden_states=states).sample
        return modules, float(((adapted - base) ** 2).mean())

    _, free = trained(0.0)
    modules, anchored = trained(20.0)
    assert free > 0 and anchored < 0.5 * free
    before = lora_state(modules.unet)
    assert cap_lora_delta(modules.unet, 0.0)["lora_layers_capped"] == 0
    assert all(torch.equal(v, lora_state(modules.unet)[k]) for k, v in before.items())
    largest = cap_lora_delta(modules.unet, 0.0)["lora_delta_max"]
    report = cap_lora_delta(modules.unet, largest / 4)
    assert report["lora_layers_capped"] > 0
    assert cap_lora_delta(modules.unet, 0.0)["lora_delta_max"] <= largest / 4 * (1 + 1e-5)


def _guarded_context(toy, tmp_path, **changes):
    from cg4ctr_fast.training.cycle import build_context

    sections = {**GUARDED, **changes}
    config = load_cycle_config(_write_config(tmp_path / "guarded.toml", toy, **sections))
    return config, build_context(config, log=lambda _m: None, guard_dir=tmp_path / "guards")


def test_judge_accept_undoes_a_rejected_cycle(toy, tmp_path):
    """With guard.accept, a cycle the judge scores below the reference leaves the LoRA and the prompt model as
    they were; one it scores at or above keeps the update."""
    import copy

    from cg4ctr_fast.training.cycle import run_cycle
    from cg4ctr_fast.training.lora import lora_state

    _config, ctx = _guarded_context(toy, tmp_path, refresh={"enabled": False})
    start_lora = lora_state(ctx.modules.unet)
    start_prompt = copy.deepcopy(ctx.prompt_model.state_dict())
    metrics, _ = run_cycle(ctx, 1, judge_reference=float("inf"))
    assert metrics["judge"]["accepted"] is False and metrics["lora_steps"] == 3
    assert all(torch.equal(v, lora_state(ctx.modules.unet)[k]) for k, v in start_lora.items())
    assert all(torch.equal(v, ctx.prompt_model.state_dict()[k]) for k, v in start_prompt.items())
    metrics, _ = run_cycle(ctx, 1, judge_reference=float("-inf"))
    assert metrics["judge"]["accepted"] is True
    assert any(not torch.equal(v, lora_state(ctx.modules.unet)[k]) for k, v in start_lora.items())
    # The judge reads its own products, never the evaluation's.
    assert not set(ctx.judge_items) & set(ctx.eval_items) and metrics["judge"]["aggregate_lift"] > -1


def test_keep_best_and_patience(toy, tmp_path, monkeypatch):
    """keep_best serves the best-judged accepted cycle; patience stops the run after that many cycles without a
    better one. The judge's scores are planted (the decision rule is what is tested)."""
    from cg4ctr_fast.training import cycle as cycle_module

    planted = iter([0.10, 0.30, 0.20, 0.25])  # cycle 0, 1, 2, 3
    monkeypatch.setattr(cycle_module, "judge_step", lambda ctx, **_k: next(planted))
    config = load_cycle_config(_write_config(tmp_path / "best.toml", toy, run={"cycles": 3},
                                             guard={"judge": True, "judge_products": 1, "keep_best": True,
                                                    "patience": 1}))
    history = cycle_module.run_cycles(config, tmp_path / "run", progress=False, log=lambda _m: None,
                                      guard_dir=tmp_path / "guards")
    # Cycle 2 (0.20) is not better than cycle 1 (0.30): with patience 1 the run stops before cycle 3.
    assert [m["cycle"] for m in history] == [0, 1, 2]
    assert [m["best_cycle"] for m in history] == [0, 1, 1]
    from cg4ctr_fast.training.ablate import served_cycle

    assert served_cycle(tmp_path / "run", 3) == 1 and served_cycle(tmp_path / "run", 0) == 0


def test_refresh_logs_what_was_served_and_retrains(toy, tmp_path):
    """Fresh logs: the top-k creatives and the photo of every (training product, group), with the oracle's CTR
    and Poisson impressions; the reward models after the cycle are new ones, saved beside the checkpoint."""
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.training.cycle import run_cycles
    from cg4ctr_fast.training.guards import load_fresh_logs

    config = load_cycle_config(_write_config(tmp_path / "fresh.toml", toy, run={"cycles": 1},
                                             refresh={"enabled": True, "epochs": 2}))
    history = run_cycles(config, tmp_path / "run", progress=False, log=lambda _m: None, guard_dir=tmp_path / "g")
    folder = tmp_path / "run" / "cycles" / "cycle_001"
    fresh = load_fresh_logs(folder / "fresh_logs.npz")
    n_kept, n_photo = 2 * 8 * 1, 2 * 8  # products × groups × top_k; products × groups
    assert len(fresh["item_id"]) == n_kept + n_photo == history[1]["refresh"]["creatives"]
    assert list(fresh["caption"][n_kept:]) == [""] * n_photo and all(c for c in fresh["caption"][:n_kept])
    assert (fresh["clicks"] <= fresh["impressions"]).all() and (fresh["clicks"] >= 0).all()
    from cg4ctr_fast.sim import load_dataset
    from PIL import Image

    world = load_dataset(toy.world).world
    traffic = world.group_traffic()
    for i in (0, n_kept + 3):
        want = world.true_ctr(Image.fromarray(fresh["images"][i]), int(fresh["group"][i]), item_id=int(fresh["item_id"][i]))
        assert fresh["true_ctr"][i] == pytest.approx(want, rel=1e-9)
    lam = 1680.0 * 8 * traffic[fresh["group"]]
    assert abs(fresh["impressions"].sum() - lam.sum()) < 5 * np.sqrt(lam.sum())
    retrained = RewardModel.load(folder / "reward" / "member_0")
    base = RewardModel.load(toy.reward)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in retrained.state_dict().items())


def test_planted_hacked_cycle_is_rejected_by_the_judge(tmp_path):
    """A LoRA trained to please the training reward model but not the oracle is rejected by the held-out judge.

    On the shipped toy set: 4 training products × 8 groups × 6 creatives; per (product, group) the hack keeps
    the 2 creatives whose reward most overstates their oracle CTR (z-score of reward − z-score of true CTR
    within the bucket) and trains the LoRA on them (60 steps, lr 3e-3). The judge is a reward model on a
    disjoint log sample (15 epochs), never used to build the hack. Measured on this machine: the training
    reward model's lift over the photo on the judge products went 14.30 % → 14.37 % (pleased), the oracle's
    +2.3 % → −2.2 % (hacked), the judge's 9.93 % → 9.45 % (rejects: below the reference)."""
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.training import guards
    from cg4ctr_fast.training.cycle import (build_context, evaluate, generate_for_groups, judge_items,
                                            lora_step, prompt_model_prompts)
    from cg4ctr_fast.pipeline import derive_seed

    torch.set_num_threads(1)
    config = CycleConfig().replace(
        run={"seed": 0, "train_products": 4, "threads": 1}, guard={"judge_products": 3},
        generate={"prompts_per_group": 2, "images_per_prompt": 3, "steps": 10, "top_k": 2},
        lora={"steps": 60, "lr": 3e-3}, eval={"images_per_group": 3, "steps": 10})
    ctx = build_context(config, log=lambda _m: None)  # the shipped toy set
    ctx.judge = RewardModel.load(guards.build_judge(ctx.model_paths["world"], tmp_path / "judge", epochs=15,
                                                    log=lambda _m: None))
    ctx.judge_items = judge_items(config.replace(guard={"judge": True}))

    def lifts() -> tuple[float, float, float]:
        e = evaluate(ctx, prompt_model_prompts(ctx), seed=derive_seed(0, "judge"), items=ctx.judge_items,
                     judge=ctx.judge)
        w = np.array([r["traffic"] for r in e["rows"]])
        reward = (w * [r["reward"] for r in e["rows"]]).sum() / (w * [r["original_reward"] for r in e["rows"]]).sum()
        return e["judge_aggregate_lift"], e["aggregate_lift"], float(reward - 1)

    judge_before, true_before, reward_before = lifts()
    sampler = torch.Generator().manual_seed(1)
    rows = []
    for item in ctx.train_items:
        features = np.repeat(ctx.item_features(item)[None], 16, axis=0)
        prompts = ctx.prompt_model.propose(np.repeat(ctx.group_features, 2, axis=0), features, top_p=0.9,
                                           sample=True, generator=sampler)
        rows += generate_for_groups(ctx, item, [prompts[2 * g : 2 * g + 2] for g in range(8)], images_per_prompt=3,
                                    steps=10, seed=derive_seed(0, "hack", item))
    buckets: dict = {}
    for r in rows:
        r["true"] = ctx.world.true_ctr(r["image"], ctx.group_ids[r["group"]], item_id=r["item_id"])
        buckets.setdefault((r["item_id"], r["group"]), []).append(r)
    hacked = []
    for bucket in buckets.values():
        reward = np.array([r["reward"] for r in bucket])
        true = np.array([r["true"] for r in bucket])
        overstated = (reward - reward.mean()) / (reward.std() + 1e-12) - (true - true.mean()) / (true.std() + 1e-12)
        hacked += [bucket[i] for i in np.argsort(-overstated, kind="stable")[:2]]
    lora_step(ctx, hacked, seed=5)
    judge_after, true_after, reward_after = lifts()
    assert reward_after >= reward_before - 1e-4  # the training reward model is not displeased
    assert true_after < true_before - 0.01  # the oracle: a real loss (the plant is a hack)
    assert judge_after < judge_before  # the judge sees it: guard.accept undoes the cycle (judged < reference)


def test_saved_lora_file_is_byte_reproducible(tmp_path):
    """The same adapter weights give the same file, header included (peft keeps target_modules as a set; its
    order in the header would otherwise change from process to process, and with it the sha256 provenance records)."""
    import hashlib

    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules
    from cg4ctr_fast.training.lora import LoraTrainConfig, add_lora, save_lora

    digests = []
    for k in range(2):
        unet = build_modules(get_preset("tiny")).unet
        torch.manual_seed(0)
        add_lora(unet, LoraTrainConfig(targets=("to_v", "to_q", "to_out.0", "to_k")))
        file = save_lora(unet, tmp_path / f"lora_{k}")
        digests.append(hashlib.sha256(file.read_bytes()).hexdigest())
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        header = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert digests[0] == digests[1]
    assert header["unet.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
