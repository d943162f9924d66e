"""The shipped toy set (cg4ctr_fast/assets/toy): its files match the manifest and load, `cg4ctr-train toy` writes
such a set on a seconds-sized configuration, and a changed file is refused in one line."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
import pytest

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.toy import TOY_CONFIGS, VAE_EVAL_IMAGES, ToyConfig
from cg4ctr_fast.training.toy_set import (
    ENV_SET,
    EXTRA_FP16_FILES,
    EXTRAS,
    FP16_FILES,
    LEFT_OUT,
    MANIFEST,
    PACKAGE_SET,
    reference_outputs,
    resolve_toy_models,
    resolve_toy_root,
    verify_toy_set,
)

SMALL = TOY_CONFIGS["small"]
# Tolerance on the reward model's calibrated CTR (values ~0.01-0.1) between the float32 build and the fp16-stored
# weights loaded back into float32: fp16 keeps 11 significant bits (relative rounding ≤ 4.9e-4 per weight); on the
# default set the largest difference measured is below 1e-4 (README, "Presets and weights").
REWARD_ATOL = 1e-3


def _safetensors_dtypes(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}


def _check_set(root, manifest, config) -> None:
    assert manifest["config_key"] == config.key() and manifest["config"] == json.loads(json.dumps(asdict(config)))
    assert manifest["world_seed"] == config.seed and f"--seed {config.seed}" in manifest["commands"]["world"]
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    assert on_disk == set(manifest["files"])
    assert not any(name.startswith(tuple(p + "/" for p in LEFT_OUT)) for name in on_disk)
    extras = manifest.get("extras", {})
    assert set(extras) <= {name for name, _ in EXTRAS}
    assert {f for e in extras.values() for f in e["files"]} == {
        name for name in on_disk if any(name == n or name.startswith(n + "/") for n in extras)}
    extra_weights = tuple(f for f in EXTRA_FP16_FILES if f.split("/")[0] in extras)
    weights = [name for name in on_disk if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt"))]
    assert sorted(weights) == sorted(FP16_FILES + extra_weights)  # safetensors only, each stored as planned
    for name in FP16_FILES + extra_weights:
        assert _safetensors_dtypes(root / name) <= {"F16", "I64"}, name
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (root / "generator" / "tokenizer").iterdir()}
    got, want = reference_outputs(root), manifest["reference_outputs"]
    assert got["prompts"] == want["prompts"]
    np.testing.assert_allclose(got["reward_ctr"], want["reward_ctr"], rtol=0, atol=REWARD_ATOL)


def test_shipped_set_matches_its_manifest_and_loads(monkeypatch):
    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.models.saliency import load_saliency

    monkeypatch.delenv(ENV_SET, raising=False)
    manifest = verify_toy_set(PACKAGE_SET)
    _check_set(PACKAGE_SET, manifest, ToyConfig())
    assert manifest["commands"]["set"] == "cg4ctr-train toy --out cg4ctr_fast/assets/toy --config default"
    # The LCM-LoRA, the preview decoder and the quality table ship too, each with the command that made it.
    assert set(manifest["extras"]) == {"lcm_lora", "taesd", "quality.json"}
    assert all(e["command"].startswith(("cg4ctr-train ", "cg4ctr-bench ")) for e in manifest["extras"].values())
    assert sum(f["size"] for f in manifest["files"].values()) <= 30e6  # the budget for the whole set
    # The default configuration resolves to the shipped folder: nothing to train.
    assert resolve_toy_root(ToyConfig()) == PACKAGE_SET
    assert resolve_toy_models(ToyConfig(), log=pytest.fail).generator == PACKAGE_SET / "generator"
    modules = load_modules(PACKAGE_SET / "generator")
    assert next(modules.unet.parameters()).dtype.is_floating_point and str(next(modules.unet.parameters()).dtype) == "torch.float32"
    assert load_saliency(str(PACKAGE_SET / "saliency" / "saliency.safetensors")) is not None


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """`cg4ctr-train toy --config small`: the shipped set's path (build_toy_models + export) in seconds."""
    from cg4ctr_fast.cli.train import main

    root = tmp_path_factory.mktemp("toy")
    out = root / "set"
    assert main(["toy", "--out", str(out), "--config", "small", "--cache", str(root / "cache"), "--quiet"]) == 0
    return out


def test_train_toy_small_writes_a_set_that_loads(small_set, monkeypatch, tmp_path):
    from cg4ctr_fast.cli.demo import run_demo

    manifest = verify_toy_set(small_set)
    _check_set(small_set, manifest, SMALL)
    assert manifest["commands"]["set"] == f"cg4ctr-train toy --out {small_set} --config small"
    # The set is found as the models of its configuration (here through CG4CTR_TOY_SET) and the demo runs on it.
    monkeypatch.setenv(ENV_SET, str(small_set))
    assert resolve_toy_root(SMALL) == small_set and resolve_toy_root(ToyConfig()) != small_set
    summary = run_demo(tmp_path / "demo", steps=2, quiet=True, n_products=1, images_per_group=1, config=SMALL)
    assert summary["model_root"] == str(small_set) and len(summary["creatives"]) == 8
    # The VAE's held-out reconstruction is measured and shipped beside the steering measure.
    vae_eval = json.loads((small_set / "generator" / "vae_eval.json").read_text())
    assert vae_eval["images"] == VAE_EVAL_IMAGES and 0 < vae_eval["l1"] < 2 and vae_eval["chroma_ratio"] > 0
    assert f"reconstruction L1 {vae_eval['l1']:.4f}" in (tmp_path / "demo" / "report.md").read_text()


