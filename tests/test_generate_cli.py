"""`cg4ctr generate`: the working size (--height/--width), the reward model (--reward, or an engine folder's), and
the provenance creatives.json records.

- Sizes: the model runs at the given working size and the creatives come back at the input's own size with the
  product pixels kept; bad sizes are refused in one line, exit 2, before any model loads.
- Reward: the scores written equal RewardModel's own scores on the saved PNGs and on the input image, within
  1e-6 (float32 CTRs in (0, 1); PNG is lossless, so the reward model sees the same 8-bit pixels and only the
  batch it runs in differs). ONNX Runtime engines against the torch model: the reward contracts' tolerance,
  1.1e-4 (tests/test_export_reward.py).
- Provenance: content hashes (sha256 of the input file, the model folder's content hash, the LoRA's files, the
  saliency weights, the reward files, the engine manifest), the package version, the LoRA scale and the working
  size, each checked against a hash computed here.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.cli.main import main
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.models.reward import RewardConfig, RewardModel, Vocabulary
from tests.conftest import make_product
from tests.test_export import loras  # noqa: F401 - a fixture

REWARD_ATOL = 1e-6
TITLES = ["red ceramic mug", "desk lamp"]
CAPTIONS = ["warm red", "cool blue studio"]


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code)
    return code, capsys.readouterr().err


def _one_line(capsys, *argv) -> str:
    code, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def files(tmp_path):
    image, mask = make_product(52, 44, seed=3)  # not a multiple of 8, not square
    image.save(tmp_path / "product.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """An untrained RewardModel (three group features, 16-px images) with a calibration that spreads its scores."""
    torch.manual_seed(0)
    titles, captions = Vocabulary.build(TITLES), Vocabulary.build(CAPTIONS)
    config = RewardConfig(group_dim=3, title_vocab_size=len(titles), caption_vocab_size=len(captions), image_size=16,
                          image_channels=(8, 8, 16, 16), max_title_tokens=6, max_caption_tokens=4, token_dim=16,
                          tower_hidden=32, d_model=16, n_heads=2, n_layers=1, ff_dim=32, head_hidden=16,
                          calib_scale=3.0, calib_bias=-2.0)
    return RewardModel(config, titles, captions).eval().save(tmp_path_factory.mktemp("reward") / "model")


def _groups_file(folder: Path, dim: int = 3) -> Path:
    rng = np.random.default_rng(5)
    groups = [{"group_id": name, "features": rng.normal(size=dim).round(3).tolist()} for name in ("young", "old", "kids")]
    path = folder / "groups.json"
    path.write_text(json.dumps(groups))
    return path


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: the refusals below must come before one."""
    from cg4ctr_fast.pipeline import CreativePipeline

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for name in ("from_preset", "from_engines", "from_pretrained"):
        monkeypatch.setattr(CreativePipeline, name, refuse)


# ------------------------------------------------------------------------------------------------ working size
def test_height_width_set_the_working_size_and_creatives_keep_the_input_size(capsys, files):
    from cg4ctr_fast.pipeline import CreativePipeline

    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "warm beach", "--steps", "2", "--height", "96", "--width", "48", "--out", str(out),
                     "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert (meta["width"], meta["height"]) == (48, 96) and meta["image_size"] == [52, 44]
    creative = np.asarray(Image.open(out / meta["creatives"][0]["file"]).convert("RGB"))
    original = np.asarray(Image.open(files / "product.png").convert("RGB"))
    keep = np.asarray(Image.open(files / "mask.png")) < 128
    assert creative.shape == original.shape  # the composite restores the input's size
    assert np.array_equal(creative[keep], original[keep])

    # The run used that size: it matches the pipeline's own 8-bit output at 96×48 and not the one at the default
    # working size, 64×56. The same computation in one process: one 8-bit step allowed, for a float sum that a
    # different thread split could round across a step boundary. (The float output, "np", is not the reference
    # here: the 8-bit LANCZOS resize back to 52×44 clips between its two passes and differed from the float
    # resize by up to 8/255 on this noise-like image.)
    pipe = CreativePipeline.from_preset("tiny")
    kwargs = dict(mask_image=str(files / "mask.png"), num_inference_steps=2, guidance_scale=7.5, show_progress=False)
    at_size = np.asarray(pipe("warm beach", str(files / "product.png"), height=96, width=48, **kwargs)[0].image)
    default = np.asarray(pipe("warm beach", str(files / "product.png"), **kwargs)[0].image)
    written = creative.astype(np.int16)
    assert np.abs(written - at_size).max() <= 1
    assert np.abs(written - default).max() > 10


