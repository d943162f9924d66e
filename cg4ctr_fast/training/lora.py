"""The generator's LoRA: attached with peft, trained with a denoising loss on the repainted background only,
saved in diffusers' format (safetensors + adapter metadata) so that both `CreativePipeline(lora=...)` and
diffusers' own `load_lora_weights` read it.

Why the loss is masked: the composite pastes the original product back bit for bit, so whatever the UNet
predicts under the product never reaches an advertiser. Training on those latents would only teach the LoRA
to reproduce product pixels it is never asked for, and would pull the adapter toward the products of the
cycle's winners instead of their backgrounds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cg4ctr_fast.errors import InputError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "cg4ctr_cycle"
# Attention projections of every transformer block: the layers SD LoRAs adapt (DreamBooth-LoRA's default).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 60  # optimizer steps per cycle
    batch: int = 8
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    # What the LoRA learns to denoise: "images" = the kept creatives (composited, as ranked) encoded again
    # by the VAE, i.e. posterior means, the kind of latent the base UNet was trained on; "latents" = the
    # pipeline's own final latents, which carry the sampler's off-manifold error. On the toy world,
    # LoRA-only cycles lost held-out true CTR faster with "latents": 0.0335 / 0.0334 after 4 cycles against
    # 0.0359 / 0.0353 with "images" (seeds 0 / 1, from 0.0387 / 0.0370; "latents" ran with caption dropout,
    # "images" without, but 2 cycles of "latents" without dropout ended at 0.0356 against 0.0357 with it).
    train_on: str = "images"
    # Share of examples trained with the empty prompt, as the base model was (10 %). Without it only the
    # conditional branch learns the winners, and the cond − uncond gap that guidance multiplies widens:
    # at t = 900, 1.93× the base after 4 LoRA-only cycles without it, 1.37× with it (bench/guidance_gap.py,
    # docs/cycle.md). It did not keep more true CTR in those runs; it is kept for the narrower gap.
    caption_dropout: float = 0.1
    # Fit the *guided* prediction eps_u + w (eps_c − eps_u) (both branches through the adapter, w = the
    # generation's guidance) instead of eps_c alone. The creatives were sampled with guidance, so fitting
    # eps_c to them makes the conditional branch absorb the guidance, and sampling with w again compounds
    # it cycle after cycle. Fitting the guided prediction makes "no selection" a fixed point: only the
    # top-k choice moves the generator. Costs a second UNet pass per example. Over 3 seeds on the toy
    # world it lost more lift than the plain loss (LoRA-only −8.3 % vs −2.7 % after 4 cycles), so it is off.
    guided_loss: bool = False
    # Anchors (guards against reward over-optimisation, docs/cycle.md). anchor_weight λ adds
    # λ · masked MSE(ε_adapted, ε_base) on the same noisy inputs, ε_base from the UNet with the adapter
    # disabled: the adapter pays for every move away from the base model's noise prediction, not only
    # for failing to fit the kept creatives. max_delta caps each adapted layer's update after every cycle:
    # ‖ΔW‖_F ≤ max_delta · ‖W‖_F with ΔW = scaling · B·A (B rescaled when over; 0 = no cap).
    anchor_weight: float = 0.0
    max_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.batch < 1 or self.steps < 0 or not self.targets:
            raise InputError(f"lora.rank and lora.batch must be ≥ 1, lora.steps ≥ 0 and lora.targets not empty, got "
                             f"{self.rank}, {self.batch}, {self.steps} and {list(self.targets)}")
        values = (self.alpha, self.lr, self.max_grad_norm, self.anchor_weight, self.max_delta)
        if not all(np.isfinite(v) for v in values):
            raise InputError("lora.alpha, lr, max_grad_norm, anchor_weight and max_delta must be finite numbers")
        if not (self.alpha > 0 and self.lr > 0 and self.max_grad_norm > 0):
            raise InputError(f"lora.alpha, lora.lr and lora.max_grad_norm must be > 0, got {self.alpha}, {self.lr} "
                             f"and {self.max_grad_norm}")
        if self.anchor_weight < 0 or self.max_delta < 0:
            raise InputError(f"lora.anchor_weight and lora.max_delta must be ≥ 0, got {self.anchor_weight} "
                             f"and {self.max_delta}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise InputError(f"lora.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.train_on not in ("latents", "images"):
            raise InputError(f"lora.train_on must be 'latents' or 'images', got {self.train_on!r}")
        if self.rank < 1:
            raise InputError(f"lora.rank must be ≥ 1, got {self.rank}")
        if self.alpha <= 0:
            raise InputError(f"lora.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise InputError("lora.targets must name at least one module")
        if self.steps < 0 or self.batch < 1:
            raise InputError(f"lora.steps must be ≥ 0 and lora.batch ≥ 1, got {self.steps} and {self.batch}")
        if not self.lr > 0:
            raise InputError(f"lora.lr must be > 0, got {self.lr}")


def add_lora(unet, config: LoraTrainConfig) -> None:
    """Attach a fresh LoRA adapter (peft) to the UNet; only its parameters train.

    peft initialises lora_B to zero, so the adapted UNet starts exactly equal to the base one.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    # peft matches a target as a suffix of a module name and refuses only when no target matches at all
    # (a UNet may lack some of a LoRA's usual targets, e.g. conv_shortcut); the same rule, as a one-line error.
    names = [name for name, _ in unet.named_modules()]
    if not any(n == t or n.endswith("." + t) for t in config.targets for n in names):
        raise InputError(f"lora.targets: no module of the UNet matches {list(config.targets)} "
                         "(e.g. to_q, to_k, to_v, to_out.0)")
    unet.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets), init_lora_weights=True),
        adapter_name=ADAPTER_NAME,
    )
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name)


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if ".lora_" in n]


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (exact copies, for checkpoints)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def load_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise InputError(f"LoRA checkpoint does not fit this UNet: unexpected keys such as {unexpected[0]}")