def test_vae_reconstruction_matches_its_definition():
    """`vae_reconstruction` against the same quantities computed by hand, on random images of an odd count
    (not a multiple of the batch)."""
    import torch

    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules
    from cg4ctr_fast.training.base import CreativeSet, vae_reconstruction

    vae = build_modules(get_preset("tiny"), seed=3).vae.eval()
    images = torch.rand(7, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = CreativeSet(images=images, masks=torch.zeros(7, 1, 64, 64), captions=[""] * 7)
    got = vae_reconstruction(vae, data, batch=3)
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    assert got["images"] == 7
    assert got["l1"] == pytest.approx(float((recon - images).abs().mean()), rel=1e-5)
    assert got["chroma_ratio"] == pytest.approx(float(recon.std(dim=1).mean() / images.std(dim=1).mean()), rel=1e-5)
    # A grey image (three equal channels) has no chroma; the ratio of a VAE's output to it stays finite.
    grey = CreativeSet(images=images[:, :1].expand(-1, 3, -1, -1).contiguous(), masks=data.masks, captions=data.captions)
    assert np.isfinite(vae_reconstruction(vae, grey)["chroma_ratio"])


def test_register_extras_hashes_them_and_a_changed_extra_is_refused(small_set, tmp_path):
    from cg4ctr_fast.training.toy_set import register_extras

    root = tmp_path / "set"
    shutil.copytree(small_set, root)
    (root / "quality.json").write_text('{"entries": []}\n')
    with pytest.raises(InputError, match="present but no command"):
        register_extras(root, {}, log=lambda _m: None)
    with pytest.raises(InputError, match="'bogus' is not an extra"):
        register_extras(root, {"bogus": "x"}, log=lambda _m: None)
    manifest = register_extras(root, {"quality.json": "cg4ctr-bench --pareto --json p.json"}, log=lambda _m: None)
    assert manifest["extras"] == {"quality.json": {"command": "cg4ctr-bench --pareto --json p.json",
                                                   "files": ["quality.json"]}}
    assert verify_toy_set(root)["files"]["quality.json"]["size"] == len('{"entries": []}\n')
    _check_set(root, manifest, SMALL)
    (root / "quality.json").write_text('{"entries": [1]}\n')
    with pytest.raises(InputError, match="quality.json: does not match its sha256"):
        verify_toy_set(root)


def test_a_changed_file_is_refused_in_one_line(small_set, monkeypatch, tmp_path, capsys):
    tampered = tmp_path / "set"
    shutil.copytree(small_set, tampered)
    weights = tampered / "reward" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight: same size, another sha256
    weights.write_bytes(bytes(data))
    monkeypatch.setenv(ENV_SET, str(tampered))
    with pytest.raises(InputError, match="reward/model.safetensors: does not match its sha256"):
        resolve_toy_models(SMALL, log=pytest.fail)
    # The command line: the default configuration's set (a copy of the shipped one) with one file changed.
    shipped = tmp_path / "shipped"
    shutil.copytree(PACKAGE_SET, shipped)
    (shipped / "world" / "groups.json").write_text((shipped / "world" / "groups.json").read_text() + " ")
    monkeypatch.setenv(ENV_SET, str(shipped))
    from cg4ctr_fast.cli.main import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{shipped / 'world' / 'groups.json'}: does not match its sha256" in err, err
    assert not (tmp_path / "demo").exists()


def test_retrain_and_other_configs_use_the_cache(monkeypatch, tmp_path):
    import cg4ctr_fast.training.toy as toy

    calls = []
    monkeypatch.delenv(ENV_SET, raising=False)
    monkeypatch.setattr(toy, "build_toy_models", lambda config, **kw: calls.append((config.key(), kw)) or "built")
    assert resolve_toy_models(ToyConfig(), retrain=True) == "built"
    assert resolve_toy_models(ToyConfig(seed=1)) == "built"
    assert resolve_toy_models(ToyConfig(), cache=tmp_path) == "built"
    assert [key for key, _ in calls] == [ToyConfig().key(), ToyConfig(seed=1).key(), ToyConfig().key()]
    monkeypatch.setenv("CG4CTR_CACHE", str(tmp_path / "cache"))
    assert resolve_toy_root(ToyConfig(seed=1)) == tmp_path / "cache" / f"{toy.TOY_VERSION}-{ToyConfig(seed=1).key()}"
