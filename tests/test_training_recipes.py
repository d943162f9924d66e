"""The TOML recipes of the top-level training/ folder: every one loads and validates; each equals the code it
mirrors (the toy presets, LcmDistillConfig's defaults, the cycle config), so the two cannot drift; the command
lines read them, with flags the user passed overriding keys and nothing else; bad files fail in one line (exit 2)."""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.cycle_config import (
    AblationSection,
    CycleConfig,
    load_ablation_config,
    load_cycle_config,
)
from cg4ctr_fast.training.lcm import LcmDistillConfig, load_lcm_config
from cg4ctr_fast.training.toy import TOY_CONFIGS, ToyConfig, load_toy_config, resolve_toy_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "training"
# Which loader reads which recipe. A new file in training/ must be added here (the test below fails until it is).
LOADERS = {
    "cycle.toml": load_cycle_config,
    "cycle_pixel_reward.toml": load_cycle_config,
    "ablation.toml": load_ablation_config,
    "toy.toml": load_toy_config,
    "toy-small.toml": load_toy_config,
    "lcm.toml": load_lcm_config,
}
TOY_RECIPES = {"default": "toy.toml", "small": "toy-small.toml"}


def _raw(name: str) -> dict:
    return tomllib.loads((RECIPES / name).read_text(encoding="utf-8"))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cg4ctr-train: error: "), err
    return err


# ------------------------------------------------------------------------------------------ every recipe
def test_the_folder_holds_exactly_the_known_recipes():
    assert sorted(p.name for p in RECIPES.iterdir()) == sorted(LOADERS)
    assert not (ROOT / "configs").exists()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    loaded = LOADERS[path.name](path)
    assert loaded is not None
    # Its header shows the command that reads it, by the path a user types from the repository root, and every
    # recipe path it names exists.
    text = path.read_text(encoding="utf-8")
    assert f"--config training/{path.name} " in text, f"{path.name}: no example command in the header"
    for name in re.findall(r"training/[\w.-]+\.toml", text):
        assert (ROOT / name).is_file(), (path.name, name)


# ------------------------------------------------------------------------------------------ cycle, ablation
def test_ablation_recipe_is_the_cycle_recipe_plus_its_settings():
    from cg4ctr_fast.training.ablate import ARMS

    config, ablation = load_ablation_config(RECIPES / "ablation.toml")
    assert config == load_cycle_config(RECIPES / "cycle.toml")
    # The documented ablation (docs/cycle.md): three seeds, three jobs, every arm.
    assert ablation == AblationSection(seeds=3, jobs=3, arms=ARMS)
    # Without [ablation], the command line's old defaults.
    assert load_ablation_config(RECIPES / "cycle.toml")[1] == AblationSection(seeds=3, jobs=1, arms=None)


def test_pixel_reward_recipe_differs_from_the_cycle_recipe_only_in_the_caption():
    plain = load_cycle_config(RECIPES / "cycle.toml")
    assert load_cycle_config(RECIPES / "cycle_pixel_reward.toml") == plain.replace(generate={"reward_sees_prompt": False})


