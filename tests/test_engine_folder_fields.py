"""A hand-edited engine folder whose manifest was re-hashed to match is refused field by field, not by a crash.

The manifest's sha256 proves a file is the one recorded, not that its values are usable: model_info.json with
`"scaling_factor": null` ended in a TypeError inside the loop, and tokenizer_config.json with
`"model_max_length": -1` in an OverflowError.  Every model_info.json field is checked for type and range when
the folder loads (InputError, one line naming the field); an unusable model_max_length falls back to the
text encoder's length (77), as the torch model-folder path does (models/tokenizer.load_clip_tokenizer).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.export import manifest as mf
from tests.conftest import make_product
from tests.test_imaging import assert_one_line_error
from tests.test_export import export_cli


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    assert export_cli("onnx", "--preset", "tiny", "--out", str(out)) == 0
    return out


def _edited(exported: Path, tmp_path: Path, relative: str, edit) -> Path:
    """A copy of the folder with one JSON file edited and re-hashed in the manifest (so only its values differ)."""
    folder = tmp_path / "edited"
    shutil.copytree(exported, folder)
    path = folder / relative
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    manifest = json.loads((folder / mf.MANIFEST).read_text())
    records = [r for r in manifest["files"] if r["path"] == relative]
    assert len(records) == 1, relative
    records[0].update(mf.file_record(folder, relative))
    mf.write_json(folder / mf.MANIFEST, manifest)
    mf.check_files(folder, manifest)  # the manifest matches: what follows is about the values alone
    return folder


def _set(field, value):
    return lambda data: data.__setitem__(field, value)


BAD_MODEL_INFO = [
    ("scaling_factor", None), ("scaling_factor", "0.18215"), ("scaling_factor", 0), ("scaling_factor", -0.2),
    ("scaling_factor", float("nan")), ("scaling_factor", True),
    ("vae_scale_factor", 0), ("vae_scale_factor", 3), ("vae_scale_factor", 8.0), ("vae_scale_factor", None),
    ("unet_in_channels", 5), ("unet_in_channels", "9"),
    ("latent_channels", 0), ("latent_channels", None),
    ("sample_size", -1), ("sample_size", 1.5),
    ("model_id", 3),
]


@pytest.mark.parametrize("field,value", BAD_MODEL_INFO, ids=[f"{f}={v!r}" for f, v in BAD_MODEL_INFO])
def test_model_info_field_refused(exported, tmp_path, field, value):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = _edited(exported, tmp_path, mf.MODEL_INFO, _set(field, value))
    with pytest.raises(InputError) as excinfo:
        CreativePipeline.from_engines(str(folder))
    assert_one_line_error(excinfo, "model_info.json", field)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("scaling_factor"), "missing scaling_factor"),
    (lambda d: d.__setitem__("extra", 1), "unknown field extra"),
], ids=["missing", "unknown"])
def test_model_info_missing_or_unknown_field(exported, tmp_path, edit, needle):
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = _edited(exported, tmp_path, mf.MODEL_INFO, edit)
    with pytest.raises(InputError) as excinfo:
        CreativePipeline.from_engines(str(folder))
    assert_one_line_error(excinfo, "model_info.json", needle)


def test_model_info_as_exported_loads(exported):
    from cg4ctr_fast.export.manifest import read_model_info

    info = read_model_info(exported)
    data = json.loads((exported / mf.MODEL_INFO).read_text())
    assert {k: getattr(info, k) for k in data} == data


BAD_LENGTHS = [-1, 0, 77.5, "77", True, None, 10**30]


@pytest.mark.parametrize("value", BAD_LENGTHS, ids=[repr(v) for v in BAD_LENGTHS])
def test_tokenizer_max_length_falls_back_like_the_torch_path(exported, tmp_path, value):
    """Both paths call load_clip_tokenizer with the encoder's length (torch: max_position_embeddings,
    engines: the graph's fixed 77); without one, an unusable length is refused in one line."""
    from cg4ctr_fast.models.tokenizer import load_clip_tokenizer

    folder = _edited(exported, tmp_path, "tokenizer/tokenizer_config.json", _set("model_max_length", value))
    assert load_clip_tokenizer(folder / "tokenizer", max_positions=77).model_max_length == 77
    if value is None or value == 10**30:
        return  # null reads as transformers' "unset" int(1e30): an int, kept when there is nothing to compare with
    with pytest.raises(InputError) as excinfo:
        load_clip_tokenizer(folder / "tokenizer")
    assert_one_line_error(excinfo, "tokenizer_config.json", "model_max_length")


