"""The exported saliency net runs at its own size and threshold, as the torch path runs it.

A net trained by `cg4ctr-train saliency` records its input side and threshold (config.json, safetensors
metadata). The export makes that side the saliency profile's opt and writes saliency/config.json (hashed by the
manifest); ONNX Runtime (and TensorRT) run the graph with it, so `from_engines` makes the same mask as torch.

Tolerance on the soft maps (float32 H × W in [0, 1], min-max normalised as the official normPRED does):
SOFT_TOL = 1e-4. The graph and the torch net do the same fp32 math in another order: the raw sigmoid maps
differed by 6e-8 here (validation.json). Min-max normalisation divides that by the raw map's span, 0.008 for this
seeded random net (a trained net spans ≈ 1), so the normalised maps differ by 7e-6 (measured, printed by the
test): 1e-4 leaves 14× margin. A net run at the wrong size (320 instead of its 44) moves the map by more than
1e-2 (asserted), two orders above the tolerance.
Masks are compared exactly: the threshold is put in the middle of a gap of the torch map that is far wider
than SOFT_TOL (asserted), so no pixel can change side by float reordering alone.
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

SIZE = 44  # not 320, not a multiple of 32 (U²-Net-p pools 5 times with ceil_mode)
SOFT_TOL = 1e-4


def _export(*args: str) -> int:
    from cg4ctr_fast.cli.export import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code)


def _gap_threshold(saliency: np.ndarray) -> tuple[float, float]:
    """(threshold, half gap): the midpoint of the widest gap between the map's sorted values in its middle half,
    so that both product and background exist and no pixel lies near the threshold."""
    values = np.unique(saliency.ravel())
    lo, hi = len(values) // 4, 3 * len(values) // 4
    gaps = np.diff(values[lo:hi])
    i = int(np.argmax(gaps))
    return float(values[lo + i] + gaps[i] / 2), float(gaps[i] / 2)


@pytest.fixture(scope="module")
def image():
    picture, _ = make_product(57, 41, seed=4)  # odd sides: the map is resized back to 57 × 41
    return picture


@pytest.fixture(scope="module")
def trained(tmp_path_factory, image):
    """A `cg4ctr-train saliency` folder (save_trained_saliency) for a seeded random net at SIZE px, and the
    threshold it records."""
    from cg4ctr_fast.models.saliency import U2NetP, predict_saliency
    from cg4ctr_fast.training.saliency import save_trained_saliency

    torch.manual_seed(3)
    net = U2NetP().eval()
    threshold, half_gap = _gap_threshold(predict_saliency(net, image, size=SIZE))
    assert half_gap > 5 * SOFT_TOL, half_gap  # the mask comparison below cannot flip on float reordering
    folder = save_trained_saliency(net, {"config": {"size": SIZE, "threshold": threshold}},
                                   tmp_path_factory.mktemp("sal") / "saliency")
    return folder, threshold


@pytest.fixture(scope="module")
def engines(tmp_path_factory, trained):
    folder, _ = trained
    out = tmp_path_factory.mktemp("exports") / "tiny-sal"
    assert _export("onnx", "--preset", "tiny", "--saliency", str(folder), "--batch", "1:1:2", "--out", str(out)) == 0
    return out


def test_export_records_the_nets_size_and_threshold(engines, trained):
    folder, threshold = trained
    manifest = json.loads((engines / mf.MANIFEST).read_text())
    entry = manifest["components"]["saliency"]
    assert entry["profile"]["height"] == [SIZE // 5, SIZE, 2 * SIZE]
    assert entry["profile"]["width"] == [SIZE // 5, SIZE, 2 * SIZE]
    recorded = json.loads((engines / mf.SALIENCY_CONFIG).read_text())
    assert recorded["size"] == SIZE and recorded["threshold"] == threshold and entry["config"] == recorded
    assert mf.SALIENCY_CONFIG in {f["path"] for f in entry["files"]}  # hashed with the graph
    assert manifest["source"]["saliency_sha256"] == mf.folder_sha256(folder)  # weights and config.json
    # validation ran at the net's own size
    checks = json.loads((engines / mf.VALIDATION).read_text())["components"]["saliency"]["checks"]
    assert checks and all(c["values"]["height"] == SIZE for c in checks), checks


def test_from_engines_makes_the_torch_mask(engines, trained, image):
    from cg4ctr_fast.models.saliency import load_saliency, mask_from_saliency, predict_saliency
    from cg4ctr_fast.pipeline import CreativePipeline

    folder, threshold = trained
    net = load_saliency(folder)
    engine_pipe = CreativePipeline.from_engines(str(engines))
    assert engine_pipe.saliency_settings() == (SIZE, threshold)

    want = predict_saliency(net, image, size=SIZE)
    got = predict_saliency(engine_pipe.saliency, image, size=engine_pipe.saliency_settings()[0])
    error = float(np.abs(got - want).max())
    print(f"max |onnxruntime - torch| on the normalised soft map: {error:.2e}")
    assert got.shape == want.shape == (41, 57) and got.dtype == np.float32
    assert error <= SOFT_TOL
    at_320 = predict_saliency(net, image, size=320)
    assert float(np.abs(at_320 - want).max()) > 100 * SOFT_TOL  # the test tells the sizes apart

    torch_pipe = CreativePipeline.from_preset("tiny", saliency=str(folder))  # `cg4ctr generate --saliency`
    expected = torch_pipe.product_mask(image)
    assert np.array_equal(np.asarray(expected), np.asarray(mask_from_saliency(want, threshold)))
    keep = np.asarray(expected) == 0
    assert 0 < keep.sum() < keep.size
    assert np.array_equal(np.asarray(engine_pipe.product_mask(image)), np.asarray(expected))
    wrong = mask_from_saliency(at_320, threshold)
    assert not np.array_equal(np.asarray(wrong), np.asarray(expected))  # what a 320-px engine gave
    # and through the whole call, as `cg4ctr generate --engines` runs it
    creative = engine_pipe("warm", image, None, num_inference_steps=1, show_progress=False)[0]
    assert np.array_equal(np.asarray(creative.mask), np.asarray(expected))
    assert np.array_equal(np.asarray(creative.image)[keep], np.asarray(image)[keep])


def test_changed_or_missing_saliency_config_is_refused(engines, trained, tmp_path):
    from cg4ctr_fast.pipeline import CreativePipeline

    edited = tmp_path / "edited"
    shutil.copytree(engines, edited)
    config = json.loads((edited / mf.SALIENCY_CONFIG).read_text())
    (edited / mf.SALIENCY_CONFIG).write_text(json.dumps({**config, "size": 320}))
    with pytest.raises(InputError, match="saliency/config.json") as excinfo:
        CreativePipeline.from_engines(str(edited))
    assert "\n" not in str(excinfo.value)

    # A folder exported before the size was recorded: no config.json beside the graph.
    old = tmp_path / "old"
    shutil.copytree(engines, old)
    (old / mf.SALIENCY_CONFIG).unlink()
    manifest = json.loads((old / mf.MANIFEST).read_text())
    entry = manifest["components"]["saliency"]
    entry["files"] = [f for f in entry["files"] if f["path"] != mf.SALIENCY_CONFIG]
    entry.pop("config")
    (old / mf.MANIFEST).write_text(json.dumps(manifest))
    old_pipe = CreativePipeline.from_engines(str(old))  # loads: a given mask needs no saliency net
    image, mask = make_product(64, 64, seed=1)
    assert np.array_equal(np.asarray(old_pipe.product_mask(image, mask)), np.asarray(mask))
    with pytest.raises(InputError, match="no saliency/config.json.*re-export") as excinfo:
        old_pipe.product_mask(image)  # running its net is refused: it would run at 320 px whatever it learned
    assert "\n" not in str(excinfo.value)
    # With the torch weights named instead, the folder still runs, at the net's own size.
    folder, threshold = trained
    assert CreativePipeline.from_engines(str(old), saliency=str(folder)).saliency_settings() == (SIZE, threshold)


def test_engine_build_carries_the_saliency_config(engines, tmp_path):
    """`cg4ctr-export engine` copies saliency/config.json beside the plan and lists it (pure Python part)."""
    from cg4ctr_fast.export.tensorrt_build import _copy_side_files

    manifest = json.loads((engines / mf.MANIFEST).read_text())
    (tmp_path / "saliency").mkdir()
    records = _copy_side_files(engines, tmp_path, manifest["components"]["saliency"])
    assert [r["path"] for r in records] == [mf.SALIENCY_CONFIG]
    assert (tmp_path / mf.SALIENCY_CONFIG).read_bytes() == (engines / mf.SALIENCY_CONFIG).read_bytes()
    assert _copy_side_files(engines, tmp_path, manifest["components"]["unet"]) == []


def test_saliency_profile_follows_the_nets_size():
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.export.contracts import ExportSettings, StackDims, build_contracts

    stack = StackDims.from_preset(get_preset("tiny"))
    default = build_contracts(stack, ExportSettings(), ["saliency"])["saliency"]
    assert default.profile_dict() == {"batch": [1, 1, 8], "height": [64, 320, 640], "width": [64, 320, 640]}
    own = build_contracts(stack, ExportSettings(), ["saliency"], saliency_size=SIZE)["saliency"]
    assert own.profile_dict()["height"] == [8, SIZE, 2 * SIZE]
    assert all(point["height"] == SIZE for point in own.validation_points())
    with pytest.raises(InputError, match="saliency size"):
        build_contracts(stack, ExportSettings(), ["saliency"], saliency_size=0)
