"""Product saliency with U^2-Net-p, and the inpainting masks made from it.

The creative pipeline keeps the advertised product pixel-exact and repaints only the background.
When the product photo has no alpha channel we find the product with U^2-Net-p (Qin et al. 2020,
the 4.7 MB "small" variant), threshold its saliency map and turn it into a diffusers inpainting mask.

Mask convention (diffusers inpainting): 255 / white = repaint (background), 0 / black = keep (product).

The network's module names follow the official implementation so that the published `u2netp.pth`
loads key for key (686 tensors, plus optional `num_batches_tracked` counters).

The net's own config decides how it runs: `U2NetP.config` (a `SaliencyConfig`) holds the input size
and threshold.  `load_saliency` fills it from the folder's `config.json` (written by `cg4ctr-train
saliency`, which trains at 64 px) or the safetensors metadata; weights without either (the official
u2netp.pth) run at 320 px, the size they were trained for.  A 64-px net run at 320 px kept 57 of 1,681
product pixels.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cg4ctr_fast.errors import InputError

__all__ = [
    "SaliencyConfig",
    "U2NetP",
    "default_dilate_px",
    "deep_supervision_loss",
    "load_saliency",
    "mask_from_alpha",
    "mask_from_saliency",
    "predict_saliency",
    "preprocess",
    "save_saliency",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

CONFIG_FILE = "config.json"  # beside the weights in a `cg4ctr-train saliency` folder
WEIGHTS_FILE = "saliency.safetensors"
_CONFIG_KEYS = {"size", "threshold", "dilate_px", "architecture"}

# ImageNet statistics, as in the official u2net_test.py (ToTensorLab, flag=0).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# One pixel of repaint dilation per this many pixels of the image's shorter side; see default_dilate_px.
DILATE_SIDE_PER_PX = 512

_NUM_BATCHES_TRACKED = ".num_batches_tracked"
_TORCH_SUFFIXES = (".pth", ".pt")
_SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class SaliencyConfig:
    """Defaults for saliency prediction and mask making.

    size: 320 is what the official test script resizes to (RescaleT(320); training crops 288 of 320).
    threshold: 0.5 splits the min-max normalised map halfway between background (0) and product (1).
    dilate_px: pixels (int >= 0) the repaint region grows over the anti-aliased product edge so that the
        inpainting blends the seam instead of leaving a halo of the old background.  None (default): scaled
        with the image, `default_dilate_px` (0 below 512 px, 1 px per 512 px of the shorter side); an int
        is used as given at every size (a folder's config.json may record one).
    """

    size: int = 320
    threshold: float = 0.5
    dilate_px: Optional[int] = None

    def __post_init__(self) -> None:
        _check_size(self.size)
        _check_threshold(self.threshold)
        if self.dilate_px is not None:
            _check_dilate(self.dilate_px)


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


class REBNCONV(nn.Module):
    """3x3 conv (dilation d, padding d keeps the size) + BatchNorm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, dirate: int = 1) -> None:
        super().__init__()
        # Attribute names are the official ones: they become the state_dict keys.
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


