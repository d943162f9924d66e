"""The creative data path: one product image + one prompt per user group in, ranked-ready creatives out.

Stages, top to bottom (see `CreativePipeline.__call__`):
  1. product image and mask (given, the image's alpha, or the saliency net)
  2. seeds: hashlib over (image, prompt, index) unless a generator is passed
  3. prompt embeddings, cached by prompt text
  4. timesteps (strength picks the start)
  5. encode the product once: image latents and masked-image latents
  6. initial latents for the whole batch (groups × images per group)
  7. ONE denoising loop over the whole batch (levers: guidance_cutoff halves the batch after a fraction of
     the steps; cache_interval > 1 reuses the UNet's deep features between key steps, runtime/deepcache.py)
  7b. with preview_top_k: cheap preview decode of every candidate, reward ranks them, top k per group go on
  8. VAE decode
  9. postprocess, restore the original size, paste the product back bit for bit
 10. reward scores, when a reward model is attached

`generate_batch` runs several products, each with its own prompts, through stages 1–3 and 5–6 one product
at a time and then ONE loop (7–8) for all of them: what the serving runtime uses to fill batches across requests.

Backends fill the named slots of `Components` (text_encoder, unet, vae_encoder, vae_decoder); the loop
never forks on the backend. With composite off and the same components, scheduler and generator, the output
equals diffusers' StableDiffusionInpaintPipeline within float tolerance (tests/test_parity.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from cg4ctr_fast.errors import InputError, check_utf8
from cg4ctr_fast.kernels.step import BACKENDS, Blend, fused_unsupported_reason, make_step, supports_fused
from cg4ctr_fast.runtime.slots import Components

GeneratorArg = Union[torch.Generator, list, None]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")  # diffusers' names
PROMPT_CACHE_SIZE = 1024  # embeddings are 77 × 768 fp32 ≈ 236 KB each at SD1.5 size: ≈ 240 MB at most


@dataclass
class Creative:
    """One generated creative for one user group, as `CreativePipeline.__call__` returns it.

    image: by `output_type`, at the product image's original (displayed) size H × W unless noted:
        "pil":    PIL.Image, mode "RGB", 8-bit sRGB;
        "np":     numpy float32 [H, W, 3], values in [0, 1];
        "pt":     torch float32 [3, H, W] on the CPU, values in [0, 1], the same floats as "np";
        "latent": torch [C, h, w] (C = the VAE's latent channels, h × w = height × width / 8), the final
                  denoised latents in the UNet's scaled space (not divided by the VAE scaling factor),
                  on the pipeline's device and dtype, as diffusers returns them: no decode, no composite.
        With composite=False, "np" and "pt" are the decoder's output at the working height × width
        (what diffusers returns); "pil" is resized to H × W.
    prompt: this creative's prompt; group: the index of that prompt in the request (= user group);
    index: the image index within the group (0 .. num_images_per_prompt − 1);
    seed: the 63-bit seed this creative's noise was drawn from when the pipeline derived it, None when
        the caller passed `generator`;
    mask: mode "L" at H × W, 255 (white) = repainted, 0 (black) = product kept (the diffusion mask);
    reward: the attached reward model's score (a CTR in [0, 1] for the project's reward model), or None;
    latents: with return_latents=True, the final latents [C, h, w] float32 on the CPU (as "latent");
    preview_reward: with preview_top_k, the reward model's score of the preview decode (same scale as
        reward) that ranked this creative into its group's top k; else None.
    """

    image: Any
    prompt: str
    group: int
    index: int
    seed: Optional[int]
    mask: Image.Image
    reward: Optional[float] = None
    # The final denoised latents [C, h, w] in the UNet's (scaled) space, with return_latents=True: what
    # training on the pipeline's own output wants, without a VAE decode + encode round trip.
    latents: Optional[torch.Tensor] = None
    # With preview_top_k: the reward of this creative's cheap preview decode, by which it was chosen.
    preview_reward: Optional[float] = None


@dataclass
class ProductJob:
    """One product and its prompts, for `CreativePipeline.generate_batch` (the per-product arguments of `__call__`).

    prompt: a string or one per user group; image: a path, bytes, PIL image or `imaging.ProductImage`;
    mask_image, negative_prompt, num_images_per_prompt, seed, generator: as in `__call__`.
    """

    prompt: Union[str, Sequence[str]]
    image: Any
    mask_image: Any = None
    negative_prompt: Union[str, Sequence[str], None] = None
    num_images_per_prompt: int = 1
    seed: int = 0
    generator: GeneratorArg = None

    def prompts(self) -> list[str]:
        """The prompts as a list; InputError for anything but a str or a list / tuple of them."""
        if isinstance(self.prompt, (bytes, bytearray)):
            # list(b"...") would be a list of ints; name what was passed instead.
            raise InputError(f"prompt must be str, got {type(self.prompt).__name__}: decode it first (e.g. .decode('utf-8'))")
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt, (list, tuple)):
            return list(self.prompt)
        raise InputError(f"prompt must be a str or a list of str (one per user group), got {type(self.prompt).__name__}")


@dataclass
class _Prepared:
    """One product after stages 1–3 and 5–6: what the shared loop concatenates and splits back."""

    product: Any
    mask: Image.Image
    paste_mask: Image.Image
    height: int
    width: int
    batch: int
    per_prompt: int
    creative_prompts: list
    seeds: list
    generators: Optional[list]
    step_generator: Any
    prompt_embeds: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    image_latents: Optional[torch.Tensor]
    mask_latents: torch.Tensor
    masked_image_latents: torch.Tensor


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from hashlib over the parts: the same request gives the same pixels in any process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    # CPU generators on every device: the noise is then the same on a CPU and a GPU (randn_tensor moves it).
    return torch.Generator("cpu").manual_seed(seed)


class CreativePipeline:
    """Stable Diffusion inpainting for ad creatives: the product stays, the background follows the prompt.

    One product image and one prompt per user group in; `Creative`s out, all groups denoised in one
    batched loop.  The product's pixels are pasted back after decoding (bit for bit where opaque), the
    background is repainted.  Built on diffusers components and argument names; with composite=False the
    output equals diffusers' StableDiffusionInpaintPipeline on the same components (tests/test_parity.py).

    Build it with `from_preset`, `from_pretrained`, `from_diffusers`, `from_modules` or `from_engines`
    rather than from `Components` directly.

    Args (all keyword-only after `components`):
        components: the filled backend slots (text_encoder, unet, vae_encoder, vae_decoder, scheduler).
        saliency: a U2NetP (or any module with its interface) that finds the product when neither a mask
            nor transparency is given; None: such a call raises InputError.
        reward: callable (list of PIL RGB images, list of group indices) → list of floats, scored on every
            creative (stage 10; "np" / "pt" outputs are rounded to 8 bits for it, "latent" skips it);
            None: `Creative.reward` stays None.
        saliency_threshold: saliency in [0, 1] at or above which a pixel is product; None (default): the
            net's own config (`U2NetP.config.threshold`, 0.5 for the official weights).
        saliency_dilate_px: pixels (≥ 0) the repaint region grows over the product edge, used as given at
            every size; None (default): the net's config.dilate_px when it records one, else scaled with the
            image (`saliency.default_dilate_px`: 0 px below 512 px, 1 px per 512 px of the shorter side).
        saliency_size: the square side in pixels the saliency net runs at; None (default): the net's own
            config, i.e. the size it was trained at (`cg4ctr-train saliency` records it), 320 for the
            official u2netp.pth.
        max_side: the longer side in pixels inputs are resized to for the model (a multiple of 8);
            None: the preset's resolution (64 for `tiny`, 512 for `sd15-inpaint`).
    Raises InputError for a bad saliency threshold, size or dilation.
    """

    # The tensors a callback_on_step_end may read and replace: diffusers' StableDiffusionInpaintPipeline list.
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"]

    def __init__(
        self,
        components: Components,
        *,
        saliency: Optional[torch.nn.Module] = None,
        reward: Optional[Callable] = None,
        saliency_threshold: Optional[float] = None,
        saliency_dilate_px: Optional[int] = None,
        saliency_size: Optional[int] = None,
        max_side: Optional[int] = None,
    ):
        from diffusers.image_processor import VaeImageProcessor

        from cg4ctr_fast.models.saliency import SaliencyConfig

        # Validates the explicit values now (InputError), so a bad one fails before any image is read.
        SaliencyConfig(size=saliency_size or 320, threshold=0.5 if saliency_threshold is None else saliency_threshold,
                       dilate_px=saliency_dilate_px)
        self.components = components
        self.saliency = saliency
        self.reward = reward
        self.saliency_threshold = saliency_threshold
        self.saliency_dilate_px = saliency_dilate_px
        # None: the net decides (a net trained at 64 px and run at 320 kept 57 of 1,681 product pixels).
        self.saliency_size = saliency_size
        self.max_side = max_side or components.info.resolution
        scale = components.info.vae_scale_factor
        # Same processors as diffusers' inpainting pipeline, so preprocessing is identical.
        self.image_processor = VaeImageProcessor(vae_scale_factor=scale)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self._prompt_cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self._cache_lock = threading.Lock()
        # Fused denoising step (guidance + scheduler update + blend in one pass): None = on CUDA when the
        # scheduler has a fused path; True/False force it (CPU: the fused math runs as its torch reference).
        self.fuse_step: Optional[bool] = None
        # "auto": "triton" on CUDA tensors when triton imports, else "torch"; "triton", "torch", or "native"
        # (the C++/CUDA ops built by `make native`; also fuses the step on CPU when fuse_step is None, and a
        # missing library fails the first call in one line naming `make native`).
        self.step_backend = "auto"
        # Attach a cg4ctr_fast.runtime.timing.StageTimer to record seconds per stage (benchmarks).
        self.timer = None

    def _stage(self, name: str):
        return self.timer.stage(name) if self.timer is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_modules(
        cls,
        modules,
        *,
        backend: str = "torch",
        scheduler: Optional[str] = None,
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        saliency=None,
        lora=None,
        lora_scale=1.0,
        **kwargs,
    ) -> "CreativePipeline":
        """A pipeline over torch modules (a `DiffusionModules`: unet, vae, text_encoder, tokenizer, scheduler).

        backend: "torch" (eager) or "compile" (torch.compile'd slots).
        scheduler: None keeps the modules' scheduler; a name ("ddim", "euler", "dpm++", ...) swaps it.
        device / dtype: move and cast the modules first (e.g. "cuda", torch.float16); None keeps them.
        saliency: a U2NetP module, or a path to its weights (.pth / .pt / .safetensors, or a folder written
            by `cg4ctr-train saliency`), whose config decides its input size (see `load_saliency`).
        lora: a LoRA (diffusers, kohya or peft files, e.g. a `cg4ctr-train cycle` checkpoint's `lora/`) fused
            into the weights through diffusers before anything runs, so it costs nothing per step;
            lora_scale multiplies it (1.0 = as trained).  Several LoRAs (e.g. an LCM-LoRA and a style LoRA): a
            list of paths with lora_scale one float for all or a list of one per LoRA, or a list of (path, scale)
            pairs; they are fused together through diffusers' set_adapters + fuse_lora (`export.lora.fuse_loras`).
        **kwargs: passed to `CreativePipeline(...)` (reward, saliency_threshold, max_side, ...).
        Raises InputError for an unknown scheduler or backend, an unreadable saliency file or LoRA, or a LoRA
        for another architecture.
        """
        from cg4ctr_fast.models.diffusion import swap_scheduler
        from cg4ctr_fast.runtime.torch_backend import torch_components

        if lora is not None:
            from cg4ctr_fast.export.lora import fuse_loras, lora_pairs

            fuse_loras(modules, lora_pairs(lora, lora_scale))
        if scheduler is not None:
            modules.scheduler = swap_scheduler(modules.scheduler, scheduler)
        if device is not None or dtype is not None:
            _move(modules, device or modules.unet.device, dtype or modules.unet.dtype)
        if isinstance(saliency, (str, os.PathLike)):
            saliency = _load_saliency(saliency)
        return cls(torch_components(modules, backend=backend), saliency=saliency, **kwargs)

    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        model: Optional[str] = None,
        random_weights: bool = False,
        seed: int = 0,
        unet_in_channels: Optional[int] = None,
        scheduler: Optional[str] = None,
        saliency: Optional[str] = None,
        backend: str = "torch",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "CreativePipeline":
        """A pipeline for a named preset: `tiny` builds in code (64×64); `sd15-inpaint` loads `model`.

        model: a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/); nothing is
            downloaded.  random_weights: build the preset's architecture with weights seeded by `seed`
            (latency work; the images are noise).  unet_in_channels: 9 (inpainting UNet) or 4 (plain UNet
            with masked latent blending), built-in presets only.  Other arguments as in `from_modules`.
        Raises InputError for an unknown preset, a preset without built-in weights and neither `model`
        nor `random_weights`, or a model folder that cannot be used.
        """
        from cg4ctr_fast.config import get_preset, with_unet_channels
        from cg4ctr_fast.models.diffusion import build_modules, load_modules

        preset = get_preset(name)
        if unet_in_channels is not None:
            preset = with_unet_channels(preset, unet_in_channels)
        if model is not None:
            modules = load_modules(model, dtype=dtype)
        elif random_weights or preset.buildable:
            modules = build_modules(preset, seed=seed, dtype=dtype)
        else:
            raise InputError(
                f"preset {name!r} has no built-in weights: pass --model PATH (a local diffusers folder) "
                "or --random-weights for latency work"
            )
        return cls.from_modules(
            modules, backend=backend, scheduler=scheduler, device=device, dtype=dtype, saliency=saliency, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        scheduler: Optional[str] = None,
        saliency: Optional[str] = None,
        backend: str = "torch",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "CreativePipeline":
        """Load a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/); no network.

        Arguments as in `from_modules`.  Raises InputError when the folder is missing, incomplete or holds an
        architecture this pipeline does not run.
        """
        from cg4ctr_fast.models.diffusion import load_modules

        modules = load_modules(path, dtype=dtype)
        return cls.from_modules(
            modules, backend=backend, scheduler=scheduler, device=device, dtype=dtype, saliency=saliency, **kwargs
        )

    @classmethod
    def from_diffusers(cls, pipe, saliency=None, reward=None, **kwargs) -> "CreativePipeline":
        """Reuse the components of an existing diffusers inpainting pipeline (no copy of the weights).

        pipe: a `StableDiffusionInpaintPipeline` (or any pipeline with unet, vae, text_encoder, tokenizer and
        scheduler).  Other arguments as in `from_modules`.
        """
        from cg4ctr_fast.models.diffusion import DiffusionModules

        modules = DiffusionModules(
            unet=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler=pipe.scheduler,
            model_id=f"diffusers:{getattr(pipe, 'name_or_path', None) or type(pipe).__name__}",
        )
        return cls.from_modules(modules, saliency=saliency, reward=reward, **kwargs)

    @classmethod
    def from_engines(
        cls,
        path: str,
        *,
        backend: str = "onnxruntime",
        saliency: Optional[str] = None,
        scheduler: Optional[str] = None,
        providers: Optional[Sequence[str]] = None,
        reward: Any = None,
        **kwargs,
    ) -> "CreativePipeline":
        """Run a `cg4ctr-export` folder: ONNX models in ONNX Runtime, or TensorRT engines. Same loop, other slots.

        saliency: U2NetP weights for the torch saliency net; by default the folder's exported one, if any.
        reward: None (default): the folder's reward engines when it was exported with `--reward`, attached as a
            `cg4ctr_fast.runtime.onnxruntime_backend.PipelineReward` (no title, no caption and the default
            user-group row unless set on it: `pipe.reward.title`, `.captions`, `.group_features`), so every
            creative gets a calibrated CTR; False: none; a callable (images, groups) → scores: that one.
        Files are checked against the folder's manifest first (sizes and sha256; graphs over 256 MiB by size):
        a modified tokenizer, scheduler, model_info.json or graph is an InputError naming the file.
        """
        if backend == "onnxruntime":
            from cg4ctr_fast.runtime.onnxruntime_backend import (
                onnxruntime_components,
                onnxruntime_reward,
                onnxruntime_saliency,
            )

            components = onnxruntime_components(path, providers=providers, scheduler=scheduler)
            saliency_model = _load_saliency(saliency) if saliency else onnxruntime_saliency(path, providers=providers)
            folder_reward = (lambda: onnxruntime_reward(path, providers=providers))  # noqa: E731
        elif backend == "tensorrt":
            from cg4ctr_fast.runtime.tensorrt_backend import tensorrt_components, tensorrt_reward, tensorrt_saliency

            components = tensorrt_components(path, scheduler=scheduler)
            saliency_model = _load_saliency(saliency) if saliency else tensorrt_saliency(path)
            folder_reward = (lambda: tensorrt_reward(path))  # noqa: E731
        else:
            raise InputError(f"unknown engine backend {backend!r}; choose onnxruntime or tensorrt")
        if reward is None:
            reward = folder_reward()
        elif reward is False:
            reward = None
        return cls(components, saliency=saliency_model, reward=reward, **kwargs)

    @property
    def step_backend(self) -> str:
        """The fused step's backend: "auto", "torch", "triton" or "native" (see the constructor's comment)."""
        return self._step_backend

    @step_backend.setter
    def step_backend(self, value: str) -> None:
        # Checked here: a typo would otherwise run the torch step without a word.
        if not isinstance(value, str) or value not in BACKENDS:
            raise ValueError(f"step_backend must be one of {', '.join(BACKENDS)}, got {value!r}")
        self._step_backend = value

    @property
    def scheduler(self):
        return self.components.scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        self.components.scheduler = scheduler

    # ------------------------------------------------------------------ stage helpers
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings [len(prompts), 77, D]; each distinct prompt is encoded once and cached by its text."""
        comps = self.components
        with self._cache_lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            tokens = comps.tokenizer(
                missing,
                padding="max_length",
                max_length=comps.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            embeds = comps.text_encoder(tokens.input_ids.to(comps.device)).to(comps.dtype)
            with self._cache_lock:
                for prompt, row in zip(missing, embeds):
                    self._prompt_cache[prompt] = row
                while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                    self._prompt_cache.popitem(last=False)
        with self._cache_lock:
            rows = []
            for prompt in prompts:
                self._prompt_cache.move_to_end(prompt)
                rows.append(self._prompt_cache[prompt])
        return torch.stack(rows)

    def clear_prompt_cache(self) -> None:
        with self._cache_lock:
            self._prompt_cache.clear()

    def _encode_image(self, image: torch.Tensor, generator) -> torch.Tensor:
        """Scaled latents sampled from the VAE posterior, as diffusers' `_encode_vae_image` draws them."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.components.vae_encoder(image)
        latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        return self.components.info.scaling_factor * latents

    def saliency_settings(self) -> tuple[int, float]:
        """(input size in px, threshold) the saliency net runs with: explicit values, else the net's config.

        A net trained by `cg4ctr-train saliency` records its training size (e.g. 64) in its folder's
        config.json and safetensors metadata; `load_saliency` puts it on `net.config`.  Nets without a
        config (the official u2netp.pth) run at 320 px with threshold 0.5.  An engine folder carries its
        net's config in `saliency/config.json`, so an exported net runs at the size it was trained at.
        """
        from cg4ctr_fast.models.saliency import SaliencyConfig

        config = getattr(self.saliency, "config", None)
        if not isinstance(config, SaliencyConfig):
            config = SaliencyConfig()
        size = self.saliency_size if self.saliency_size is not None else config.size
        threshold = self.saliency_threshold if self.saliency_threshold is not None else config.threshold
        return size, threshold

    def product_mask(self, rgb: Image.Image, mask_image=None, alpha_mask: Optional[Image.Image] = None) -> Image.Image:
        """The repaint mask at the image's size: given, the image's alpha, or the saliency net's.

        rgb: the product as the model sees it (mode "RGB", displayed orientation, sRGB).
        mask_image: a path, bytes or PIL image of exactly rgb's size, EXIF-oriented like the image and
            binarized at 128 (≥ 128 = repaint).  alpha_mask: the mask from the image's alpha.
        Returns mode "L": 255 = repaint, 0 = keep.  Raises InputError for a mask of another size, an all-black
        or all-white mask, or when there is no mask, no transparency and no saliency net.
        """
        from cg4ctr_fast.imaging import check_mask, load_mask

        if mask_image is not None:
            return load_mask(mask_image, rgb.size)  # binarized at 128, size and content checked
        if alpha_mask is not None:
            mask = alpha_mask
        elif self.saliency is not None:
            from cg4ctr_fast.models.saliency import mask_from_saliency, predict_saliency

            size, threshold = self.saliency_settings()
            with self._stage("saliency"):
                saliency_map = predict_saliency(self.saliency, rgb, size=size)
            dilate = self.saliency_dilate_px  # explicit, else the net's config, else scaled (None)
            if dilate is None:
                dilate = getattr(getattr(self.saliency, "config", None), "dilate_px", None)
            mask = mask_from_saliency(saliency_map, threshold=threshold, dilate_px=dilate)
        else:
            raise InputError(
                "no mask: pass mask_image (white = background to repaint), an RGBA image with transparency, "
                "or attach a saliency model"
            )
        check_mask(mask)
        return mask

    # ------------------------------------------------------------------ the data path
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]],
        image,
        mask_image=None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: GeneratorArg = None,
        output_type: str = "pil",
        composite: bool = True,
        height: Optional[int] = None,
        width: Optional[int] = None,
        eta: float = 0.0,
        seed: int = 0,
        show_progress: bool = True,
        return_latents: bool = False,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_cutoff: float = 1.0,
        cache_interval: int = 1,
        cache_branch: int = 0,
        preview_top_k: Optional[int] = None,
    ) -> list[Creative]:
        """Generate creatives: one product image, one prompt per user group, one denoising loop for all.

        Args:
            prompt: a string or a list of strings, one per user group (group g = prompt g).
            image: the product photo: a path, raw file bytes, a PIL image, or an `imaging.ProductImage`.
                Every input type takes the same load path (`imaging.load_product`): EXIF orientation
                applied (the photo as a viewer displays it), an embedded non-sRGB ICC profile (Display
                P3, Adobe RGB, CMYK) converted to sRGB, straight alpha kept for the composite.  At most
                4096 × 4096 pixels and 64 MiB; any mode (grayscale, palette, CMYK, 16-bit) is converted.
            mask_image: white (≥ 128) = background to repaint, black = product to keep; a path, bytes or
                PIL image of exactly the image's displayed size.  None: the image's alpha (alpha < 128 is
                repainted), else the attached saliency net.
            negative_prompt: a string or one per prompt (used when guidance_scale > 1); None = "".
            num_inference_steps: denoising steps (≥ 1, at most what the scheduler was trained with).
            guidance_scale: classifier-free guidance weight w ≥ 0; guidance runs when w > 1.
            strength: in [0, 1]; 1 starts from pure noise, lower values start from the noised product
                photo and run int(num_inference_steps × strength) steps.
            num_images_per_prompt: creatives per group (≥ 1); the batch is groups × this.
            generator: None (default): each creative's noise comes from its own seed,
                hashlib(sha256 of the sRGB product pixels, prompt, index within the group, `seed`), so the
                same request gives the same pixels in any process and a creative does not depend on the
                other groups in the batch; `Creative.seed` records it.  A torch.Generator, or a list of
                one per creative, is used as diffusers uses it (noise drawn from it; the product is
                VAE-encoded with the first one); `Creative.seed` is then None.
            output_type: "pil" (default), "np", "pt" or "latent"; see `Creative.image` for shapes,
                dtypes and ranges.  "np" and "pt" composite in float (no 8-bit rounding of the background),
                "pil" in 8-bit integers.  At the working size the two agree to within one 8-bit step;
                when the working size differs from the input's, "pil" is resized back with Pillow's 8-bit
                LANCZOS, which clips between its passes (up to 8/255 apart measured on the tiny preset).  "latent" skips the VAE
                decode, the composite and the reward model.
            composite: paste the product back after decoding (default True): opaque product pixels are
                copied bit for bit from the sRGB input, partially transparent ones (an RGBA cut-out's
                anti-aliased edge) are blended over the generated background, C·a + G·(1 − a)
                (`imaging.composite` states the rounding).  False: the decoder's output as is.
            height, width: the size in pixels the model runs at, positive multiples of 8.  By default the
                input is resized (aspect ratio kept) so its longer side equals the preset's resolution
                (`max_side`: 64 for `tiny`, 512 for `sd15-inpaint`), each side rounded to the nearest
                multiple of 8 (`imaging.working_size`); height / width override that.  The creatives come
                back at the input's own size either way (except "latent", and "np" / "pt" without
                composite).
            eta: DDIM's η (0 = deterministic DDIM) and TCD's γ (its stochasticity, in [0, 1]); ignored by other schedulers.
            seed: mixed into every derived seed (ignored with `generator`).
            show_progress: a tqdm bar over the denoising steps.
            return_latents: also return each creative's final latents in `Creative.latents`.
            callback_on_step_end: diffusers' contract: called after each denoising step (after the
                scheduler step and, for a 4-channel UNet, the masked blend) as
                callback_on_step_end(pipeline, i, t, callback_kwargs) with the step index i, the timestep
                t and a dict holding the tensors named in `callback_on_step_end_tensor_inputs`; it returns
                a dict, and any of "latents", "prompt_embeds", "mask", "masked_image_latents" in it replaces
                that tensor for the following steps ("negative_prompt_embeds" is accepted and, as in
                diffusers, not read again).  A diffusers `PipelineCallback` / `MultiPipelineCallbacks`
                supplies its own tensor_inputs; callbacks that change pipeline attributes (such as
                `_guidance_scale`) are not honoured.  Shapes as in diffusers: latents [B, C, h, w];
                prompt_embeds [2B, 77, D] with guidance ([negatives; prompts]), else [B, 77, D];
                mask [2B or B, 1, h, w] in {0, 1}; masked_image_latents [2B or B, C, h, w].
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs` (default ["latents"]).
            guidance_cutoff: in (0, 1]: classifier-free guidance runs for the first ceil(guidance_cutoff × n)
                of the n denoising steps actually run (after strength); from the next step the UNet batch
                halves (the prompt half of the embeddings, un-doubled mask and masked-image latents) and the
                step is unguided (diffusers' SDCFGCutoffCallback idea, done inside the loop so the 9-channel
                input halves too).  1.0 (default) is the plain loop, bit for bit.  Ignored when guidance is
                off.  After the cut-off a callback sees prompt_embeds [B, 77, D], mask [B, 1, h, w] and
                masked_image_latents [B, C, h, w], and "negative_prompt_embeds" is None.
            cache_interval: ≥ 1.  DeepCache feature reuse (runtime/deepcache.py): step i (0-based) is a key
                step when i % cache_interval == 0 and runs the full UNet, caching the feature entering its
                shallow up block(s); the other steps run only the shallow blocks around that feature.
                1 (default) is the plain loop, bit for bit.  > 1 needs a UNet slot with
                supports_feature_cache (torch and compile backends); ONNX Runtime / TensorRT refuse it.
                The image changes: measured in bench/levers.py, not assumed.
            cache_branch: which down/up block pair is the shallow part for cache_interval > 1: 0 (default,
                outermost, cheapest) .. number of up blocks − 1.
            preview_top_k: None (default) or 1 .. num_images_per_prompt: rank candidates by cheap previews.
                Every creative's latents are decoded by `components.preview_decoder`, composited as the
                output would be and scored by the reward model; per group only the best preview_top_k (by
                that preview reward) are decoded by the full VAE, composited and rescored.  Needs a preview
                decoder and a reward model.

        Returns: a list of groups × num_images_per_prompt `Creative`s, group-major (group 0's images first);
            with preview_top_k, groups × preview_top_k of them, group-major, each group's best preview
            first (`Creative.index` stays the image's index among all candidates, so its seed and noise
            are those of the full run; `Creative.preview_reward` is set).

        Raises:
            InputError (a ValueError) for anything the caller controls: an unreadable, corrupt, oversized or
                empty image or mask, a mask of another size or marking nothing / everything, no mask at
                all, a bad step count, guidance, strength, size, output type, negative-prompt or generator
                count, a non-UTF-8 prompt, an unknown callback tensor name, or a callback returning
                something other than a dict; a guidance_cutoff outside (0, 1], a cache_interval < 1, a
                cache_branch the UNet does not have, cache_interval > 1 on a backend without feature
                caching, a preview_top_k outside 1 .. num_images_per_prompt or without a preview decoder
                or reward model.
            TypeError for an image that is not a path, bytes, PIL image or ProductImage (arrays and tensors
                are not accepted: wrap them with PIL.Image.fromarray).
            RuntimeError when the VAE decode gives NaN/Inf even in float32.
        """
        job = ProductJob(prompt, image, mask_image=mask_image, negative_prompt=negative_prompt,
                         num_images_per_prompt=num_images_per_prompt, seed=seed, generator=generator)
        return self._run(
            [job], num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, strength=strength,
            output_type=output_type, composite=composite, height=height, width=width, eta=eta,
            show_progress=show_progress, return_latents=return_latents,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            guidance_cutoff=guidance_cutoff, cache_interval=cache_interval, cache_branch=cache_branch,
            preview_top_k=preview_top_k,
        )[0]

    @torch.no_grad()
    def generate_batch(
        self,
        jobs: Sequence["ProductJob"],
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        output_type: str = "pil",
        composite: bool = True,
        height: Optional[int] = None,
        width: Optional[int] = None,
        eta: float = 0.0,
        show_progress: bool = True,
        return_latents: bool = False,
        guidance_cutoff: float = 1.0,
        cache_interval: int = 1,
        cache_branch: int = 0,
        preview_top_k: Optional[int] = None,
    ) -> list[list[Creative]]:
        """Several products, each with its own prompts (user groups), in ONE denoising loop.

        Each product is prepared as `__call__` prepares it (its mask, seeds, prompt embeddings and its own
        VAE encodes, once per product), then the latents of all products are concatenated and denoised
        together, decoded together and split back.  With the same arguments, product k's creatives equal
        `pipe(jobs[k].prompt, jobs[k].image, ...)`: the same seeds, so the same noise; the pixels agree within
        the float tolerance of a larger UNet batch (tests/test_serve_runtime.py); product pixels bit-exact.

        jobs: `ProductJob`s; all must have the same working size (height × width after `working_size`, or the
            explicit height/width); the serving runtime groups requests by it.
        Other arguments as in `__call__`, shared by every job (guidance_cutoff, cache_interval, cache_branch and
        preview_top_k included; preview_top_k must be ≤ every job's num_images_per_prompt).
        Returns one list of `Creative`s per job, in job order, each group-major as `__call__` returns it.
        Raises InputError as `__call__` does (naming the job), and when the jobs' working sizes differ.
        """
        return self._run(
            list(jobs), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, strength=strength,
            output_type=output_type, composite=composite, height=height, width=width, eta=eta,
            show_progress=show_progress, return_latents=return_latents,
            guidance_cutoff=guidance_cutoff, cache_interval=cache_interval, cache_branch=cache_branch,
            preview_top_k=preview_top_k,
        )

    def _run(
        self,
        jobs: list["ProductJob"],
        *,
        num_inference_steps: int,
        guidance_scale: float,
        strength: float,
        output_type: str,
        composite: bool,
        height: Optional[int],
        width: Optional[int],
        eta: float,
        show_progress: bool,
        return_latents: bool,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance_cutoff: float = 1.0,
        cache_interval: int = 1,
        cache_branch: int = 0,
        preview_top_k: Optional[int] = None,
    ) -> list[list[Creative]]:
        """The data path for one or more products; see `__call__` (one) and `generate_batch` (several)."""
        from diffusers.utils.torch_utils import randn_tensor
        from tqdm.auto import tqdm

        comps = self.components
        info = comps.info
        device, dtype = comps.device, comps.dtype
        if not jobs:
            raise InputError("no product: pass at least one job")
        for job in jobs:
            if not isinstance(job, ProductJob):
                raise InputError(f"jobs must be ProductJob objects, got {type(job).__name__}")
            _check_call_args(job.prompts(), num_inference_steps, guidance_scale, strength,
                             job.num_images_per_prompt, output_type, scheduler=comps.scheduler)
        scale = info.vae_scale_factor
        # The latents are side // scale; the UNet halves them three times, hence 8 at the least.
        multiple = max(8, scale)
        for side_name, side in (("height", height), ("width", width)):
            if side is not None and (side <= 0 or side % multiple):
                raise InputError(f"{side_name} must be a positive multiple of {multiple}, got {side}")
        callback_inputs = _callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if info.unet_in_channels not in (4, 9):
            raise InputError(f"the UNet has {info.unet_in_channels} input channels; 4 or 9 are supported")
        four_channel = info.unet_in_channels == 4
        do_cfg = guidance_scale > 1.0
        self._check_levers(jobs, guidance_cutoff, cache_interval, cache_branch, preview_top_k, output_type)

        # 4. timesteps (shared by every product of the batch) ------------------------------------
        # A fresh scheduler per call: scheduler state (step index, solver history) is per request.
        scheduler = comps.scheduler.__class__.from_config(comps.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        if len(timesteps) < 1:
            raise InputError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step")

        # 1–3, 5–6 per product: image and mask, seeds, prompt embeddings, latents encoded once per product.
        prepared = [
            self._prepare(job, scheduler=scheduler, timesteps=timesteps, strength=strength, do_cfg=do_cfg,
                          height=height, width=width, randn_tensor=randn_tensor)
            for job in jobs
        ]
        sizes = {(p.height, p.width) for p in prepared}
        if len(sizes) > 1:
            listed = ", ".join(f"{w}×{h}" for h, w in sorted(sizes))
            raise InputError(f"products of different working sizes ({listed}) cannot share one denoising batch; "
                             "group them by size or pass height and width")
        height, width = prepared[0].height, prepared[0].width
        batch = sum(p.batch for p in prepared)
        if len(prepared) == 1:
            generator = prepared[0].step_generator
        elif any(p.generators is None for p in prepared):
            raise InputError("a batch of several products needs one generator per creative (a list) or none")
        else:
            generator = [g for p in prepared for g in p.generators]
        latents = torch.cat([p.latents for p in prepared])
        mask_latents = torch.cat([p.mask_latents for p in prepared])
        masked_image_latents = torch.cat([p.masked_image_latents for p in prepared])
        # [negatives of every product; prompts of every product]: diffusers' order, one UNet call for both halves.
        if do_cfg:
            prompt_embeds = torch.cat([p.prompt_embeds[: p.batch] for p in prepared]
                                      + [p.prompt_embeds[p.batch:] for p in prepared])
            unet_mask = torch.cat([mask_latents] * 2)
            unet_masked_latents = torch.cat([masked_image_latents] * 2)
        else:
            prompt_embeds = torch.cat([p.prompt_embeds for p in prepared])
            unet_mask, unet_masked_latents = mask_latents, masked_image_latents
        noise = torch.cat([p.noise for p in prepared])
        image_latents = (torch.cat([p.image_latents.expand(p.batch, -1, -1, -1) for p in prepared])
                         if four_channel else None)

        # 7. one denoising loop over all groups of all products --------------------------------
        # `guided`: classifier-free guidance this step. It turns off once, after ceil(cutoff × n) steps.
        guided = do_cfg
        guided_steps = math.ceil(guidance_cutoff * len(timesteps)) if do_cfg else len(timesteps)
        feature = None  # DeepCache: the deep feature of the last key step (cache_interval > 1)
        stepper = self._make_stepper(scheduler, guidance_scale, do_cfg, eta, generator, device)
        for i, t in enumerate(tqdm(timesteps, desc="denoise", disable=not show_progress, leave=False)):
            if guided and i == guided_steps:
                # Guidance cut-off: keep the prompt half ([negatives; prompts] order) of everything the UNet
                # reads, and step unguided. The new stepper shares `scheduler`, whose state (step index, DPM
                # history) both steppers read and advance, so the solver continues where it was.
                guided = False
                prompt_embeds = prompt_embeds[batch:]
                unet_mask, unet_masked_latents = unet_mask[batch:], unet_masked_latents[batch:]
                if feature is not None:  # per-sample features: the prompt half is what that half would cache
                    feature = feature[batch:]
                stepper = self._make_stepper(scheduler, guidance_scale, False, eta, generator, device)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if not four_channel:
                model_input = torch.cat([model_input, unet_mask, unet_masked_latents], dim=1)
            with self._stage("unet"):
                if cache_interval == 1:
                    noise_pred = comps.unet(model_input, t, prompt_embeds)
                else:
                    noise_pred, feature = comps.unet.feature_cache_step(
                        model_input, t, prompt_embeds, feature=None if i % cache_interval == 0 else feature,
                        branch=cache_branch)
            blend = None
            if four_channel:
                next_t = timesteps[i + 1] if i < len(timesteps) - 1 else None
                blend = Blend(mask_latents, image_latents, noise, next_t)
            with self._stage("step"):
                latents = stepper(noise_pred, t, latents, blend=blend)
            if callback_on_step_end is not None:
                # diffusers' names for our tensors: "mask" / "masked_image_latents" are the UNet's inputs
                # (doubled under guidance), "negative_prompt_embeds" the negative half of prompt_embeds.
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": prompt_embeds[:batch] if guided else None,
                    "mask": unet_mask,
                    "masked_image_latents": unet_masked_latents,
                }
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_inputs})
                if not isinstance(outputs, dict):
                    raise InputError(
                        f"callback_on_step_end must return a dict (diffusers' contract), got {type(outputs).__name__}"
                    )
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                if "mask" in outputs:
                    unet_mask = outputs.pop("mask")
                    # The 4-channel blend reads the unguided half, as diffusers' mask.chunk(2) does.
                    mask_latents = unet_mask.chunk(2)[0] if guided else unet_mask
                unet_masked_latents = outputs.pop("masked_image_latents", unet_masked_latents)

        # 7b. preview ranking: which creatives get the full decode (all of them without preview_top_k) ------
        picks = [list(range(p.batch)) for p in prepared]  # per product: indices into its batch, output order
        preview_rewards: list[list[Optional[float]]] = [[None] * p.batch for p in prepared]
        if preview_top_k is not None:
            picks, preview_rewards = self._preview_rank(latents, prepared, preview_top_k, composite)
            offsets = np.cumsum([0] + [p.batch for p in prepared[:-1]])
            latents = latents[[int(o) + k for o, ks in zip(offsets, picks) for k in ks]]

        if output_type == "latent":
            # diffusers returns the scaled latents themselves: no decode, so no composite and no reward.
            images = list(latents)
        else:
            # 8. decode -------------------------------------------------------------------------
            with self._stage("vae_decode"):
                decoded = comps.vae_decoder(latents / info.scaling_factor)
                finite = bool(torch.isfinite(decoded).all())  # one device sync per call, not two
                if not finite and hasattr(comps.vae_decoder, "decode_fp32"):
                    decoded = comps.vae_decoder.decode_fp32(latents.float() / info.scaling_factor)
                    finite = bool(torch.isfinite(decoded).all())
            if not finite:
                raise RuntimeError(
                    "VAE decode produced NaN/Inf: run the VAE in float32 (fp16 SD VAEs overflow) or lower the guidance"
                )

            # 9. postprocess, restore each original size, paste each product back --------------
            images = []
            with self._stage("composite"):
                start = 0
                for p, ks in zip(prepared, picks):
                    images += self._postprocess(decoded[start:start + len(ks)], p.product, p.paste_mask,
                                                composite=composite, output_type=output_type)
                    start += len(ks)
        results: list[list[Creative]] = []
        start = 0
        for p, ks, previews in zip(prepared, picks, preview_rewards):
            creatives = [
                Creative(
                    image=images[start + j],
                    prompt=p.creative_prompts[k],
                    group=k // p.per_prompt,
                    index=k % p.per_prompt,
                    seed=p.seeds[k],
                    mask=p.mask,
                    latents=latents[start + j].detach().float().cpu() if return_latents else None,
                    preview_reward=previews[k],
                )
                for j, k in enumerate(ks)
            ]
            start += len(ks)

            # 10. reward --------------------------------------------------------------------------
            if self.reward is not None and output_type != "latent":
                with self._stage("reward"):
                    # The reward model scores what would be shipped: 8-bit RGB images, whatever the output type.
                    shown = [c.image if output_type == "pil" else _to_pil(c.image) for c in creatives]
                    scores = self.reward(shown, [c.group for c in creatives])
                for creative, score in zip(creatives, scores):
                    creative.reward = float(score)
            results.append(creatives)
        return results

    def _check_levers(self, jobs, guidance_cutoff, cache_interval, cache_branch, preview_top_k, output_type) -> None:
        """InputError (one line) for a bad guidance_cutoff / cache_interval / cache_branch / preview_top_k."""
        comps = self.components
        if (isinstance(guidance_cutoff, bool) or not isinstance(guidance_cutoff, numbers.Real)
                or not math.isfinite(guidance_cutoff) or not 0.0 < guidance_cutoff <= 1.0):
            raise InputError(f"guidance_cutoff must be a number in (0, 1], got {guidance_cutoff!r}")
        if isinstance(cache_interval, bool) or not isinstance(cache_interval, numbers.Integral) or cache_interval < 1:
            raise InputError(f"cache_interval must be an integer ≥ 1, got {cache_interval!r}")
        if isinstance(cache_branch, bool) or not isinstance(cache_branch, numbers.Integral) or cache_branch < 0:
            raise InputError(f"cache_branch must be an integer ≥ 0, got {cache_branch!r}")
        if cache_interval > 1:
            if not getattr(comps.unet, "supports_feature_cache", False):
                raise InputError(f"cache_interval > 1 needs a UNet that can run its shallow blocks alone; the "
                                 f"{comps.backend} backend runs a whole-UNet engine (use cache_interval=1, or the "
                                 "torch / compile backend)")
            if hasattr(comps.unet, "feature_split"):
                comps.unet.feature_split(cache_branch)  # InputError for a branch this UNet does not have
        if preview_top_k is not None:
            if isinstance(preview_top_k, bool) or not isinstance(preview_top_k, numbers.Integral):
                raise InputError(f"preview_top_k must be None or an integer ≥ 1, got {preview_top_k!r}")
            smallest = min(job.num_images_per_prompt for job in jobs)
            if not 1 <= preview_top_k <= smallest:
                raise InputError(f"preview_top_k must be in 1..num_images_per_prompt ({smallest}), got {preview_top_k}")
            if comps.preview_decoder is None:
                raise InputError("preview_top_k needs a preview decoder (components.preview_decoder, e.g. a TAESD "
                                 "AutoencoderTiny); none is attached")
            if self.reward is None:
                raise InputError("preview_top_k ranks previews by the reward model; no reward model is attached")

    def _preview_rank(self, latents: torch.Tensor, prepared: list, top_k: int, composite: bool):
        """Decode every candidate with the preview decoder, score it, keep each group's best top_k.

        Returns (picks, preview_rewards): per product, the chosen indices into its batch (group-major, each
        group's best preview first, ties by index) and the preview reward of every candidate.
        The previews are postprocessed like the "pil" output (resized, product pasted when `composite`),
        since the reward model scores what would be shipped.
        """
        comps = self.components
        with self._stage("preview_decode"):
            previews = comps.preview_decoder(latents / comps.info.scaling_factor)
        picks, rewards = [], []
        start = 0
        with self._stage("preview_reward"):
            for p in prepared:
                shown = self._postprocess(previews[start:start + p.batch], p.product, p.paste_mask,
                                          composite=composite, output_type="pil")
                scores = [float(x) for x in self.reward(shown, [k // p.per_prompt for k in range(p.batch)])]
                start += p.batch
                chosen = []
                for g in range(p.batch // p.per_prompt):
                    members = range(g * p.per_prompt, (g + 1) * p.per_prompt)
                    # A NaN preview score ranks last rather than breaking the sort.
                    order = sorted(members, key=lambda k: (-scores[k] if math.isfinite(scores[k]) else math.inf, k))
                    chosen += order[:top_k]
                picks.append(chosen)
                rewards.append(scores)
        return picks, rewards

    def _prepare(self, job: "ProductJob", *, scheduler, timesteps, strength: float, do_cfg: bool,
                 height: Optional[int], width: Optional[int], randn_tensor) -> "_Prepared":
        """Stages 1–3 and 5–6 for one product: mask, seeds, prompt embeddings, its latents (encoded once)."""
        from cg4ctr_fast.imaging import image_sha256, load_product, working_size

        comps = self.components
        info = comps.info
        device, dtype = comps.device, comps.dtype
        prompts = job.prompts()
        per_prompt = job.num_images_per_prompt

        # 1. product image and mask -------------------------------------------------------------
        # One load path for every input type: oriented, sRGB, straight alpha (imaging.load_product).
        product = load_product(job.image, what="image")
        rgb = product.model_rgb
        mask = self.product_mask(rgb, job.mask_image, product.alpha_mask)
        # The composite's keep region: the mask's black part; when the mask comes from the alpha itself, every
        # pixel with alpha > 0, so the anti-aliased outer edge (alpha 1..127) blends over the new background.
        paste_mask = mask
        if job.mask_image is None and product.alpha_mask is not None:
            paste_mask = Image.fromarray(np.where(product.alpha > 0, 0, 255).astype(np.uint8))
        work_w, work_h = working_size(rgb.width, rgb.height, self.max_side)
        height = height or work_h
        width = width or work_w

        # 2. seeds ------------------------------------------------------------------------------
        batch = len(prompts) * per_prompt
        creative_prompts = [p for p in prompts for _ in range(per_prompt)]
        seeds: list[Optional[int]] = [None] * batch
        generator = job.generator
        generators = None
        if generator is None:
            product_key = image_sha256(rgb)
            seeds = [derive_seed(product_key, p, i % per_prompt, job.seed) for i, p in enumerate(creative_prompts)]
            generators = [_generator(s) for s in seeds]
            generator = generators
            encode_generator = _generator(derive_seed(product_key, "vae-encode", job.seed))
        else:
            if isinstance(generator, list) and len(generator) != batch:
                raise InputError(f"got {len(generator)} generators for a batch of {batch} creatives")
            # diffusers encodes the single product image with the first generator.
            encode_generator = generator[0] if isinstance(generator, list) else generator
            if isinstance(generator, list):
                generators = list(generator)

        # 3. prompt embeddings (cached) ---------------------------------------------------------
        negatives = _negative_prompts(job.negative_prompt, len(prompts)) if do_cfg else []
        # One text-encoder call for every new prompt, negatives included; [negatives; prompts] as diffusers.
        with self._stage("text"):
            prompt_embeds = self.encode_prompts(negatives + prompts).repeat_interleave(per_prompt, dim=0)

        # 5. encode the product once ------------------------------------------------------------
        is_strength_max = strength == 1.0
        four_channel = info.unet_in_channels == 4
        scale = info.vae_scale_factor
        init_image = self.image_processor.preprocess(rgb, height=height, width=width).to(torch.float32)
        init_image = init_image.to(device=device, dtype=dtype)
        mask_condition = self.mask_processor.preprocess(mask, height=height, width=width)
        image_latents = None
        if four_channel or not is_strength_max:
            with self._stage("vae_encode"):
                image_latents = self._encode_image(init_image, encode_generator)

        # 6. initial latents --------------------------------------------------------------------
        latent_shape = (batch, info.latent_channels, height // scale, width // scale)
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        if is_strength_max:
            latents = noise * scheduler.init_noise_sigma
        else:
            latent_timestep = timesteps[:1].repeat(batch)
            latents = scheduler.add_noise(image_latents.expand(batch, -1, -1, -1), noise, latent_timestep)
        masked_image = init_image * (mask_condition.to(device=device, dtype=dtype) < 0.5)
        with self._stage("vae_encode"):
            masked_image_latents = self._encode_image(masked_image, encode_generator)
        mask_latents = torch.nn.functional.interpolate(mask_condition, size=(height // scale, width // scale))
        mask_latents = mask_latents.to(device=device, dtype=dtype).expand(batch, -1, -1, -1)
        return _Prepared(
            product=product, mask=mask, paste_mask=paste_mask, height=height, width=width, batch=batch,
            per_prompt=per_prompt, creative_prompts=creative_prompts, seeds=seeds, generators=generators,
            step_generator=generator, prompt_embeds=prompt_embeds, noise=noise, latents=latents,
            image_latents=image_latents, mask_latents=mask_latents,
            masked_image_latents=masked_image_latents.expand(batch, -1, -1, -1),
        )

    def _make_stepper(self, scheduler, guidance_scale: float, do_cfg: bool, eta: float, generator, device):
        """The per-step work outside the UNet: fused when asked (or on CUDA), else diffusers' literal sequence."""
        fuse = self.fuse_step
        native = self.step_backend == "native" and fuse is not False
        if native:  # asked for by name: a missing library fails here, whatever the scheduler
            from cg4ctr_fast.kernels.native import load

            load()
        if fuse is None:
            fuse = (device.type == "cuda" or self.step_backend == "native") and supports_fused(scheduler, eta)
            if native and not fuse:
                warnings.warn(f"step_backend='native': {fused_unsupported_reason(scheduler, eta)}; running "
                              "diffusers' unfused step", RuntimeWarning, stacklevel=3)
        if fuse:
            reason = fused_unsupported_reason(scheduler, eta)
            if reason is not None:
                raise InputError(f"fused step unavailable: {reason}; set fuse_step=False")
            return make_step(scheduler, guidance_scale, do_cfg, fused=True, backend=self.step_backend, eta=eta,
                             generator=generator)
        return make_step(scheduler, guidance_scale, do_cfg, fused=False, eta=eta, generator=generator)

    def _postprocess(self, decoded, product, paste_mask: Image.Image, *, composite: bool, output_type: str):
        """Decoder output → images at the original size, with the original product pixels when compositing.

        "pil": 8-bit, resized with LANCZOS in 8 bits, composited in integers (imaging.composite).
        "np" / "pt": float, resized per channel with LANCZOS in 32-bit float and clipped to [0, 1], composited
        in float (imaging.composite_float), so no 8-bit rounding; the same floats for both.
        """
        from cg4ctr_fast.imaging import composite as paste_product
        from cg4ctr_fast.imaging import composite_float

        rgb = product.rgb
        if not composite and output_type in ("np", "pt"):
            arrays = self.image_processor.postprocess(decoded, output_type="np")
            return [_as_output(a, output_type) for a in arrays]
        if output_type == "pil":
            images: list[Any] = []
            for generated in self.image_processor.postprocess(decoded, output_type="pil"):
                if generated.size != rgb.size:
                    generated = generated.resize(rgb.size, Image.LANCZOS)
                if composite:
                    generated = paste_product(rgb, generated, paste_mask, product.alpha)
                images.append(generated)
            return images
        out = []
        for generated in self.image_processor.postprocess(decoded, output_type="np"):
            generated = _resize_float(generated, rgb.size)
            out.append(_as_output(composite_float(rgb, generated, paste_mask, product.alpha), output_type))
        return out


def _check_call_args(prompts, steps, guidance, strength, per_prompt, output_type, scheduler=None) -> None:
    if not prompts:
        raise InputError("no prompt: pass one prompt per user group")
    for p in prompts:
        if not isinstance(p, str):
            raise InputError(f"prompts must be strings, got {type(p).__name__}")
        check_utf8(p, "prompt")
    if not isinstance(steps, int) or steps <= 0:
        raise InputError(f"num_inference_steps must be a positive integer, got {steps}")
    if not np.isfinite(guidance) or guidance < 0:
        raise InputError(f"guidance_scale must be a finite number ≥ 0, got {guidance}")
    if not (0.0 < strength <= 1.0) or not np.isfinite(strength):
        # 0 would leave no denoising step: the same range the command line states.
        raise InputError(f"strength must be in (0, 1], got {strength}")
    if scheduler is not None:  # steps past the trained timesteps fail mid-call inside diffusers (IndexError)
        from cg4ctr_fast.models.diffusion import check_steps

        check_steps(scheduler, steps, strength)
    if not isinstance(per_prompt, int) or per_prompt <= 0:
        raise InputError(f"num_images_per_prompt must be a positive integer, got {per_prompt}")
    if output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")


def _callback_tensor_names(callback, names) -> list[str]:
    """diffusers' check: every requested tensor must be one of `_callback_tensor_inputs`."""
    if callback is not None and not callable(callback):
        raise InputError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    # PipelineCallback / MultiPipelineCallbacks name their own inputs, as diffusers reads them.
    names = list(getattr(callback, "tensor_inputs", None) or names or [])
    unknown = [n for n in names if n not in CreativePipeline._callback_tensor_inputs]
    if unknown:
        raise InputError(
            f"callback_on_step_end_tensor_inputs has to be in {CreativePipeline._callback_tensor_inputs}, "
            f"but found {unknown}"
        )
    return names if callback is not None else []


def _resize_float(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 [h, w, 3] → [H, W, 3] with Pillow's LANCZOS per channel in 32-bit float, clipped to [0, 1]."""
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return np.asarray(image, dtype=np.float32)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
                   .resize(size, Image.Resampling.LANCZOS))
        for c in range(image.shape[-1])
    ]
    # LANCZOS overshoots at edges (negative lobes); the decoder's range is [0, 1].
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32, copy=False)


def _to_pil(image) -> Image.Image:
    """A float [H, W, 3] array or [3, H, W] tensor in [0, 1] → 8-bit RGB, rounded as diffusers' numpy_to_pil."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    return Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8))


def _as_output(image: np.ndarray, output_type: str):
    """float32 [H, W, 3] → itself ("np") or a float32 [3, H, W] CPU tensor with the same values ("pt")."""
    image = np.asarray(image, dtype=np.float32)
    if output_type == "pt":
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return image


def _negative_prompts(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [check_utf8(negative_prompt, "negative prompt")] * n
    negatives = [check_utf8(text, "negative prompt") for text in negative_prompt]
    if len(negatives) != n:
        raise InputError(f"got {len(negatives)} negative prompts for {n} prompts")
    return negatives


def _move(modules, device: str, dtype: torch.dtype) -> None:
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(modules, name)
        # Cast only when needed: diffusers warns on every .to(dtype) of a model, even a no-op one.
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.to(device=device)


def _load_saliency(path: Optional[str]):
    if path is None:
        return None
    from cg4ctr_fast.models.saliency import load_saliency

    return load_saliency(path)