def test_one_side_keeps_the_input_aspect_ratio(capsys, files):
    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "warm beach", "--steps", "1", "--height", "96", "--out", str(out), "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    # 52 × 96 / 44 = 113.45 px, the nearest multiple of 8 is 112.
    assert (meta["width"], meta["height"]) == (112, 96)
    assert Image.open(out / meta["creatives"][0]["file"]).size == (52, 44)


def test_default_working_size_is_recorded(capsys, files):
    from cg4ctr_fast.imaging import working_size

    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "warm beach", "--steps", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert [meta["width"], meta["height"]] == list(working_size(52, 44, 64))  # tiny: longer side 64


@pytest.mark.parametrize("flags, needle", [
    (["--height", "0"], "--height must be a positive multiple of 8"),
    (["--height", "-8"], "--height must be a positive multiple of 8"),
    (["--width", "50"], "--width must be a positive multiple of 8 up to 4096, got 50"),
    (["--width", "4104"], "--width must be a positive multiple of 8 up to 4096"),
    (["--height", "12", "--width", "64"], "--height must be a positive multiple of 8"),
    (["--height", "abc"], "invalid int value"),
])
def test_bad_sizes_one_line_before_any_model_loads(capsys, files, monkeypatch, flags, needle):
    _no_model_load(monkeypatch)
    line = _one_line(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "a", "--out", str(files / "out"), *flags)
    assert needle in line and not (files / "out").exists()


def test_derived_side_over_the_limit_is_refused(capsys, tmp_path, monkeypatch):
    _no_model_load(monkeypatch)
    Image.new("RGB", (400, 8), "red").save(tmp_path / "wide.png")
    mask = np.zeros((8, 400), np.uint8)
    mask[:, 200:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    line = _one_line(capsys, "generate", "--image", str(tmp_path / "wide.png"), "--mask", str(tmp_path / "mask.png"),
                     "--prompt", "a", "--height", "96", "--out", str(tmp_path / "out"))
    assert "--width would be 4800" in line and "over the 4096 limit" in line


def _fake_engines(folder: Path, scale: int, height, width) -> Path:
    """Only a manifest: the size checks read it before anything loads."""
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "stack": {"vae_scale_factor": scale}, "settings": {"height": height, "width": width}, "components": {}}))
    return folder


@pytest.mark.parametrize("scale, height, width, flags, needle", [
    (4, [32, 64, 128], [32, 64, 128], ["--height", "256"], "--height 256 is outside the engine folder's exported "
                                                           "range 32..128"),
    (4, [32, 64, 128], [64, 64, 64], ["--height", "64"], "--width 72 (from the input's 52×44 aspect ratio; give "
                                                         "--width too) is outside"),
    (16, [32, 64, 128], [32, 64, 128], ["--height", "40", "--width", "64"], "--height 40 is not a multiple of 16"),
])
def test_engine_folder_sizes_are_checked_against_its_profile(capsys, files, monkeypatch, scale, height, width,
                                                             flags, needle):
    _no_model_load(monkeypatch)
    engines = _fake_engines(files / "engines", scale, height, width)
    line = _one_line(capsys, "generate", "--engines", str(engines), "--image", str(files / "product.png"), "--mask",
                     str(files / "mask.png"), "--prompt", "a", "--out", str(files / "out"), *flags)
    assert needle in line


