"""Style LoRAs inside the self-cyclic loop ([style] in the cycle config): the prompt model's style category, the
mixed-LoRA generation of one product's groups, the random-assignment check arm, and kill + resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.cycle_config import CycleConfig, load_cycle_config
from tests.test_cycle import _write_config, kill_resume_and_compare, toy  # noqa: F401  (toy: fixture)

FAMILIES = ("sunlit", "marine", "pop", "noir")
STYLED = {"run": {"update_lora": False}, "style": {"loras": "chosen"}}


@pytest.fixture(scope="module")
def style_folder(toy, tmp_path_factory):
    """Four real (tiny) style LoRAs on the toy generator: 4 seed images and 2 steps per family."""
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.lora import LoraTrainConfig
    from cg4ctr_fast.training.style import StyleLoraConfig, train_style_loras

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("style-loras")
    config = StyleLoraConfig(images_per_family=4, lora=LoraTrainConfig(steps=2, batch=2, rank=2, alpha=2.0, lr=0.05))
    dataset = load_dataset(toy.world)
    train_style_loras(toy.generator, dataset.world, root, train_items=[0, 1], config=config, log=lambda _m: None)
    return root


def _styled(toy, tmp_path, style_folder, name="styled.toml", **changes):
    sections = {"run": {**STYLED["run"], **changes.pop("run", {})},
                "style": {**STYLED["style"], "folder": str(style_folder), **changes.pop("style", {})}, **changes}
    return load_cycle_config(_write_config(tmp_path / name, toy, **sections))


def test_style_config_refuses_the_cycle_lora_beside_style_loras():
    with pytest.raises(InputError, match="update_lora"):
        CycleConfig().replace(style={"loras": "chosen"})
    with pytest.raises(InputError, match="style.loras"):
        CycleConfig().replace(style={"loras": "some"})
    with pytest.raises(InputError, match="style.mode"):
        CycleConfig().replace(style={"mode": "fused"})


def test_split_choice_drops_the_family_categories():
    from cg4ctr_fast.training.style import split_choice, with_style

    marine = split_choice("warm stripes beach golden marine")
    assert (marine.prompt, marine.lora, marine.caption) == ("stripes beach", "marine", "stripes beach marine")
    plain = split_choice("warm stripes beach golden none")
    assert (plain.prompt, plain.lora, plain.style) == ("warm stripes beach golden", None, "none")
    assert with_style("warm stripes beach golden none", "pop") == "warm stripes beach golden pop"
    for bad in ("warm stripes beach golden", "warm stripes beach golden pop noir", "warm beach golden pop"):
        with pytest.raises(InputError):
            split_choice(bad)


def test_prompt_model_gains_a_style_category(toy):
    from cg4ctr_fast.models.prompt import PromptModel

    model = PromptModel.load(toy.prompt)
    wider = model.with_category("style", ("none", *FAMILIES), prior=[0.4, 0.15, 0.15, 0.15, 0.15])
    torch.manual_seed(3)
    group, item = torch.randn(5, model.config.group_dim), torch.randn(5, model.config.item_dim)
    before, after = model.token_scores(group, item), wider.token_scores(group, item)
    # The existing categories' scores are the old model's (same hidden layers, same output rows).
    torch.testing.assert_close(after[:, : before.shape[1]], before, rtol=0, atol=1e-6)
    probs = torch.softmax(after[:, before.shape[1]:], dim=1)
    torch.testing.assert_close(probs, torch.tensor([[0.4, 0.15, 0.15, 0.15, 0.15]]).expand(5, 5), rtol=0, atol=1e-6)
    assert all(p.split()[-1] == "none" for p in wider.propose(group, item))  # greedy: the prior's mode
    # The category trains like any other: positive rows that choose "pop" raise P(pop).
    from cg4ctr_fast.models.prompt import train_prompt_model

    rows = ["stripes beach pop"] * 8
    train_prompt_model(wider, group.repeat(2, 1)[:8].numpy(), item.repeat(2, 1)[:8].numpy(), rows, [1.0] * 8,
                       epochs=20, lr=0.01)
    trained = torch.softmax(wider.token_scores(group, item)[:, before.shape[1]:], dim=1)
    assert (trained[:, 3] > 0.3).all()
    for bad in (("style", ("x",)), ("palette", ("y",)), ("other", ("warm",)), ("other", ("pop",))):
        with pytest.raises(InputError):
            wider.with_category(*bad)
    with pytest.raises(InputError, match="prior"):
        model.with_category("style", ("none", "pop"), prior=[1.0])


def test_style_cycle_chooses_loras_and_learns_the_choice(toy, tmp_path, style_folder):
    """One styled cycle: every training creative ran its chosen LoRA, the kept ones and the evaluation report
    their styles, the prompt model saved with the style category. Cycle 0 (greedy: no style yet) equals the same
    run without style LoRAs, creative for creative."""
    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.training.cycle import run_cycles

    config = _styled(toy, tmp_path, style_folder, run={"cycles": 1})
    history = run_cycles(config, tmp_path / "run", progress=False, log=lambda _m: None, guard_dir=tmp_path / "g")
    first = history[1]
    assert set(first["generated_style_share"]) <= {"none", *FAMILIES} and len(first["generated_style_share"]) > 1
    assert sum(first["generated_style_share"].values()) == pytest.approx(1.0)
    kept = json.loads((tmp_path / "run" / "cycles" / "cycle_001" / "topk.json").read_text())
    assert all(r["style"] in {"none", *FAMILIES} for r in kept)
    # A family's palette and lighting tokens never reach the generator: the LoRA carries them.
    assert all(len(r["prompt"].split()) == (4 if r["style"] == "none" else 2) for r in kept)
    share = first["eval"]["served_style_share"]
    assert sum(share.values()) == pytest.approx(1.0) and set(share) <= {"photo", "none", *FAMILIES}
    saved = PromptModel.load(tmp_path / "run" / "cycles" / "cycle_001" / "prompt")
    assert saved.config.categories[-1] == ("style", ("none", *FAMILIES))

    plain = load_cycle_config(_write_config(tmp_path / "plain.toml", toy, run={"cycles": 0, "update_lora": False}))
    reference = run_cycles(plain, tmp_path / "plain", progress=False, log=lambda _m: None)[0]["eval"]
    assert history[0]["eval"]["served_style_share"].get("none", 0) + \
        history[0]["eval"]["served_style_share"].get("photo", 0) == 1.0
    for key in ("aggregate_lift", "generated_only_aggregate_lift", "reward_mean", "original_kept_share"):
        assert history[0]["eval"][key] == pytest.approx(reference[key], rel=0, abs=1e-9), key


def test_random_styles_are_seeded_and_cover_the_families(toy, tmp_path, style_folder):
    from cg4ctr_fast.training.cycle import build_context, prompt_model_prompts

    config = _styled(toy, tmp_path, style_folder, style={"loras": "random"})
    ctx = build_context(config, log=lambda _m: None, guard_dir=tmp_path / "g")
    item = ctx.eval_items[0]
    first, again = prompt_model_prompts(ctx)(item), prompt_model_prompts(ctx)(item)
    assert first == again  # the evaluation's draw is the same every cycle
    styles = [p.split()[-1] for p in first]
    assert set(styles) <= set(FAMILIES) and len(set(styles)) > 1


def test_styled_resume_after_kill_equals_uninterrupted(toy, tmp_path, style_folder):
    """Kill after cycle 1 and resume: the styled run with fresh logs gives the uninterrupted run's metrics and
    prompt model, bit for bit."""
    from safetensors.torch import load_file

    from cg4ctr_fast.training.cycle import run_cycles

    config = _styled(toy, tmp_path, style_folder, refresh={"enabled": True, "epochs": 2})
    config_file = tmp_path / "styled.toml"
    reference = tmp_path / "reference"
    run_cycles(config, reference, progress=False, log=lambda _m: None)
    out = tmp_path / "run"
    kill_resume_and_compare(config_file, out, reference)
    for sub in ("prompt", "reward/member_0"):
        got = load_file(str(out / "cycles" / "cycle_002" / sub / "model.safetensors"))
        want = load_file(str(reference / "cycles" / "cycle_002" / sub / "model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert np.array_equal(np.load(out / "cycles" / "cycle_002" / "fresh_logs.npz")["clicks"],
                          np.load(reference / "cycles" / "cycle_002" / "fresh_logs.npz")["clicks"])


def test_ablation_style_arm_reports_what_it_serves(toy, tmp_path, style_folder):
    """The styles arm in `ablate`: its config, the served-style shares in results.json and results.md (recomputed
    here from the cycle metrics), and the style-share figure."""
    from cg4ctr_fast.training.ablate import run_ablation

    config = load_cycle_config(_write_config(tmp_path / "tiny.toml", toy, run={"cycles": 1},
                                             style={"folder": str(style_folder)}, refresh={"epochs": 2}))
    results = run_ablation(config, 1, tmp_path / "ablate", progress=False, log=lambda _m: None,
                           arms=("styles_refresh",))
    run = tmp_path / "ablate" / "seed_0" / "styles_refresh"
    saved = json.loads((run / "config.json").read_text())
    assert saved["style"]["loras"] == "chosen" and saved["refresh"]["enabled"] and not saved["run"]["update_lora"]
    metrics = json.loads((run / "cycles" / "cycle_001" / "metrics.json").read_text())
    share = results["eval_metrics"]["styles_refresh"]["1"]["served_style_share"]
    assert share == metrics["eval"]["served_style_share"] and sum(share.values()) == pytest.approx(1.0)
    md = (tmp_path / "ablate" / "results.md").read_text()
    assert "What the style arms serve" in md
    section = md[md.index("What the style arms serve"):]
    row = next(line for line in section.splitlines() if line.startswith("| styles_refresh | 1 |"))
    assert [c.strip() for c in row.split("|")[3:-1]] == [f"{v:.0%}" for _, v in sorted(
        share.items(), key=lambda kv: (kv[0] != "photo", kv[0] != "none", kv[0]))]
    assert (tmp_path / "ablate" / "style_share.png").stat().st_size > 1000


def test_style_inputs_are_refused_in_one_line(toy, tmp_path, style_folder):
    """A base ablation config with style LoRAs, a missing or misplaced LoRA folder, unknown LoRA targets, an
    empty --out, and a resume after a style LoRA changed."""
    import shutil

    from cg4ctr_fast.cli.train import main
    from cg4ctr_fast.training.ablate import run_ablation
    from cg4ctr_fast.training.cycle import run_cycles
    from cg4ctr_fast.training.lora import LoraTrainConfig, add_lora
    from cg4ctr_fast.training.style import check_style_folder

    with pytest.raises(InputError, match="leave it \"none\""):
        run_ablation(_styled(toy, tmp_path, style_folder), 1, tmp_path / "ablate", progress=False)
    assert not (tmp_path / "ablate").exists()
    with pytest.raises(InputError, match="not found"):
        check_style_folder(tmp_path / "nowhere")
    (tmp_path / "style_out").mkdir()
    shutil.copytree(style_folder, tmp_path / "style_out" / "loras")
    with pytest.raises(InputError, match="did you mean .*loras"):
        check_style_folder(tmp_path / "style_out")
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.models.diffusion import build_modules

    with pytest.raises(InputError, match="lora.targets"):
        add_lora(build_modules(get_preset("tiny")).unet, LoraTrainConfig(targets=("no_such_layer",)))
    config_file = _write_config(tmp_path / "c.toml", toy)
    assert main(["cycle", "--config", str(config_file), "--out", ""]) == 2

    # A run records its style LoRAs; resuming it with one of them changed is refused.
    folder = tmp_path / "styles"
    shutil.copytree(style_folder, folder)
    config = _styled(toy, tmp_path, folder, run={"cycles": 1})
    run_cycles(config, tmp_path / "run", progress=False, log=lambda _m: None)
    recorded = json.loads((tmp_path / "run" / "style_loras.json").read_text())
    assert sorted(recorded) == sorted(FAMILIES) and len(set(recorded.values())) == 4
    weights = next((folder / "pop").glob("*.safetensors"))
    shutil.copy(next((folder / "noir").glob("*.safetensors")), weights)
    with pytest.raises(InputError, match="style LoRA 'pop' differs"):
        run_cycles(config, tmp_path / "run", resume=True, progress=False, log=lambda _m: None)
