"""The named slots every backend fills. The pipeline's loop calls only these.

Each slot is a callable on tensors, so torch modules, torch.compile'd modules, ONNX Runtime sessions and
TensorRT engines are interchangeable without forking the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

# ModelInfo describes the model, not a backend: models/diffusion.py owns it (export writes it too).
from cg4ctr_fast.models.diffusion import ModelInfo

Tensor = torch.Tensor


@dataclass
class Components:
    """Backend-filled slots.

    text_encoder(input_ids[B, 77] int64) -> hidden states [B, 77, D]
    unet(sample[B, C, h, w], timestep[] or [B], encoder_hidden_states[B, 77, D]) -> noise prediction [B, 4, h, w]
    vae_encoder(image[B, 3, H, W] in [-1, 1]) -> moments [B, 2 * latent_channels, h, w] (mean ⊕ logvar)
    vae_decoder(latents[B, 4, h, w], already divided by scaling_factor) -> image [B, 3, H, W] in about [-1, 1]
    preview_decoder: None, or a cheap decoder with vae_decoder's contract (e.g. AutoencoderTiny,
        runtime/preview.py) for `preview_top_k`: its images are only ranked, never shipped.

    A unet slot with `supports_feature_cache = True` also has
    `feature_cache_step(sample, timestep, encoder_hidden_states, *, feature=None, branch=0) -> (noise, feature)`
    (DeepCache, runtime/deepcache.py): the torch and compile backends; engine slots set it False.
    """

    text_encoder: Callable[[Tensor], Tensor]
    unet: Callable[[Tensor, Tensor, Tensor], Tensor]
    vae_encoder: Callable[[Tensor], Tensor]
    vae_decoder: Callable[[Tensor], Tensor]
    tokenizer: Any
    scheduler: Any
    info: ModelInfo
    backend: str = "torch"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # The torch modules behind the slots when there are any (LoRA, export, training); None for engines.
    modules: Optional[Any] = None
    # Cheap decoder used only to rank candidates (pipeline's preview_top_k); same call contract as vae_decoder.
    preview_decoder: Optional[Any] = None
