"""Component contracts as data: what each exported component takes and gives, and over which shapes.

One contract per component says its input/output names, dtypes, dynamic axes, the min/opt/max range of
every dynamic axis (the profile) and how to draw a sample input. ONNX export (`dynamic_axes`, the trace
inputs), validation (inputs at two batch sizes, per-component tolerance), the TensorRT optimization profiles,
the runtimes' shape checks and the tests all read these, so they cannot drift apart.

The slot semantics are those of `cg4ctr_fast.runtime.slots.Components`:

    text_encoder(input_ids int64 [B, 77])                        -> last_hidden_state [B, 77, D]
    unet(sample [B, C, h, w], timestep float32 [B], encoder_hidden_states [B, 77, D]) -> out_sample [B, 4, h, w]
    vae_encoder(image [B, 3, H, W] in [-1, 1])                   -> moments [B, 2 * latent_channels, h, w]
    vae_decoder(latent_sample [B, 4, h, w] / scaling_factor)     -> sample [B, 3, H, W]
    saliency(image [B, 3, H, W], ImageNet-normalised)            -> saliency [B, 1, H, W] in [0, 1]

and those of `cg4ctr_fast.models.reward.RewardModel`, split as it is served (DESIGN.md §5):

    reward_image(image [B, 3, S, S] in [0, 1])                   -> image_embedding [B, D]   (embed_images)
    reward_head(image_embedding [B, D], title_ids int64 [B, Lt], caption_ids int64 [B, Lc],
                group_features [B, G])                           -> score float32 [B]        (score, calibrated)

The timestep is float32 [B] whatever the precision: DDIM's integer timesteps are exact in float32 (≤ 1000),
Euler/DPM Karras timesteps are fractional, and diffusers' UNet computes its sinusoidal embedding in float32
anyway (`Timesteps` casts to float). The pipeline passes a 0-dim tensor; the runtime slots broadcast it.

Nothing here imports torch, onnx or tensorrt at module level (the sample builder imports torch lazily).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from cg4ctr_fast.errors import InputError

# The components `cg4ctr-export onnx` knows, in export order. COMPONENTS come from the diffusion stack (and
# --saliency); the reward model's two parts come from a saved RewardModel folder (--reward) and follow them.
PIPELINE_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
COMPONENTS = (*PIPELINE_COMPONENTS, "saliency")
REWARD_COMPONENTS = ("reward_image", "reward_head")
EXPORTABLE = (*COMPONENTS, *REWARD_COMPONENTS)

PRECISIONS = {"fp32": "float32", "fp16": "float16"}
NUMPY_DTYPES = ("float32", "float16", "int64")
SEQ_LEN = 77  # CLIP's context length: every SD1.x tokenizer pads to it
# U²-Net-p's official input side: the default for weights that record no size of their own (the official
# u2netp.pth). A net that records one (`cg4ctr-train saliency` trains at 64 px) is exported at its own size.
SALIENCY_SIDE = 320


def saliency_sides(size: int) -> tuple[int, int, int]:
    """The saliency profile's image side MIN:OPT:MAX in pixels for a net that runs at `size` px.

    OPT is the net's own size, the one the pipeline runs it at. MIN = size // 5 and MAX = 2 × size leave room
    for an explicit `saliency_size` override without a re-export (for the official 320: 64..640, the range
    exported before sizes were recorded). U²-Net-p pools with ceil_mode, so any side ≥ 1 runs."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"saliency size must be a positive integer, got {size!r}")
    return max(1, size // 5), size, 2 * size


@dataclass(frozen=True)
class Dim:
    """One dynamic axis and its profile range; `multiple`: values must be multiples of it."""

    name: str
    min: int
    opt: int
    max: int
    multiple: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise InputError(f"axis {self.name}: need 1 ≤ min ≤ opt ≤ max, got {self.min}:{self.opt}:{self.max}")


@dataclass(frozen=True)
class TensorSpec:
    """An input or output. `shape` holds ints (fixed axes) and Dim names (dynamic axes).

    `sample` says how the sample builder draws an input: "normal", "uniform:LO:HI" or "randint:LO:HI".
    """

    name: str
    dtype: str
    shape: tuple[Any, ...]
    sample: str = "normal"


@dataclass(frozen=True)
class Tolerance:
    """max |onnx - torch| must be ≤ atol + rtol × max |torch| for every output (scale-relative)."""

    atol: float
    rtol: float
    why: str = ""

    def allowed(self, reference_max_abs: float) -> float:
        return self.atol + self.rtol * reference_max_abs


# Per component and precision. Every engine is compared with the fp32 torch module on random inputs.
# fp32: both sides do the same fp32 math in another order (oneDNN/MLAS kernels, fused ops, a different
#   reduction order in GroupNorm/LayerNorm/softmax): errors grow with depth, ≈1e-6 of the output scale on the
#   tiny stack, ≈1e-5 expected on SD1.5's 3.4 GB UNet. 1e-4 of the output scale (5e-4 for the deep UNet and
#   the VAE decoder, whose outputs pass ~30 normalised layers) keeps a 10-100× margin over rounding while an
#   export bug (a dropped bias, a wrong constant, a misrouted skip) moves outputs by > 1e-2 of their scale.
# fp16: a 10-bit mantissa rounds every op by ≤ 4.9e-4 relative; through ~100 layers with fp32 accumulation
#   the measured drift of an fp16 module against its fp32 self is ≈2e-3 of the output scale (tiny UNet).
#   3e-2 of the scale (+1e-2 absolute for near-zero outputs) allows that with margin and still catches a
#   broken graph, whose error is of the order of the output itself.
_FP32 = "fp32 vs the fp32 torch module: reordered float math only (≈1e-6 of the scale measured)"
_FP16 = "fp16 vs the fp32 torch module: fp16 rounding through the network (≈2e-3 of the scale measured)"
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "text_encoder": {"fp32": Tolerance(1e-5, 1e-4, _FP32), "fp16": Tolerance(1e-2, 3e-2, _FP16)},
    "unet": {"fp32": Tolerance(1e-5, 5e-4, _FP32), "fp16": Tolerance(1e-2, 3e-2, _FP16)},
    "vae_encoder": {"fp32": Tolerance(1e-5, 1e-4, _FP32), "fp16": Tolerance(1e-2, 3e-2, _FP16)},
    "vae_decoder": {"fp32": Tolerance(1e-5, 5e-4, _FP32), "fp16": Tolerance(1e-2, 3e-2, _FP16)},
    "saliency": {"fp32": Tolerance(1e-5, 1e-4, _FP32), "fp16": Tolerance(1e-2, 3e-2, _FP16)},
    # The reward image tower is a 4-block CNN with GroupNorm, shallow like the VAE encoder (measured ≤ 4e-6 on
    # embeddings of scale 0.8; ≈3e-4 of the scale in fp16). The head is always fp32 (see reward_contracts); its
    # output is a probability, so the bound is ≤ 1.1e-4 (measured ≤ 1e-7, while averaging over the padding too,
    # a plausible export bug, moved scores by ≥ 5e-3).
    "reward_image": {"fp32": Tolerance(1e-5, 1e-4, _FP32), "fp16": Tolerance(1e-2, 3e-2, _FP16)},
    "reward_head": {"fp32": Tolerance(1e-5, 1e-4, _FP32)},
}


