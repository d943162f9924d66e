"""cg4ctr-export onnx --reward: the reward model as two validated ONNX graphs, served by ONNX Runtime.

The model is a small untrained RewardModel (seconds to build, export and validate). ONNX Runtime is compared with
the torch model's own `embed_images` / `score` on random inputs with the contracts' tolerances, max|err| ≤ atol +
rtol × max|ref| (export/contracts.py: 1e-5 + 1e-4 × scale for both fp32 graphs, ≈9e-5 for embeddings of scale
0.84 and ≈3e-5 for scores ≤ 0.3); this model measured ≤ 4e-6 on the embedding and ≤ 1e-7 on the score. The
inputs are chosen so that an export bug would show: the scores spread far wider than the tolerance, none
saturated, and the token ids include rows of padding only and rows shorter than the exported length (averaging
over the padding too, a plausible export bug, moved scores by 5e-3 to 1e-2 when tried).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from cg4ctr_fast.export.contracts import PIPELINE_COMPONENTS, REWARD_COMPONENTS
from cg4ctr_fast.export.tensorrt_build import trt_profile
from cg4ctr_fast.models.reward import RewardConfig, RewardModel, Vocabulary
from tests.test_export import export_cli, one_line_error

TITLES = ["red ceramic mug", "desk lamp", "blue bag", "leather shoe strap"]
CAPTIONS = ["warm red", "cool blue studio", "fresh green", "bright"]
BATCH_MAX = 4  # the export's --batch 1:1:4: a ranking of 6 runs as 4 + 2


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    torch.manual_seed(0)
    titles, captions = Vocabulary.build(TITLES), Vocabulary.build(CAPTIONS)
    # Small sizes keep export and validation at a fraction of a second. n_heads = 2 (even) keeps the fused
    # native transformer path live in eval mode, which the exporter must switch off. The calibration is not
    # the identity, so the graph has to carry it, and its slope spreads the untrained model's scores (≈0.15 to
    # 0.3, none saturated: a saturated sigmoid would hide errors in the logits).
    config = RewardConfig(group_dim=3, title_vocab_size=len(titles), caption_vocab_size=len(captions), image_size=16,
                          image_channels=(8, 8, 16, 16), max_title_tokens=6, max_caption_tokens=4, token_dim=16,
                          tower_hidden=32, d_model=16, n_heads=2, n_layers=1, ff_dim=32, head_hidden=16,
                          calib_scale=3.0, calib_bias=-2.0)
    model = RewardModel(config, titles, captions).eval()
    return model.save(tmp_path_factory.mktemp("reward") / "model")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, reward_dir):
    out = tmp_path_factory.mktemp("exports") / "tiny-reward"
    assert export_cli("onnx", "--preset", "tiny", "--reward", str(reward_dir), "--batch", "1:1:4", "--out", str(out)) == 0
    return out


def _inputs(model: RewardModel, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    images = torch.rand(batch, 3, c.image_size, c.image_size, generator=g)
    titles = torch.randint(0, c.title_vocab_size, (batch, c.max_title_tokens), generator=g)
    captions = torch.randint(0, c.caption_vocab_size, (batch, c.max_caption_tokens), generator=g)
    titles[0] = 0  # an empty title: the mean over no tokens is zeros
    captions[-1, 1:] = 0  # one caption token
    groups = torch.randn(batch, c.group_dim, generator=g)
    return images, titles, captions, groups


def _check(got: torch.Tensor, want: torch.Tensor, tolerance, what: str) -> float:
    assert got.shape == want.shape and got.dtype == torch.float32, what
    err = float((got.cpu() - want).abs().max())
    allowed = tolerance.allowed(float(want.abs().max()))
    assert err <= allowed, f"{what}: max |onnx - torch| {err:.2e} > {allowed:.2e}"
    return allowed


# ------------------------------------------------------------------------------------------------ the folder
def test_export_lists_both_graphs_and_the_reward_files(exported, reward_dir):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert list(manifest["components"]) == [*PIPELINE_COMPONENTS, *REWARD_COMPONENTS]
    config = RewardModel.load(reward_dir).config
    image = mf.contract_of(manifest, "reward_image")
    head = mf.contract_of(manifest, "reward_head")
    assert image.input("image").shape == ("batch", 3, config.image_size, config.image_size)
    assert image.outputs[0].shape == ("batch", config.image_dim)
    assert head.input_names == ["image_embedding", "title_ids", "caption_ids", "group_features"]
    assert head.input("title_ids").shape == ("batch", config.max_title_tokens) and head.input("title_ids").dtype == "int64"
    assert head.input("caption_ids").shape == ("batch", config.max_caption_tokens)
    assert head.input("group_features").shape == ("batch", config.group_dim) and head.precision == "fp32"
    assert head.output_names == ["score"] and head.dynamic_axes()["score"] == {0: "batch"}
    # TensorRT gets a batch-only profile from the same contract (the build itself needs a GPU).
    assert dict((name, shapes) for name, *shapes in trt_profile(head))["title_ids"] == [
        (1, config.max_title_tokens), (1, config.max_title_tokens), (BATCH_MAX, config.max_title_tokens)]
    for name in REWARD_COMPONENTS:
        entry = manifest["components"][name]
        assert entry["file"] == f"{name}/model.onnx" and entry["profile"] == {"batch": [1, 1, BATCH_MAX]}
        assert entry["sha256"] == mf.sha256_file(exported / entry["file"])
    # The runtime files: config and vocabularies, not the weights (the graphs carry them).
    assert sorted(p.name for p in (exported / "reward").iterdir()) == ["config.json", "vocab.json"]
    for name in ("config.json", "vocab.json"):
        assert (exported / "reward" / name).read_bytes() == (reward_dir / name).read_bytes()
    assert [r["path"] for r in manifest["reward"]["files"]] == ["reward/config.json", "reward/vocab.json"]
    assert manifest["reward"]["config"] == config.to_dict()
    assert manifest["source"]["reward"] == str(reward_dir.resolve())
    assert manifest["source"]["reward_sha256"]["model.safetensors"] == mf.sha256_file(reward_dir / "model.safetensors")
    validation = json.loads((exported / "validation.json").read_text())
    assert validation["ok"]
    for name in REWARD_COMPONENTS:
        record = validation["components"][name]
        assert record["ok"] and [c["batch"] for c in record["checks"]] == [1, 3]
        assert (record["tolerance"]["atol"], record["tolerance"]["rtol"]) == (1e-5, 1e-4)
        for check in record["checks"]:
            assert all(o["max_abs_error"] <= o["allowed"] for o in check["outputs"].values())


# ------------------------------------------------------------------------------------------------ the runtime
def test_onnxruntime_reward_equals_torch(exported, reward_dir):
    from cg4ctr_fast.runtime.onnxruntime_backend import load_reward_engine

    model = RewardModel.load(reward_dir)
    engine = load_reward_engine(exported)
    assert engine.config == model.config and engine.title_vocab == model.title_vocab
    tol_image, tol_head = engine.image.contract.tolerance, engine.head.contract.tolerance
    for batch in (1, 3, 6):  # 6 > the profile's max 4: two calls
        images, titles, captions, groups = _inputs(model, batch, seed=batch)
        with torch.no_grad():
            want_emb = model.embed_images(images)
            want = model.score(want_emb, titles, captions, groups)
        got_emb = engine.embed_images(images)
        _check(got_emb, want_emb, tol_image, f"embed_images at batch {batch}")
        allowed = _check(engine.score(want_emb, titles, captions, groups), want, tol_head, f"score at batch {batch}")
        _check(engine(images, titles, captions, groups), want, tol_head, f"images → score at batch {batch}")
        if batch > 1:  # an export bug moves scores by their spread, far more than the tolerance
            assert float(want.max() - want.min()) > 100 * allowed
    # As in torch: batch-1 inputs broadcast, and id rows shorter than the exported length are padded.
    images, titles, captions, groups = _inputs(model, 3, seed=7)
    one_title = model.encode_titles(["red ceramic mug"])[:, :3]
    with torch.no_grad():
        emb = model.embed_images(images)
        want = model.score(emb, one_title, captions, groups[:1])
    _check(engine.score(emb, one_title, captions, groups[:1]), want, tol_head, "broadcast, short ids")
    assert engine.embed_images(images[:0]).shape == (0, model.config.image_dim)
    with pytest.raises(InputError, match="title_ids has batch"):
        engine.score(emb, titles[:2], captions, groups)
    with pytest.raises(InputError, match=r"caption_ids has shape \[3, 9\]"):
        engine.score(emb, titles, torch.zeros(3, 9, dtype=torch.long), groups)
    with pytest.raises(InputError, match="expected"):
        engine.embed_images(torch.rand(1, 3, 32, 32))  # not the image side the model was exported at


def test_onnxruntime_scores_pil_images_like_torch(exported, reward_dir):
    from cg4ctr_fast.runtime.onnxruntime_backend import load_reward_engine

    model = RewardModel.load(reward_dir)
    engine = load_reward_engine(exported)
    images = [Image.new("RGB", (40, 24), c) for c in ("red", "blue", "green")]
    want = model.pipeline_scorer(np.eye(3), title="red mug", captions=CAPTIONS[:3])(images, [0, 1, 2])
    got = engine.pipeline_scorer(np.eye(3), title="red mug", captions=CAPTIONS[:3])(images, [0, 1, 2])
    np.testing.assert_allclose(got, want, rtol=0, atol=engine.head.contract.tolerance.allowed(1.0))


# ------------------------------------------------------------------------------------------------ the pipeline
def test_engine_folder_attaches_its_reward_and_scores_like_torch(exported, reward_dir):
    """from_engines(DIR) scores every creative with the folder's reward engines, as RewardModel.pipeline_scorer
    scores the same creatives: with the defaults (no title, no caption, the default group row) and with a title,
    captions and group features set. Tolerance: the reward head's bound at scale 1 (1.1e-4, module docstring)."""
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.runtime.onnxruntime_backend import PipelineReward, default_group_features
    from tests.conftest import make_product

    model = RewardModel.load(reward_dir)
    pipe = CreativePipeline.from_engines(str(exported))
    assert isinstance(pipe.reward, PipelineReward)
    assert CreativePipeline.from_engines(str(exported), reward=False).reward is None
    tol = pipe.reward.engine.head.contract.tolerance.allowed(1.0)
    image, mask = make_product(seed=2)
    prompts = ["warm red", "cool blue studio"]  # 2 groups × 2 images: the export's batch max of 4
    creatives = pipe(prompts, image, mask, num_inference_steps=2, num_images_per_prompt=2, show_progress=False)
    images, groups = [c.image for c in creatives], [c.group for c in creatives]
    assert all(c.reward is not None and 0 < c.reward < 1 for c in creatives)
    default = np.tile(default_group_features(model.config.group_dim), (3, 1))
    assert default.shape == (3, 3) and not default.any()  # group_dim 3: no attribute known
    want = model.pipeline_scorer(default, title="", captions=None)(images, groups)
    np.testing.assert_allclose([c.reward for c in creatives], want, rtol=0, atol=tol)

    pipe.reward.title, pipe.reward.captions, pipe.reward.group_features = "red ceramic mug", prompts, np.eye(3)
    got = pipe.reward(images, groups)
    want = model.pipeline_scorer(np.eye(3), title="red ceramic mug", captions=prompts)(images, groups)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert max(want) - min(want) > 10 * tol  # groups and captions move the scores: the comparison can fail
    with pytest.raises(InputError, match="group 3 has no row"):
        pipe.reward(images[:1], [3])
    assert default_group_features(1).tolist() == [1.0]  # logs without user groups: the one feature they train on


