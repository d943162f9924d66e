"""Style LoRAs (cg4ctr_fast.training.style): mixed-LoRA batches and the style families.

Per-row adapters (peft's mixed-batch inference on ONE UNet) against the reference, one UNet per LoRA with the
LoRA fused by diffusers (`export.lora.fuse_loras`) and the batch split by LoRA: the same creatives, in the same
order, within OUTPUT_RTOL × max |output| (decoder floats in [0, 1], composite off). Measured: 1.2e-6 absolute
(4 groups, 2 images each, 4 DDIM steps, guidance 5; float32 on the CPU: W x + s·B(A x) against (W + s·BA) x).
Each LoRA moves its rows by far more than the tolerance (checked), so a swapped or dropped LoRA fails.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from tests.conftest import make_product
from tests.test_export import random_unet_lora

OUTPUT_RTOL = 1e-5
# A LoRA must move its rows by at least this × max |output| for the comparison to mean anything.
EFFECT_MIN = 1e-3
STEPS = 4


def _tiny():
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules

    return build_modules(get_preset("tiny"))  # seeded: every call builds the same weights


@pytest.fixture(scope="module")
def style_loras(tmp_path_factory):
    """Two random diffusers-format LoRAs on the tiny UNet: a (attention, r 4) and b (other layers too, r 2)."""
    from diffusers import StableDiffusionInpaintPipeline

    root = tmp_path_factory.mktemp("style_loras")
    specs = {"a": dict(seed=5), "b": dict(seed=9, rank=2, alpha=3, targets=("to_k", "to_v", "ff.net.2", "conv1"))}
    paths = {}
    for name, kwargs in specs.items():
        _, state, config = random_unet_lora(**kwargs)
        StableDiffusionInpaintPipeline.save_lora_weights(str(root / name), unet_lora_layers=state,
                                                         unet_lora_adapter_metadata=config.to_dict())
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def mixed(style_loras):
    from cg4ctr_fast.training.style import MixedLoraPipeline

    torch.set_num_threads(1)
    return {mode: MixedLoraPipeline.build(_tiny(), style_loras, mode) for mode in ("per_row", "split")}


PROMPTS = ["red stripes", "blue sky", "warm sand", "green forest"]
ASSIGNED = ["a", "b", "a", None]


def _run(pipe, loras, prompts=PROMPTS, per=2, guidance=5.0, **kwargs):
    image, mask = make_product(40, 56, seed=3)  # odd size: resized to a working size, not a multiple of 64
    creatives = pipe(prompts, loras, image, mask, num_images_per_prompt=per, num_inference_steps=STEPS,
                     guidance_scale=guidance, output_type="np", composite=False, show_progress=False, seed=1,
                     **kwargs)
    return creatives, np.stack([c.image for c in creatives])


@pytest.fixture(scope="module")
def runs(mixed):
    return {mode: _run(pipe, ASSIGNED) for mode, pipe in mixed.items()}


def _tol(reference: np.ndarray) -> float:
    return OUTPUT_RTOL * float(np.abs(reference).max())


def test_per_row_adapters_equal_fused_unets(runs):
    (rows, per_row), (splits, split) = runs["per_row"], runs["split"]
    def key(c):
        return (c.group, c.index, c.prompt, c.seed)

    assert [key(c) for c in rows] == [key(c) for c in splits]
    assert [c.group for c in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert np.abs(per_row - split).max() <= _tol(split)


@pytest.mark.parametrize("guidance, cutoff", [(1.0, 1.0), (5.0, 0.5)])
def test_odd_batch_without_doubling_per_row_equals_split(mixed, guidance, cutoff):
    """3 groups, one image each. Guidance 1: the batch is never doubled. Guidance 5 with guidance_cutoff 0.5: doubled
    for the first half of the steps, then halved back to the prompt rows; the per-row names follow both."""
    loras = ["b", None, "a"]
    per_row = _run(mixed["per_row"], loras, PROMPTS[:3], per=1, guidance=guidance, guidance_cutoff=cutoff)[1]
    split = _run(mixed["split"], loras, PROMPTS[:3], per=1, guidance=guidance, guidance_cutoff=cutoff)[1]
    assert np.abs(per_row - split).max() <= _tol(split)


def test_each_lora_changes_its_rows(mixed, runs):
    """Swapping a and b (per-row adapters), or dropping them (fused UNets; the two modes agree, tested above),
    moves exactly the rows whose LoRA changed; the base row stays."""
    reference = runs["split"][1]
    tol = _tol(reference)
    for mode, other in (("per_row", ["b", "a", "b", None]), ("split", [None, None, None, None])):
        out = _run(mixed[mode], other)[1]
        for g, (was, now) in enumerate(zip(ASSIGNED, other)):
            moved = float(np.abs(out[2 * g:2 * g + 2] - reference[2 * g:2 * g + 2]).max())
            if was == now:
                assert moved <= tol, (mode, other, g)
            else:
                assert moved > max(EFFECT_MIN * float(np.abs(reference).max()), 100 * tol), (mode, other, g)


def test_mixed_pipeline_refuses_bad_requests(mixed, style_loras):
    from cg4ctr_fast.training.style import ADAPTER_PREFIX, MixedLoraPipeline, load_adapters, row_adapters

    image, mask = make_product(40, 56, seed=3)
    with pytest.raises(InputError, match="LoRA names for"):
        mixed["per_row"](PROMPTS, ["a"], image, mask)
    with pytest.raises(InputError, match="unknown LoRA 'c'"):
        mixed["split"](PROMPTS[:1], ["c"], image, mask)
    with pytest.raises(InputError, match="generator"):
        mixed["split"](PROMPTS[:1], ["a"], image, mask, generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="mode"):
        MixedLoraPipeline.build(_tiny(), style_loras, "fused")
    with pytest.raises(InputError, match="ModuleDict attribute"):  # peft keeps adapters in ModuleDicts
        load_adapters(_tiny(), {"pop": style_loras["a"]})
    unet = mixed["per_row"].pipes[None].components.unet.module
    a, b = ADAPTER_PREFIX + "a", ADAPTER_PREFIX + "b"
    with pytest.raises(InputError, match="no adapter named 'z'"):
        with row_adapters(unet, [a, "z"]):
            pass
    with pytest.raises(RuntimeError, match="batch of"):
        with row_adapters(unet, [a, b, a]):
            unet(torch.zeros(4, 9, 8, 8), 10, encoder_hidden_states=torch.zeros(4, 77, 32))


def test_adapters_are_off_outside_the_block(mixed):
    """After a per-row call the UNet is the base UNet again: a plain pipeline call equals the base rows."""
    pipe = mixed["per_row"].pipes[None]
    image, mask = make_product(40, 56, seed=3)
    plain = pipe(PROMPTS, image, mask, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=5.0,
                 output_type="np", composite=False, show_progress=False, seed=1)
    base = _run(mixed["split"], [None] * 4)[1]
    assert np.abs(np.stack([c.image for c in plain]) - base).max() <= _tol(base)


# ------------------------------------------------------------------------------------------------ families
@pytest.fixture(scope="module")
def world():
    from cg4ctr_fast.sim import World

    return World(seed=0)


def test_seed_sets_hold_their_family(world):
    from cg4ctr_fast.sim import CATEGORIES
    from cg4ctr_fast.training.style import STYLE_FAMILIES, seed_set

    for family in STYLE_FAMILIES:
        data, captions = seed_set(world, family, [3, 7, 11], 12, seed=4)
        assert data.images.shape == (12, 3, 64, 64) and data.masks.shape == (12, 1, 64, 64)
        assert float(data.images.min()) >= -1.0 and float(data.images.max()) <= 1.0
        assert all(family.contains(c) for c in captions)
        fixed = {t for _c, tokens in family.tokens for t in tokens}
        assert all(not (set(p.split()) & fixed) and len(p.split()) == len(CATEGORIES) - len(family.tokens)
                   for p in data.captions)
        # Masks are the products' own (one of the three), 1 = background.
        products = {tuple(np.asarray(world.product(i).mask).ravel() // 255) for i in (3, 7, 11)}
        assert all(tuple(m.numpy().astype(np.uint8).ravel()) in products for m in data.masks)


def test_families_differ_as_designed(world):
    """Centroids order as the renderer's palettes and lighting make them (sim/render.py): cool is the only blue
    palette, monochrome + dim / dramatic is the least saturated and darkest, neon / pastel (magenta, ≈ 300°) the
    lowest hue_sin, warm / earthy + golden the highest; held-out renders land in their own family."""
    from cg4ctr_fast.training.style import STYLE_COLUMNS, STYLE_FAMILIES, family_separation

    result = family_separation(world, STYLE_FAMILIES, train_items=list(range(12)), test_items=[100_000, 100_001],
                               n_images=40, seed=2)
    centroids = result["centroids"]

    def extreme(column, fn):
        return fn(centroids, key=lambda name: centroids[name][STYLE_COLUMNS.index(column)])

    assert extreme("hue_cos", min) == "marine"
    assert extreme("saturation", min) == "noir" and extreme("brightness", min) == "noir"
    assert extreme("hue_sin", min) == "pop" and extreme("hue_sin", max) == "sunlit"
    assert min(result["accuracy"].values()) >= 0.75, result["accuracy"]
    assert min(result["distance"].values()) >= 1.0, result["distance"]


def test_a_lora_that_does_nothing_fails_the_steering_check(tmp_path, world):
    """A LoRA with lora_B = 0 leaves every row as the base UNet made it: d_z and the shift are 0, so it fails."""
    from diffusers import StableDiffusionInpaintPipeline

    from cg4ctr_fast.training.style import STYLE_FAMILIES, MixedLoraPipeline, steering_report

    _, state, config = random_unet_lora(seed=1)
    state = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in state.items()}
    StableDiffusionInpaintPipeline.save_lora_weights(str(tmp_path / "null"), unet_lora_layers=state,
                                                     unet_lora_adapter_metadata=config.to_dict())
    family = STYLE_FAMILIES[0]
    mixed = MixedLoraPipeline.build(_tiny(), {family.name: tmp_path / "null"}, "per_row")
    centroids = {family.name: [0.5, 1.0, 0.0, 0.8]}
    report = steering_report(mixed, world, [family], centroids, [100_000], prompts=["stripes beach", "waves sky"],
                             images_per_prompt=2, steps=2)
    row = report["families"][family.name]
    assert row["n"] == 4 and abs(row["shift"]) < 1e-3 and not row["passed"]


def test_trained_style_lora_loads_in_the_pipeline(tmp_path, world):
    """train_style_loras writes diffusers files that CreativePipeline.from_pretrained(..., lora=) fuses; two Adam
    steps move lora_B off zero, so the fused pipeline's output differs from the base one."""
    import json

    from cg4ctr_fast.models.diffusion import save_modules
    from cg4ctr_fast.pipeline import CreativePipeline
    from cg4ctr_fast.training.lora import LoraTrainConfig
    from cg4ctr_fast.training.style import STYLE_FAMILIES, StyleLoraConfig, train_style_loras

    save_modules(_tiny(), tmp_path / "generator")
    config = StyleLoraConfig(images_per_family=4, lora=LoraTrainConfig(steps=2, batch=2))
    paths = train_style_loras(tmp_path / "generator", world, tmp_path / "loras", families=STYLE_FAMILIES[3:],
                              train_items=[1, 2], config=config, log=lambda _line: None)
    folder = paths["noir"]
    record = json.loads((folder / "style.json").read_text())
    assert record["family"] == "noir" and record["lora_steps"] == 2 and record["seed_set_images"] == 4
    product = world.product(100_002)
    outputs = []
    for pipe in (CreativePipeline.from_modules(_tiny()),
                 CreativePipeline.from_pretrained(str(tmp_path / "generator"), lora=folder)):
        creatives = pipe(["smooth beach"], product.image, product.mask, num_inference_steps=2, guidance_scale=5.0,
                         output_type="np", composite=False, show_progress=False)
        outputs.append(creatives[0].image)
    assert np.abs(outputs[0] - outputs[1]).max() > 100 * _tol(outputs[0])


