"""Prompt model: top-p mechanics, learning a known preference, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.models.prompt import PromptModel, PromptModelConfig, top_p_indices, train_prompt_model

CATEGORIES = (("palette", ("warm", "cool", "neon")), ("scene", ("beach", "forest", "city", "studio")))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert top_p_indices(probs, 0.5).tolist() == [1]
    assert top_p_indices(probs, 0.6).tolist() == [1, 2]
    assert top_p_indices(probs, 0.8).tolist() == [1, 2]
    nucleus = top_p_indices(probs, 0.85).tolist()  # 0.5 + 0.3 = 0.8 < 0.85: a third token (a 0.1 tie)
    assert len(nucleus) == 3 and nucleus[:2] == [1, 2] and nucleus[2] in (0, 3)
    assert len(top_p_indices(probs, 1.0)) == 4
    assert top_p_indices(torch.tensor([1.0, 0.0]), 0.01).tolist() == [0]


def _model(seed=0):
    torch.manual_seed(seed)
    return PromptModel(PromptModelConfig(categories=CATEGORIES, group_dim=2, item_dim=1))


def test_learns_which_tokens_each_group_prefers():
    # Group 0 clicks on warm beach, group 1 on cool forest; every other prompt is a negative.
    rng = np.random.default_rng(0)
    groups, items, prompts, labels = [], [], [], []
    best = {0: "warm beach", 1: "cool forest"}
    for _ in range(300):
        g = int(rng.integers(0, 2))
        p = f"{rng.choice(CATEGORIES[0][1])} {rng.choice(CATEGORIES[1][1])}"
        groups.append(np.eye(2)[g])
        items.append([rng.random()])
        prompts.append(p)
        labels.append(1.0 if p == best[g] else 0.0)
    model = _model()
    history = train_prompt_model(model, np.array(groups), np.array(items), prompts, labels, epochs=80, seed=0)
    assert history[-1] < history[0]
    proposals = model.propose(np.eye(2), np.array([[0.5], [0.5]]))
    assert proposals == ["warm beach", "cool forest"]
    # Sampling with exploration stays inside the nucleus and is reproducible under a generator.
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = model.propose(np.eye(2), np.array([[0.5], [0.5]]), top_p=0.99, sample=True, generator=gen_a)
    b = model.propose(np.eye(2), np.array([[0.5], [0.5]]), top_p=0.99, sample=True, generator=gen_b)
    assert a == b


def test_encode_prompt_and_loss_signs():
    model = _model()
    assert model.encode_prompt("cool studio extra words") == [1, 3]
    assert model.encode_prompt("nothing known") == [-1, -1]
    g, i = torch.eye(2), torch.zeros(2, 1)
    pos = model.loss(g, i, ["warm beach", "warm beach"], [1.0, 1.0])
    neg = model.loss(g, i, ["warm beach", "warm beach"], [0.0, 0.0])
    assert pos.item() > 0 and neg.item() > 0


def test_save_load_round_trip(tmp_path):
    model = _model(3)
    model.save(tmp_path / "prompt")
    loaded = PromptModel.load(tmp_path / "prompt")
    x = (torch.eye(2), torch.ones(2, 1))
    assert torch.equal(model.token_scores(*x), loaded.token_scores(*x))
    assert loaded.config == model.config
    with pytest.raises(InputError):
        PromptModel.load(tmp_path / "missing")
    with pytest.raises(InputError):
        model.propose(np.eye(2), np.ones((2, 1)), top_p=0.0)
