"""Engine folders are what their manifest says, file by file, and their sources are recognised by content.

- Every file an ONNX folder needs is hashed in its manifest; one flipped byte in any of them (graph, external
  data, tokenizer, scheduler, model_info.json, validation.json, reward config / vocabulary) or one added file
  is refused in one line naming the file, by `cg4ctr-export verify` (exit 2) and by `from_engines`.
- Sources are recorded by content (LoRA sha256 + scale, model folder content hash), so `verify` runs from any
  directory, finds a moved source given by flag, and refuses a different one.
- --height/--width take MIN:OPT:MAX: a folder exported with a range runs at two sizes in ONNX Runtime and
  equals the torch pipeline there (float outputs, the tolerance of tests/test_export.py: 5e-4 on [0, 1]).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from tests.conftest import make_product
from tests.test_export import PIPE_TOL, export_cli, loras, one_line_error  # noqa: F401 - loras is a fixture
from tests.test_export_reward import reward_dir  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def saliency_file(tmp_path_factory):
    from cg4ctr_fast.models.saliency import U2NetP, save_saliency

    torch.manual_seed(0)
    return save_saliency(U2NetP().eval(), tmp_path_factory.mktemp("sal") / "u2netp.safetensors")


@pytest.fixture(scope="module")
def full(tmp_path_factory, saliency_file, reward_dir):  # noqa: F811
    """Every kind of file: the pipeline graphs, saliency, the reward graphs and reward/ files; the UNet's
    weights in an external data file (the path SD1.5's 3.4 GB UNet takes, forced here at any size)."""
    from cg4ctr_fast.export import onnx_export

    out = tmp_path_factory.mktemp("exports") / "full"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
        assert export_cli("onnx", "--preset", "tiny", "--saliency", str(saliency_file), "--reward", str(reward_dir),
                          "--batch", "1:1:2", "--out", str(out)) == 0
    return out


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# One of each kind; every one of them changes what the folder generates or scores.
FLIPPED = [
    "unet/model.onnx",
    "unet/model.onnx.data",
    "saliency/model.onnx",
    "reward_head/model.onnx",
    "scheduler/scheduler_config.json",
    "model_info.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/tokenizer.json",
    "reward/config.json",
    "reward/vocab.json",
    "validation.json",
]


def test_manifest_lists_every_file(full):
    manifest = json.loads((full / "manifest.json").read_text())
    listed = {r["path"] for r in manifest["files"]}
    listed |= {f["path"] for e in manifest["components"].values() for f in e["files"]}
    on_disk = {p.relative_to(full).as_posix() for p in full.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk and set(FLIPPED) <= on_disk
    assert [f["path"] for f in manifest["components"]["unet"]["files"]] == ["unet/model.onnx", "unet/model.onnx.data"]
    for record in manifest["files"]:
        assert record["sha256"] == mf.sha256_file(full / record["path"])


@pytest.mark.parametrize("relative", FLIPPED)
def test_one_flipped_byte_in_any_file_is_refused(full, tmp_path, capsys, relative):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = tmp_path / "copy"
    shutil.copytree(full, folder)
    _flip(folder / relative)
    line = one_line_error(capsys, export_cli("verify", "--engines", str(folder)))
    assert f"{folder / relative}: sha256 differs from the manifest" in line
    with pytest.raises(InputError, match="sha256 differs") as caught:
        CreativePipeline.from_engines(str(folder))
    assert str(folder / relative) in str(caught.value)


def test_an_added_file_is_refused(full, tmp_path, capsys):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = tmp_path / "copy"
    shutil.copytree(full, folder)
    added = folder / "tokenizer" / "added_tokens.json"  # transformers would read it and tokenise differently
    added.write_text('{"sunset": 49408}')
    assert f"{added}: not listed in the manifest" in one_line_error(capsys, export_cli("verify", "--engines", str(folder)))
    with pytest.raises(InputError, match="not listed in the manifest"):
        CreativePipeline.from_engines(str(folder))


def test_a_cost_table_written_after_export_is_allowed(full, tmp_path, capsys):
    """`cg4ctr-bench --calibrate --engines` writes cost_table.json beside the engines: it describes the machine,
    not the engines, so verification accepts it, while the same name in a subfolder is still an added file."""
    folder = tmp_path / "copy"
    shutil.copytree(full, folder)
    (folder / mf.COST_TABLE).write_text("{}")
    assert export_cli("verify", "--engines", str(folder)) == 0
    capsys.readouterr()
    (folder / "tokenizer" / mf.COST_TABLE).write_text("{}")
    assert "not listed in the manifest" in one_line_error(capsys, export_cli("verify", "--engines", str(folder)))


def test_a_version_1_folder_is_refused(full, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(full, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1  # version 1 left its tokenizer, scheduler and model_info unchecked
    del manifest["files"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "format version 1" in one_line_error(capsys, export_cli("verify", "--engines", str(folder)))


def test_large_graphs_are_size_checked_at_load_and_hashed_by_verify(full, tmp_path, capsys, monkeypatch):
    from cg4ctr_fast.runtime.onnxruntime_backend import onnxruntime_components

    folder = tmp_path / "copy"
    shutil.copytree(full, folder)
    _flip(folder / "unet" / "model.onnx.data")
    _flip(folder / "model_info.json")
    monkeypatch.setattr(mf, "LOAD_HASH_BYTES", 1000)  # every graph counts as large here; model_info.json does not
    with pytest.raises(InputError, match="model_info.json: sha256 differs"):
        onnxruntime_components(folder)
    (folder / "model_info.json").write_bytes((full / "model_info.json").read_bytes())
    onnxruntime_components(folder)  # same size: loads (the documented cost trade-off)
    assert "unet/model.onnx.data: sha256 differs" in one_line_error(capsys, export_cli("verify", "--engines", str(folder)))


# ------------------------------------------------------------------------------------------------ provenance
def test_lora_is_recorded_by_content_not_path(loras, tmp_path, monkeypatch, capsys):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy2(loras["diffusers"], work / "style.safetensors")
    monkeypatch.chdir(work)
    assert export_cli("onnx", "--preset", "tiny", "--components", "unet", "--lora", "style.safetensors",
                      "--lora-scale", "0.7", "--out", "engines") == 0
    folder = work / "engines"
    record = json.loads((folder / "manifest.json").read_text())["lora"]
    assert record["sha256"] and record["scale"] == 0.7 and record["source"] == str((work / "style.safetensors").resolve())
    capsys.readouterr()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the path typed at export was relative: the hint is absolute
    assert export_cli("verify", "--engines", str(folder)) == 0
    capsys.readouterr()

    moved = tmp_path / "moved" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(str(work / "style.safetensors"), moved)
    line = one_line_error(capsys, export_cli("verify", "--engines", str(folder)))
    assert "LoRA not found at" in line and "pass --lora FILE" in line
    assert export_cli("verify", "--engines", str(folder), "--lora", str(moved)) == 0  # found by content
    capsys.readouterr()
    code = export_cli("verify", "--engines", str(folder), "--lora", str(loras["kohya"]))  # same weights, other file
    assert "is not the one this folder was exported with" in one_line_error(capsys, code)


def test_model_folder_is_recorded_by_content_hash(tmp_path, capsys):
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules, diffusers_inpaint_pipeline

    model = tmp_path / "model"
    diffusers_inpaint_pipeline(build_modules(get_preset("tiny"), seed=1)).save_pretrained(str(model))
    folder = tmp_path / "engines"
    assert export_cli("onnx", "--model", str(model), "--components", "text_encoder", "--out", str(folder)) == 0
    source = json.loads((folder / "manifest.json").read_text())["source"]
    assert source["model_sha256"] == mf.folder_sha256(model) and source["model"] == str(model.resolve())
    capsys.readouterr()

    moved = tmp_path / "moved"
    shutil.move(str(model), moved)
    assert "pass --model DIR" in one_line_error(capsys, export_cli("verify", "--engines", str(folder)))
    assert export_cli("verify", "--engines", str(folder), "--model", str(moved)) == 0
    capsys.readouterr()
    config = moved / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    data["beta_end"] = data["beta_end"] * 1.01  # another noise schedule: other images
    config.write_text(json.dumps(data))
    code = export_cli("verify", "--engines", str(folder), "--model", str(moved))
    assert "differs from the one this folder was exported with" in one_line_error(capsys, code)


# ------------------------------------------------------------------------------------------------ --out rule
def test_existing_out_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "engines"
    args = ("onnx", "--preset", "tiny", "--components", "text_encoder", "--out", str(out))
    assert export_cli(*args) == 0
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    assert "--overwrite" in one_line_error(capsys, export_cli(*args))
    assert (out / "manifest.json").read_bytes() == before
    assert export_cli(*args, "--overwrite", "--seed", "1") == 0
    assert json.loads((out / "manifest.json").read_text())["source"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ side ranges
def test_a_side_range_runs_at_two_sizes_like_torch(tmp_path):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = tmp_path / "ranged"
    assert export_cli("onnx", "--preset", "tiny", "--batch", "1:1:2", "--height", "48:64:96", "--width", "64:64:96",
                      "--out", str(folder)) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["height"] == [48, 64, 96] and manifest["settings"]["width"] == [64, 64, 96]
    assert manifest["components"]["vae_encoder"]["profile"]["height"] == [48, 64, 96]
    sizes = {tuple(c["values"].get(k) for k in ("height", "width"))
             for c in json.loads((folder / "validation.json").read_text())["components"]["vae_encoder"]["checks"]}
    assert sizes == {(64, 64), (96, 96), (48, 64)}  # opt, max and min validated

    ours = CreativePipeline.from_engines(str(folder))
    reference = CreativePipeline.from_preset("tiny")
    prompts = ["warm beach at sunset", "cool blue studio"]
    for height, width in ((64, 64), (96, 80)):
        image, mask = make_product(width=width, height=height, seed=height)
        kwargs = dict(num_inference_steps=2, guidance_scale=7.5, height=height, width=width, output_type="np",
                      composite=False, show_progress=False)
        got, want = ours(prompts, image, mask, **kwargs), reference(prompts, image, mask, **kwargs)
        assert got[0].image.shape == (height, width, 3)
        err = max(float(np.abs(a.image - b.image).max()) for a, b in zip(got, want))
        assert err <= PIPE_TOL, f"{height}x{width}: max abs error {err:.2e} > {PIPE_TOL}"
    image, mask = make_product(width=64, height=104, seed=5)
    with pytest.raises(InputError, match="outside the exported profile"):
        ours(prompts, image, mask, num_inference_steps=1, height=104, width=64, show_progress=False)