def test_family_ctr_ceiling_is_consistent(world):
    """With one family every choice is that family (lift exactly 0); each arm's lift is its aggregate CTR over the
    best single family's, minus 1; the best single family's row is that family's own."""
    from cg4ctr_fast.training.style import STYLE_FAMILIES, family_ctr_ceiling

    one = family_ctr_ceiling(world, STYLE_FAMILIES[:1], item_ids=[100_003, 100_004], renders=2, seed=5)
    assert one["lift_vs_best_single"]["best family per (item, group)"]["lift"] == 0.0
    assert one["lift_vs_best_single"]["best family per group"]["lift"] == 0.0
    two = family_ctr_ceiling(world, STYLE_FAMILIES[1:3], item_ids=[100_003, 100_004], renders=2, seed=5)
    agg = two["aggregate_ctr"]
    for arm, row in two["lift_vs_best_single"].items():
        assert row["lift"] == pytest.approx(agg[arm] / agg["best single family"] - 1, rel=1e-9, abs=1e-12)
    assert two["best_single_family"] in ("marine", "pop")
    assert agg["best single family"] == agg[f"{two['best_single_family']} alone"]
    assert sum(two["share_of_cells"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("args", [["--lr", "-1"], ["--eval-products", "0"], ["--steps", "x"]])
def test_style_cli_rejects_bad_input_in_one_line(tmp_path, capsys, args):
    from cg4ctr_fast.cli.train import main

    try:
        code = main(["style", "--out", str(tmp_path / "s"), *args])
    except SystemExit as exc:  # argparse's own type errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and not (tmp_path / "s").exists()
