"""Loading, checking and compositing the images a creative is made from.

The product photo and its optional mask come from users, so everything here assumes they may be
missing, huge, corrupt, in an odd mode or rotated by EXIF.  Every such problem becomes an
`InputError` whose message is one line naming the file, so the command line can print it as is.

Mask convention (the one diffusers' inpainting pipelines use): white (255) marks the background
to repaint, black (0) marks the product to keep.  `composite` puts the original product pixels
back bit for bit, whatever the diffusion model did to them.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.fileio import path_label as _path_label

__all__ = [
    "MAX_SIDE",
    "MAX_PIXELS",
    "MAX_BYTES",
    "load_image",
    "to_rgb_and_alpha_mask",
    "load_mask",
    "check_mask",
    "working_size",
    "composite",
    "image_sha256",
]

# Limits on what a user may hand us.  The side limit is far above what SD inpainting runs at
# (the image is resized to `working_size` anyway) but keeps a decoded RGB image under ~50 MB.
MAX_SIDE = 4096
MAX_PIXELS = 4096 * 4096
# Checked on the file size before reading, so a multi-gigabyte file is refused without I/O.
MAX_BYTES = 64 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

# Pixel value at or above which a mask pixel (or below which an alpha value) means "repaint".
_THRESHOLD = 128


def _one_line(text: object) -> str:
    """Collapse any text (an exception message, a path) onto one line for an InputError."""
    return " ".join(str(text).split())


def _check_dimensions(img: Image.Image, label: str, what: str) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InputError(f"{label}: {what} is {width}×{height}, it has no pixels")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise InputError(
            f"{label}: {what} is {width}×{height}, over the {MAX_SIDE}×{MAX_SIDE} limit"
        )
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{label}: {what} is {width}×{height} = {width * height} pixels, "
            f"over the {MAX_PIXELS}-pixel limit"
        )


def _decode(opener, label: str, what: str, *, owns: bool) -> Image.Image:
    """Open, size-check, fully decode and EXIF-orient an image; every failure is an InputError.

    `opener` returns a PIL image (lazily opened or already in memory).  The dimension check runs
    after opening (which only reads the header) and before decoding, so an over-size image is
    refused without spending the memory to decode it.  `owns` says whether we opened the image
    (and so may close its file); a caller's image is never closed or modified.
    """
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse both, since an
        # image that size is never a legitimate product photo and decoding it could exhaust RAM.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = opener()
        except InputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(
                f"{label}: refused as a possible decompression bomb: {_one_line(exc)}"
            ) from exc
        except UnidentifiedImageError as exc:
            raise InputError(
                f"{label}: not an image file, or a format Pillow cannot read"
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - header parsers raise a zoo of types on bad data
            raise InputError(
                f"{label}: cannot read {what}: {type(exc).__name__}: {_one_line(exc)}"
            ) from exc

        try:
            _check_dimensions(img, label, what)
            try:
                # load() decodes every pixel, so truncation and corruption surface here rather
                # than later inside the pipeline.  LOAD_TRUNCATED_IMAGES is deliberately left
                # off: a half-grey product photo must be refused, not silently repainted.
                img.load()
                # Phone photos are stored sideways with an EXIF Orientation tag; apply it so the
                # product stands the way the user sees it.  Also gives us a copy detached from
                # the file (or from the caller's image, which we never mutate).
                oriented = ImageOps.exif_transpose(img)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InputError(
                    f"{label}: refused as a possible decompression bomb: {_one_line(exc)}"
                ) from exc
            except MemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError,
                # ValueError, EOFError, struct.error, ... on truncated or corrupt data
                raise InputError(
                    f"{label}: {what} data is corrupt or truncated "
                    f"({type(exc).__name__}: {_one_line(exc)})"
                ) from exc
        finally:
            # Release the file handle now; the decoded pixels live on in `oriented`.
            if owns:
                img.close()
    # No re-check needed: EXIF rotation only swaps width and height, and the limits are symmetric.
    return oriented


def load_image(source: ImageSource, *, what: str = "image") -> Image.Image:
    """Load and validate an image from a path, raw bytes, or a PIL image.

    `what` names the thing in messages ("image", "mask").  Returns a fully decoded image in its
    own mode (use `to_rgb_and_alpha_mask` to normalise it), with EXIF orientation applied.  Never
    modifies a PIL image passed in.  Raises InputError (one line, naming the file) when the
    file is missing, a directory, over MAX_BYTES, empty, not an image, corrupt or truncated, a
    decompression bomb, empty of pixels, or over MAX_SIDE / MAX_PIXELS.
    """
    if isinstance(source, Image.Image):
        label = what
        return _decode(lambda: source, label, what, owns=False)

    if isinstance(source, (bytes, bytearray, memoryview)):
        label = f"{what} data"
        data = bytes(source)
        if len(data) > MAX_BYTES:
            raise InputError(
                f"{label}: {len(data) / 2**20:.1f} MiB, over the {MAX_BYTES // 2**20} MiB limit"
            )
        if not data:
            raise InputError(f"{label}: empty (0 bytes)")
        return _decode(lambda: Image.open(io.BytesIO(data)), label, what, owns=True)

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_image() takes a path, bytes or a PIL image, not {type(source).__name__}"
        )

    label = _path_label(source)
    path = os.fspath(source)
    # stat() first: it tells missing / directory / size apart without reading the file, so a
    # huge file is refused before a single byte is read.
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise InputError(f"{label}: no such file") from exc
    except NotADirectoryError as exc:
        raise InputError(f"{label}: no such file (a parent in the path is not a directory)") from exc
    except OSError as exc:
        raise InputError(f"{label}: cannot access file: {_one_line(exc.strerror or exc)}") from exc
    if os.path.isdir(path):
        raise InputError(f"{label}: is a directory, not a file")
    if info.st_size > MAX_BYTES:
        raise InputError(
            f"{label}: file is {info.st_size / 2**20:.1f} MiB, "
            f"over the {MAX_BYTES // 2**20} MiB limit"
        )
    if info.st_size == 0:
        raise InputError(f"{label}: file is empty (0 bytes)")

    def opener() -> Image.Image:
        try:
            return Image.open(path)
        except UnidentifiedImageError:
            raise
        except PermissionError as exc:
            # An InputError here so _decode does not report it as an unreadable image.
            raise InputError(f"{label}: cannot read file: permission denied") from exc

    return _decode(opener, label, what, owns=True)


# Modes that hold more than 8 bits per sample and need an explicit scale to 0..255.
_WIDE_GRAY_MODES = ("I", "F")


def _is_wide_gray(mode: str) -> bool:
    return mode in _WIDE_GRAY_MODES or mode.startswith("I;16")


def _wide_gray_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float grayscale image to uint8, sensibly.

    Pillow's own conversion clips these to 0..255, which turns any 16-bit photo white.  Rules:
    - I;16* (16-bit by definition): 0..65535 maps linearly onto 0..255.
    - I (32-bit int; Pillow opens some 16-bit PNG/TIFF this way, and L.convert("I") gives 0..255):
      values already in 0..255 are kept, values in 0..65535 are scaled as 16-bit, anything
      else (negative or wider) is stretched from its min..max onto 0..255.
    - F (float): values in 0..1 are the usual normalised range and are scaled by 255, values in
      0..255 are kept, anything else is stretched from min..max.  NaN becomes 0, +-inf clip.
    """
    mode = img.mode
    arr = np.asarray(img)
    if mode.startswith("I;16"):
        # (v * 255 + 32767) // 65535 rounds to nearest: 65535 -> 255, 0 -> 0, 32768 -> 128.
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)

    values = arr.astype(np.float64)
    if mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=np.finfo(np.float32).max,
                               neginf=np.finfo(np.float32).min)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif mode == "I" and low >= 0.0 and high <= 65535.0:
        scaled = values * (255.0 / 65535.0)
    else:
        span = high - low
        scaled = (values - low) * (255.0 / span) if span > 0 else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _has_alpha(img: Image.Image) -> bool:
    # "transparency" in info covers P images with a tRNS entry (and L/RGB with a colour key).
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def to_rgb_and_alpha_mask(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Convert any mode to RGB, and turn real transparency into an inpainting mask.

    Returns (rgb, mask).  `mask` is mode "L" in diffusers' convention: 255 where alpha < 128
    (transparent: background to repaint), 0 where alpha >= 128 (opaque: product to keep).  It is
    None when the image has no alpha, or when no pixel is below 128 (nothing would be repainted,
    so the alpha carries no usable mask; a user-supplied mask is then needed).

    Transparent images are composited over white so every pixel has a defined colour (the RGB
    under alpha 0 is often garbage or black); fully opaque pixels keep their exact values.
    16-bit and float grayscale are scaled as documented in `_wide_gray_to_uint8`.
    """
    if _is_wide_gray(img.mode):
        gray = _wide_gray_to_uint8(img)
        return Image.fromarray(np.stack([gray] * 3, axis=-1)), None

    if not _has_alpha(img):
        # Covers 1, L, P, CMYK, RGB, YCbCr, LAB, HSV, RGBX; a copy even for RGB so the caller
        # can never mutate the loaded image through it.
        return img.convert("RGB"), None

    # RGBa / La are premultiplied; convert("RGBA") un-premultiplies.  P/PA/L/RGB with a
    # transparency entry become RGBA through the palette / colour key.
    rgba = np.asarray(img.convert("RGBA"))
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:].astype(np.uint32)
    # Integer "over white": (c*a + 255*(255-a)) / 255, rounded; exact for a == 255.
    over_white = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    rgb_img = Image.fromarray(over_white.astype(np.uint8))

    repaint = rgba[..., 3] < _THRESHOLD
    if not repaint.any():
        return rgb_img, None
    mask = Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8))
    return rgb_img, mask


def _to_gray(img: Image.Image) -> np.ndarray:
    """Luminance of any mode as uint8 (alpha ignored, 16-bit/float scaled)."""
    if _is_wide_gray(img.mode):
        return _wide_gray_to_uint8(img)
    if img.mode == "L":
        return np.asarray(img)
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    # Through RGB so alpha is dropped (an RGBA mask uses its colour, not its alpha) and modes
    # Pillow cannot turn into L directly (CMYK, ...) work too.
    return np.asarray(img.convert("RGB").convert("L"))


def load_mask(source: ImageSource, size: tuple[int, int]) -> Image.Image:
    """Load a user mask and return it as mode "L" with values 0 (keep) or 255 (repaint).

    The mask must be exactly `size` (width, height) of the image it belongs to: resizing it
    silently would move the product edge.  Gray values are binarized at 128 (>= 128 -> 255).
    Raises InputError for a bad file, a size mismatch, or an all-black / all-white mask.
    """
    label = _path_label(source) if isinstance(source, (str, os.PathLike)) else "mask"
    img = load_image(source, what="mask")
    width, height = size
    if img.size != (width, height):
        raise InputError(
            f"{label}: mask is {img.width}×{img.height} but the image is {width}×{height}"
        )
    gray = _to_gray(img)
    mask = Image.fromarray(np.where(gray >= _THRESHOLD, 255, 0).astype(np.uint8))
    check_mask(mask, name=label)
    return mask


def check_mask(mask: Image.Image, *, name: str = "mask") -> None:
    """Refuse a mask that would make inpainting pointless.

    All black: nothing to repaint, the output would be the input.  All white: no product to keep,
    which is almost always an inverted mask.  `name` (usually the file name) prefixes messages.
    """
    values = np.asarray(mask if mask.mode == "L" else mask.convert("L"))
    repaint = values >= _THRESHOLD
    if not repaint.any():
        raise InputError(
            f"{name}: mask has nothing to repaint (all black): "
            "white marks the background to repaint"
        )
    if repaint.all():
        raise InputError(
            f"{name}: mask marks no product (all white): black marks the product to keep"
        )


def working_size(width: int, height: int, max_side: int, multiple: int = 8) -> tuple[int, int]:
    """The (width, height) the diffusion model runs at for an image of width×height.

    The image is scaled (down or up, aspect ratio kept) so its longer side is `max_side`, then
    each side is rounded to the NEAREST multiple of `multiple` (halves round up), never below
    `multiple`.  The SD VAE downsamples by 8, hence the default.  Rounding to nearest keeps the
    aspect error smallest; it means the longer side exceeds `max_side` by up to multiple/2 when
    `max_side` itself is not a multiple, so pass a multiple.  Integer arithmetic, so the result
    never depends on float rounding: (60, 52, 64) -> (64, 56); (7, 3, 64) -> (64, 24).
    """
    for arg_name, value in (("width", width), ("height", height),
                            ("max_side", max_side), ("multiple", multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"working_size: {arg_name} must be a positive integer, got {value!r}")
    longer = max(width, height)

    def scaled(side: int) -> int:
        # round(side * max_side / longer / multiple) with halves up, as exact integer math.
        steps = (2 * side * max_side + longer * multiple) // (2 * longer * multiple)
        return max(1, steps) * multiple

    return scaled(width), scaled(height)


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """Paste the product back: original where mask < 128, generated where mask >= 128.

    `generated` usually comes out of the model at `working_size`; if its size differs from the
    original it is resized to the original's size with LANCZOS first (the sharpest of Pillow's
    filters for the background).  Selection is done on uint8 arrays, so product pixels are
    bit-identical to `original`.  `original` must be RGB and `mask` the original's size.
    """
    if original.mode != "RGB":
        raise ValueError(f"composite: original must be RGB, got mode {original.mode}")
    if mask.size != original.size:
        raise ValueError(
            f"composite: mask is {mask.width}×{mask.height} "
            f"but the image is {original.width}×{original.height}"
        )
    if generated.mode != "RGB":
        generated = generated.convert("RGB")
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    mask_values = np.asarray(mask if mask.mode == "L" else mask.convert("L"))
    repaint = (mask_values >= _THRESHOLD)[..., None]
    out = np.where(repaint, np.asarray(generated), np.asarray(original))
    return Image.fromarray(out.astype(np.uint8, copy=False))


def image_sha256(img: Image.Image) -> str:
    """Hex SHA-256 of an image's mode, size and pixel bytes (plus palette for P/PA).

    Used to derive seeds, so it must be the same in every process and on every run; unlike
    hash() it is not salted.  Metadata (EXIF, file format, compression) does not count: the
    same pixels give the same hash whatever file they came from.
    """
    digest = hashlib.sha256()
    # NUL-separated header so mode and size can't run together: without separators, width 12
    # height 3 and width 1 height 23 would hash the same text.
    digest.update(f"{img.mode}\0{img.width}\0{img.height}\0".encode("ascii"))
    digest.update(img.tobytes())
    if img.mode in ("P", "PA"):
        # Indices alone don't determine the colours.
        palette = img.getpalette()
        digest.update(b"\0palette\0" + bytes(palette or []))
    return digest.hexdigest()
