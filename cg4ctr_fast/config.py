"""Presets: frozen dataclasses that say which architecture a preset builds and how it runs.

Nothing here imports diffusers or touches a device; builders in `cg4ctr_fast.models.diffusion`
turn a preset into modules.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cg4ctr_fast.errors import InputError

# Stable Diffusion's noise schedule (SD1.x training): scaled-linear betas 0.00085 → 0.012 over 1000 steps.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


@dataclass(frozen=True)
class UNetSpec:
    in_channels: int = 9  # 9 = inpainting UNet (latents 4 + mask 1 + masked-image latents 4); 4 = plain UNet
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    cross_attention_dim: int = 768
    attention_head_dim: int = 8
    norm_num_groups: int = 32

    def to_kwargs(self) -> dict[str, Any]:
        kwargs = asdict(self)
        for key in ("block_out_channels", "down_block_types", "up_block_types"):
            kwargs[key] = list(kwargs[key])
        return kwargs


@dataclass(frozen=True)
class VaeSpec:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 512
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def scale_factor(self) -> int:
        # diffusers: vae_scale_factor = 2 ** (len(block_out_channels) - 1)
        return 2 ** (len(self.block_out_channels) - 1)

    def to_kwargs(self) -> dict[str, Any]:
        n_blocks = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * n_blocks,
            "up_block_types": ["UpDecoderBlock2D"] * n_blocks,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "sample_size": self.sample_size,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": self.scaling_factor,
        }


@dataclass(frozen=True)
class TextEncoderSpec:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    # CLIP's BPE vocabulary: 49,408 tokens, <|startoftext|> = 49406, <|endoftext|> = 49407 (also the pad token).
    vocab_size: int = 49408
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    unet: UNetSpec
    vae: VaeSpec
    text_encoder: TextEncoderSpec
    scheduler: str = "DDIMScheduler"
    scheduler_config: tuple[tuple[str, Any], ...] = field(
        default_factory=lambda: tuple(
            {**SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}.items()
        )
    )
    # Built in code with seeded random weights when no model path is given (tests, latency work).
    buildable: bool = False
    default_steps: int = 50
    default_guidance: float = 7.5

    @property
    def resolution(self) -> int:
        """Image side the model was trained at: latent sample size × VAE scale factor."""
        return self.unet.sample_size * self.vae.scale_factor

    def scheduler_kwargs(self) -> dict[str, Any]:
        return dict(self.scheduler_config)


TINY = Preset(
    name="tiny",
    description="tiny SD-style inpainting stack built in code: 64x64 images, 16x16 latents, CLIP BPE tokenizer",
    unet=UNetSpec(
        in_channels=9,
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        # 8 groups, not SD's 32: 32 groups over 32 channels make every GroupNorm a per-image, per-channel norm
        # that removes each feature map's mean; 8 keep 4 channels per group, as SD's VAE does (128 over 32).
        # Its effect was not isolated: in 420-s VAE runs on crops, 8 and 32 groups both learned colour by step
        # ~800 (chroma kept 0.61 and 0.66); the grey toy-v1 VAE had stopped at step 500.
        norm_num_groups=8,
    ),
    # Three VAE blocks: scale factor 4, so 64x64 images give 16x16 latents (two blocks would give 32x32 and a
    # 4x costlier UNet; four would give 8x8, too coarse for the toy world's backgrounds).
    vae=VaeSpec(block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=64, norm_num_groups=8),
    text_encoder=TextEncoderSpec(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        projection_dim=32,
        hidden_act="gelu",
    ),
    buildable=True,
    default_steps=20,
    default_guidance=7.5,
)

SD15_INPAINT = Preset(
    name="sd15-inpaint",
    description="Stable Diffusion 1.5 inpainting architecture (9-channel UNet 320/640/1280/1280, CLIP ViT-L/14 text)",
    unet=UNetSpec(),
    vae=VaeSpec(),
    text_encoder=TextEncoderSpec(),
    buildable=False,
    default_steps=20,
    default_guidance=7.5,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (TINY, SD15_INPAINT)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None


def with_unet_channels(preset: Preset, in_channels: int) -> Preset:
    """The same preset with a 4-channel (masked latent blending) or 9-channel (inpainting) UNet."""
    if in_channels not in (4, 9):
        raise InputError(f"UNet in_channels must be 4 or 9, got {in_channels}")
    return replace(preset, unet=replace(preset.unet, in_channels=in_channels))