def test_cycle_refuses_a_file_with_an_ablation_table(tmp_path, capsys):
    from cg4ctr_fast.cli.train import main

    with pytest.raises(InputError, match=r"\[ablation\] is read by `cg4ctr-train ablate` only"):
        load_cycle_config(RECIPES / "ablation.toml")
    assert main(["cycle", "--config", str(RECIPES / "ablation.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "ablation.toml: [ablation] is read by" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.fixture()
def fake_ablation(monkeypatch):
    """run_ablation replaced by a recorder: what the command line would run, without running it."""
    import cg4ctr_fast.training.ablate as ablate

    calls = []

    def record(config, seeds, out, **kwargs):
        calls.append({"config": config, "seeds": seeds, **kwargs})
        return {"comparisons": {}}

    monkeypatch.setattr(ablate, "run_ablation", record)
    return calls


def test_ablate_reads_the_ablation_table(tmp_path, fake_ablation):
    from cg4ctr_fast.cli.train import main
    from cg4ctr_fast.training.ablate import ARMS

    recipe = str(RECIPES / "ablation.toml")
    assert main(["ablate", "--config", recipe, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    (call,) = fake_ablation
    assert call["seeds"] == 3 and call["jobs"] == 3 and call["arms"] == list(ARMS)
    assert call["config"] == load_cycle_config(RECIPES / "cycle.toml")
    # Every arm is the default, so the recorded command needs no --arms.
    assert call["command"] == f"cg4ctr-train ablate --config {recipe} --seeds 3 --out {tmp_path / 'a'} --jobs 3"


@pytest.mark.parametrize("flags, seeds, jobs, arms", [
    (["--seeds", "2"], 2, 3, ["lora_only", "full"]),
    (["--jobs", "1"], 5, 1, ["lora_only", "full"]),
    (["--arms", "full,full_refresh"], 5, 3, ["full", "full_refresh"]),
    # A flag equal to the old argparse default still wins over the file: what was passed is what counts.
    (["--seeds", "3", "--jobs", "1", "--arms", "full"], 3, 1, ["full"]),
    (["--arms", "full,full,lora_only"], 5, 3, ["full", "lora_only"]),  # a repeat runs once
])
def test_ablate_flags_override_the_file(tmp_path, fake_ablation, flags, seeds, jobs, arms):
    from cg4ctr_fast.cli.train import main

    recipe = tmp_path / "abl.toml"
    # A file with other values than the flags', so each override is visible.
    recipe.write_text("[ablation]\nseeds = 5\njobs = 3\narms = ['lora_only', 'full']\n[run]\ncycles = 2\n")
    assert main(["ablate", "--config", str(recipe), "--out", str(tmp_path / "a"), "--quiet", *flags]) == 0
    (call,) = fake_ablation
    assert (call["seeds"], call["jobs"], call["arms"]) == (seeds, jobs, arms)
    assert call["config"] == CycleConfig().replace(run={"cycles": 2})
    assert f"--seeds {seeds} " in call["command"] and call["command"].endswith(f"--arms {','.join(arms)}")


def test_ablate_refuses_arms_that_name_no_arm(tmp_path, fake_ablation, capsys):
    from cg4ctr_fast.cli.train import main

    code = main(["ablate", "--config", str(RECIPES / "ablation.toml"), "--out", str(tmp_path / "a"), "--arms", " , "])
    err = capsys.readouterr().err
    assert code == 2 and fake_ablation == [] and err.count("\n") == 1 and "--arms names no arm" in err, err


def test_ablate_without_an_ablation_table_keeps_the_old_defaults(tmp_path, fake_ablation):
    from cg4ctr_fast.cli.train import main

    assert main(["ablate", "--config", str(RECIPES / "cycle.toml"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    (call,) = fake_ablation
    assert (call["seeds"], call["jobs"], call["arms"]) == (3, 1, None)
    assert "--jobs" not in call["command"] and "--arms" not in call["command"]


@pytest.mark.parametrize("text, needle", [
    ("[ablation]\nseeds = 0\n", "ablation.seeds must be ≥ 1, got 0"),
    ("[ablation]\njobs = '3'\n", "ablation.jobs must be an integer"),
    ("[ablation]\narms = ['full', 'fulll']\n", "ablation.arms: unknown arm 'fulll'"),
    ("[ablation]\narms = []\n", "ablation.arms must name at least one arm"),
    ("[ablation]\narms = 'full'\n", "ablation.arms must be a list"),
    ("[ablation]\nseed = 3\n", "unknown key 'seed' in [ablation]"),
    ("ablation = 3\n", "[ablation] must be a table"),
])
def test_bad_ablation_table_is_one_line(tmp_path, capsys, fake_ablation, text, needle):
    from cg4ctr_fast.cli.train import main

    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["ablate", "--config", str(path), "--out", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys)
    assert needle in err and str(path) in err, err
    assert not fake_ablation and not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------------ toy set
def _leaves(config, prefix: str = "") -> dict:
    """Every field of a nested dataclass as "table.key" → value; None (TOML has no null) left out."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        elif value is not None:
            out[prefix + f.name] = value
    return out


def _raw_leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_raw_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_toy_preset_has_a_recipe():
    assert set(TOY_RECIPES) == set(TOY_CONFIGS)


@pytest.mark.parametrize("preset, name", sorted(TOY_RECIPES.items()))
def test_toy_recipe_equals_its_preset_exactly(preset, name):
    config = load_toy_config(RECIPES / name)
    assert config == TOY_CONFIGS[preset]
    assert config.key() == TOY_CONFIGS[preset].key()  # the set's identity: the shipped set is found by it
    # The file spells out every key (no silent reliance on the code's defaults), each with the preset's value
    # and type (an int where the code has an int).
    raw = _raw_leaves(_raw(name))
    want = _leaves(TOY_CONFIGS[preset])
    assert set(raw) == set(want)
    for key, value in want.items():
        assert raw[key] == value and type(raw[key]) is type(value), key


def test_toy_config_is_a_preset_name_or_a_file(tmp_path):
    assert resolve_toy_config("small") is TOY_CONFIGS["small"]
    assert resolve_toy_config(str(RECIPES / "toy-small.toml")) == TOY_CONFIGS["small"]
    with pytest.raises(InputError, match="neither a preset .*default, small.* nor a TOML file"):
        resolve_toy_config(str(tmp_path / "nope.toml"))
    # An optional wall-clock cap (None in code, no TOML null) is read when the file names it.
    (tmp_path / "capped.toml").write_text("[generator]\nvae_seconds = 60\n")
    assert load_toy_config(tmp_path / "capped.toml").generator.vae_seconds == 60.0
    assert load_toy_config(tmp_path / "capped.toml").generator.unet_seconds is None


def test_toy_command_with_a_recipe_builds_and_records_it(tmp_path, monkeypatch):
    """`cg4ctr-train toy --config FILE`: the file's ToyConfig is built and exported, and the set's command is the
    one given (export_toy_set puts it in manifest.json beside the config and its key)."""
    import cg4ctr_fast.training.toy as toy
    import cg4ctr_fast.training.toy_set as toy_set
    from cg4ctr_fast.cli.train import main

    calls = {}

    def build(config, **_kwargs):
        calls["built"] = config
        return toy.ToyModels(*[tmp_path] * 6)

    def export(_src, _out, config, *, command, **_kwargs):
        calls.update(exported=config, command=command)

    monkeypatch.setattr(toy, "build_toy_models", build)
    monkeypatch.setattr(toy_set, "export_toy_set", export)
    recipe = str(RECIPES / "toy-small.toml")
    out = tmp_path / "set"
    assert main(["toy", "--out", str(out), "--config", recipe, "--cache", str(tmp_path / "c"), "--quiet"]) == 0
    assert calls["built"] == calls["exported"] == TOY_CONFIGS["small"]
    assert calls["command"] == f"cg4ctr-train toy --out {out} --config {recipe}"


@pytest.mark.parametrize("text, needle", [
    ("[generator]\nvae_step = 3\n", "unknown key 'vae_step' in [generator] (known: seed, n_images"),
    ("prodcts = 3\n", "unknown key 'prodcts' in the top level"),
    ("[saliency]\nlr = 'fast'\n", "saliency.lr must be a number"),
    ("days = 2.5\n", "days must be an integer"),
    ("generator = 3\n", "[generator] must be a table"),
    ("products = 0\n", "products must be a positive integer, got 0"),
    ("[generator]\nvae_seconds = inf\n", "generator.vae_seconds must be a finite number"),
    ("[saliency\n", "not valid TOML"),
    ("# a comment only\n", "holds no keys; a recipe sets some of: seed, products"),
    ("[generator]\nunet_steps = -4\n", "unet_steps must be an integer ≥ 0, got -4"),
    ("[saliency]\ntest_fraction = 1.5\n", "test_fraction must be a number in [0, 1], got 1.5"),
])
def test_bad_toy_recipe_is_one_line_exit_2(tmp_path, capsys, text, needle):
    from cg4ctr_fast.cli.train import main

    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        load_toy_config(path)
    assert needle in str(info.value) and str(info.value).startswith(str(path))
    assert main(["toy", "--out", str(tmp_path / "set"), "--config", str(path), "--quiet"]) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "set").exists()


# ------------------------------------------------------------------------------------------ LCM distillation
def test_lcm_recipe_equals_the_defaults_field_by_field():
    raw = _raw("lcm.toml")
    default = LcmDistillConfig()
    assert set(raw) == {f.name for f in dataclasses.fields(LcmDistillConfig)}
    for f in dataclasses.fields(LcmDistillConfig):
        assert raw[f.name] == getattr(default, f.name) and type(raw[f.name]) is type(getattr(default, f.name)), f.name
    assert load_lcm_config(RECIPES / "lcm.toml") == default


def _lcm_args(*argv: str):
    from cg4ctr_fast.cli.train import build_parser

    return build_parser().parse_args(["lcm", "--model", "m", "--out", "o", *argv])


def test_lcm_flags_override_the_file_only_when_passed(tmp_path):
    from cg4ctr_fast.cli.train import _lcm_config

    path = tmp_path / "lcm.toml"
    path.write_text("steps = 7\nrank = 4\nalpha = 2.0\nw_min = 6.0\nseed = 3\n")
    from_file = LcmDistillConfig(steps=7, rank=4, alpha=2.0, w_min=6.0, seed=3)
    assert _lcm_config(_lcm_args("--config", str(path))) == from_file  # no flag: every value from the file
    assert _lcm_config(_lcm_args("--config", str(path), "--steps", "9", "--w-max", "12")) == \
        dataclasses.replace(from_file, steps=9, w_max=12.0)
    # --rank sets alpha = rank, as it always did without a file.
    assert _lcm_config(_lcm_args("--config", str(path), "--rank", "16")) == \
        dataclasses.replace(from_file, rank=16, alpha=16.0)
    # A flag passed with the default's value still overrides: what counts is that it was given.
    assert _lcm_config(_lcm_args("--config", str(path), "--steps", "1000", "--seed", "0")) == \
        dataclasses.replace(from_file, steps=1000, seed=0)
    # Without a file: the defaults, and the flags on top (the command line as before).
    assert _lcm_config(_lcm_args()) == LcmDistillConfig()
    assert _lcm_config(_lcm_args("--rank", "4", "--lr", "0.002")) == LcmDistillConfig(rank=4, alpha=4.0, lr=0.002)


@pytest.mark.parametrize("text, needle", [
    ("stepz = 10\n", "unknown key 'stepz' in the top level (known: steps, batch"),
    ("batch = 16.0\n", "batch must be an integer"),
    ("lr = nan\n", "lr must be a finite number"),
    ("num_ddim_timesteps = 33\n", "--num-ddim-timesteps must divide 1000"),
    ("", "holds no keys; a recipe sets some of: steps, batch"),
])
def test_bad_lcm_recipe_is_one_line_exit_2(tmp_path, capsys, text, needle):
    from cg4ctr_fast.cli.train import main

    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "lora"
    code = main(["lcm", "--config", str(path), "--model", str(tmp_path / "no-model"), "--out", str(out), "--quiet"])
    assert code == 2
    err = _one_line_error(capsys)
    assert needle in err and str(path) in err, err
    assert not out.exists()
