"""EXIF orientation: the product is kept as a viewer displays it, whatever type the image arrives as.

Before one load path existed, a PIL image passed to the pipeline was not oriented while its mask was: for a
square photo with Orientation 6, 0 % of the displayed product survived. Each EXIF orientation 2-8, on a
square and a non-square photo, given as a path, as bytes and as a PIL image, must keep every displayed
product pixel bit for bit (a copy, so no tolerance).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cg4ctr_fast.imaging import load_image, load_product
from cg4ctr_fast.pipeline import CreativePipeline
from tests.conftest import make_product

ORIENTATION = 0x0112

# What a viewer shows for a stored array S with each EXIF orientation (TIFF/EXIF 2.3 definitions), written
# with numpy so the reference does not come from the code under test (Pillow's exif_transpose).
DISPLAYED = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, *range(2, a.ndim)),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # stored rotated 90° counter-clockwise: shown turned 90° clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, *range(2, a.ndim)),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # shown turned 90° counter-clockwise
}
STORED = {o: f for o, f in DISPLAYED.items()}
STORED[6], STORED[8] = DISPLAYED[8], DISPLAYED[6]  # the two rotations undo each other; the rest are involutions


def _png_with_orientation(stored: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buffer, "PNG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipe():
    return CreativePipeline.from_preset("tiny")


def _as(kind: str, data: bytes, tmp_path):
    if kind == "path":
        path = tmp_path / "photo.png"
        path.write_bytes(data)
        return path
    if kind == "bytes":
        return data
    return Image.open(io.BytesIO(data))  # lazily opened, as a user's Image.open gives it


@pytest.mark.parametrize("orientation", range(2, 9))
def test_reference_table_is_consistent(orientation):
    a = np.arange(3 * 5 * 3).reshape(3, 5, 3)
    assert np.array_equal(DISPLAYED[orientation](STORED[orientation](a)), a)
    # ...and agrees with what Pillow shows for a file carrying the tag.
    shown = load_image(_png_with_orientation(a.astype(np.uint8), orientation))
    assert np.array_equal(np.asarray(shown), DISPLAYED[orientation](a.astype(np.uint8)))


@pytest.mark.parametrize("kind", ["path", "bytes", "pil"])
@pytest.mark.parametrize("size", [(40, 40), (48, 30)])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_displayed_product_survives_bit_exact(pipe, tmp_path, orientation, size, kind):
    width, height = size  # as displayed
    displayed, mask = make_product(width, height, seed=orientation * 7 + width)
    shown = np.asarray(displayed)
    stored = STORED[orientation](shown)
    image = _as(kind, _png_with_orientation(stored, orientation), tmp_path)
    creative = pipe(["warm"], image, mask, num_inference_steps=1, show_progress=False)[0]
    out = np.asarray(creative.image)
    keep = np.asarray(mask) < 128
    assert out.shape == shown.shape
    assert np.array_equal(out[keep], shown[keep])
    assert np.array_equal(np.asarray(creative.mask), np.asarray(mask))


@pytest.mark.parametrize("orientation", range(2, 9))
def test_rgba_cutout_alpha_follows_the_displayed_orientation(pipe, orientation):
    """No mask: the alpha makes it, and alpha, colours and composite must all be turned the same way."""
    width, height = 45, 29
    displayed, mask = make_product(width, height, seed=orientation)
    rgba = np.dstack([np.asarray(displayed), np.where(np.asarray(mask) < 128, 255, 0).astype(np.uint8)])
    data = _png_with_orientation(STORED[orientation](rgba), orientation)
    image = Image.open(io.BytesIO(data))
    creative = pipe(["cool"], image, None, num_inference_steps=1, show_progress=False)[0]
    keep = rgba[..., 3] == 255
    assert np.array_equal(np.asarray(creative.image)[keep], rgba[..., :3][keep])
    assert np.array_equal(np.asarray(creative.mask), np.where(keep, 0, 255).astype(np.uint8))


def test_every_input_type_loads_the_same_product(tmp_path):
    displayed, _ = make_product(37, 23, seed=3)
    data = _png_with_orientation(STORED[6](np.asarray(displayed)), 6)
    loaded = [load_product(_as(kind, data, tmp_path)) for kind in ("path", "bytes", "pil")]
    for product in loaded:
        assert np.array_equal(np.asarray(product.rgb), np.asarray(displayed))
    # Loading an already oriented image again does not turn it a second time.
    again = load_product(load_image(data))
    assert np.array_equal(np.asarray(again.rgb), np.asarray(displayed))


def test_pil_image_passed_in_is_not_modified():
    displayed, mask = make_product(32, 24, seed=1)
    data = _png_with_orientation(STORED[8](np.asarray(displayed)), 8)
    image = Image.open(io.BytesIO(data))
    image.load()
    before = np.asarray(image).copy()
    load_product(image)
    assert image.size == (before.shape[1], before.shape[0])
    assert np.array_equal(np.asarray(image), before)
    assert image.getexif().get(ORIENTATION) == 8
