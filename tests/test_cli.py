"""`cg4ctr generate` end to end: outputs, and every bad input as one line on stderr with exit code 2."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cg4ctr_fast.cli.main import main
from tests.conftest import make_product


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture()
def files(tmp_path):
    image, mask = make_product(52, 44, seed=3)
    image.save(tmp_path / "product.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path


def _png_with_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG header claiming width × height (correct CRC), with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_generate_writes_creatives(capsys, files):
    out = files / "out"
    code, err = _run(
        capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
        "--prompt", "warm beach", "--prompt", "cool studio", "--steps", "2", "--out", str(out), "--quiet",
    )
    assert code == 0, err
    meta = json.loads((out / "creatives.json").read_text())
    assert [r["group"] for r in meta["creatives"]] == [0, 1]
    original = np.asarray(Image.open(files / "product.png").convert("RGB"))
    keep = np.asarray(Image.open(files / "mask.png")) < 128
    for record in meta["creatives"]:
        assert record["model_id"].startswith("preset:tiny")
        assert isinstance(record["seed"], int)
        creative = np.asarray(Image.open(out / record["file"]))
        assert creative.shape == original.shape  # 52×44 is not a multiple of 8: restored to the original size
        assert np.array_equal(creative[keep], original[keep])
    assert (out / meta["creatives"][0]["mask_file"]).is_file()
    assert not [p for p in files.iterdir() if p.name.startswith(".out")]  # no temporary folder left


def test_generate_is_reproducible(capsys, files):
    args = ["generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
            "--prompt", "warm beach", "--steps", "2", "--quiet", "--seed", "7"]
    assert _run(capsys, *args, "--out", str(files / "a"))[0] == 0
    assert _run(capsys, *args, "--out", str(files / "b"))[0] == 0
    a = np.asarray(Image.open(files / "a" / "creative_g000_00.png"))
    b = np.asarray(Image.open(files / "b" / "creative_g000_00.png"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_other_modes_are_converted(capsys, files, mode):
    Image.open(files / "product.png").convert(mode).save(files / f"p.{'jpg' if mode == 'CMYK' else 'png'}")
    path = files / f"p.{'jpg' if mode == 'CMYK' else 'png'}"
    code, err = _run(capsys, "generate", "--image", str(path), "--mask", str(files / "mask.png"),
                     "--prompt", "x", "--steps", "1", "--out", str(files / "o"), "--quiet")
    assert code == 0, err
    assert Image.open(files / "o" / "creative_g000_00.png").mode == "RGB"


def _bad_image(tmp: Path, kind: str) -> Path:
    path = tmp / "bad.png"
    good = io.BytesIO()
    make_product(64, 64)[0].save(good, format="PNG")
    if kind == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif kind == "truncated":
        path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    elif kind == "not-an-image":
        path.write_text("item_id,clicks\n1,2\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero-size":
        path.write_bytes(_png_with_size(0, 10))
    elif kind == "too-large":
        Image.new("1", (5000, 8)).save(path)
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize(
    "kind", ["corrupt", "truncated", "not-an-image", "empty", "zero-size", "too-large", "missing"]
)
def test_bad_image_files(capsys, files, kind):
    path = _bad_image(files, kind)
    out = files / "out"
    code, err = _run(capsys, "generate", "--image", str(path), "--mask", str(files / "mask.png"),
                     "--prompt", "x", "--out", str(out))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("cg4ctr: error:") and "Traceback" not in err
    assert "bad.png" in err
    assert not out.exists()


def test_decompression_bomb(capsys, files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 52×44 product is then over twice the limit
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "x", "--out", str(files / "out"))
    assert code == 2 and err.count("\n") == 1
    assert not (files / "out").exists()


@pytest.mark.parametrize("case", ["size", "empty", "full"])
def test_bad_masks(capsys, files, case):
    if case == "size":
        Image.new("L", (40, 40), 255).save(files / "m2.png")
        needle = "40×40"
    elif case == "empty":
        Image.new("L", (52, 44), 0).save(files / "m2.png")
        needle = "nothing to repaint"
    else:
        Image.new("L", (52, 44), 255).save(files / "m2.png")
        needle = "no product"
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--mask", str(files / "m2.png"),
                     "--prompt", "x", "--out", str(files / "out"))
    assert code == 2 and err.count("\n") == 1 and needle in err
    assert not (files / "out").exists()


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "-3"], "--steps"),
        (["--strength", "1.5"], "--strength"),
        (["--strength", "-0.1"], "--strength"),
        (["--strength", "0"], "--strength"),
        (["--guidance", "-1"], "--guidance"),
        (["--guidance", "nan"], "--guidance"),
        (["--images-per-prompt", "0"], "--images-per-prompt"),
        (["--steps", "abc"], "--steps"),
        (["--preset", "huge"], "unknown preset"),
        (["--preset", "sd15-inpaint"], "--model"),
    ],
)
def test_bad_numbers_and_options(capsys, files, flags, needle):
    argv = ["generate", "--image", str(files / "product.png"), "--mask", str(files / "mask.png"),
            "--prompt", "x", "--out", str(files / "out"), *flags]
    try:
        code, err = _run(capsys, *argv)
    except SystemExit as exc:  # argparse's own errors exit through SystemExit
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (files / "out").exists()


def test_no_mask_and_no_saliency(capsys, files):
    code, err = _run(capsys, "generate", "--image", str(files / "product.png"), "--prompt", "x",
                     "--out", str(files / "out"))
    assert code == 2 and "no mask" in err


def test_rgba_alpha_is_the_mask(capsys, files):
    image, mask = make_product(48, 40, seed=4)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))  # product opaque, background transparent
    rgba.save(files / "rgba.png")
    code, err = _run(capsys, "generate", "--image", str(files / "rgba.png"), "--prompt", "x", "--steps", "1",
                     "--out", str(files / "out"), "--quiet")
    assert code == 0, err
    creative = np.asarray(Image.open(files / "out" / "creative_g000_00.png"))
    keep = np.asarray(mask) < 128
    assert np.array_equal(creative[keep], np.asarray(image)[keep])


def test_console_script_reports_without_traceback(files):
    result = subprocess.run(
        [sys.executable, "-m", "cg4ctr_fast.cli.main", "generate", "--image", str(files / "nope.png"),
         "--prompt", "x", "--out", str(files / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.png" in result.stderr
