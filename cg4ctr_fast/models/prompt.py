"""The prompt model: user-group, item and context features → a score per style token → top-p tokens →
a prompt from a template.

The style vocabulary is split into categories (palette, texture, scene, lighting, …); the model is a
per-category softmax policy, so a prompt takes one token per category:

    P(prompt | g, i, c) = Π_cat softmax_cat(s(g, i, c))[token_cat]

Positives (the prompts of the top-k creatives) are pushed up by their log-likelihood; negatives (the
rest) are pushed down with an unlikelihood term, −log(1 − P_cat(token)), per category, weighted by
`negative_weight`. Proposal: per category, keep the smallest set of tokens whose probability mass reaches
`top_p`, then take the best (greedy) or sample one (exploration).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cg4ctr_fast.errors import InputError


@dataclass(frozen=True)
class PromptModelConfig:
    categories: tuple[tuple[str, tuple[str, ...]], ...]  # (category, tokens) in template order
    group_dim: int
    item_dim: int
    context_dim: int = 0
    hidden: int = 64
    template: str = "{tokens}"  # "{tokens}" = the chosen tokens in category order, space-separated
    negative_weight: float = 0.5

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(t for _, tokens in self.categories for t in tokens)

    def to_json(self) -> dict:
        data = asdict(self)
        data["categories"] = [[name, list(tokens)] for name, tokens in self.categories]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "PromptModelConfig":
        data = dict(data)
        data["categories"] = tuple((name, tuple(tokens)) for name, tokens in data["categories"])
        return cls(**data)


class PromptModel(nn.Module):
    def __init__(self, config: PromptModelConfig):
        super().__init__()
        self.config = config
        in_dim = config.group_dim + config.item_dim + config.context_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.hidden), nn.GELU(),
            nn.Linear(config.hidden, len(config.vocab)),
        )
        # Token index ranges per category, in vocab order.
        spans, start = [], 0
        for _, tokens in config.categories:
            spans.append((start, start + len(tokens)))
            start += len(tokens)
        self.spans = spans
        self.token_index = {t: i for i, t in enumerate(config.vocab)}

    def _inputs(self, group, item, context=None) -> torch.Tensor:
        parts = [torch.as_tensor(group, dtype=torch.float32), torch.as_tensor(item, dtype=torch.float32)]
        if self.config.context_dim:
            if context is None:
                raise InputError("this prompt model needs context features")
            parts.append(torch.as_tensor(context, dtype=torch.float32))
        x = torch.cat([p if p.dim() == 2 else p.unsqueeze(0) for p in parts], dim=1)
        return x

    def token_scores(self, group, item, context=None) -> torch.Tensor:
        """Raw scores [B, V] over the whole style vocabulary."""
        return self.net(self._inputs(group, item, context))

    def category_log_probs(self, scores: torch.Tensor) -> list[torch.Tensor]:
        return [F.log_softmax(scores[:, a:b], dim=1) for a, b in self.spans]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token indices (one per category, −1 where the prompt has none) of a space-separated prompt."""
        words = prompt.split()
        out = []
        for a, b in self.spans:
            hit = [self.token_index[w] - a for w in words if w in self.token_index and a <= self.token_index[w] < b]
            out.append(hit[0] if hit else -1)
        return out

    def loss(
        self, group, item, prompts, labels: Sequence[float], context=None, weights: Optional[Sequence[float]] = None
    ) -> torch.Tensor:
        """Likelihood of positive prompts, unlikelihood of negatives (see the module docstring).

        `prompts` are strings or pre-encoded token indices [B, n_categories]; `weights` (≥ 0, default 1)
        scale each row, e.g. by how far its CTR is from its item's mean.
        """
        scores = self.token_scores(group, item, context)
        if isinstance(prompts, torch.Tensor):
            targets = prompts
        else:
            targets = torch.tensor([self.encode_prompt(p) for p in prompts])  # [B, n_categories]
        y = torch.as_tensor(labels, dtype=torch.float32)
        w = torch.ones_like(y) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        total = torch.zeros(())
        for c, log_p in enumerate(self.category_log_probs(scores)):
            idx = targets[:, c]
            present = idx >= 0
            if not present.any():
                continue
            chosen = log_p[present].gather(1, idx[present].unsqueeze(1)).squeeze(1)
            yy, ww = y[present], w[present]
            pos = -(yy * chosen)
            neg = -(1 - yy) * torch.log1p(-chosen.exp().clamp(max=1 - 1e-6)) * self.config.negative_weight
            total = total + (ww * (pos + neg)).sum() / ww.sum().clamp(min=1e-9)
        return total / len(self.spans)

    @torch.no_grad()
    def propose(
        self,
        group,
        item,
        context=None,
        *,
        top_p: float = 0.9,
        sample: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> list[str]:
        """One prompt per row: per category the top-p nucleus, then its best token or a sampled one."""
        if not 0.0 < top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {top_p}")
        scores = self.token_scores(group, item, context)
        chosen: list[list[str]] = [[] for _ in range(scores.shape[0])]
        for (a, _b), (_, tokens) in zip(self.spans, self.config.categories):
            probs = F.softmax(scores[:, a:_b], dim=1)
            for row in range(probs.shape[0]):
                keep = top_p_indices(probs[row], top_p)
                if sample:
                    weights = probs[row, keep] / probs[row, keep].sum()
                    pick = keep[int(torch.multinomial(weights, 1, generator=generator))]
                else:
                    pick = keep[0]
                chosen[row].append(tokens[int(pick)])
        return [self.config.template.format(tokens=" ".join(words)) for words in chosen]

    def with_category(self, name: str, tokens: Sequence[str], *, prior: Optional[Sequence[float]] = None) -> "PromptModel":
        """A copy with one more category appended (last in template order), e.g. ("style", ("none", "sunlit", …)).

        The hidden layers and the existing categories' output rows are copied, so every existing category's
        scores are unchanged (up to the float rounding of a wider output matmul: within 1e-6 in the tests). The new category's rows start at zero weight with bias = log(prior)
        (prior: probabilities over `tokens`, default uniform), so its distribution starts at `prior` for every
        input and is then learned like any category. Raises InputError for an existing category name, a token
        already in the vocabulary, or a prior of the wrong length or not positive.
        """
        tokens = tuple(tokens)
        if name in dict(self.config.categories) or not tokens:
            raise InputError(f"prompt model: category {name!r} exists already or has no tokens")
        clash = sorted(set(tokens) & set(self.config.vocab))
        if clash or len(set(tokens)) != len(tokens):
            raise InputError(f"prompt model: token {(clash or list(tokens))[0]!r} is already in the vocabulary")
        p = np.full(len(tokens), 1.0 / len(tokens)) if prior is None else np.asarray(prior, dtype=np.float64)
        if p.shape != (len(tokens),) or not (p > 0).all():
            raise InputError(f"prompt model: the prior needs {len(tokens)} positive probabilities")
        out = PromptModel(dataclasses.replace(self.config, categories=self.config.categories + ((name, tokens),)))
        state = {k: v.clone() for k, v in self.state_dict().items()}
        last = str(len(self.net) - 1)
        n_old = len(self.config.vocab)
        weight = torch.zeros(n_old + len(tokens), self.config.hidden)
        weight[:n_old] = state[f"net.{last}.weight"]
        bias = torch.cat([state[f"net.{last}.bias"], torch.log(torch.as_tensor(p / p.sum(), dtype=torch.float32))])
        state[f"net.{last}.weight"], state[f"net.{last}.bias"] = weight, bias
        out.load_state_dict(state)
        return out.train(self.training)

    def save(self, out_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from cg4ctr_fast.fileio import atomic_dir

        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptModel":
        from safetensors.torch import load_file

        root = Path(path)
        if not (root / "config.json").is_file() or not (root / "model.safetensors").is_file():
            raise InputError(f"{root}: not a prompt model folder (needs config.json and model.safetensors)")
        model = cls(PromptModelConfig.from_json(json.loads((root / "config.json").read_text())))
        model.load_state_dict(load_file(str(root / "model.safetensors")))
        return model.eval()


def top_p_indices(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Indices of the smallest set of tokens (most probable first) whose mass reaches top_p."""
    order = torch.argsort(probs, descending=True)
    cumulative = torch.cumsum(probs[order], dim=0)
    # Keep every token up to and including the first that brings the mass to top_p.
    n_keep = int(torch.searchsorted(cumulative, torch.tensor(top_p) - 1e-7).item()) + 1
    return order[: max(1, min(n_keep, probs.numel()))]


def train_prompt_model(
    model: PromptModel,
    group: np.ndarray,
    item: np.ndarray,
    prompts: Sequence[str],
    labels: Sequence[float],
    *,
    context: Optional[np.ndarray] = None,
    weights: Optional[np.ndarray] = None,
    epochs: int = 200,
    lr: float = 3e-3,
    batch: int = 256,
    seed: int = 0,
) -> list[float]:
    """Full-batch-ish Adam on (features, prompt, label) rows; returns the loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.as_tensor(group, dtype=torch.float32)
    it = torch.as_tensor(item, dtype=torch.float32)
    c = torch.as_tensor(context, dtype=torch.float32) if context is not None else None
    y = torch.as_tensor(labels, dtype=torch.float32)
    w = torch.ones_like(y) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    targets = torch.tensor([model.encode_prompt(p) for p in prompts])  # encoded once, not per epoch
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=gen)
        epoch_loss = 0.0
        for start in range(0, len(targets), batch):
            idx = order[start : start + batch]
            loss = model.loss(g[idx], it[idx], targets[idx], y[idx], c[idx] if c is not None else None, w[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.item() * len(idx)
        history.append(epoch_loss / len(targets))
    model.eval()
    return history
