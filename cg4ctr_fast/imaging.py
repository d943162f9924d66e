"""Loading, checking and compositing the images a creative is made from.

The product photo and its optional mask come from users, so everything here assumes they may be
missing, huge, corrupt, in an odd mode, rotated by EXIF or in another colour space.  Every such
problem becomes an `InputError` whose message is one line naming the file, so the command line can
print it as is.

Images as the person sees them.  `load_product` is the one load path for a product photo, whatever
it arrives as (path, bytes or PIL image):
  1. EXIF orientation is applied (`load_image`), for every input type, so image, alpha, mask and
     composite all use the orientation a viewer displays;
  2. an embedded ICC profile other than sRGB (Display P3 from phones, Adobe RGB, CMYK press
     profiles) is converted to sRGB with Pillow's ImageCms (`to_srgb`), relative colorimetric
     intent; the creatives carry no profile, i.e. they are sRGB.  "Product pixels bit-exact" means
     bit-exact to this sRGB-converted input, which is ImageCms's own transform of the file;
  3. alpha stays straight (not premultiplied): `composite` blends partially transparent edge
     pixels over the GENERATED background, C·a + G·(1 − a), never over white.

Mask convention (the one diffusers' inpainting pipelines use): white (255) marks the background
to repaint, black (0) marks the product to keep.  `composite` puts the original product pixels
back bit for bit, whatever the diffusion model did to them.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.fileio import path_label as _path_label

__all__ = [
    "MAX_SIDE",
    "MAX_PIXELS",
    "MAX_BYTES",
    "ProductImage",
    "load_image",
    "load_product",
    "to_srgb",
    "to_rgb_and_alpha_mask",
    "load_mask",
    "check_mask",
    "working_size",
    "composite",
    "composite_float",
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


# ---------------------------------------------------------------------------------------------
# Colour management
# ---------------------------------------------------------------------------------------------

# Relative colorimetric: in-gamut colours land on the same sRGB colour a colour-managed viewer
# shows, out-of-gamut ones (saturated P3 reds and greens) clip to the sRGB gamut edge.  For the
# matrix/TRC profiles phones write (Display P3) every intent gives this same result.
_INTENT_NAME = "relative colorimetric"

# Image modes per ICC colour space that a transform can take directly; alpha is split off first.
_RGB_FAMILY = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA")


def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _is_srgb(profile) -> bool:
    """True for an embedded profile that IS sRGB (then the bytes are kept as they are).

    Most JPEGs and many PNGs embed one of the sRGB profiles ("sRGB IEC61966-2.1", "sRGB built-in",
    ...).  Running them through LittleCMS anyway would move some pixels by one 8-bit step (table vs
    parametric tone curves) for no visible reason, so they are recognised by name, or failing that
    by an identity transform on a 16-level RGB grid (4,096 colours) against LittleCMS's own sRGB.
    """
    from PIL import ImageCms

    try:
        name = ImageCms.getProfileDescription(profile) or ""
    except ImageCms.PyCMSError:
        name = ""
    if "srgb" in name.lower():
        return True
    levels = np.arange(0, 256, 17, dtype=np.uint8)  # 0, 17, ..., 255: 16 levels per channel
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(64, 64, 3)
    probe = Image.fromarray(grid)
    converted = ImageCms.profileToProfile(
        probe, profile, _srgb_profile(), outputMode="RGB",
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
    )
    return np.array_equal(np.asarray(converted), grid)


def to_srgb(img: Image.Image) -> Image.Image:
    """`img` in sRGB: converted through its embedded ICC profile when it carries one that is not sRGB.

    Input: a decoded PIL image in any mode.  Output: a new image (the input is never modified)
    without an "icc_profile" entry in `.info`, so calling `to_srgb` again is a no-op.
    - RGB-family modes with an RGB profile (Display P3, Adobe RGB, ...) -> "RGB", or "RGBA" when
      the image has alpha (alpha copied unchanged, colours converted straight, not premultiplied);
    - "CMYK" with a CMYK profile -> "RGB" through that profile (Pillow's naive CMYK->RGB formula
      is used only for CMYK without a profile);
    - anything else (no profile, an sRGB profile, a grayscale or other profile, or a profile that
      does not match the image's mode) comes back unchanged in mode and pixels, less the profile.
      A profile LittleCMS cannot parse is ignored, as browsers do: the pixels are shown as sRGB.
    Conversion: Pillow's ImageCms (LittleCMS), relative colorimetric intent, 8 bits per channel;
    out-of-gamut colours clip to the sRGB gamut.
    """
    from PIL import ImageCms

    icc = img.info.get("icc_profile")
    out = img.copy()
    out.info.pop("icc_profile", None)
    if not icc:
        return out
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return out  # unreadable profile: shown as sRGB, as a browser would
    if space == "RGB" and img.mode in _RGB_FAMILY:
        if _is_srgb(profile):
            return out
        alpha = None
        if _has_alpha(img):
            rgba = img.convert("RGBA")  # un-premultiplies RGBa, expands palettes and tRNS
            alpha = rgba.getchannel("A")
            rgb = rgba.convert("RGB")
        else:
            rgb = img.convert("RGB")
        converted = ImageCms.profileToProfile(
            rgb, profile, _srgb_profile(), outputMode="RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        )
        if alpha is not None:
            converted.putalpha(alpha)
    elif space == "CMYK" and img.mode == "CMYK":
        converted = ImageCms.profileToProfile(
            img, profile, _srgb_profile(), outputMode="RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
        )
    else:
        return out
    converted.info = {k: v for k, v in img.info.items() if k != "icc_profile"}
    return converted


def to_rgb_and_alpha_mask(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Convert any mode to sRGB RGB, and turn real transparency into an inpainting mask.

    Returns (rgb, mask).  `rgb` is `to_srgb(img)` in mode RGB; partially or fully transparent
    pixels are shown over white (what the diffusion model is given as the product photo; the final
    creative blends them over the generated background instead, see `load_product` and
    `composite`).  `mask` is mode "L" in diffusers' convention: 255 where alpha < 128 (transparent:
    background to repaint), 0 where alpha >= 128 (opaque: product to keep).  It is None when the
    image has no alpha, or when no pixel is below 128 (nothing would be repainted, so the alpha
    carries no usable mask; a user-supplied mask is then needed).
    16-bit and float grayscale are scaled as documented in `_wide_gray_to_uint8`.
    """
    product = _split_product(img)
    return product.model_rgb, product.alpha_mask


@dataclass(frozen=True)
class ProductImage:
    """A product photo as the person sees it: oriented, in sRGB, with straight alpha.

    rgb:        mode "RGB", the straight (not premultiplied) sRGB colours; under alpha 0 the colour
                is whatever the file holds and is never shown.
    alpha:      uint8 array [height, width], 0 (transparent) .. 255 (opaque), or None when every
                pixel is opaque (or the image has no alpha at all).
    alpha_mask: mode "L" repaint mask from alpha (255 where alpha < 128), or None when alpha marks
                nothing to repaint.
    model_rgb:  mode "RGB", `rgb` shown over white where alpha < 255 (so every pixel the diffusion
                model sees has a defined colour); `rgb` itself when alpha is None.
    """

    rgb: Image.Image
    alpha: Optional[np.ndarray]
    alpha_mask: Optional[Image.Image]
    model_rgb: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def _split_product(img: Image.Image) -> ProductImage:
    if _is_wide_gray(img.mode):
        gray = _wide_gray_to_uint8(img)
        rgb = Image.fromarray(np.stack([gray] * 3, axis=-1))
        return ProductImage(rgb, None, None, rgb)
    img = to_srgb(img)
    if not _has_alpha(img):
        # Covers 1, L, P, CMYK, RGB, YCbCr, LAB, HSV, RGBX; a copy even for RGB so the caller
        # can never mutate the loaded image through it.
        rgb = img.convert("RGB")
        return ProductImage(rgb, None, None, rgb)
    # RGBa / La are premultiplied; convert("RGBA") un-premultiplies.  P/PA/L/RGB with a
    # transparency entry become RGBA through the palette / colour key.
    rgba = np.asarray(img.convert("RGBA"))
    straight = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    alpha = np.ascontiguousarray(rgba[..., 3])
    if alpha.min() == 255:
        return ProductImage(straight, None, None, straight)
    rgb = rgba[..., :3].astype(np.uint32)
    a = alpha[..., None].astype(np.uint32)
    # Integer "over white": (c*a + 255*(255-a)) / 255 rounded to nearest; exact for a == 255.
    over_white = Image.fromarray(((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8))
    repaint = alpha < _THRESHOLD
    alpha_mask = Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8)) if repaint.any() else None
    return ProductImage(straight, alpha, alpha_mask, over_white)


