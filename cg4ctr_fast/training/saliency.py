"""Train the U²-Net-p saliency net on creatives with exact product masks.

U²-Net-p is fully convolutional, so it trains at the world's image size (64 px by default) instead of
the official 320 px: at 320 px one forward+backward of a batch of 16 took ≈ 25× longer on 2 CPU cores.
The training size is the net's own input size: it goes into `config.json` beside the weights and into
the safetensors metadata, and `load_saliency` / `CreativePipeline` run the net at it (a 64-px net run at
the official 320 px kept 57 of 1,681 product pixels).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cg4ctr_fast.models.saliency import SaliencyConfig, U2NetP, deep_supervision_loss

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class SaliencyTrainConfig:
    seed: int = 0
    size: int = 64
    steps: int = 600
    batch: int = 16
    lr: float = 2e-3
    test_fraction: float = 0.2
    threshold: float = 0.5

    def __post_init__(self) -> None:
        from cg4ctr_fast.training.base import check_ranges

        check_ranges(self, positive=("size", "batch", "lr"), non_negative=("seed", "steps"),
                     unit=("test_fraction", "threshold"))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """The official preprocessing on [B, 3, H, W] in [0, 1]: divide by the max, ImageNet mean/std."""
    peak = images.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return (images / peak - IMAGENET_MEAN) / IMAGENET_STD


def _to_tensors(images: np.ndarray, product_masks: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(product_masks.astype(np.float32)).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        y = (torch.nn.functional.interpolate(y, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float()
    return normalize(x), y


@torch.no_grad()
def evaluate(model: U2NetP, x: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Mean IoU of the thresholded map against the product masks, and mean absolute error of the soft map."""
    model.eval()
    preds = torch.cat([model(x[i : i + 32]) for i in range(0, x.shape[0], 32)])
    hard = preds >= threshold
    truth = y >= 0.5
    inter = (hard & truth).flatten(1).sum(1).float()
    union = (hard | truth).flatten(1).sum(1).float().clamp(min=1)
    return {"iou": float((inter / union).mean()), "mae": float((preds - y).abs().mean())}


def train_saliency(
    images: np.ndarray, product_masks: np.ndarray, cfg: SaliencyTrainConfig = SaliencyTrainConfig(), *,
    progress: bool = True,
) -> tuple[U2NetP, dict[str, Any]]:
    """images: uint8 [N, H, W, 3]; product_masks: bool [N, H, W] (True = product). Split by index."""
    from tqdm.auto import tqdm

    if images.shape[0] != product_masks.shape[0] or images.shape[0] < 5:
        raise ValueError("need at least 5 images with one mask each")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(images.shape[0])
    n_test = max(1, int(round(cfg.test_fraction * images.shape[0])))
    test_idx, train_idx = order[:n_test], order[n_test:]
    x_train, y_train = _to_tensors(images[train_idx], product_masks[train_idx], cfg.size)
    x_test, y_test = _to_tensors(images[test_idx], product_masks[test_idx], cfg.size)
    torch.manual_seed(cfg.seed)
    model = U2NetP(config=SaliencyConfig(size=cfg.size, threshold=cfg.threshold))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    started = time.perf_counter()
    model.train()
    for step in tqdm(range(cfg.steps), desc="train saliency", disable=not progress, leave=False):
        idx = torch.randint(0, x_train.shape[0], (cfg.batch,), generator=gen)
        xb, yb = x_train[idx], y_train[idx]
        if torch.rand((), generator=gen) < 0.5:  # horizontal flips: products are not left-right specific
            xb, yb = xb.flip(-1), yb.flip(-1)
        sides = model(xb, return_sides=True, logits=True)
        loss = deep_supervision_loss(sides, yb, from_logits=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    metrics = {
        "config": asdict(cfg),
        "n_train": int(train_idx.size),
        "n_test": int(test_idx.size),
        "train_loss_last20": float(np.mean(losses[-20:])),
        "seconds": time.perf_counter() - started,
        **{f"test_{k}": v for k, v in evaluate(model, x_test, y_test, cfg.threshold).items()},
    }
    return model.eval(), metrics


def save_trained_saliency(model: U2NetP, metrics: dict[str, Any], out_dir: str | Path) -> Path:
    """`saliency.safetensors` (official key layout; metadata: input size, threshold), `config.json` (the net's
    input size in px and threshold, which `load_saliency` reads), `metrics.json`.  The folder is written
    atomically."""
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.models.saliency import CONFIG_FILE, WEIGHTS_FILE, save_saliency

    size, threshold = metrics["config"]["size"], metrics["config"]["threshold"]
    model.config = SaliencyConfig(size=size, threshold=threshold)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_saliency(model, tmp / WEIGHTS_FILE)
        config = {"architecture": "u2netp", "size": size, "threshold": threshold}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out
