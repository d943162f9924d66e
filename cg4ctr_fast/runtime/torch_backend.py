"""Torch backend: slots backed by diffusers / transformers modules (eager or torch.compile'd)."""
from __future__ import annotations

import torch

from cg4ctr_fast.models.diffusion import DiffusionModules, model_info
from cg4ctr_fast.runtime.slots import Components


class TextEncoderSlot:
    def __init__(self, text_encoder):
        self.module = text_encoder

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        # SD1.x conditions on the last hidden state; CLIPTextConfig has no use_attention_mask, so no mask.
        return self.module(input_ids.to(self.module.device), attention_mask=None)[0]


class UNetSlot:
    """unet(sample, timestep, encoder_hidden_states) -> noise prediction, plus DeepCache key / non-key steps."""

    # The pipeline's cache_interval > 1 needs `feature_cache_step`; engine slots set this False.
    supports_feature_cache = True

    def __init__(self, unet):
        self.module = unet
        self.forward = unet
        # Set for CUDA-graph compiled UNets: each call is a new step, so inductor may reuse its static
        # output buffer; the loop consumes the previous output before the next call.
        self.mark_step = False
        # The torch.compile mode of the compile backend (None: eager); the DeepCache halves compile with it.
        self.compiled = False
        self.compile_mode = None
        self._splits: dict = {}  # branch -> (DeepCacheUNet, full_fn, shallow_fn)

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states):
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        return self.forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def feature_split(self, branch: int):
        """(DeepCacheUNet, full_fn, shallow_fn) for `branch`, built once; InputError for a branch or UNet it cannot split."""
        if branch not in self._splits:
            from cg4ctr_fast.runtime.deepcache import DeepCacheUNet

            split = DeepCacheUNet(self.module, branch)  # InputError for a bad branch or UNet
            full_fn, shallow_fn = split.full, split.shallow
            if self.compiled:
                # Two graphs per shape (key and non-key step), compiled on first use like the full UNet.
                full_fn = torch.compile(full_fn, mode=self.compile_mode, fullgraph=False)
                shallow_fn = torch.compile(shallow_fn, mode=self.compile_mode, fullgraph=False)
            self._splits[branch] = (split, full_fn, shallow_fn)
        return self._splits[branch]

    @torch.no_grad()
    def feature_cache_step(self, sample, timestep, encoder_hidden_states, *, feature=None, branch: int = 0):
        """A DeepCache step (runtime/deepcache.py): the full UNet when `feature` is None (key step), else the
        shallow blocks around the cached `feature`.

        sample [B, C_in, h, w], timestep 0-dim or [B], encoder_hidden_states [B, 77, D]; feature: None or the
        tensor a previous call returned, with batch B.  branch: which down/up block pair is the shallow part
        (0 = outermost).  Returns (noise prediction [B, C_out, h, w], feature to pass on non-key steps).
        Raises InputError for a branch this UNet does not have.
        """
        from cg4ctr_fast.runtime.deepcache import feature_step

        split, full_fn, shallow_fn = self.feature_split(branch)
        if self.mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        out, new_feature = feature_step(split, full_fn, shallow_fn, sample, timestep, encoder_hidden_states, feature)
        if self.mark_step and feature is None:
            # CUDA-graph outputs live in static buffers the next replay overwrites; the feature outlives it.
            new_feature = new_feature.clone()
        return out, new_feature


class VaeEncoderSlot:
    def __init__(self, vae):
        self.module = vae

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        # Same as AutoencoderKL._encode without tiling: the posterior's moments, sampled by the pipeline with
        # its own generator so every backend draws the same noise.
        moments = self.module.encoder(image)
        if self.module.quant_conv is not None:
            moments = self.module.quant_conv(moments)
        return moments


class VaeDecoderSlot:
    def __init__(self, vae):
        self.module = vae

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.module.decode(latents, return_dict=False)[0]

    @torch.no_grad()
    def decode_fp32(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode in float32: SD's VAE overflows in fp16 on some latents (NaN images); fp32 does not."""
        dtype = self.module.dtype
        if dtype == torch.float32:
            return self(latents)
        self.module.to(dtype=torch.float32)
        try:
            return self.module.decode(latents.float(), return_dict=False)[0]
        finally:
            self.module.to(dtype=dtype)


def torch_components(
    modules: DiffusionModules, *, backend: str = "torch", compile_mode: str | None = None
) -> Components:
    unet = UNetSlot(modules.unet)
    if backend == "compile":
        on_cuda = modules.unet.device.type == "cuda"
        # Inductor. On CUDA the default is "reduce-overhead" (CUDA graphs) with channels_last convolutions:
        # "max-autotune" also graphs but its kernel search took minutes on the SD UNet. Each new shape
        # recompiles (≈10 s warm on 2 CPU cores for the tiny UNet).
        mode = compile_mode or ("reduce-overhead" if on_cuda else None)
        if on_cuda:
            modules.unet.to(memory_format=torch.channels_last)
        unet.forward = torch.compile(modules.unet, mode=mode, fullgraph=False)
        unet.compiled, unet.compile_mode = True, mode
        unet.mark_step = on_cuda and mode in ("reduce-overhead", "max-autotune")
    elif backend != "torch":
        raise ValueError(f"torch_components: backend must be 'torch' or 'compile', got {backend!r}")
    return Components(
        text_encoder=TextEncoderSlot(modules.text_encoder),
        unet=unet,
        vae_encoder=VaeEncoderSlot(modules.vae),
        vae_decoder=VaeDecoderSlot(modules.vae),
        tokenizer=modules.tokenizer,
        scheduler=modules.scheduler,
        info=model_info(modules),
        backend=backend,
        device=modules.unet.device,
        dtype=modules.unet.dtype,
        modules=modules,
    )