def load_product(source: Union[ImageSource, ProductImage], *, what: str = "image") -> ProductImage:
    """The one load path for a product photo: a path, raw bytes or a PIL image, all treated alike.

    `load_image` (checks, full decode, EXIF orientation applied, also to a PIL image passed in),
    then `to_srgb` (an embedded non-sRGB ICC profile converted to sRGB), then straight alpha split
    off (`ProductImage`).  A ProductImage passes through unchanged.  Never modifies a PIL image
    passed in.  Raises InputError as `load_image` does (one line naming the file).
    """
    if isinstance(source, ProductImage):
        return source
    return _split_product(load_image(source, what=what))


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


def _paste_weights(original: Image.Image, mask: Image.Image, alpha: Optional[np.ndarray], where: str) -> np.ndarray:
    """Per-pixel product weight 0..255 (uint8 [H, W]): alpha (255 without one) where mask < 128, else 0."""
    if original.mode != "RGB":
        raise ValueError(f"{where}: original must be RGB, got mode {original.mode}")
    if mask.size != original.size:
        raise ValueError(
            f"{where}: mask is {mask.width}×{mask.height} "
            f"but the image is {original.width}×{original.height}"
        )
    keep = np.asarray(mask if mask.mode == "L" else mask.convert("L")) < _THRESHOLD
    if alpha is None:
        return np.where(keep, 255, 0).astype(np.uint8)
    alpha = np.asarray(alpha)
    if alpha.shape != (original.height, original.width) or alpha.dtype != np.uint8:
        raise ValueError(
            f"{where}: alpha must be uint8 [{original.height}, {original.width}], "
            f"got {alpha.dtype} {list(alpha.shape)}"
        )
    return np.where(keep, alpha, 0).astype(np.uint8)


