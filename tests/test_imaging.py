"""Tests for cg4ctr_fast.imaging: input validation, mode handling, masks, sizing, compositing,
hashing and atomic output."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cg4ctr_fast import imaging
from cg4ctr_fast.errors import InputError
from cg4ctr_fast.fileio import atomic_dir, atomic_write_bytes
from cg4ctr_fast.imaging import (
    MAX_BYTES,
    MAX_PIXELS,
    MAX_SIDE,
    check_mask,
    composite,
    image_sha256,
    load_image,
    load_mask,
    to_rgb_and_alpha_mask,
    working_size,
)


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def random_rgb(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    """The CLI prints InputError messages as one line; each must name the file."""
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --------------------------------------------------------------------------------------------
# load_image: bad inputs


def test_constants():
    assert MAX_SIDE == 4096
    assert MAX_PIXELS == 4096 * 4096
    assert MAX_BYTES == 64 * 1024 * 1024


def test_corrupt_bytes_with_png_name(tmp_path):
    path = tmp_path / "product.png"
    path.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "not an image")


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not a picture\nsecond line\n")
    with pytest.raises(InputError) as excinfo:
        load_image(str(path))
    assert_one_line_error(excinfo, str(path), "not an image")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    data = png_bytes(random_rgb(rng, 64, 64))  # random pixels: compressed data is large
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "corrupt or truncated")


def test_truncated_png_bytes_source():
    rng = np.random.default_rng(1)
    data = png_bytes(random_rgb(rng, 64, 64))
    with pytest.raises(InputError) as excinfo:
        load_image(data[: len(data) // 2], what="mask")
    assert_one_line_error(excinfo, "mask data", "truncated")


def test_truncated_images_not_enabled_globally():
    # The loader must refuse truncation, not paper over it by flipping Pillow's global flag.
    from PIL import ImageFile

    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "empty")


def test_empty_bytes():
    with pytest.raises(InputError) as excinfo:
        load_image(b"")
    assert_one_line_error(excinfo, "image data", "empty")


def test_missing_path(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "no such file")


def test_directory(tmp_path):
    path = tmp_path / "photos.png"
    path.mkdir()
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "directory")


def test_file_over_max_bytes_refused_before_reading(tmp_path, monkeypatch):
    path = save(Image.new("RGB", (16, 16), "red"), tmp_path / "big.png")
    monkeypatch.setattr(imaging, "MAX_BYTES", 10)

    def no_open(*args, **kwargs):  # the size check must come before any read
        raise AssertionError("Image.open called on an over-size file")

    monkeypatch.setattr(Image, "open", no_open)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "MiB limit")


def test_sparse_file_over_max_bytes(tmp_path):
    # A real over-limit size, without writing 64 MiB: a sparse file.
    path = tmp_path / "huge.png"
    with open(path, "wb") as handle:
        handle.truncate(MAX_BYTES + 1)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "over the 64 MiB limit")


@pytest.mark.parametrize("size", [(MAX_SIDE + 1, 8), (8, MAX_SIDE + 1)])
def test_over_max_side(tmp_path, size):
    path = save(Image.new("1", size), tmp_path / "wide.png")
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    message = assert_one_line_error(excinfo, str(path), f"{size[0]}×{size[1]}", "4096×4096 limit")
    assert message.startswith(f"{path}: image is ")


def test_max_side_exactly_is_fine(tmp_path):
    path = save(Image.new("1", (MAX_SIDE, 8)), tmp_path / "edge.png")
    assert load_image(path).size == (MAX_SIDE, 8)


def test_over_max_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "MAX_PIXELS", 100)
    path = save(Image.new("L", (20, 20)), tmp_path / "many.png")
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "pixel limit")


def test_zero_size_pil_image():
    with pytest.raises(InputError) as excinfo:
        load_image(Image.new("RGB", (0, 5)))
    assert_one_line_error(excinfo, "image", "0×5")


def test_decompression_bomb_error(tmp_path, monkeypatch):
    path = save(Image.new("L", (40, 40)), tmp_path / "bomb.png")  # 1600 > 2 * 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "decompression bomb")


def test_decompression_bomb_warning_is_refused(tmp_path, monkeypatch):
    path = save(Image.new("L", (15, 10)), tmp_path / "bomblet.png")  # 150: warns, not errors
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, str(path), "decompression bomb")


def test_control_characters_in_name_stay_on_one_line(tmp_path):
    path = tmp_path / "bad\nname.png"
    path.write_bytes(b"not an image")
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, "bad\\nname.png")


def test_wrong_source_type():
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# load_image: good inputs


def test_load_path_bytes_and_pil_agree(tmp_path):
    rng = np.random.default_rng(2)
    img = random_rgb(rng, 12, 9)
    path = save(img, tmp_path / "ok.png")
    from_path = load_image(path)
    from_str = load_image(str(path))
    from_bytes = load_image(path.read_bytes())
    from_pil = load_image(img)
    for loaded in (from_path, from_str, from_bytes, from_pil):
        assert loaded.mode == "RGB" and loaded.size == (12, 9)
        assert np.array_equal(np.asarray(loaded), np.asarray(img))
    assert from_pil is not img  # a copy: the caller's image is never modified


def test_load_keeps_mode(tmp_path):
    path = save(Image.new("LA", (5, 4), (10, 20)), tmp_path / "la.png")
    assert load_image(path).mode == "LA"


def test_file_handle_released(tmp_path):
    path = save(Image.new("RGB", (8, 8)), tmp_path / "closed.png")
    img = load_image(path)
    assert getattr(img, "fp", None) is None
    os.replace(path, tmp_path / "moved.png")  # would fail on Windows with an open handle
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_applied(tmp_path):
    # A 4×2 image stored with Orientation=6 ("rotate 90° CW to view") is shown 2×4.
    arr = np.zeros((2, 4, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)  # red at stored top-left
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    # PNG rather than JPEG: it carries EXIF too and keeps the pixels exact.
    path = tmp_path / "phone.png"
    img.save(path, exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (2, 4)
    # Rotating 90° clockwise moves the stored top-left to the top-right.
    assert loaded.getpixel((1, 0)) == (255, 0, 0)
    assert loaded.getexif().get(0x0112, 1) == 1


# --------------------------------------------------------------------------------------------
# to_rgb_and_alpha_mask


def rgb_of(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    rgb, mask = to_rgb_and_alpha_mask(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    return rgb, mask


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("1", 0, (0, 0, 0)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 0, (0, 0, 0)),
        ("I;16", 32768, (128, 128, 128)),
        ("I", 65535, (255, 255, 255)),  # 16-bit data in an I image
        ("I", 128, (128, 128, 128)),  # 8-bit data converted to I
        ("F", 1.0, (255, 255, 255)),  # normalised float
        ("F", 0.5, (128, 128, 128)),
        ("F", 200.0, (200, 200, 200)),  # float in 0..255
    ],
)
def test_mode_conversion_uniform(mode, value, expected):
    rgb, mask = rgb_of(Image.new(mode, (3, 2), value))
    assert mask is None
    assert np.all(np.asarray(rgb) == np.array(expected, dtype=np.uint8))


def test_i16_gradient_is_scaled_not_clipped():
    arr = np.array([[0, 257, 65535 // 2, 65535]], dtype=np.uint16)
    rgb, _ = rgb_of(Image.fromarray(arr))
    assert list(np.asarray(rgb)[0, :, 0]) == [0, 1, 127, 255]


def test_i16_big_endian():
    img = Image.new("I;16B", (2, 2), 65535)
    rgb, _ = rgb_of(img)
    assert np.all(np.asarray(rgb) == 255)


def test_wide_i_and_float_are_stretched():
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert list(np.asarray(rgb_of(wide)[0])[0, :, 0]) == [0, 128, 255]
    floats = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], dtype=np.float32))
    assert np.asarray(rgb_of(floats)[0])[0, :, 0].tolist() == [0, 128, 255, 128]


def test_sixteen_bit_png_roundtrip(tmp_path):
    path = save(Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), tmp_path / "g16.png")
    loaded = load_image(path)
    assert loaded.mode in ("I", "I;16")
    rgb, _ = rgb_of(loaded)
    assert np.all(np.asarray(rgb) == 255)


def test_rgba_alpha_mask():
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[..., :3] = (10, 20, 30)
    arr[..., 3] = [[255, 128, 127], [0, 200, 255]]
    rgb, mask = rgb_of(Image.fromarray(arr))
    assert mask is not None and mask.mode == "L"
    assert np.asarray(mask).tolist() == [[0, 0, 255], [255, 0, 0]]
    rgb_arr = np.asarray(rgb)
    assert tuple(rgb_arr[0, 0]) == (10, 20, 30)  # opaque pixels keep their exact colour
    assert tuple(rgb_arr[1, 0]) == (255, 255, 255)  # fully transparent -> white
    assert rgb_arr[0, 1, 0] == round((10 * 128 + 255 * 127) / 255)  # half: blended over white


def test_rgba_opaque_gives_no_mask():
    rgb, mask = rgb_of(Image.new("RGBA", (4, 4), (9, 8, 7, 255)))
    assert mask is None
    assert np.all(np.asarray(rgb) == np.array((9, 8, 7), dtype=np.uint8))


def test_rgba_only_slightly_transparent_gives_no_mask():
    # Nothing is below the 128 threshold, so nothing would be repainted.
    _, mask = rgb_of(Image.new("RGBA", (4, 4), (9, 8, 7, 200)))
    assert mask is None


def test_la_alpha_mask():
    arr = np.array([[[50, 255], [50, 0]]], dtype=np.uint8)
    rgb, mask = rgb_of(Image.frombytes("LA", (2, 1), arr.tobytes()))
    assert np.asarray(mask).tolist() == [[0, 255]]
    assert np.asarray(rgb).tolist() == [[[50, 50, 50], [255, 255, 255]]]


def test_pa_alpha_mask():
    img = Image.new("PA", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), (1, 255))
    img.putpixel((1, 0), (1, 0))
    rgb, mask = rgb_of(img)
    assert np.asarray(mask).tolist() == [[0, 255]]
    assert tuple(np.asarray(rgb)[0, 0]) == (255, 0, 0)


def make_palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    for x in range(3):
        img.putpixel((x, 0), x)
    if transparent:
        img.info["transparency"] = 2  # palette index 2 (blue) is transparent
    return img


def test_p_without_transparency():
    rgb, mask = rgb_of(make_palette_image(False))
    assert mask is None
    assert np.asarray(rgb).tolist() == [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]]


def test_p_with_transparency(tmp_path):
    path = save(make_palette_image(True), tmp_path / "pal.png")
    loaded = load_image(path)
    assert loaded.mode == "P" and "transparency" in loaded.info
    rgb, mask = rgb_of(loaded)
    assert np.asarray(mask).tolist() == [[0, 0, 255]]
    assert np.asarray(rgb).tolist() == [[[255, 0, 0], [0, 255, 0], [255, 255, 255]]]


def test_rgba_png_file_alpha(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.paste((200, 100, 50, 255), (1, 1, 3, 3))
    rgb, mask = rgb_of(load_image(save(img, tmp_path / "cutout.png")))
    expected = np.full((4, 4), 255, dtype=np.uint8)
    expected[1:3, 1:3] = 0
    assert np.array_equal(np.asarray(mask), expected)
    assert tuple(np.asarray(rgb)[1, 1]) == (200, 100, 50)


# --------------------------------------------------------------------------------------------
# load_mask / check_mask


def half_mask(width: int = 8, height: int = 8) -> np.ndarray:
    arr = np.zeros((height, width), dtype=np.uint8)
    arr[:, : width // 2] = 255
    return arr


def test_load_mask_size_mismatch(tmp_path):
    path = save(Image.fromarray(half_mask(60, 60)), tmp_path / "mask.png")
    with pytest.raises(InputError) as excinfo:
        load_mask(path, (64, 64))
    message = assert_one_line_error(excinfo, str(path))
    assert message == f"{path}: mask is 60×60 but the image is 64×64"


def test_load_mask_binarizes(tmp_path):
    arr = np.array([[0, 127, 128, 255], [1, 200, 50, 130]], dtype=np.uint8)
    mask = load_mask(save(Image.fromarray(arr), tmp_path / "gray.png"), (4, 2))
    assert mask.mode == "L" and mask.size == (4, 2)
    assert np.asarray(mask).tolist() == [[0, 0, 255, 255], [0, 255, 0, 255]]


def test_load_mask_rgba_uses_luminance(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0] = (255, 255, 255, 0)  # white but transparent: alpha is ignored, white means repaint
    arr[1] = (0, 0, 0, 255)
    mask = load_mask(save(Image.fromarray(arr), tmp_path / "rgba_mask.png"), (2, 2))
    assert np.asarray(mask).tolist() == [[255, 255], [0, 0]]


def test_load_mask_mode_1(tmp_path):
    img = Image.fromarray(half_mask(8, 4)).convert("1")
    mask = load_mask(save(img, tmp_path / "bilevel.png"), (8, 4))
    assert mask.mode == "L"
    assert np.array_equal(np.asarray(mask), half_mask(8, 4))


def test_load_mask_all_black(tmp_path):
    path = save(Image.new("L", (8, 8), 0), tmp_path / "black.png")
    with pytest.raises(InputError) as excinfo:
        load_mask(path, (8, 8))
    assert_one_line_error(excinfo, str(path), "nothing to repaint (all black)")


def test_load_mask_all_white(tmp_path):
    path = save(Image.new("L", (8, 8), 255), tmp_path / "white.png")
    with pytest.raises(InputError) as excinfo:
        load_mask(path, (8, 8))
    assert_one_line_error(excinfo, str(path), "no product (all white)")


def test_load_mask_just_below_threshold_is_all_black(tmp_path):
    path = save(Image.new("L", (8, 8), 127), tmp_path / "dim.png")
    with pytest.raises(InputError) as excinfo:
        load_mask(path, (8, 8))
    assert_one_line_error(excinfo, str(path), "all black")


def test_load_mask_bad_file(tmp_path):
    path = tmp_path / "mask.png"
    path.write_text("nope")
    with pytest.raises(InputError) as excinfo:
        load_mask(path, (8, 8))
    assert_one_line_error(excinfo, str(path))


def test_load_mask_over_side_says_mask(tmp_path):
    path = save(Image.new("1", (MAX_SIDE + 1, 8)), tmp_path / "huge_mask.png")
    with pytest.raises(InputError) as excinfo:
        load_mask(path, (MAX_SIDE + 1, 8))
    assert_one_line_error(excinfo, str(path), "mask is 4097×8")


def test_check_mask_messages():
    with pytest.raises(InputError) as excinfo:
        check_mask(Image.new("L", (4, 4), 0))
    assert_one_line_error(excinfo, "mask", "white marks the background to repaint")
    with pytest.raises(InputError) as excinfo:
        check_mask(Image.new("L", (4, 4), 255), name="cutout.png")
    assert_one_line_error(excinfo, "cutout.png", "black marks the product to keep")
    check_mask(Image.fromarray(half_mask()))  # a proper mask passes


# --------------------------------------------------------------------------------------------
# working_size


@pytest.mark.parametrize(
    "args, expected",
    [
        ((64, 64, 64), (64, 64)),
        ((60, 52, 64), (64, 56)),
        ((1000, 500, 512), (512, 256)),
        ((7, 3, 64), (64, 24)),
        ((3, 7, 64), (24, 64)),
        ((4096, 1, 512), (512, 8)),  # never below `multiple`
        ((512, 512, 1024), (1024, 1024)),  # upscaling
        ((100, 52, 64), (64, 32)),  # 33.28 -> 32
        ((100, 62, 64), (64, 40)),  # 39.68 -> 40
        ((64, 60, 64, 16), (64, 64)),  # 60 -> nearest multiple of 16
    ],
)
def test_working_size(args, expected):
    assert working_size(*args) == expected


def test_working_size_half_rounds_up():
    # 1 * 64 / 16 = 4 = half of 8: rounds up to 8 (and 12 * 64 / 16 = 48 exactly).
    assert working_size(16, 1, 64) == (64, 8)
    assert working_size(16, 12, 64) == (64, 48)
    # 20 * 64 / 64 = 20 = 2.5 multiples of 8 -> 24 (halves up, not to even).
    assert working_size(64, 20, 64) == (64, 24)


def test_working_size_preserves_aspect():
    for width, height in [(1920, 1080), (1080, 1920), (800, 600), (333, 777)]:
        out_w, out_h = working_size(width, height, 512)
        assert max(out_w, out_h) == 512
        assert out_w % 8 == 0 and out_h % 8 == 0
        assert abs(out_w / out_h - width / height) < 0.05


@pytest.mark.parametrize("bad", [(0, 5, 64), (5, -1, 64), (5, 5, 0), (5, 5, 64, 0)])
def test_working_size_rejects_nonpositive(bad):
    with pytest.raises(InputError) as excinfo:
        working_size(*bad)
    assert_one_line_error(excinfo, "positive")


# --------------------------------------------------------------------------------------------
# composite


@pytest.mark.parametrize("seed", range(5))
def test_composite_bit_exact(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(1, 80)), int(rng.integers(1, 80))
    original = random_rgb(rng, width, height)
    generated = random_rgb(rng, width, height)
    mask_arr = rng.integers(0, 256, (height, width), dtype=np.uint8)
    out = composite(original, generated, Image.fromarray(mask_arr))
    assert out.mode == "RGB" and out.size == (width, height)
    out_arr = np.asarray(out)
    product = mask_arr < 128
    assert np.array_equal(out_arr[product], np.asarray(original)[product])
    assert np.array_equal(out_arr[~product], np.asarray(generated)[~product])


def test_composite_resizes_generated():
    rng = np.random.default_rng(7)
    original = random_rgb(rng, 30, 20)
    generated = Image.new("RGB", (64, 40), (0, 200, 0))
    mask_arr = np.zeros((20, 30), dtype=np.uint8)
    mask_arr[:, 15:] = 255
    out = np.asarray(composite(original, generated, Image.fromarray(mask_arr)))
    assert out.shape == (20, 30, 3)
    assert np.array_equal(out[:, :15], np.asarray(original)[:, :15])
    assert np.all(out[:, 15:] == np.array((0, 200, 0), dtype=np.uint8))


def test_composite_does_not_touch_inputs():
    rng = np.random.default_rng(8)
    original, generated = random_rgb(rng, 10, 10), random_rgb(rng, 10, 10)
    before = np.asarray(original).copy(), np.asarray(generated).copy()
    composite(original, generated, Image.fromarray(half_mask(10, 10)))
    assert np.array_equal(np.asarray(original), before[0])
    assert np.array_equal(np.asarray(generated), before[1])


def test_composite_rejects_mismatched_mask():
    with pytest.raises(ValueError):
        composite(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), Image.new("L", (4, 4)))
    with pytest.raises(ValueError, match="alpha"):
        composite(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)), Image.new("L", (8, 8)),
                  np.zeros((8, 7), np.uint8))


def _alpha_case(seed: int, width: int, height: int):
    """Random colours, a random mask and a random alpha with many exact 0 and 255 values."""
    rng = np.random.default_rng(seed)
    original, generated = random_rgb(rng, width, height), random_rgb(rng, width, height)
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
    alpha[rng.random((height, width)) < 0.25] = 255
    alpha[rng.random((height, width)) < 0.15] = 0
    mask = rng.integers(0, 256, (height, width), dtype=np.uint8)
    return original, generated, alpha, mask


@pytest.mark.parametrize("seed,size", [(0, (1, 1)), (1, (17, 9)), (2, (33, 21)), (3, (64, 63)), (4, (5, 77))])
def test_composite_straight_alpha_matches_numpy_reference(seed, size):
    """C·a + G·(1 − a) over the generated background, rounded to nearest: float64 reference, no tolerance
    (exact rationals k/255 never sit on a .5 tie, so floor(x + 0.5) and the integer formula agree)."""
    width, height = size
    original, generated, alpha, mask = _alpha_case(seed, width, height)
    out = np.asarray(composite(original, generated, Image.fromarray(mask), alpha))
    c, g = np.asarray(original, np.float64), np.asarray(generated, np.float64)
    w = np.where(mask < 128, alpha, 0).astype(np.float64)[..., None]
    expected = np.floor((c * w + g * (255.0 - w)) / 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(out, expected)
    opaque = (alpha == 255) & (mask < 128)
    assert np.array_equal(out[opaque], np.asarray(original)[opaque])  # a copy, bit for bit
    clear = (alpha == 0) | (mask >= 128)
    assert np.array_equal(out[clear], np.asarray(generated)[clear])


def test_composite_edge_over_a_dark_background_has_no_light_fringe():
    """The seen fault: a 50 %-alpha dark edge pixel shown over white became light grey on every background."""
    original = Image.new("RGB", (3, 1), (20, 20, 20))
    generated = Image.new("RGB", (3, 1), (0, 0, 0))
    alpha = np.array([[255, 128, 0]], np.uint8)
    out = np.asarray(composite(original, generated, Image.new("L", (3, 1), 0), alpha))
    assert out[0].tolist() == [[20, 20, 20], [10, 10, 10], [0, 0, 0]]  # (20·128 + 0·127 + 127) // 255 = 10


@pytest.mark.parametrize("seed,size", [(5, (13, 7)), (6, (40, 31))])
def test_composite_float_matches_reference(seed, size):
    """Float composite: float64 reference within 1e-6 (float32 rounding, ~6e-8 per operation on [0, 1]);
    opaque pixels exactly float32(C) / 255 and fully clear ones exactly G."""
    width, height = size
    original, _, alpha, mask = _alpha_case(seed, width, height)
    generated = np.random.default_rng(seed + 100).random((height, width, 3), dtype=np.float32)
    out = imaging.composite_float(original, generated, Image.fromarray(mask), alpha)
    assert out.dtype == np.float32 and out.shape == (height, width, 3)
    w = np.where(mask < 128, alpha, 0).astype(np.float64)[..., None] / 255.0
    expected = np.asarray(original, np.float64) / 255.0 * w + generated.astype(np.float64) * (1.0 - w)
    assert np.abs(out - expected).max() <= 1e-6
    opaque = (alpha == 255) & (mask < 128)
    assert np.array_equal(out[opaque], np.asarray(original, np.float32)[opaque] / np.float32(255))
    clear = (alpha == 0) | (mask >= 128)
    assert np.array_equal(out[clear], generated[clear])


def test_load_product_splits_straight_alpha():
    rng = np.random.default_rng(11)
    rgba = rng.integers(0, 256, (9, 14, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    product = imaging.load_product(png_bytes(Image.fromarray(rgba)))
    assert np.array_equal(np.asarray(product.rgb), rgba[..., :3])  # straight colours, not over white
    assert np.array_equal(product.alpha, rgba[..., 3])
    expected_white = (rgba[..., :3].astype(np.uint32) * rgba[..., 3:] + 255 * (255 - rgba[..., 3:].astype(np.uint32))
                      + 127) // 255
    assert np.array_equal(np.asarray(product.model_rgb), expected_white.astype(np.uint8))
    assert np.array_equal(np.asarray(product.alpha_mask), np.where(rgba[..., 3] < 128, 255, 0))
    opaque = imaging.load_product(png_bytes(Image.fromarray(rgba[..., :3])))
    assert opaque.alpha is None and opaque.alpha_mask is None and opaque.model_rgb is opaque.rgb


# --------------------------------------------------------------------------------------------
# image_sha256


def test_image_sha256_stable_and_sensitive():
    rng = np.random.default_rng(9)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    first, second = Image.fromarray(arr), Image.fromarray(arr.copy())
    digest = image_sha256(first)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == image_sha256(second)
    changed = arr.copy()
    changed[5, 7, 1] ^= 1
    assert image_sha256(Image.fromarray(changed)) != digest
    # Same bytes, different shape or mode: different hash.
    assert image_sha256(Image.fromarray(arr.reshape(8, 32, 3))) != digest
    assert image_sha256(Image.new("L", (4, 4))) != image_sha256(Image.new("P", (4, 4)))


def test_image_sha256_ignores_file_format(tmp_path):
    rng = np.random.default_rng(10)
    img = random_rgb(rng, 9, 9)
    from_png = load_image(save(img, tmp_path / "a.png"))
    from_bmp = load_image(save(img, tmp_path / "a.bmp"))
    assert image_sha256(from_png) == image_sha256(from_bmp) == image_sha256(img)


def test_image_sha256_same_across_processes():
    code = (
        "from PIL import Image; from cg4ctr_fast.imaging import image_sha256; "
        "print(image_sha256(Image.new('RGB', (5, 3), (1, 2, 3))))"
    )
    env = dict(os.environ, PYTHONHASHSEED="123")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env
    )
    assert result.stdout.strip() == image_sha256(Image.new("RGB", (5, 3), (1, 2, 3)))


# --------------------------------------------------------------------------------------------
# atomic_write_bytes / atomic_dir


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_bytes_failure_leaves_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_dir_success(tmp_path):
    final = tmp_path / "run1"
    with atomic_dir(final) as work:
        work = Path(work)
        assert work.parent == tmp_path
        assert work.name.startswith(".run1.tmp-")
        assert not final.exists()  # nothing visible until the block succeeds
        (work / "creative.png").write_bytes(b"png")
    assert (final / "creative.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1"]


def test_atomic_dir_replaces_existing(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    (final / "sub").mkdir()
    with atomic_dir(final) as work:
        (Path(work) / "fresh.txt").write_text("new")
        assert (final / "stale.txt").exists()  # old result untouched while working
    assert sorted(p.name for p in final.iterdir()) == ["fresh.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final) as work:
            (Path(work) / "partial.png").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_existing(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as work:
            (Path(work) / "partial.png").write_bytes(b"half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_dir_refuses_existing_file(tmp_path):
    final = tmp_path / "run"
    final.write_text("a file")
    with pytest.raises(InputError) as excinfo:
        with atomic_dir(final):
            pytest.fail("body must not run")
    assert_one_line_error(excinfo, str(final), "not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_dir_creates_parents(tmp_path):
    final = tmp_path / "a" / "b" / "run"
    with atomic_dir(final) as work:
        (Path(work) / "x").write_text("1")
    assert (final / "x").read_text() == "1"


@pytest.mark.parametrize("code", ["EPERM", "EBUSY"])
def test_atomic_dir_rename_failure_keeps_existing(tmp_path, monkeypatch, code):
    """A rename refused at the end is one-line InputError; the old output stays, no temporary folder."""
    import errno

    final = tmp_path / "run"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == final:  # moving the old output aside
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real_rename(src, dst)

    with pytest.raises(InputError) as excinfo:
        with atomic_dir(final) as work:
            (Path(work) / "new.png").write_bytes(b"new")
            monkeypatch.setattr(os, "rename", rename)
    assert_one_line_error(excinfo, str(final), os.strerror(getattr(errno, code)))
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