@dataclass(frozen=True)
class ComponentContract:
    name: str
    precision: str  # "fp32" | "fp16": the dtype of the component's float tensors
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[Dim, ...]  # the profile: min/opt/max per dynamic axis
    tolerance: Tolerance
    # Output axes computed from input axes: (name, source axis, numerator, denominator).
    derived: tuple[tuple[str, str, int, int], ...] = ()
    # Dynamic axes validated at their min and max too (validation_points): the image sides a user exported a
    # range for. Empty by default: the default side floor (one 8-pixel step) is the pipeline's resize limit, not
    # a size the stack is meant to run at (diffusers' UNet needs 2^downsamplers latents).
    extremes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ lookups
    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def values(self, which: str = "opt", **overrides: int) -> dict[str, int]:
        """Dim values at the profile's min, opt or max, with overrides; derived axes filled in."""
        values = {d.name: getattr(d, which) for d in self.dims}
        values.update(overrides)
        for name, source, num, den in self.derived:
            values[name] = values[source] * num // den
        return values

    def shape(self, spec: TensorSpec, values: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(axis if isinstance(axis, int) else int(values[axis]) for axis in spec.shape)

    # ------------------------------------------------------------------ readers
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes for every input and output."""
        return {
            spec.name: {i: axis for i, axis in enumerate(spec.shape) if isinstance(axis, str)}
            for spec in (*self.inputs, *self.outputs)
        }

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input: (min shape, opt shape, max shape), as a TensorRT optimization profile wants them."""
        lo, opt, hi = self.values("min"), self.values("opt"), self.values("max")
        return {spec.name: (self.shape(spec, lo), self.shape(spec, opt), self.shape(spec, hi)) for spec in self.inputs}

    def validation_points(self) -> list[dict[str, int]]:
        """Two batch sizes at the opt spatial size: the profile's min and its opt (min + 2 when they coincide);
        then, for the axes in `extremes` (a side range the user gave, e.g. --height 64:64:128), the batch min at
        those axes' max and at their min, where they differ from opt."""
        batch = self.dim("batch")
        second = batch.opt if batch.opt > batch.min else min(batch.max, batch.min + 2)
        sizes = [batch.min] if second == batch.min else [batch.min, second]
        points = [self.values("opt", batch=b) for b in sizes]
        for which in ("max", "min"):
            axes = {name: getattr(self.dim(name), which) for name in self.extremes}
            if any(value != self.dim(name).opt for name, value in axes.items()):
                points.append(self.values("opt", batch=batch.min, **axes))
        return points

    def check_shapes(self, shapes: Mapping[str, Sequence[int]], *, where: str = "") -> None:
        """Raise InputError (one line) unless every input's shape fits this contract's profile."""
        label = where or self.name
        values: dict[str, int] = {}
        for spec in self.inputs:
            if spec.name not in shapes:
                raise InputError(f"{label}: input {spec.name!r} missing")
            shape = tuple(int(s) for s in shapes[spec.name])
            if len(shape) != len(spec.shape):
                raise InputError(
                    f"{label}: input {spec.name!r} has shape {list(shape)}, expected rank {len(spec.shape)} "
                    f"{_shape_text(spec.shape)}"
                )
            for got, axis in zip(shape, spec.shape):
                if isinstance(axis, int):
                    if got != axis:
                        raise InputError(
                            f"{label}: input {spec.name!r} has shape {list(shape)}, expected {_shape_text(spec.shape)}"
                        )
                    continue
                if axis in values and values[axis] != got:
                    raise InputError(f"{label}: axis {axis} is {values[axis]} in one input and {got} in {spec.name!r}")
                values[axis] = got
        for d in self.dims:
            got = values.get(d.name)
            if got is None:
                continue
            if not (d.min <= got <= d.max) or got % d.multiple:
                multiple = f", a multiple of {d.multiple}" if d.multiple > 1 else ""
                raise InputError(
                    f"{label}: {d.name} {got} is outside the exported profile {d.min}..{d.max}{multiple}; "
                    f"re-export with a wider range (cg4ctr-export onnx --batch / --height / --width MIN:OPT:MAX)"
                )

    def sample_inputs(self, values: Optional[Mapping[str, int]] = None, *, seed: int = 0) -> dict[str, Any]:
        """Random inputs (torch tensors) at `values` (default: opt), drawn from a seeded CPU generator."""
        import torch

        values = dict(values or self.values("opt"))
        generator = torch.Generator("cpu").manual_seed(seed)
        tensors = {}
        for spec in self.inputs:
            shape = self.shape(spec, values)
            kind, *bounds = spec.sample.split(":")
            if kind == "randint":
                tensor = torch.randint(int(bounds[0]), int(bounds[1]), shape, generator=generator, dtype=torch.int64)
            elif kind == "uniform":
                lo, hi = float(bounds[0]), float(bounds[1])
                tensor = torch.rand(shape, generator=generator, dtype=torch.float32) * (hi - lo) + lo
            else:
                tensor = torch.randn(shape, generator=generator, dtype=torch.float32)
            tensors[spec.name] = tensor.to(getattr(torch, spec.dtype))
        return tensors

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComponentContract":
        try:
            return cls(
                name=data["name"],
                precision=data["precision"],
                inputs=tuple(_spec(s) for s in data["inputs"]),
                outputs=tuple(_spec(s) for s in data["outputs"]),
                dims=tuple(Dim(**d) for d in data["dims"]),
                tolerance=Tolerance(**data["tolerance"]),
                derived=tuple(tuple(x) for x in data.get("derived", ())),  # type: ignore[misc]
                extremes=tuple(data.get("extremes", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed component contract ({type(exc).__name__}: {exc})") from None

    def profile_dict(self) -> dict[str, list[int]]:
        return {d.name: [d.min, d.opt, d.max] for d in self.dims}


def _spec(data: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]), sample=data.get("sample", "normal"))


def _shape_text(shape: Iterable[Any]) -> str:
    return "[" + ", ".join(str(a) for a in shape) + "]"


# ---------------------------------------------------------------------------------------------------------
# Facts about a stack, and the settings of one export
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackDims:
    """The sizes the contracts need, read from a preset or from loaded modules' configs."""

    unet_in_channels: int
    unet_out_channels: int
    latent_channels: int
    vae_scale_factor: int
    unet_up_factor: int  # 2 ** number of UNet upsamplers
    cross_attention_dim: int
    text_hidden_size: int
    vocab_size: int
    sample_size: int  # UNet latent side the model was trained at

    @property
    def resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @classmethod
    def from_preset(cls, preset, unet_in_channels: Optional[int] = None) -> "StackDims":
        return cls(
            unet_in_channels=unet_in_channels or preset.unet.in_channels,
            unet_out_channels=preset.unet.out_channels,
            latent_channels=preset.vae.latent_channels,
            vae_scale_factor=preset.vae.scale_factor,
            unet_up_factor=2 ** (len(preset.unet.block_out_channels) - 1),
            cross_attention_dim=preset.unet.cross_attention_dim,
            text_hidden_size=preset.text_encoder.hidden_size,
            vocab_size=preset.text_encoder.vocab_size,
            sample_size=preset.unet.sample_size,
        )

    @classmethod
    def from_modules(cls, modules) -> "StackDims":
        unet, vae, text = modules.unet.config, modules.vae.config, modules.text_encoder.config
        return cls(
            unet_in_channels=int(unet.in_channels),
            unet_out_channels=int(unet.out_channels),
            latent_channels=int(vae.latent_channels),
            vae_scale_factor=2 ** (len(vae.block_out_channels) - 1),
            unet_up_factor=2 ** (len(unet.block_out_channels) - 1),
            cross_attention_dim=int(unet.cross_attention_dim),
            text_hidden_size=int(text.hidden_size),
            vocab_size=int(text.vocab_size),
            sample_size=int(unet.sample_size),
        )


@dataclass(frozen=True)
class RewardDims:
    """The sizes the reward contracts need, read from a `RewardConfig` (cg4ctr_fast.models.reward)."""

    image_size: int  # side of the square images embed_images takes
    image_dim: int  # length of the stored image embedding
    max_title_tokens: int
    max_caption_tokens: int
    group_dim: int
    title_vocab_size: int
    caption_vocab_size: int

    @classmethod
    def from_config(cls, config) -> "RewardDims":
        return cls(
            image_size=int(config.image_size),
            image_dim=int(config.image_dim),
            max_title_tokens=int(config.max_title_tokens),
            max_caption_tokens=int(config.max_caption_tokens),
            group_dim=int(config.group_dim),
            title_vocab_size=int(config.title_vocab_size),
            caption_vocab_size=int(config.caption_vocab_size),
        )


Range = tuple[int, int, int]


@dataclass(frozen=True)
class ExportSettings:
    """batch: creatives per call (user groups × images per group) as MIN:OPT:MAX.

    height / width: image sides in pixels as MIN:OPT:MAX (an int means fixed: MIN = OPT = MAX). None: the
    model's resolution as opt and max, and one 8-pixel step as min, so every image the pipeline fits to the
    model's resolution (longer side = resolution, both sides rounded to multiples of 8) runs.
    """

    precision: str = "fp32"
    batch: Range = (1, 1, 8)
    height: Optional[Range] = None
    width: Optional[Range] = None
    opset: int = 17

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        lo, opt, hi = self.batch
        if not (1 <= lo <= opt <= hi):
            raise InputError(f"--batch must be MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX, got {lo}:{opt}:{hi}")
        for name in ("height", "width"):
            side = getattr(self, name)
            if side is None:
                continue
            side = (side, side, side) if isinstance(side, int) else tuple(int(v) for v in side)
            object.__setattr__(self, name, side)
            lo, opt, hi = side
            if not (1 <= lo <= opt <= hi):
                raise InputError(f"--{name} must be MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX, got {lo}:{opt}:{hi}")
            bad = [v for v in side if v % 8]
            if bad:
                raise InputError(f"--{name} must be a multiple of 8 at min, opt and max, got {bad[0]} in {lo}:{opt}:{hi}")


def parse_range(text: str, flag: str, example: str = "1:1:8") -> Range:
    """'MIN:OPT:MAX' or one number (fixed: MIN = OPT = MAX) → three ints; InputError (one line) otherwise.

    Only the form is checked here; the order (MIN ≤ OPT ≤ MAX) and the sizes are ExportSettings' checks."""
    parts = str(text).split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = [values[0]] * 3
    if len(values) != 3:
        raise InputError(f"{flag} must be MIN:OPT:MAX (e.g. {example}) or one number, got {text!r}")
    return values[0], values[1], values[2]


def parse_batch(text: str) -> Range:
    return parse_range(text, "--batch", "1:1:8")  # checked by ExportSettings


def parse_side(text: Optional[str], flag: str) -> Optional[Range]:
    """--height / --width: 'MIN:OPT:MAX' pixels or one number (fixed); None stays None (the model's default)."""
    return None if text is None else parse_range(text, flag, "64:64:128")


def build_contracts(
    stack: StackDims,
    settings: ExportSettings,
    components: Iterable[str] = COMPONENTS,
    reward: Optional[RewardDims] = None,
    saliency_size: int = SALIENCY_SIDE,
) -> dict[str, ComponentContract]:
    """Every requested component's contract, its profile derived from the stack (and the reward model's sizes)
    and the settings. `saliency_size`: the side in pixels the saliency net runs at (its config's `size`), the
    opt of the saliency profile (see `saliency_sides`)."""
    precision = settings.precision
    float_dtype = PRECISIONS[precision]
    scale = stack.vae_scale_factor
    heights, widths = image_sides(stack, settings)
    side_multiple = max(8, scale)
    for name, sides in (("--height", heights), ("--width", widths)):
        bad = [v for v in sides if v % side_multiple]
        if bad:
            raise InputError(f"{name} {bad[0]} is not a multiple of {side_multiple} (8 and the VAE's scale factor {scale})")
    lo, opt, hi = settings.batch
    # A side range the user gave is validated at its min and max as well as at opt.
    ranged = settings.height is not None or settings.width is not None

    def image_dims(batch: tuple[int, int, int]) -> tuple[Dim, ...]:
        return (
            Dim("batch", *batch),
            Dim("height", *heights, side_multiple),
            Dim("width", *widths, side_multiple),
        )

    def latent_dims(batch: tuple[int, int, int]) -> tuple[Dim, ...]:
        # Latent sides follow the 8-pixel image grid. The UNet is traced at a latent size that is not a
        # multiple of its up factor, so its graph carries explicit upsample sizes and runs at any latent size
        # (see export/onnx_export.py), not only at multiples of 8 latents as a plain trace would.
        return (
            Dim("batch", *batch),
            Dim("latent_height", *(v // scale for v in heights), side_multiple // scale),
            Dim("latent_width", *(v // scale for v in widths), side_multiple // scale),
        )

    image_extremes = ("height", "width") if ranged else ()
    latent_extremes = ("latent_height", "latent_width") if ranged else ()

    contracts: dict[str, ComponentContract] = {}
    for name in components:
        if name == "text_encoder":
            # One call per set of new prompts, negatives included: 1 .. 2 × creatives. fp32 whatever --dtype
            # says: it runs once per new prompt (embeddings are cached), so fp16 buys nothing in the loop, and
            # the TorchScript exporter turns CLIP's fp16 SDPA with its fp32 causal mask into a graph that mixes
            # float and float16 at LayerNormalization, which ONNX Runtime refuses to load (seen here).
            contracts[name] = ComponentContract(
                name=name,
                precision="fp32",
                inputs=(TensorSpec("input_ids", "int64", ("batch", SEQ_LEN), f"randint:0:{stack.vocab_size}"),),
                outputs=(TensorSpec("last_hidden_state", "float32", ("batch", SEQ_LEN, stack.text_hidden_size)),),
                dims=(Dim("batch", 1, 2 * opt, 2 * hi),),
                tolerance=TOLERANCES[name]["fp32"],
            )
        elif name == "unet":
            # Batch = creatives, doubled by classifier-free guidance: MIN (unguided) .. 2 × MAX.
            contracts[name] = ComponentContract(
                name=name,
                precision=precision,
                inputs=(
                    TensorSpec("sample", float_dtype, ("batch", stack.unet_in_channels, "latent_height", "latent_width")),
                    TensorSpec("timestep", "float32", ("batch",), "uniform:0:1000"),
                    TensorSpec("encoder_hidden_states", float_dtype, ("batch", SEQ_LEN, stack.cross_attention_dim)),
                ),
                outputs=(
                    TensorSpec("out_sample", float_dtype, ("batch", stack.unet_out_channels, "latent_height", "latent_width")),
                ),
                dims=latent_dims((lo, 2 * opt, 2 * hi)),
                tolerance=TOLERANCES[name][precision],
                extremes=latent_extremes,
            )
        elif name == "vae_encoder":
            # The pipeline encodes the product once (batch 1); up to MAX for batched callers.
            contracts[name] = ComponentContract(
                name=name,
                precision=precision,
                inputs=(TensorSpec("image", float_dtype, ("batch", 3, "height", "width"), "uniform:-1:1"),),
                outputs=(TensorSpec("moments", float_dtype, ("batch", 2 * stack.latent_channels, "latent_height", "latent_width")),),
                dims=image_dims((1, 1, hi)),
                tolerance=TOLERANCES[name][precision],
                derived=(("latent_height", "height", 1, scale), ("latent_width", "width", 1, scale)),
                extremes=image_extremes,
            )
        elif name == "vae_decoder":
            # fp32 whatever --dtype says: SD's VAE decoder overflows to NaN in fp16 on some latents. The torch
            # backend falls back to fp32 at run time (VaeDecoderSlot.decode_fp32); an engine cannot.
            dec_dtype = "float32"
            contracts[name] = ComponentContract(
                name=name,
                precision="fp32",
                inputs=(TensorSpec("latent_sample", dec_dtype, ("batch", stack.latent_channels, "latent_height", "latent_width")),),
                outputs=(TensorSpec("sample", dec_dtype, ("batch", 3, "height", "width")),),
                dims=latent_dims((lo, opt, hi)),
                tolerance=TOLERANCES[name]["fp32"],
                derived=(("height", "latent_height", scale, 1), ("width", "latent_width", scale, 1)),
                extremes=latent_extremes,
            )
        elif name == "saliency":
            sal_lo, sal_opt, sal_hi = saliency_sides(saliency_size)
            contracts[name] = ComponentContract(
                name=name,
                precision=precision,
                inputs=(TensorSpec("image", float_dtype, ("batch", 3, "height", "width")),),
                outputs=(TensorSpec("saliency", float_dtype, ("batch", 1, "height", "width")),),
                dims=(
                    Dim("batch", 1, 1, hi),
                    Dim("height", sal_lo, sal_opt, sal_hi),
                    Dim("width", sal_lo, sal_opt, sal_hi),
                ),
                tolerance=TOLERANCES[name][precision],
            )
        elif name in REWARD_COMPONENTS:
            if reward is None:
                raise InputError(f"component {name!r} needs --reward DIR (a folder written by RewardModel.save)")
            contracts[name] = reward_contracts(reward, settings)[name]
        else:
            raise InputError(f"unknown component {name!r}; choose from {', '.join(EXPORTABLE)}")
    return contracts


def image_sides(stack: StackDims, settings: ExportSettings) -> tuple[Range, Range]:
    """(height, width) as MIN:OPT:MAX pixels: the settings', or by default the model's resolution as opt and
    max with one 8-pixel step (the VAE's factor if larger) as min. The pipeline fits an image's longer side to
    the model's resolution and rounds both sides to multiples of 8, so by default every aspect ratio runs."""
    floor = max(8, stack.vae_scale_factor)
    default = (floor, stack.resolution, stack.resolution)
    return tuple(settings.height or default), tuple(settings.width or default)  # type: ignore[return-value]


def reward_contracts(reward: RewardDims, settings: ExportSettings) -> dict[str, ComponentContract]:
    """The reward model as served: an image tower run once per creative, and a small head run per ranking.

    Batch = creatives per call, the settings' MIN:OPT:MAX; the runtime splits larger rankings into calls of at
    most MAX. Every other axis is fixed by the model's config: the image side it was trained at and the token
    lengths its vocabularies pad to (the runtime right-pads shorter id rows with <pad>, which the mean over
    token embeddings skips, so they score as in torch).

    reward_image follows --dtype (a CNN over pixels: where fp16 pays on a GPU). reward_head is fp32 whatever
    --dtype says: it is a few small matrices over five tokens, so fp16 saves nothing, and its output is a CTR
    of a few percent that ranks creatives: fp16's spacing there (≈1.5e-5 at 0.03) would tie close creatives.
    """
    lo, opt, hi = settings.batch
    image_dtype = PRECISIONS[settings.precision]
    batch = (Dim("batch", lo, opt, hi),)
    return {
        "reward_image": ComponentContract(
            name="reward_image",
            precision=settings.precision,
            inputs=(TensorSpec("image", image_dtype, ("batch", 3, reward.image_size, reward.image_size), "uniform:0:1"),),
            outputs=(TensorSpec("image_embedding", image_dtype, ("batch", reward.image_dim)),),
            dims=batch,
            tolerance=TOLERANCES["reward_image"][settings.precision],
        ),
        "reward_head": ComponentContract(
            name="reward_head",
            precision="fp32",
            inputs=(
                TensorSpec("image_embedding", "float32", ("batch", reward.image_dim)),
                # Ids over the whole vocabulary, <pad> (0) included, so sample rows carry padding as in use.
                TensorSpec("title_ids", "int64", ("batch", reward.max_title_tokens), f"randint:0:{reward.title_vocab_size}"),
                TensorSpec(
                    "caption_ids", "int64", ("batch", reward.max_caption_tokens), f"randint:0:{reward.caption_vocab_size}"
                ),
                TensorSpec("group_features", "float32", ("batch", reward.group_dim)),
            ),
            outputs=(TensorSpec("score", "float32", ("batch",)),),
            dims=batch,
            tolerance=TOLERANCES["reward_head"]["fp32"],
        ),
    }


def parse_components(text: Optional[str]) -> tuple[str, ...]:
    """'unet,vae_decoder' → the components in export order; unknown names are an InputError."""
    if text is None:
        return COMPONENTS
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--components is empty")
    for name in names:
        if name not in EXPORTABLE:
            raise InputError(f"unknown component {name!r}; choose from {', '.join(EXPORTABLE)}")
    return tuple(n for n in EXPORTABLE if n in names)


def contract_digest(contract: ComponentContract) -> str:
    """sha256 of a contract's canonical JSON (profile, names, dtypes): part of the TensorRT engine cache key."""
    text = json.dumps(contract.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()

