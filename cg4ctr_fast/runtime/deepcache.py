"""DeepCache-style feature reuse (Ma et al., arXiv 2312.00858) for diffusers' `UNet2DConditionModel`.

The UNet is split at one down/up block pair, the *branch*:

    shallow down: conv_in, time embedding, down_blocks[:k]        (k: the fewest down blocks whose skip
                                                                   residuals feed the shallow up blocks)
    deep:         down_blocks[k:], mid_block, up_blocks[:-(branch + 1)]
    shallow up:   up_blocks[-(branch + 1):], conv_norm_out, conv_act, conv_out

`full(...)` (a key step) runs all of it and returns the noise prediction plus the *feature*: the hidden
state that enters `up_blocks[-(branch + 1)]`.  `shallow(...)` (a non-key step) runs only the shallow parts
and feeds the cached feature in place of the deep part's output.  Adjacent denoising steps change the deep
features little (the paper's observation), so the skipped deep blocks cost a small image change that is
measured, not assumed (bench/levers.py).

Both call the UNet's own submodules in the order and with the arguments of diffusers'
`UNet2DConditionModel.forward` (diffusers 0.42), so `full` equals `unet(...)` bit for bit and
`shallow` fed the feature `full` just returned equals it too (tests/test_levers.py).

The skip residuals: diffusers collects `(conv_in output,) + each down block's residuals` and every up block
pops `len(up_block.resnets)` of them from the end.  When the deep part is skipped, the residuals the shallow
up blocks need are exactly the first `needed = sum(len(up.resnets) for the shallow up blocks)` of that tuple,
all produced by conv_in and down_blocks[:k]; the rest (down_blocks[k - 1]'s downsampler output for SD) are
dropped.  For SD1.5 and branch 0: k = 1, needed = 3 (conv_in, down_blocks[0]'s two resnets); the
downsampler of down_blocks[0] still runs (one stride-2 conv, ≈ 1/8 of one of its resnets' convs), since
leaving it out would mean re-implementing the down block's forward.

Supported: SD-style UNets (SD1.x / SD2.x, the inpainting 9-channel and the plain 4-channel ones, any block
counts): no class, addition or encoder-hidden-state projection embeddings (SDXL's `text_time`, Kandinsky),
no ControlNet / adapter residuals, no attention masks.  Anything else raises InputError at construction.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from cg4ctr_fast.errors import InputError

Tensor = torch.Tensor


def _residual_count(down_block) -> int:
    """How many skip residuals a diffusers down block returns: one per resnet, one for its downsampler."""
    return len(down_block.resnets) + (len(down_block.downsamplers) if getattr(down_block, "downsamplers", None) else 0)


def _cross(block) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


class DeepCacheUNet:
    """A `UNet2DConditionModel` split into shallow and deep parts at `branch` (see the module docstring).

    unet: a diffusers UNet2DConditionModel (eager, not a torch.compile wrapper; compile the methods instead).
    branch: 0 (default: the outermost pair, the cheapest non-key step) .. len(unet.up_blocks) − 1 (the deep
        part is the mid block alone).
    Raises InputError for a branch out of range or a UNet configuration the split does not reproduce.
    """

    def __init__(self, unet, branch: int = 0):
        cfg = unet.config
        n_up = len(unet.up_blocks)
        if isinstance(branch, bool) or not isinstance(branch, numbers.Integral) or not 0 <= branch < n_up:
            raise InputError(f"cache_branch must be an integer in 0..{n_up - 1} (this UNet has {n_up} up blocks), got {branch!r}")
        unsupported = [
            name for name, bad in (
                ("class embeddings", unet.class_embedding is not None),
                (f"addition_embed_type={cfg.addition_embed_type!r}", cfg.addition_embed_type is not None),
                ("an encoder_hid_proj", unet.encoder_hid_proj is not None),
                ("a GLIGEN position net", getattr(unet, "position_net", None) is not None),
            ) if bad
        ]
        if unsupported:
            raise InputError(f"cache_interval > 1 supports SD-style UNets only; this one has {', '.join(unsupported)}")
        self.unet = unet
        self.branch = branch = int(branch)
        self.shallow_up = n_up - (branch + 1)  # index of the first shallow up block
        self.needed = sum(len(up.resnets) for up in unet.up_blocks[self.shallow_up:])
        produced, k = 1, 0  # conv_in's output is the first residual
        while produced < self.needed and k < len(unet.down_blocks):
            produced += _residual_count(unet.down_blocks[k])
            k += 1
        if produced < self.needed:
            raise InputError(f"cache_branch {branch}: the down blocks give {produced} skip residuals, the up blocks need {self.needed}")
        self.shallow_down = k  # down_blocks[:k] are shallow

    # ------------------------------------------------------------------ pieces of diffusers' forward
    def _embed(self, sample: Tensor, timestep: Any, encoder_hidden_states: Tensor):
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None
        )
        return unet.conv_in(sample), emb, encoder_hidden_states

    def _down(self, blocks, sample: Tensor, emb: Tensor, encoder_hidden_states: Tensor, residuals: tuple):
        for block in blocks:
            if _cross(block):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=None, cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            residuals += res
        return sample, residuals

    def _up(self, first: int, last: int, sample: Tensor, emb: Tensor, encoder_hidden_states: Tensor,
            residuals: tuple, upsample_size, forward_upsample_size: bool):
        """up_blocks[first:last], popping residuals from the end as diffusers does; returns (sample, residuals, size)."""
        blocks = self.unet.up_blocks
        for i in range(first, last):
            block = blocks[i]
            is_final_block = i == len(blocks) - 1
            res = residuals[-len(block.resnets):]
            residuals = residuals[: -len(block.resnets)]
            if not is_final_block and forward_upsample_size:
                upsample_size = residuals[-1].shape[2:]
            if _cross(block):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None,
                               upsample_size=upsample_size, attention_mask=None, encoder_attention_mask=None)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
        return sample, residuals, upsample_size

    def _out(self, sample: Tensor) -> Tensor:
        unet = self.unet
        if unet.conv_norm_out:
            sample = unet.conv_norm_out(sample)
            sample = unet.conv_act(sample)
        return unet.conv_out(sample)

    def _forward_upsample_size(self, sample: Tensor) -> bool:
        factor = 2 ** self.unet.num_upsamplers
        return any(dim % factor != 0 for dim in sample.shape[-2:])

    # ------------------------------------------------------------------ the two step kinds
    def full(self, sample: Tensor, timestep: Any, encoder_hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """A key step: the whole UNet. Returns (noise prediction [B, C_out, h, w], feature [B, C_f, h_f, w_f])."""
        forward_upsample_size = self._forward_upsample_size(sample)
        sample, emb, ehs = self._embed(sample, timestep, encoder_hidden_states)
        sample, residuals = self._down(self.unet.down_blocks, sample, emb, ehs, (sample,))
        mid = self.unet.mid_block
        if mid is not None:
            if _cross(mid):
                sample = mid(sample, emb, encoder_hidden_states=ehs, attention_mask=None,
                             cross_attention_kwargs=None, encoder_attention_mask=None)
            else:
                sample = mid(sample, emb)
        sample, residuals, upsample_size = self._up(0, self.shallow_up, sample, emb, ehs, residuals, None,
                                                    forward_upsample_size)
        feature = sample
        sample, _, _ = self._up(self.shallow_up, len(self.unet.up_blocks), sample, emb, ehs, residuals,
                                upsample_size, forward_upsample_size)
        return self._out(sample), feature

    def shallow(self, sample: Tensor, timestep: Any, encoder_hidden_states: Tensor, feature: Tensor) -> Tensor:
        """A non-key step: shallow blocks only, `feature` (from the last `full`) in place of the deep part.

        feature's batch must equal sample's (slice it when the batch changes, e.g. at the guidance cut-off).
        Returns the noise prediction [B, C_out, h, w].
        """
        if feature.shape[0] != sample.shape[0]:
            raise ValueError(f"cached feature has batch {feature.shape[0]}, the sample {sample.shape[0]}")
        forward_upsample_size = self._forward_upsample_size(sample)
        sample, emb, ehs = self._embed(sample, timestep, encoder_hidden_states)
        _, residuals = self._down(self.unet.down_blocks[: self.shallow_down], sample, emb, ehs, (sample,))
        residuals = residuals[: self.needed]
        # upsample_size as diffusers would hold it on entering the first shallow up block: set by the
        # previous (deep) up block from the residuals left after it, i.e. the last of the ones kept here.
        upsample_size = residuals[-1].shape[2:] if forward_upsample_size and self.shallow_up > 0 else None
        sample, _, _ = self._up(self.shallow_up, len(self.unet.up_blocks), feature, emb, ehs, residuals,
                                upsample_size, forward_upsample_size)
        return self._out(sample)


def feature_step(split: DeepCacheUNet, full_fn, shallow_fn, sample: Tensor, timestep: Any,
                 encoder_hidden_states: Tensor, feature: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One step through `split`: `full_fn` when feature is None (key step), else `shallow_fn`.

    full_fn / shallow_fn: `split.full` / `split.shallow` or their torch.compile'd versions.
    Returns (noise prediction, the feature to reuse on the following non-key steps).
    """
    if feature is None:
        return full_fn(sample, timestep, encoder_hidden_states)
    return shallow_fn(sample, timestep, encoder_hidden_states, feature), feature