def test_generate_from_an_engine_folder_writes_reward_scores(exported, reward_dir, tmp_path, capsys):
    from cg4ctr_fast.cli.main import main as cg4ctr_main
    from tests.conftest import make_product

    image, mask = make_product(seed=3)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    out = tmp_path / "gen"
    assert cg4ctr_main(["generate", "--engines", str(exported), "--image", str(tmp_path / "p.png"), "--mask",
                        str(tmp_path / "m.png"), "--prompt", "a", "--prompt", "b", "--steps", "2", "--out", str(out),
                        "--quiet"]) == 0
    capsys.readouterr()
    records = json.loads((out / "creatives.json").read_text())["creatives"]
    scores = [r["reward"] for r in records]
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    model = RewardModel.load(reward_dir)
    want = model.pipeline_scorer(np.zeros((2, model.config.group_dim)))(
        [Image.open(out / r["file"]) for r in records], [r["group"] for r in records])  # PNGs: the same 8-bit pixels
    np.testing.assert_allclose(scores, want, rtol=0, atol=1.1e-4)


# ------------------------------------------------------------------------------------------------ refusals
def test_verify_passes_and_refuses_a_tampered_head(exported, tmp_path, capsys):
    from cg4ctr_fast.runtime.onnxruntime_backend import load_reward_engine

    assert export_cli("verify", "--engines", str(exported)) == 0
    out = capsys.readouterr().out
    assert "reward_head" in out and "validation: passed" in out
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    head = folder / "reward_head" / "model.onnx"
    data = bytearray(head.read_bytes())
    data[-100] ^= 0xFF
    head.write_bytes(bytes(data))
    assert "reward_head/model.onnx: sha256 differs" in one_line_error(capsys, export_cli("verify", str(folder)))
    with pytest.raises(InputError, match="sha256 differs"):
        load_reward_engine(folder)
    head.write_bytes((exported / "reward_head" / "model.onnx").read_bytes())
    (folder / "reward" / "vocab.json").write_text(json.dumps({"title": ["<pad>", "<unk>"], "caption": ["<pad>", "<unk>"]}))
    assert "reward/vocab.json" in one_line_error(capsys, export_cli("verify", str(folder)))


def test_folder_without_reward_graphs_is_refused_in_one_line(exported, tmp_path):
    from cg4ctr_fast.runtime.onnxruntime_backend import load_reward_engine

    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in REWARD_COMPONENTS:
        del manifest["components"][name]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"no reward_image, reward_head .*--reward DIR"):
        load_reward_engine(folder)


@pytest.mark.parametrize("case", ["no-dir", "no-weights", "broken-config"])
def test_bad_reward_path_exits_2_in_one_line(reward_dir, tmp_path, capsys, case):
    bad = tmp_path / "reward"
    if case == "no-dir":
        needle = "no such directory"
    else:
        shutil.copytree(reward_dir, bad)
        if case == "no-weights":
            (bad / "model.safetensors").unlink()
            needle = "model.safetensors missing"
        else:
            (bad / "config.json").write_text("{not json")
            needle = "config.json"
    out = tmp_path / "out"
    code = export_cli("onnx", "--preset", "tiny", "--reward", str(bad), "--out", str(out))
    assert needle in one_line_error(capsys, code)
    assert not out.exists()
