"""Colour profiles: a photo with an embedded wide-gamut or CMYK ICC profile keeps the colours a viewer shows.

The product is converted to sRGB on load (`imaging.to_srgb`, Pillow's ImageCms, relative colorimetric) and
the creatives are written without a profile, i.e. as sRGB. "Product pixels bit-exact" then means: bit-exact to
ImageCms's own transform of the input, which is the reference here (no tolerance: the composite copies them).
The profiles are built in the test, byte by byte from the ICC v2 format (Pillow's createProfile only makes
sRGB, LAB and XYZ): a Display-P3-like matrix/TRC profile (P3 primaries adapted to D50, gamma 2.2) and a
naive CMYK press profile (a lut8 A2B0 table to Lab).
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

from cg4ctr_fast.imaging import load_product, to_srgb
from cg4ctr_fast.pipeline import CreativePipeline
from tests.conftest import make_product

INTENT = ImageCms.Intent.RELATIVE_COLORIMETRIC


# ------------------------------------------------------------------------------------------ profiles
def _s15(x: float) -> bytes:
    return struct.pack(">i", int(round(x * 65536)))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def _gamma_curve(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, int(round(gamma * 256))) + bytes(2)


def _description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    # textDescriptionType: ASCII part, then empty Unicode and ScriptCode parts.
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(8) + bytes(3) + bytes(67)


def _profile(tags, colour_space: bytes, pcs: bytes, device_class: bytes) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        data += bytes(-(offset + len(data)) % 4)  # every tag starts on a 4-byte boundary
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    data += bytes(-len(data) % 4)
    header = (struct.pack(">I", offset + len(data)) + b"lcms" + struct.pack(">I", 0x02100000) + device_class
              + colour_space + pcs + bytes(12) + b"acsp" + b"APPL" + bytes(4 + 4 + 4 + 8 + 4)
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(4 + 16 + 28))
    assert len(header) == 128
    return header + table + data


def display_p3_like() -> bytes:
    """Display P3 primaries (D50-adapted colorants, as in Apple's profile) with a gamma-2.2 tone curve."""
    return _profile(
        [(b"desc", _description("Display P3 (test)")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
         (b"rXYZ", _xyz(0.5151, 0.2412, -0.0011)), (b"gXYZ", _xyz(0.2919, 0.6922, 0.0419)),
         (b"bXYZ", _xyz(0.1571, 0.0666, 0.7841)),
         (b"rTRC", _gamma_curve(2.2)), (b"gTRC", _gamma_curve(2.2)), (b"bTRC", _gamma_curve(2.2))],
        b"RGB ", b"XYZ ", b"mntr")


# Lab of the ink combinations (roughly coated offset inks); K alone is black.
_INK_LAB = {(0, 0, 0): (100, 0, 0), (1, 0, 0): (55, -37, -50), (0, 1, 0): (48, 74, -3), (0, 0, 1): (89, -5, 93),
            (1, 1, 0): (25, 20, -46), (1, 0, 1): (50, -65, 27), (0, 1, 1): (47, 68, 48), (1, 1, 1): (10, 0, 0)}


def naive_cmyk() -> bytes:
    """A CMYK output profile: lut8 A2B0 with 2 grid points per ink, identity curves, Lab PCS."""
    ramp = bytes(range(256))
    body = b"mft1" + bytes(4) + bytes([4, 3, 2, 0])
    body += b"".join(_s15(1.0 if i == j else 0.0) for i in range(3) for j in range(3))
    body += ramp * 4
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lab = (0, 0, 0) if k else _INK_LAB[(c, m, y)]
                    body += bytes([round(lab[0] * 255 / 100), lab[1] + 128, lab[2] + 128])
    body += ramp * 3
    return _profile([(b"desc", _description("naive CMYK (test)")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
                     (b"A2B0", body)], b"CMYK", b"Lab ", b"prtr")


def _reference(img: Image.Image, icc: bytes) -> np.ndarray:
    """ImageCms's own transform of the decoded pixels: the sRGB the product must keep."""
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return np.asarray(ImageCms.profileToProfile(img, source, srgb, outputMode="RGB", renderingIntent=INTENT))


def _encode(img: Image.Image, fmt: str, icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    kwargs = {"icc_profile": icc} if icc else {}
    if fmt == "JPEG":
        kwargs["quality"] = 95
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _random_rgb(width=37, height=23, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _source(kind: str, data: bytes, tmp_path):
    if kind == "path":
        (tmp_path / "photo").write_bytes(data)
        return tmp_path / "photo"
    return data if kind == "bytes" else Image.open(io.BytesIO(data))


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["path", "bytes", "pil"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_display_p3_is_converted_to_srgb(tmp_path, fmt, kind):
    icc = display_p3_like()
    data = _encode(_random_rgb(seed=1), fmt, icc)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")  # the file's own pixels, P3-encoded
    expected = _reference(decoded, icc)
    product = load_product(_source(kind, data, tmp_path))
    got = np.asarray(product.rgb)
    assert np.array_equal(got, expected)
    assert "icc_profile" not in product.rgb.info
    # The conversion matters: dropping the profile would shift colours by tens of 8-bit steps.
    assert np.abs(got.astype(int) - np.asarray(decoded, dtype=int)).max() >= 20


def test_rgba_p3_keeps_alpha_and_converts_colours():
    icc = display_p3_like()
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (19, 31, 4), dtype=np.uint8)
    rgba[..., 3][:5] = 0  # a transparent band, so alpha makes a mask
    product = load_product(_encode(Image.fromarray(rgba), "PNG", icc))
    assert np.array_equal(product.alpha, rgba[..., 3])
    assert np.array_equal(np.asarray(product.rgb), _reference(Image.fromarray(rgba[..., :3]), icc))


@pytest.mark.parametrize("kind", ["path", "bytes", "pil"])
def test_cmyk_jpeg_is_converted_through_its_profile(tmp_path, kind):
    icc = naive_cmyk()
    cmyk = Image.fromarray(np.random.default_rng(3).integers(0, 256, (21, 33, 4), dtype=np.uint8), "CMYK")
    data = _encode(cmyk, "JPEG", icc)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.mode == "CMYK"
    expected = _reference(decoded, icc)
    got = np.asarray(load_product(_source(kind, data, tmp_path)).rgb)
    assert np.array_equal(got, expected)
    # ...and not Pillow's profile-less CMYK formula.
    assert np.abs(got.astype(int) - np.asarray(decoded.convert("RGB"), dtype=int)).max() >= 20


def test_srgb_profile_keeps_the_bytes():
    """An embedded sRGB profile (most JPEGs carry one) is sRGB already: no transform, not even ±1."""
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img = _random_rgb(seed=4)
    product = load_product(_encode(img, "PNG", srgb))
    assert np.array_equal(np.asarray(product.rgb), np.asarray(img))


def test_unreadable_profile_is_ignored_like_a_browser_does():
    img = _random_rgb(seed=5)
    product = load_product(_encode(img, "PNG", b"not an ICC profile at all" * 8))
    assert np.array_equal(np.asarray(product.rgb), np.asarray(img))


def test_to_srgb_is_idempotent_and_leaves_the_input_alone():
    icc = display_p3_like()
    img = Image.open(io.BytesIO(_encode(_random_rgb(seed=6), "PNG", icc)))
    img.load()
    before = np.asarray(img).copy()
    once = to_srgb(img)
    assert np.array_equal(np.asarray(to_srgb(once)), np.asarray(once))
    assert np.array_equal(np.asarray(img), before) and img.info.get("icc_profile") == icc


def test_pipeline_keeps_the_converted_product_and_writes_srgb(tmp_path):
    icc = display_p3_like()
    image, mask = make_product(48, 40, seed=8)
    data = _encode(image, "PNG", icc)
    expected = _reference(image, icc)
    pipe = CreativePipeline.from_preset("tiny")
    keep = np.asarray(mask) < 128
    for source in (data, Image.open(io.BytesIO(data))):
        creative = pipe(["warm"], source, mask, num_inference_steps=1, show_progress=False)[0]
        assert np.array_equal(np.asarray(creative.image)[keep], expected[keep])
        assert "icc_profile" not in creative.image.info  # written as sRGB
        as_float = pipe(["warm"], source, mask, num_inference_steps=1, output_type="np", show_progress=False)[0]
        assert np.array_equal(as_float.image[keep], expected[keep].astype(np.float32) / np.float32(255))