def test_missing_saliency_weights_one_line(capsys, files, monkeypatch):
    _no_model_load(monkeypatch)
    line = _one_line(capsys, "generate", "--image", str(files / "product.png"), "--saliency",
                     str(files / "missing.pth"), "--prompt", "a", "--out", str(files / "out"))
    assert "--saliency" in line and "no such file or folder" in line


def test_help_states_the_resize(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "longer side equals the model's resolution" in text and "--height" in text and "--reward" in text


# ------------------------------------------------------------------------------------------------ reward
def test_reward_scores_equal_the_model_on_the_saved_pngs_and_the_original(capsys, files, reward_dir):
    groups = _groups_file(files)
    out = files / "out"
    prompts = ["warm red", "cool blue studio"]
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", prompts[0], "--prompt", prompts[1], "--images-per-prompt", "2", "--steps", "2",
                     "--reward", str(reward_dir), "--title", "red ceramic mug", "--captions", "prompts",
                     "--groups", str(groups), "--group", "kids", "--group", "young", "--out", str(out), "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    records = meta["creatives"]
    assert [r["group_id"] for r in records] == ["kids", "kids", "young", "young"]
    model = RewardModel.load(reward_dir)
    table = {g["group_id"]: g["features"] for g in json.loads(groups.read_text())}
    rows = np.asarray([table[r["group_id"]] for r in records], dtype=np.float32)
    want = model.score_images([out / r["file"] for r in records], ["red ceramic mug"] * 4,
                              [r["prompt"] for r in records], rows)
    got = np.asarray([r["reward"] for r in records])
    np.testing.assert_allclose(got, want, rtol=0, atol=REWARD_ATOL)
    assert np.ptp(got) > 100 * REWARD_ATOL  # the scores differ by far more than the tolerance

    # The original image is scored too, per group, with the title and no caption.
    original_rows = np.asarray([table["kids"], table["young"]], dtype=np.float32)
    want_original = model.score_images([files / "product.png"] * 2, ["red ceramic mug"] * 2, ["", ""], original_rows)
    summary = meta["groups"]
    np.testing.assert_allclose([g["original_reward"] for g in summary], want_original, rtol=0, atol=REWARD_ATOL)
    assert [r["original_reward"] for r in records] == [summary[0]["original_reward"]] * 2 + [
        summary[1]["original_reward"]] * 2
    for g, row in enumerate(summary):
        mine = [r for r in records if r["group"] == g]
        best = max(mine, key=lambda r: r["reward"])
        assert row["best_reward"] == best["reward"]
        # Chosen only when strictly above the original: the original is always a candidate.
        assert row["chosen"] == (best["file"] if best["reward"] > row["original_reward"] else "original")
    assert meta["reward"]["sha256"] == {name: _sha256(reward_dir / name)
                                        for name in ("model.safetensors", "config.json", "vocab.json")}
    assert meta["reward"]["groups"]["sha256"] == _sha256(groups)
    assert meta["reward"]["title"] == "red ceramic mug" and meta["reward"]["captions"] == "prompts"


def test_reward_defaults_one_neutral_group_row_and_no_caption(capsys, files, reward_dir):
    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "warm red", "--prompt", "cool blue studio", "--steps", "1",
                     "--reward", str(reward_dir), "--out", str(out), "--quiet")
    assert code == 0, err
    records = json.loads((out / "creatives.json").read_text())["creatives"]
    model = RewardModel.load(reward_dir)
    want = model.score_images([out / r["file"] for r in records], ["", ""], ["", ""], np.zeros((2, 3)))
    np.testing.assert_allclose([r["reward"] for r in records], want, rtol=0, atol=REWARD_ATOL)


def _wrong_dim_groups(folder: Path) -> list:
    return ["--groups", str(_groups_file(folder, dim=2))]