def masked_denoising_loss(pred: torch.Tensor, target: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the background latents only.

    background: [B, 1, h, w], 1 where the latent is repainted, 0 under the product. Each example's error is
    averaged over its own background area, so a small product and a large one weigh alike. An example with
    no background contributes zero (and no gradient).
    """
    weight = background.to(pred.dtype).expand_as(pred)
    per_example = ((pred - target) ** 2 * weight).flatten(1).sum(1)
    area = weight.flatten(1).sum(1)
    return (per_example / area.clamp(min=1.0)).mean()


@torch.no_grad()
def encode_examples(vae, images: torch.Tensor, masks: torch.Tensor, batch: int = 32,
                    latents: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Latents of the creatives and of their masked (product-only) images, scaled as the UNet sees them,
    and the latent-size repaint masks (nearest, as the pipeline does).

    images: [N, 3, H, W] in [-1, 1]; masks: [N, 1, H, W], 1 = background. `latents` (scaled), when given,
    are used as the targets instead of encoding `images` (the pipeline's own output: no VAE round trip).
    """
    scale = vae.config.scaling_factor
    encoded, masked = [], []
    for start in range(0, images.shape[0], batch):
        x = images[start : start + batch]
        m = masks[start : start + batch]
        if latents is None:
            encoded.append(vae.encode(x).latent_dist.mean * scale)
        masked.append(vae.encode(x * (m < 0.5)).latent_dist.mean * scale)
    latents_t = torch.cat(encoded) if latents is None else latents
    latent_masks = F.interpolate(masks, size=latents_t.shape[-2:])
    return {"latents": latents_t, "masked_latents": torch.cat(masked), "masks": latent_masks}


def train_lora(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    examples: dict[str, torch.Tensor],
    prompts: Sequence[str],
    config: LoraTrainConfig,
    *,
    seed: int,
    guidance: float = 1.0,
    progress: bool = False,
    desc: str = "LoRA",
) -> dict[str, Any]:
    """`config.steps` AdamW steps on the adapter with the masked epsilon loss; a fresh optimizer per call, so a
    cycle depends only on the adapter it starts from (what the checkpoint holds) and its seed."""
    from tqdm.auto import tqdm

    from cg4ctr_fast.training.base import noisy_batch

    if not prompts:
        return {"lora_steps": 0, "lora_loss_first": float("nan"), "lora_loss_last": float("nan")}
    gen = torch.Generator().manual_seed(seed)
    params = lora_parameters(unet)
    if not params:
        raise RuntimeError("the UNet has no LoRA adapter: call add_lora first")
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    with torch.no_grad():
        ids = tokenizer(list(prompts) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        hidden = torch.cat([text_encoder(ids[s : s + 64])[0] for s in range(0, len(ids), 64)])
        empty = hidden[-1:]
        hidden = hidden[:-1]
    alphas_cumprod = scheduler.alphas_cumprod
    n_train = scheduler.config.num_train_timesteps
    latents, masked_latents, masks = examples["latents"], examples["masked_latents"], examples["masks"]
    losses: list[float] = []
    unet.train()
    for _ in tqdm(range(config.steps), desc=desc, disable=not progress, leave=False):
        idx, noise, t, noisy = noisy_batch(latents, alphas_cumprod, n_train, config.batch, gen)
        model_in = torch.cat([noisy, masks[idx], masked_latents[idx]], dim=1)
        states = hidden[idx]
        if config.caption_dropout > 0:
            drop = torch.rand(config.batch, generator=gen) < config.caption_dropout
            states = torch.where(drop.view(-1, 1, 1), empty.expand_as(states), states)
        if config.guided_loss and guidance != 1.0:
            both = unet(torch.cat([model_in, model_in]), torch.cat([t, t]),
                        encoder_hidden_states=torch.cat([empty.expand_as(states), states])).sample
            uncond, cond = both.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        else:
            pred = unet(model_in, t, encoder_hidden_states=states).sample
        loss = masked_denoising_loss(pred, noise, masks[idx])
        if config.anchor_weight > 0:
            with torch.no_grad(), adapter_disabled(unet):
                base = unet(model_in, t, encoder_hidden_states=states).sample
            target_pred = pred if not (config.guided_loss and guidance != 1.0) else cond
            loss = loss + config.anchor_weight * masked_denoising_loss(target_pred, base, masks[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        losses.append(float(loss.item()))
    unet.eval()
    head = losses[: max(1, len(losses) // 5)]
    tail = losses[-max(1, len(losses) // 5) :]
    return {"lora_steps": len(losses), "lora_loss_first": float(np.mean(head)), "lora_loss_last": float(np.mean(tail))}


class adapter_disabled:
    """Context manager: the UNet runs as the base model (peft's disable_adapters), then the adapter is back."""

    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        self.unet.disable_adapters()
        return self.unet

    def __exit__(self, *exc) -> None:
        self.unet.enable_adapters()


@torch.no_grad()
def cap_lora_delta(unet, max_delta: float) -> dict[str, float]:
    """Rescale each adapted layer's lora_B so that ‖scaling · B·A‖_F ≤ max_delta · ‖W‖_F (W: the base weight).

    Conv LoRAs are measured on their flattened matrices. Returns {"lora_delta_max": the largest ratio before
    the cap, "lora_layers_capped": how many layers were rescaled}. max_delta ≤ 0 changes nothing.
    """
    from peft.tuners.lora import LoraLayer

    largest, capped = 0.0, 0
    for module in unet.modules():
        if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
            continue
        a = module.lora_A[ADAPTER_NAME].weight.flatten(1)
        b_layer = module.lora_B[ADAPTER_NAME]
        b = b_layer.weight.flatten(1)
        delta = module.scaling[ADAPTER_NAME] * (b @ a)
        base = module.get_base_layer().weight.flatten(1)
        ratio = float(delta.norm() / base.norm().clamp(min=1e-12))
        largest = max(largest, ratio)
        if max_delta > 0 and ratio > max_delta:
            b_layer.weight.mul_(max_delta / ratio)
            capped += 1
    return {"lora_delta_max": largest, "lora_layers_capped": capped}


def save_lora(unet, out_dir: str | Path, extra_metadata: Optional[dict] = None, *, peft_keys: bool = False) -> Path:
    """diffusers' layout: `pytorch_lora_weights.safetensors` with the adapter config in its header (without it
    diffusers reloads alpha as r and the output moves), plus our own keys (`cg4ctr.*`: cycle, metrics).

    peft_keys: False (the cycle LoRA, attention layers only): keys through diffusers'
    `convert_state_dict_to_diffusers`, as its LoRA training scripts write them; True: peft's own names
    (`….lora_A.weight`), as diffusers' LCM-LoRA script writes them. A LoRA on conv or time-projection layers needs
    True: the conversion renames only the attention keys (old `lora.down/up` form), and diffusers' loader then
    reads the file as peft-format and silently drops those (measured: 48 of 234 tensors of the toy LCM-LoRA).

    diffusers writes the file, then it is rewritten once with our keys added to its header: its header
    format stays diffusers' own. Written into `out_dir`, which the caller makes atomic (a cycle checkpoint
    is one atomic folder)."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    if not peft_keys:
        layers = convert_state_dict_to_diffusers(layers)
    adapter_config = unet.peft_config[ADAPTER_NAME].to_dict()
    # peft keeps target_modules as a set: sorted, the header (and so the file's sha256, which provenance
    # records) is the same for the same weights on every run.
    for key in ("target_modules", "exclude_modules"):
        if isinstance(adapter_config.get(key), (list, set, tuple)):
            adapter_config[key] = sorted(adapter_config[key])
    StableDiffusionInpaintPipeline.save_lora_weights(
        str(out), unet_lora_layers=layers, unet_lora_adapter_metadata=adapter_config, weight_name=LORA_WEIGHT_NAME,
    )
    file = out / LORA_WEIGHT_NAME
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in (extra_metadata or {}).items():
        metadata[f"cg4ctr.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    from cg4ctr_fast.fileio import atomic_write_bytes

    atomic_write_bytes(file, canonical_safetensors(save(tensors, metadata=metadata)))
    return file


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so that equal tensors and metadata give
    equal bytes. safetensors (0.8) writes the header from a hash map: the same `save_file` call gave 5 different
    sha256 in 5 tries. Tensor data is untouched; the header's offsets are relative to the data, so a reordered
    header of another length stays valid (format: 8-byte little-endian header length, JSON header padded with
    spaces to a multiple of 8, data)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def read_lora_metadata(path: str | Path) -> dict[str, Any]:
    """Our `cg4ctr.*` header entries of a saved LoRA (JSON-decoded)."""
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / LORA_WEIGHT_NAME
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if key.startswith("cg4ctr."):
            try:
                out[key[len("cg4ctr.") :]] = json.loads(value)
            except json.JSONDecodeError:
                out[key[len("cg4ctr.") :]] = value
    return out


def load_lora_file(unet, path: str | Path) -> None:
    """Load a LoRA saved by `save_lora` (diffusers keys) into the UNet's adapter, exactly (a resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / LORA_WEIGHT_NAME
    if not file.is_file():
        raise InputError(f"{file}: no LoRA weights")
    state = load_file(str(file))
    prefix = "unet."
    unet_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not unet_state:
        raise InputError(f"{file}: holds no UNet LoRA weights")
    load_lora_state(unet, convert_unet_state_dict_to_peft(unet_state))