def composite(
    original: Image.Image, generated: Image.Image, mask: Image.Image, alpha: Optional[np.ndarray] = None
) -> Image.Image:
    """Paste the product back over the generated background, as 8-bit sRGB.

    original:  mode "RGB", the product photo's straight colours C (uint8 0..255).
    generated: the generated image G (any mode, converted to RGB); when its size differs from the
               original's it is resized to it with LANCZOS first (the sharpest of Pillow's filters).
    mask:      the original's size; pixels with mask >= 128 are background: G is kept there.
    alpha:     optional straight alpha a, uint8 [H, W] (0..255), of the product (an RGBA cut-out).
    Where mask < 128 the output is (C·a + G·(255 − a)) / 255 rounded to nearest, computed in
    integers as (C·a + G·(255 − a) + 127) // 255: no ties occur (255 is odd), opaque pixels
    (a = 255, or no alpha) are C bit for bit and a = 0 gives G.  Returns a new "RGB" image.
    Raises ValueError for a non-RGB original, a mask or alpha of another size.
    """
    weights = _paste_weights(original, mask, alpha, "composite")
    if generated.mode != "RGB":
        generated = generated.convert("RGB")
    if generated.size != original.size:
        generated = generated.resize(original.size, Image.Resampling.LANCZOS)
    c = np.asarray(original).astype(np.uint32)
    g = np.asarray(generated).astype(np.uint32)
    a = weights[..., None].astype(np.uint32)
    out = (c * a + g * (255 - a) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


def composite_float(
    original: Image.Image, generated: np.ndarray, mask: Image.Image, alpha: Optional[np.ndarray] = None
) -> np.ndarray:
    """`composite` without 8-bit rounding of the background: float32 [H, W, 3] in [0, 1].

    generated: float array [H, W, 3] in [0, 1] at the original's size (the decoder's output,
    resized).  Where mask < 128 the output is c·α + G·(1 − α) with c = C / 255 and α = a / 255 in
    float32, so opaque product pixels are exactly float32(C) / 255 (x·1 + G·0 = x in IEEE
    arithmetic) and a = 0 gives G exactly; elsewhere G.  Raises ValueError as `composite` does, or
    for a generated array of another shape.
    """
    weights = _paste_weights(original, mask, alpha, "composite_float")
    generated = np.asarray(generated, dtype=np.float32)
    if generated.shape != (original.height, original.width, 3):
        raise ValueError(
            f"composite_float: generated is {list(generated.shape)}, "
            f"expected [{original.height}, {original.width}, 3]"
        )
    c = np.asarray(original, dtype=np.float32) / np.float32(255.0)
    a = weights[..., None].astype(np.float32) / np.float32(255.0)
    return (c * a + generated * (np.float32(1.0) - a)).astype(np.float32, copy=False)


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