@pytest.mark.parametrize("flags, needle", [
    (["--title", "mug"], "--title describe what the reward model scores; pass --reward DIR"),
    (["--captions", "prompts"], "--captions describe what the reward model scores"),
    (["--reward", "{tmp}/nothing"], "not a reward model folder"),
    (["--reward", "{reward}", "--group", "kids"], "--group needs --groups FILE"),
    (["--reward", "{reward}", "--groups", "{groups}", "--group", "kids", "--group", "old"],
     "--group is given 2 times for 1 --prompt"),
    (["--reward", "{reward}", "--groups", "{groups}", "--group", "adults"], "--group adults: no such group_id"),
    (["--reward", "{reward}", "--groups", "{tmp}/missing.json"], "missing.json: missing"),
    (["--reward", "{reward}", "--groups", "{bad_dim}"], "groups have 2 features each, the reward model expects 3"),
])
def test_reward_flags_refused_in_one_line_before_any_model_loads(capsys, files, reward_dir, monkeypatch, flags,
                                                                  needle):
    _no_model_load(monkeypatch)
    groups = _groups_file(files)
    bad = files / "bad"
    bad.mkdir()
    bad_dim = _groups_file(bad, dim=2)
    flags = [f.format(tmp=files, reward=reward_dir, groups=groups, bad_dim=bad_dim) for f in flags]
    line = _one_line(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "a", "--out", str(files / "out"), *flags)
    assert needle in line and not (files / "out").exists()


# ------------------------------------------------------------------------------------------------ provenance
def test_provenance_of_a_preset_run(capsys, files):
    from cg4ctr_fast.cli.common import package_version

    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "a", "--steps", "1", "--out", str(out), "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert meta["package_version"] == package_version() and meta["package_version"]
    assert meta["image_sha256"] == _sha256(files / "product.png")
    assert meta["preset"] == "tiny" and meta["model"]["source"] == "preset" and meta["model"]["random_weights"]
    assert meta["lora"] is None and meta["engines"] is None and meta["saliency"] is None and meta["reward"] is None