def test_engine_with_negative_max_length_generates_as_unedited(exported, tmp_path):
    """The reported case: model_max_length -1 raised OverflowError; now it runs and matches the untouched folder."""
    from cg4ctr_fast.pipeline import CreativePipeline

    folder = _edited(exported, tmp_path, "tokenizer/tokenizer_config.json", _set("model_max_length", -1))
    edited, plain = CreativePipeline.from_engines(str(folder)), CreativePipeline.from_engines(str(exported))
    assert edited.components.tokenizer.model_max_length == 77
    image, mask = make_product(width=40, height=56, seed=7)  # odd, non-square size
    kwargs = dict(num_inference_steps=2, guidance_scale=7.5, output_type="np", composite=False, show_progress=False,
                  seed=11)
    got = edited(["a red sofa on a beach"], image, mask, **kwargs)[0].image
    want = plain(["a red sofa on a beach"], image, mask, **kwargs)[0].image
    # Same graphs, same inputs, same CPU session: any difference would come from the token ids (1e-6: float32).
    assert float(np.abs(got - want).max()) <= 1e-6


def test_cli_generate_with_null_scaling_factor_exits_2(exported, tmp_path, capsys):
    """The reported command: `cg4ctr generate --engines X ...` with "scaling_factor": null was an internal error."""
    from cg4ctr_fast.cli.main import main

    folder = _edited(exported, tmp_path, mf.MODEL_INFO, _set("scaling_factor", None))
    image, mask = make_product(width=32, height=32, seed=1)
    image.save(tmp_path / "p.png")
    mask.save(tmp_path / "m.png")
    code = main(["generate", "--engines", str(folder), "--image", str(tmp_path / "p.png"), "--mask",
                 str(tmp_path / "m.png"), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "scaling_factor" in err and "internal error" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("scaling_factor", None), ("vae_scale_factor", 3)])
def test_verify_refuses_what_from_engines_refuses(exported, tmp_path, field, value):
    """verify vouches for a folder only if the runtime would load it: the same model_info.json checks."""
    from cg4ctr_fast.export.verify import verify_folder

    folder = _edited(exported, tmp_path, mf.MODEL_INFO, _set(field, value))
    with pytest.raises(InputError) as excinfo:
        verify_folder(folder, log=lambda _m: None)
    assert_one_line_error(excinfo, "model_info.json", field)


def _rewrite_manifest(folder: Path, edit) -> dict:
    manifest = json.loads((folder / mf.MANIFEST).read_text())
    edit(manifest)
    mf.write_json(folder / mf.MANIFEST, manifest)
    return manifest


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_entries_outside_the_folder_are_refused(exported, tmp_path, where):
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    relative = "../outside.json" if where == "parent" else str(outside)
    record = {"path": relative, "bytes": outside.stat().st_size, "sha256": mf.sha256_file(outside)}
    manifest = _rewrite_manifest(folder, lambda m: m["files"].append(record))
    with pytest.raises(InputError) as excinfo:
        mf.check_files(folder, manifest)
    assert_one_line_error(excinfo, "not a path inside the folder", relative)


def test_a_symlinked_file_is_refused(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    target = tmp_path / "validation_elsewhere.json"
    shutil.copy2(folder / "validation.json", target)
    (folder / "validation.json").unlink()
    (folder / "validation.json").symlink_to(target)  # same bytes, so only the link itself can be refused
    with pytest.raises(InputError) as excinfo:
        mf.check_files(folder, mf.read_manifest(folder))
    assert_one_line_error(excinfo, "validation.json", "symbolic link")


def test_format_version_must_be_the_integer(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    _rewrite_manifest(folder, lambda m: m.__setitem__("format_version", str(m["format_version"])))
    with pytest.raises(InputError) as excinfo:
        mf.read_manifest(folder)
    assert_one_line_error(excinfo, 'format version "2"', "reads version 2 (an integer)")
