"""torch wrappers with the exact slot semantics (runtime/torch_backend.py), one per exported component.

Each takes the contract's inputs positionally, in the contract's order, and returns the one output tensor.
"""
from __future__ import annotations

import torch


class TextEncoderExport(torch.nn.Module):
    """TextEncoderSlot: CLIP's last hidden state, no attention mask (SD1.x conditions on all 77 positions)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, attention_mask=None)[0]


class UNetExport(torch.nn.Module):
    """UNetSlot: the noise prediction for (sample, timestep[B], encoder_hidden_states)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VaeEncoderExport(torch.nn.Module):
    """VaeEncoderSlot: encoder + quant_conv, the posterior's moments (the pipeline samples them itself)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments


class VaeDecoderExport(torch.nn.Module):
    """VaeDecoderSlot: post_quant_conv + decoder (AutoencoderKL.decode without tiling or slicing)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class SaliencyExport(torch.nn.Module):
    """U2NetP's fused saliency map d0 after the sigmoid, as predict_saliency reads it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        return self.net(image)


def export_module(name: str, modules, saliency=None) -> torch.nn.Module:
    """The wrapper for component `name` over the loaded modules (DiffusionModules) or the saliency net."""
    if name == "text_encoder":
        return TextEncoderExport(modules.text_encoder).eval()
    if name == "unet":
        return UNetExport(modules.unet).eval()
    if name == "vae_encoder":
        return VaeEncoderExport(modules.vae).eval()
    if name == "vae_decoder":
        return VaeDecoderExport(modules.vae).eval()
    if name == "saliency":
        if saliency is None:
            raise ValueError("saliency: no saliency network given")
        return SaliencyExport(saliency).eval()
    raise ValueError(f"unknown component {name!r}")