def test_provenance_of_a_model_folder_with_lora_and_saliency(capsys, tmp_path, loras):  # noqa: F811
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules, diffusers_inpaint_pipeline
    from cg4ctr_fast.models.saliency import SaliencyConfig, U2NetP, predict_saliency, save_saliency

    model = tmp_path / "model"
    diffusers_inpaint_pipeline(build_modules(get_preset("tiny"), seed=1)).save_pretrained(str(model))
    image, _mask = make_product(40, 56, seed=4)
    image.save(tmp_path / "p.png")  # RGB without a mask: the saliency net makes it
    torch.manual_seed(0)
    net = U2NetP().eval()
    # An untrained net's map is arbitrary: its own config (size 64, threshold at the map's median, recorded in
    # the file's metadata) keeps both product and background.
    net.config = SaliencyConfig(size=64, threshold=float(np.median(predict_saliency(net, image, size=64))))
    saliency = save_saliency(net, tmp_path / "u2netp.safetensors")
    out = tmp_path / "out"
    code, err = _run(capsys, "generate", "--model", str(model), "--image",
                     str(tmp_path / "p.png"), "--saliency", str(saliency), "--lora", str(loras["diffusers"]),
                     "--lora-scale", "0.5", "--prompt", "a", "--steps", "1", "--guidance", "1", "--width", "32",
                     "--out", str(out), "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert meta["preset"] is None  # the weights came from the folder, not the preset
    assert meta["model"]["source"] == "folder" and meta["model"]["sha256"] == mf.folder_sha256(model)
    assert meta["image_sha256"] == _sha256(tmp_path / "p.png")
    assert meta["saliency"]["sha256"] == _sha256(saliency)
    lora_file_sha = _sha256(loras["diffusers"])
    assert meta["lora"]["scale"] == 0.5 and meta["lora"]["files"] == [{"role": "weights", "sha256": lora_file_sha}]
    assert meta["lora"]["sha256"] == hashlib.sha256(f"weights\0{lora_file_sha}\n".encode()).hexdigest()
    assert meta["lora"]["id"] == hashlib.sha256(f"{meta['lora']['sha256']}:0.5".encode()).hexdigest()
    # --width 32 on a 40×56 input: height 56 × 32 / 40 = 44.8, nearest multiple of 8: 48.
    assert (meta["width"], meta["height"]) == (32, 48)
    assert Image.open(out / meta["creatives"][0]["file"]).size == (40, 56)


@pytest.fixture(scope="module")
def exported_with_reward(tmp_path_factory, reward_dir):
    from tests.test_export import export_cli

    out = tmp_path_factory.mktemp("exports") / "tiny-reward"
    assert export_cli("onnx", "--preset", "tiny", "--reward", str(reward_dir), "--batch", "1:1:4", "--out", str(out)) == 0
    return out


def test_engine_folder_reward_is_attached_with_title_and_groups(capsys, files, reward_dir, exported_with_reward):
    engines = exported_with_reward
    groups = _groups_file(files)
    out = files / "out"
    code, err = _run(capsys, "generate", "--engines", str(engines), "--image", str(files / "product.png"), "--mask",
                     str(files / "mask.png"), "--prompt", "warm red", "--prompt", "cool blue studio", "--steps", "2",
                     "--title", "desk lamp", "--captions", "prompts", "--groups", str(groups), "--out", str(out),
                     "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert meta["engines"]["manifest_sha256"] == _sha256(engines / "manifest.json")
    assert meta["reward"]["source"] == "engines" and meta["preset"] is None
    records = meta["creatives"]
    assert [r["group_id"] for r in records] == ["young", "old"]  # prompt g → the g-th group of the file
    model = RewardModel.load(reward_dir)
    rows = np.asarray([g["features"] for g in json.loads(groups.read_text())[:2]], dtype=np.float32)
    want = model.score_images([out / r["file"] for r in records], ["desk lamp"] * 2, ["warm red", "cool blue studio"],
                              rows)
    np.testing.assert_allclose([r["reward"] for r in records], want, rtol=0, atol=1.1e-4)
    want_original = model.score_images([files / "product.png"] * 2, ["desk lamp"] * 2, ["", ""], rows)
    np.testing.assert_allclose([g["original_reward"] for g in meta["groups"]], want_original, rtol=0, atol=1.1e-4)

    # An explicit --reward replaces the folder's engines: the torch model scores, to REWARD_ATOL.
    out = files / "out2"
    code, err = _run(capsys, "generate", "--engines", str(engines), "--image", str(files / "product.png"), "--mask",
                     str(files / "mask.png"), "--prompt", "warm red", "--prompt", "cool blue studio", "--steps", "2",
                     "--reward", str(reward_dir), "--title", "desk lamp", "--captions", "prompts", "--groups",
                     str(groups), "--out", str(out), "--quiet")
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert meta["reward"]["source"] == "folder"
    np.testing.assert_allclose([r["reward"] for r in meta["creatives"]], want, rtol=0, atol=REWARD_ATOL)


def test_reward_flags_need_a_reward_model_even_with_engines(capsys, files, monkeypatch):
    _no_model_load(monkeypatch)
    engines = _fake_engines(files / "engines", 4, [32, 64, 128], [32, 64, 128])  # exported without --reward
    line = _one_line(capsys, "generate", "--engines", str(engines), "--image", str(files / "product.png"), "--mask",
                     str(files / "mask.png"), "--prompt", "a", "--title", "mug", "--out", str(files / "out"))
    assert "--title describe what the reward model scores" in line


def test_sim_groups_file_with_integer_ids(capsys, files, reward_dir):
    # cg4ctr-sim writes integer group ids; --group takes them as typed and creatives.json records them as text.
    groups = files / "groups.json"
    groups.write_text(json.dumps({"groups": [{"group_id": g, "features": [float(g == k) for k in range(3)]}
                                             for g in range(3)]}))
    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "warm red", "--steps", "1", "--reward", str(reward_dir), "--groups", str(groups),
                     "--group", "2", "--out", str(out), "--quiet")
    assert code == 0, err
    record = json.loads((out / "creatives.json").read_text())["creatives"][0]
    assert record["group_id"] == "2"
    want = RewardModel.load(reward_dir).score_images([out / record["file"]], [""], [""], [[0.0, 0.0, 1.0]])
    np.testing.assert_allclose([record["reward"]], want, rtol=0, atol=REWARD_ATOL)