def _upsample_like(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Upsample to the exact size of the shallower feature rather than by a factor 2: with
    # ceil-mode pooling a 25 px map pools to 13, and 13 * 2 = 26 != 25. align_corners=False is
    # what the official F.upsample(mode="bilinear") resolves to since PyTorch 0.4.
    if src.shape[-2:] == like.shape[-2:]:
        return src
    return F.interpolate(src, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
    # ceil_mode=True keeps the last odd row/column, so no input size needs to be a multiple of 32.
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """Residual U-block RSU-L (L = height 4..7): a small U-Net whose output is added to its input conv.

    Encoder rebnconv1..rebnconv{L-1} with a 2x max-pool between consecutive levels, a dilation-2
    bottom rebnconv{L}, and decoder rebnconv{L-1}d..rebnconv1d on [deeper, skip] concatenations.
    One generic class instead of the official RSU7/RSU6/RSU5/RSU4 copies; the module names match.
    """

    def __init__(self, height: int, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        if height < 2:
            raise ValueError(f"RSU height must be >= 2, got {height}")
        self.height = height
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        for level in range(2, height):
            self.add_module(f"rebnconv{level}", REBNCONV(mid_ch, mid_ch, dirate=1))
        self.add_module(f"rebnconv{height}", REBNCONV(mid_ch, mid_ch, dirate=2))
        for level in range(height - 1, 1, -1):
            self.add_module(f"rebnconv{level}d", REBNCONV(mid_ch * 2, mid_ch, dirate=1))
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        skips = [self.rebnconv1(hxin)]
        for level in range(2, self.height):
            skips.append(getattr(self, f"rebnconv{level}")(_pool(skips[-1])))
        # The bottom level is not pooled: it widens its receptive field with dilation 2 instead.
        hx = getattr(self, f"rebnconv{self.height}")(skips[-1])
        hx = getattr(self, f"rebnconv{self.height - 1}d")(torch.cat((hx, skips[-1]), 1))
        for level in range(self.height - 2, 0, -1):
            skip = skips[level - 1]
            hx = getattr(self, f"rebnconv{level}d")(torch.cat((_upsample_like(hx, skip), skip), 1))
        return hx + hxin


class RSU4F(nn.Module):
    """RSU-4F: RSU-4 with dilations 1, 2, 4, 8 instead of pooling, for the deepest, smallest maps."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.rebnconvin = REBNCONV(in_ch, out_ch, dirate=1)
        self.rebnconv1 = REBNCONV(out_ch, mid_ch, dirate=1)
        self.rebnconv2 = REBNCONV(mid_ch, mid_ch, dirate=2)
        self.rebnconv3 = REBNCONV(mid_ch, mid_ch, dirate=4)
        self.rebnconv4 = REBNCONV(mid_ch, mid_ch, dirate=8)
        self.rebnconv3d = REBNCONV(mid_ch * 2, mid_ch, dirate=4)
        self.rebnconv2d = REBNCONV(mid_ch * 2, mid_ch, dirate=2)
        self.rebnconv1d = REBNCONV(mid_ch * 2, out_ch, dirate=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class U2NetP(nn.Module):
    """U^2-Net-p (in_ch=3, out_ch=1): six encoder stages, five decoder stages, six side outputs fused.

    forward(x) returns the fused saliency d0 = sigmoid(outconv([d1..d6])), shape B x 1 x H x W.
    forward(x, return_sides=True) returns (d0, d1, ..., d6), every map upsampled to H x W, for the
    deep-supervision loss (see deep_supervision_loss). logits=True skips the sigmoid, which lets
    training use the numerically stable BCE-with-logits.
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 1, config: "SaliencyConfig | None" = None) -> None:
        super().__init__()
        # How this net runs (input size, threshold): set by load_saliency from the net's own files.
        self.config = config or SaliencyConfig()
        # Every stage is 16 mid / 64 out channels: that is what makes "-p" 1.13 M parameters
        # (4.7 MB fp32) against 44 M for the full U^2-Net.
        self.stage1 = RSU(7, in_ch, 16, 64)
        self.stage2 = RSU(6, 64, 16, 64)
        self.stage3 = RSU(5, 64, 16, 64)
        self.stage4 = RSU(4, 64, 16, 64)
        self.stage5 = RSU4F(64, 16, 64)
        self.stage6 = RSU4F(64, 16, 64)

        self.stage5d = RSU4F(128, 16, 64)
        self.stage4d = RSU(4, 128, 16, 64)
        self.stage3d = RSU(5, 128, 16, 64)
        self.stage2d = RSU(6, 128, 16, 64)
        self.stage1d = RSU(7, 128, 16, 64)

        self.side1 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side2 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side3 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side4 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side5 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.side6 = nn.Conv2d(64, out_ch, 3, padding=1)
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(
        self, x: torch.Tensor, return_sides: bool = False, logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        hx1 = self.stage1(x)
        hx2 = self.stage2(_pool(hx1))
        hx3 = self.stage3(_pool(hx2))
        hx4 = self.stage4(_pool(hx3))
        hx5 = self.stage5(_pool(hx4))
        hx6 = self.stage6(_pool(hx5))

        hx5d = self.stage5d(torch.cat((_upsample_like(hx6, hx5), hx5), 1))
        hx4d = self.stage4d(torch.cat((_upsample_like(hx5d, hx4), hx4), 1))
        hx3d = self.stage3d(torch.cat((_upsample_like(hx4d, hx3), hx3), 1))
        hx2d = self.stage2d(torch.cat((_upsample_like(hx3d, hx2), hx2), 1))
        hx1d = self.stage1d(torch.cat((_upsample_like(hx2d, hx1), hx1), 1))

        d1 = self.side1(hx1d)
        d2 = _upsample_like(self.side2(hx2d), d1)
        d3 = _upsample_like(self.side3(hx3d), d1)
        d4 = _upsample_like(self.side4(hx4d), d1)
        d5 = _upsample_like(self.side5(hx5d), d1)
        d6 = _upsample_like(self.side6(hx6), d1)
        d0 = self.outconv(torch.cat((d1, d2, d3, d4, d5, d6), 1))

        if not return_sides:
            return d0 if logits else torch.sigmoid(d0)
        sides = (d0, d1, d2, d3, d4, d5, d6)
        return sides if logits else tuple(torch.sigmoid(side) for side in sides)


def deep_supervision_loss(
    sides: tuple[torch.Tensor, ...] | list[torch.Tensor], target: torch.Tensor, from_logits: bool = True
) -> torch.Tensor:
    """The official U^2-Net training loss: the sum of the 7 BCE losses (fused d0 plus d1..d6).

    sides: forward(x, return_sides=True, logits=from_logits); target: B x 1 x H x W in [0, 1].
    """
    target = target.to(dtype=sides[0].dtype)
    if from_logits:
        losses = [F.binary_cross_entropy_with_logits(side, target) for side in sides]
    else:
        losses = [F.binary_cross_entropy(side, target) for side in sides]
    return torch.stack(losses).sum()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_WEIGHTS_UNPICKLER = "WeightsUnpickler error:"


def _one_line(error: BaseException, limit: int = 160) -> str:
    """The informative part of an exception message, on one line of at most `limit` characters."""
    text = _ANSI_ESCAPE.sub("", str(error))
    # torch.load(weights_only=True) wraps the real cause ("Unsupported operand 64", "Unsupported
    # global: ...") in ~10 lines of advice about trusting the file; keep just the cause.
    if _WEIGHTS_UNPICKLER in text:
        cause = text.split(_WEIGHTS_UNPICKLER, 1)[1].split("Check the documentation", 1)[0]
        text = cause.split(". ", 1)[0]
    line = " ".join(text.split()) or type(error).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _name_some(keys: list[str], shown: int = 3) -> str:
    names = ", ".join(keys[:shown])
    return names + (", …" if len(keys) > shown else "")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _read_state_dict(path: Path) -> Mapping[str, object]:
    where = f"saliency checkpoint {path}"
    if not path.exists():
        raise InputError(f"{where}: no such file")
    if not path.is_file():
        raise InputError(f"{where}: not a file")
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError, OSError, ...: the file is not usable either way
            raise InputError(f"{where}: cannot read as safetensors ({_one_line(error)})") from error
    if suffix in _TORCH_SUFFIXES:
        try:
            # weights_only=True: a .pth is a pickle, and we never execute code from a downloaded file.
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, RuntimeError, EOFError, zipfile errors, ...
            reason = _one_line(error)
            # A pickled whole model (torch.save(model)) needs code to unpickle; say what to save instead.
            hint = "; save model.state_dict() instead" if "Unsupported global" in reason else ""
            raise InputError(f"{where}: cannot read as a PyTorch checkpoint ({reason}){hint}") from error
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping):
            raise InputError(f"{where}: holds a {type(loaded).__name__}, not a state dict")
        return loaded
    raise InputError(f"{where}: unknown extension {path.suffix!r}; use .pth, .pt or .safetensors")


def _resolve_weights(path: Path) -> Path:
    """The weights file for `path`: itself, or inside a folder saliency.safetensors / its only weights file."""
    if not path.is_dir():
        return path
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    found = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in (*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX))
    if len(found) != 1:
        what = "no weights file" if not found else f"{len(found)} weights files ({_name_some([p.name for p in found])})"
        raise InputError(f"saliency folder {path}: {what}; expected {WEIGHTS_FILE} (as cg4ctr-train saliency writes)")
    return found[0]


def _config_from_dict(values: Mapping, where: str) -> SaliencyConfig:
    kwargs = {key: values[key] for key in ("size", "threshold", "dilate_px") if key in values}
    try:
        return SaliencyConfig(**kwargs)
    except InputError as error:
        raise InputError(f"{where}: {error}") from error


def _read_config(weights: Path) -> SaliencyConfig | None:
    """The net's own config: `config.json` beside the weights, else the safetensors metadata, else None.

    A config.json is read only when it looks like a saliency config (a "size" and no keys other than
    size / threshold / dilate_px / architecture), so the official u2netp.pth next to some other
    project's config.json still runs at its 320 px.  Bad values in a saliency config raise InputError.
    """
    config_path = weights.parent / CONFIG_FILE
    if config_path.is_file():
        try:
            values = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise InputError(f"saliency config {config_path}: cannot read as JSON ({_one_line(error)})") from error
        if isinstance(values, dict) and "size" in values and set(values) <= _CONFIG_KEYS:
            return _config_from_dict(values, f"saliency config {config_path}")
    if weights.suffix.lower() == _SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception:  # noqa: BLE001 - unreadable files are reported by _read_state_dict
            return None
        if "input_size" in metadata:
            try:
                values = {"size": int(metadata["input_size"])}
                if "threshold" in metadata:
                    values["threshold"] = float(metadata["threshold"])
            except ValueError as error:
                raise InputError(f"saliency checkpoint {weights}: bad metadata ({_one_line(error)})") from error
            return _config_from_dict(values, f"saliency checkpoint {weights}")
    return None


def load_saliency(path: str | os.PathLike[str]) -> U2NetP:
    """Load a U2NetP from `.pth`/`.pt` (bare or {"state_dict": ...}, optional "module." prefix) or `.safetensors`,
    or from a folder written by `cg4ctr-train saliency` (saliency.safetensors + config.json).

    The returned net's `config` (SaliencyConfig: input size in px, threshold) is its own: the folder's
    config.json (beside the weights), else the safetensors metadata `save_saliency` writes, else the
    official defaults (320 px, 0.5).  `CreativePipeline` runs the net with it unless told otherwise.
    Strict: missing keys, unexpected keys or wrong shapes raise InputError (one line). The optional
    `*.num_batches_tracked` BatchNorm counters are accepted but not required. Returns the model in eval mode.
    """
    path = _resolve_weights(Path(path))
    where = f"saliency checkpoint {path}"
    raw = _read_state_dict(path)
    config = _read_config(path) if path.is_file() else None

    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InputError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        # nn.DataParallel / DDP checkpoints prefix every key with "module.".
        state[key.removeprefix("module.")] = value

    model = U2NetP(config=config)
    expected = model.state_dict()
    required = [key for key in expected if not key.endswith(_NUM_BATCHES_TRACKED)]
    missing = [key for key in required if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: checkpoint {list(state[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"{_plural(len(missing), 'missing key')} ({_name_some(missing)})")
    if unexpected:
        problems.append(f"{_plural(len(unexpected), 'unexpected key')} ({_name_some(unexpected)})")
    if mismatched:
        problems.append(f"{_plural(len(mismatched), 'shape mismatch')} ({_name_some(mismatched, shown=2)})")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems))

    # Everything is checked above; strict=False only lets absent num_batches_tracked keep their 0.
    model.load_state_dict(state, strict=False)
    return model.eval()


def save_saliency(model: U2NetP, path: str | os.PathLike[str]) -> Path:
    """Write the model's weights as safetensors, atomically: a reader never sees a half-written file.

    The metadata records `model.config` (input_size, threshold), so the file alone runs at its own size.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != _SAFETENSORS_SUFFIX:
        raise InputError(f"saliency checkpoint {path}: save_saliency writes .safetensors; name the file *.safetensors")
    # num_batches_tracked only matters for BatchNorm(momentum=None); the official file has none (686 keys).
    tensors = {
        key: value.detach().to("cpu").contiguous()
        for key, value in model.state_dict().items()
        if not key.endswith(_NUM_BATCHES_TRACKED)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target so that os.replace is a rename on one filesystem, hence atomic.
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        config = getattr(model, "config", None) or SaliencyConfig()
        metadata = {"format": "pt", "architecture": "u2netp",
                    "input_size": str(int(config.size)), "threshold": repr(float(config.threshold))}
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"saliency size must be a positive integer, got {size!r}")


def _check_threshold(threshold: float) -> None:
    try:
        in_range = 0.0 <= float(threshold) <= 1.0  # False for NaN as well
    except (TypeError, ValueError):
        in_range = False
    if not in_range:
        raise InputError(f"saliency threshold must be in [0, 1], got {threshold!r}")


def _check_dilate(dilate_px: int) -> None:
    if isinstance(dilate_px, bool) or not isinstance(dilate_px, (int, np.integer)) or dilate_px < 0:
        raise InputError(f"dilate_px must be a non-negative integer, got {dilate_px!r}")


def preprocess(image: Image.Image, size: int = 320) -> torch.Tensor:
    """Image -> 1 x 3 x size x size float32, as the official u2net_test.py feeds u2netp.

    Resize to size x size (aspect ratio not kept, as in training), divide by the image's maximum,
    then normalise with the ImageNet mean and std.
    """
    _check_size(size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((size, size), resample=Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32)
    peak = float(array.max())
    # Dividing by the maximum (not by 255) is the official ToTensorLab behaviour; an all-black
    # image has peak 0 and stays 0 instead of becoming NaN.
    if peak > 0.0:
        array = array / peak
    array = (array - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


def predict_saliency(model: U2NetP, image: Image.Image, size: int = 320) -> np.ndarray:
    """Saliency of `image`: float32 H x W in [0, 1] at the image's own size (1 = product).

    `model` should be in eval mode (load_saliency returns it so): in train mode BatchNorm would
    normalise with this single image's statistics.
    """
    width, height = image.size
    reference = next(model.parameters())
    batch = preprocess(image, size).to(device=reference.device, dtype=reference.dtype)
    with torch.inference_mode():
        fused = model(batch)[:, :1].float()
    # Min-max normalisation, as the official normPRED does, before resizing back.
    low, high = fused.amin(), fused.amax()
    span = float(high - low)
    if span <= 1e-12:
        # A flat map marks nothing as standing out; 0/0 would make the whole map NaN.
        fused = torch.zeros_like(fused)
    else:
        fused = (fused - low) / span
    # antialias=True: when the image is smaller than `size` this averages like PIL does; the
    # weights stay non-negative and sum to 1, so the result stays in [0, 1].
    resized = F.interpolate(fused, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized[0, 0].clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def default_dilate_px(height: int, width: int) -> int:
    """The repaint dilation, in px, for a mask of height x width px when nobody set one: min(h, w) // 512.

    What the dilation is for: a photo's product outline is anti-aliased, so the pixels along it mix the
    product with the old background.  Kept pixels are pasted back bit for bit, and whatever old background
    they hold shows as a halo; growing the repaint region by d px repaints them.  The price is a ring of d px
    of product on every side.

    The seam is about 1 px wide at the image's own resolution (a resampled edge spreads over the filter's
    support, +-1 output px for PIL's bilinear), and the 0.5 threshold already repaints the outline pixels
    that are more background than product: without dilation the worst halo is one ring of pixels each at
    least half product.  A ring of d px costs about 4 d / L of a product L px across; the world's products
    span about half the side.  The rule: the largest d whose ring costs at most 1/64 of such a product,
    4 d / (side / 2) <= 1/64, i.e. d = side // 512, rounded down.
      - 48, 64, 256 px: 0, so no pixel of an exact mask is repainted.  The old fixed 2 px repainted 34 % of
        8 world products at 64 px (43 % at 48, 9.5 % at 256) and 42.5 % of the four demo products (toy
        saliency IoU 0.571 against their exact masks; 0.905 with d = 0).
      - 512 px (SD1.5's size; the old default there was 2): 1 px covers the anti-aliased seam.  On those 8
        products drawn at 2x and downscaled bilinearly, with the exact coverage as the saliency map, d = 0
        keeps 7,973 outline pixels that are part background, d = 1 keeps none and repaints 0.17 % of the
        fully opaque pixels (at corners).
      - 1024 px: 2 px, the second pixel for the outline error of a 320-px net upsampled 3.2x (+-1.6 px);
        it repaints 1.1 % of the opaque pixels of the same products.
    The saliency net's own outline error is not a reason to dilate more where it costs product: the toy net
    (64 px input) on 256-px products kept a halo of median 2 px, yet d = 2 lowered its IoU on 40 held-out
    products from 0.922 (d = 0) to 0.884.
    """
    return int(min(int(height), int(width)) // DILATE_SIDE_PER_PX)


def _dilate_white(repaint: np.ndarray, dilate_px: int) -> np.ndarray:
    """Grow the True region by dilate_px pixels in every direction (square, i.e. Chebyshev, max filter)."""
    if dilate_px == 0 or not repaint.any() or repaint.all():
        return repaint
    kernel = 2 * dilate_px + 1
    grid = torch.from_numpy(repaint.astype(np.float32))[None, None]
    # A square max filter is separable: a 1 x k then a k x 1 pass costs 2k instead of k^2 per pixel.
    # max_pool2d pads with -inf, so the image border neither grows nor shrinks the region.
    grid = F.max_pool2d(grid, kernel_size=(1, kernel), stride=1, padding=(0, dilate_px))
    grid = F.max_pool2d(grid, kernel_size=(kernel, 1), stride=1, padding=(dilate_px, 0))
    return grid[0, 0].numpy() > 0.5


def _to_mask(repaint: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8))  # 2-D uint8 -> mode "L"


def mask_from_saliency(saliency: np.ndarray, threshold: float = 0.5, dilate_px: Optional[int] = None) -> Image.Image:
    """Inpainting mask from a saliency map: product (saliency >= threshold) black, background white.

    saliency: H x W array of floats in [0, 1] (predict_saliency's output), at the image's size.
    The white (repaint) region is then dilated by dilate_px (int >= 0, px) so the product's edge seam is
    repainted; None (default): `default_dilate_px(H, W)`, i.e. 0 px below 512 px, 1 px per 512 px of the
    shorter side.  An explicit value is used as given, at any size.
    Returns a mode "L" image of H x W: 255 = repaint, 0 = keep.  Raises InputError for a threshold outside
    [0, 1], a negative or non-integer dilate_px, or a map that is not 2-D.
    """
    _check_threshold(threshold)
    if dilate_px is not None:
        _check_dilate(dilate_px)
    saliency = np.asarray(saliency)
    if saliency.ndim != 2:
        raise InputError(f"saliency map must be 2-D (H x W), got shape {saliency.shape}")
    if dilate_px is None:
        dilate_px = default_dilate_px(*saliency.shape)
    # NaN compares False with >=, so it lands in the repaint region: never keep pixels we cannot vouch for.
    repaint = ~(saliency >= threshold)
    return _to_mask(_dilate_white(repaint, dilate_px))


def mask_from_alpha(rgba: Image.Image, dilate_px: int = 0) -> Image.Image | None:
    """Inpainting mask from an image's alpha: transparent (alpha < 128) white = repaint, opaque black = keep.

    Returns None when the image has no alpha (RGB, L, P without transparency) or it is fully opaque,
    i.e. when alpha says nothing about where the product is and saliency must decide.
    """
    _check_dilate(dilate_px)
    bands = rgba.getbands()
    if "A" in bands:
        alpha = rgba.getchannel("A")
    elif "a" in bands:  # premultiplied modes RGBa / La
        alpha = rgba.getchannel("a")
    elif "transparency" in rgba.info:  # P (or L/RGB colour key) with a tRNS entry
        alpha = rgba.convert("RGBA").getchannel("A")
    else:
        return None
    alpha_array = np.asarray(alpha)
    if alpha_array.min() == 255:
        return None
    # 128 is the midpoint of 0..255: a pixel at least half opaque is product, anything fainter is repainted.
    return _to_mask(_dilate_white(alpha_array < 128, dilate_px))
