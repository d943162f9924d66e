"""Export recipes (export/*.toml, `cg4ctr-export onnx --recipe FILE`): every recipe in the folder loads and passes
the command's own checks, a flag given on the command line overrides its key (even at the flag's default), bad
recipes are one line and exit 2 naming the file and the key, and a real export records the recipe in its manifest.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from cg4ctr_fast.errors import InputError
from tests.test_export_cli_checks import _export, _one_error_line, no_export  # noqa: F401 - no_export: fixture

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "export").glob("*.toml"))
# What every recipe states (the rest of RECIPE_KEYS is optional): a target is fully described by these.
REQUIRED_KEYS = ("preset", "dtype", "batch", "height", "width", "opset", "components")


def _weights_flags(recipe) -> list[str]:
    """A preset without built-in weights (sd15-inpaint) needs --model or --random-weights on the command line."""
    from cg4ctr_fast.config import PRESETS

    preset = PRESETS.get(recipe.preset)
    return ["--random-weights"] if preset is not None and not preset.buildable else []


def _effective(req) -> dict:
    """The settings an ExportRequest exports with, after the command's checks (check_request) and the model's
    default sides (image_sides): what two ways of asking for the same export must agree on."""
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.export.contracts import image_sides
    from cg4ctr_fast.export.onnx_export import check_request

    preset, settings, components = check_request(req)
    # image_sides reads only these two facts of the stack; the preset gives them without building a model.
    stack = SimpleNamespace(vae_scale_factor=preset.vae.scale_factor, resolution=get_preset(req.preset).resolution)
    height, width = image_sides(stack, settings)
    return {"preset": req.preset, "random_weights": req.random_weights, "seed": req.seed,
            "precision": settings.precision, "batch": list(settings.batch), "height": list(height),
            "width": list(width), "opset": settings.opset, "components": list(components)}


# ------------------------------------------------------------------------------------------------ the folder
def test_the_folder_holds_the_documented_targets():
    names = {path.name for path in RECIPES}
    assert {"tiny-cpu.toml", "sd15-inpaint-h100.toml", "sd15-inpaint-cpu.toml"} <= names, names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_each_recipe_loads_states_its_target_and_passes_the_commands_checks(path, tmp_path, no_export):
    from cg4ctr_fast.cli.export import read_recipe
    from cg4ctr_fast.export.recipe import RECIPE_KEYS

    relative = path.relative_to(ROOT).as_posix()
    recipe = read_recipe(path)
    settings = recipe.settings()
    assert set(REQUIRED_KEYS) <= set(settings) <= set(RECIPE_KEYS), settings
    assert recipe.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # The header says what the target is and gives the exact command that runs it.
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# "), "a recipe opens with a comment header naming its target"
    assert f"cg4ctr-export onnx --recipe {relative}" in text, f"{relative}: the header gives the command to run it"

    # Through the command line, then the export's own request checks (nothing loads: export_onnx is recorded).
    out = tmp_path / "out"
    assert _export("onnx", "--recipe", str(path), *_weights_flags(recipe), "--out", str(out)) == 0
    (req,) = no_export
    effective = _effective(req)
    assert effective["precision"] == settings["dtype"] and effective["opset"] == settings["opset"]
    assert effective["components"] == settings["components"]
    for key in ("batch", "height", "width"):
        assert effective[key] == [int(v) for v in str(settings[key]).split(":")] or \
            effective[key] == [int(settings[key])] * 3, key
    assert req.recipe == {"path": str(path), "sha256": recipe.sha256, "keys": settings, "overridden": []}


def test_tiny_cpu_is_the_plain_tiny_export(tmp_path, no_export):
    """export/tiny-cpu.toml pins the defaults of `cg4ctr-export onnx --preset tiny` (README, CPU bench, tests):
    the same settings and profiles. (Its stated sides are also validated at MIN and MAX, as given sides are.)"""
    assert _export("onnx", "--preset", "tiny", "--out", str(tmp_path / "a")) == 0
    assert _export("onnx", "--recipe", str(ROOT / "export" / "tiny-cpu.toml"), "--out", str(tmp_path / "b")) == 0
    assert _effective(no_export[0]) == _effective(no_export[1])


def _run_sh_export_args() -> list[str]:
    """The `cg4ctr_fast.cli.export onnx ...` arguments of bench/gpu/run.sh's sd15_onnx step."""
    text = (ROOT / "bench" / "gpu" / "run.sh").read_text(encoding="utf-8")
    match = re.search(r"-m cg4ctr_fast\.cli\.export (onnx [^\\&]*)", text)
    assert match, "bench/gpu/run.sh has no `cg4ctr_fast.cli.export onnx` step"
    return shlex.split(match.group(1))


def test_gpu_script_step_exports_what_its_recorded_run_exported(tmp_path, no_export):
    """run.sh's sd15_onnx step (now through a recipe) keeps the settings of the run recorded in
    bench/results/gpu-h200/sd15_onnx_manifest.json (fp32, batch 1:1:2, 8:512:512, opset 17, four components)."""
    args = _run_sh_export_args()
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "sd15")
    assert "--recipe" in args
    assert _export(*args) == 0
    recorded = json.loads((ROOT / "bench" / "results" / "gpu-h200" / "sd15_onnx_manifest.json").read_text())
    effective = _effective(no_export[0])
    settings = recorded["settings"]
    assert {k: effective[k] for k in ("precision", "batch", "opset")} == {
        k: settings[k] for k in ("precision", "batch", "opset")}
    # That (format 1) manifest's "height"/"width" held the resolution; the image profile is the VAE encoder's.
    profile = recorded["components"]["vae_encoder"]["profile"]
    assert (effective["height"], effective["width"]) == (profile["height"], profile["width"]) == ([8, 512, 512],) * 2
    assert effective["components"] == list(recorded["components"])
    assert (effective["preset"], effective["random_weights"], effective["seed"]) == (
        recorded["source"]["preset"], recorded["source"]["random_weights"], recorded["source"]["seed"])


# ------------------------------------------------------------------------------------------------ overrides
def _write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("flag", [["--dtype", "fp32"], ["--dtype=fp32"]])
def test_a_flag_overrides_its_key_even_at_the_flags_default(tmp_path, no_export, flag):
    recipe = _write(tmp_path, 'preset = "tiny"\ndtype = "fp16"\nbatch = "1:2:4"\nheight = 48\n')
    assert _export("onnx", "--recipe", str(recipe), *flag, "--out", str(tmp_path / "o")) == 0
    (req,) = no_export
    assert req.precision == "fp32"  # given, though fp32 is --dtype's default
    assert req.batch == (1, 2, 4) and req.height == (48, 48, 48)  # not given: the recipe's, not the defaults
    assert req.recipe["keys"] == {"preset": "tiny", "dtype": "fp16", "batch": "1:2:4", "height": "48"}
    assert req.recipe["overridden"] == ["dtype"]


def test_recipe_keys_replace_the_flags_defaults_and_others_keep_theirs(tmp_path, no_export):
    recipe = _write(tmp_path, 'preset = "tiny"\nopset = 18\ncomponents = ["vae_decoder", "unet"]\n')
    assert _export("onnx", "--recipe", str(recipe), "--batch", "2:2:2", "--out", str(tmp_path / "o")) == 0
    (req,) = no_export
    assert req.opset == 18 and req.components == ("unet", "vae_decoder")  # export order
    assert req.batch == (2, 2, 2) and req.precision == "fp32"  # a flag the recipe does not set; a default
    assert req.recipe["overridden"] == []  # --batch is not one of the recipe's keys


def test_given_options_reads_the_command_line_not_the_values():
    from cg4ctr_fast.cli.export import given_options

    given = given_options(["onnx", "--out", "o", "--dtype", "fp32", "--random-weights", "--lora", "a", "--lora", "b"])
    assert {"out", "dtype", "random_weights", "lora", "command"} <= given
    assert not given & {"batch", "preset", "opset", "height", "components", "recipe", "seed", "overwrite"}
    assert "debug" in given_options(["--debug", "onnx", "--out", "o"])


# ------------------------------------------------------------------------------------------------ bad recipes
@pytest.mark.parametrize("text,key,needle", [
    ('bach = "1:1:8"\n', "bach", "unknown key 'bach'"),
    ('[onnx]\ndtype = "fp16"\n', "onnx", "unknown key 'onnx'"),
    ('model = "/models/sd15"\n', "model", "give --model DIR on the command line"),
    ('out = "engines/x"\n', "out", "give --out DIR on the command line"),
    ('opset = "17"\n', "opset", "must be an integer (as --opset takes), got a string '17'"),
    ('opset = 17.0\n', "opset", "must be an integer"),
    ('random_weights = "yes"\n', "random_weights", "must be true or false"),
    ('seed = true\n', "seed", "must be an integer"),
    ('components = 3\n', "components", "must be an array of component names"),
    ('components = ["unet", 3]\n', "components", "must be an array of component names"),
    ('components = []\n', "components", "--components is empty"),
    ('components = ["unet", "bogus"]\n', "components", "unknown component 'bogus'"),
    ('batch = [1, 1, 8]\n', "batch", "must be a 'MIN:OPT:MAX' string or one integer"),
    ('batch = "4:2:8"\n', "batch", "--batch must be MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX, got 4:2:8"),
    ('batch = "1:1:65"\n', "batch", "--batch max must be at most 64"),
    ('height = "64:128"\n', "height", "--height must be MIN:OPT:MAX"),
    ('width = "64:x:128"\n', "width", "--width must be MIN:OPT:MAX (e.g. 64:64:128) or one number, got '64:x:128'"),
    ('height = 60\n', "height", "--height must be a multiple of 8"),
    ('width = "128:64:64"\n', "width", "--width must be MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX"),
    ('dtype = "bf16"\n', "dtype", "invalid choice 'bf16' for --dtype"),
    ('unet_channels = 5\n', "unet_channels", "invalid choice 5 for --unet-channels"),
    ('opset = 9\n', "opset", "--opset must be in 14..20, got 9"),
    ('preset = "sd99"\n', "preset", "unknown preset 'sd99'"),
])
def test_a_bad_recipe_is_one_line_naming_file_and_key(tmp_path, capsys, no_export, text, key, needle):
    recipe = _write(tmp_path, text)
    out = tmp_path / "out"
    line = _one_error_line(capsys, _export("onnx", "--recipe", str(recipe), "--out", str(out)))
    assert str(recipe) in line and repr(key) in line and needle in line, line
    assert no_export == [] and not out.exists()
    # The same refusal from the library, without the command's prefix.
    from cg4ctr_fast.cli.export import read_recipe

    with pytest.raises(InputError, match=re.escape(needle)):
        read_recipe(recipe)


@pytest.mark.parametrize("text,needle", [
    ("dtype = \n", "not valid TOML"),
    ('dtype = "fp16"\ndtype = "fp32"\n', "not valid TOML"),
    ("", "holds no keys"),
    ("# only a comment\n", "holds no keys"),
])
def test_a_file_that_is_no_recipe_is_one_line(tmp_path, capsys, no_export, text, needle):
    recipe = _write(tmp_path, text)
    line = _one_error_line(capsys, _export("onnx", "--recipe", str(recipe), "--out", str(tmp_path / "o")))
    assert str(recipe) in line and needle in line, line
    assert no_export == []


def test_missing_unreadable_and_binary_recipes(tmp_path, capsys, no_export):
    for path, needle in ((tmp_path / "nope.toml", "no such file"), (tmp_path, "not a file")):
        line = _one_error_line(capsys, _export("onnx", "--recipe", str(path), "--out", str(tmp_path / "o")))
        assert str(path) in line and needle in line, line
    binary = tmp_path / "b.toml"
    binary.write_bytes(b'dtype = "fp\xff16"\n')
    line = _one_error_line(capsys, _export("onnx", "--recipe", str(binary), "--out", str(tmp_path / "o")))
    assert str(binary) in line and "not UTF-8" in line
    assert no_export == []


def test_saliency_or_reward_left_out_by_the_recipes_components_is_refused(tmp_path, capsys, no_export):
    recipe = _write(tmp_path, 'preset = "tiny"\ncomponents = ["text_encoder", "unet"]\n')
    weights = _write(tmp_path, "", "u2netp.pth")  # never read: the request is refused first
    line = _one_error_line(capsys, _export("onnx", "--recipe", str(recipe), "--saliency", str(weights),
                                           "--out", str(tmp_path / "o")))
    assert "'components' leaves out saliency" in line and "--components text_encoder,unet,saliency" in line
    # Named on the command line, the components decide (as without a recipe).
    assert _export("onnx", "--recipe", str(recipe), "--saliency", str(weights), "--components", "unet,saliency",
                   "--out", str(tmp_path / "o")) == 0
    assert no_export[0].components == ("unet", "saliency")


def test_recipe_record_refuses_an_override_of_a_key_the_recipe_lacks():
    from cg4ctr_fast.export.manifest import recipe_record

    assert recipe_record("r.toml", "ab", {"dtype": "fp16"}, ["dtype"])["overridden"] == ["dtype"]
    with pytest.raises(ValueError, match="batch"):
        recipe_record("r.toml", "ab", {"dtype": "fp16"}, ["batch"])


# ------------------------------------------------------------------------------------------------ a real export
def test_tiny_export_with_the_recipe_records_it_and_verifies(tmp_path, monkeypatch, capsys):
    from cg4ctr_fast.export import manifest as mf
    from cg4ctr_fast.cli.export import read_recipe

    monkeypatch.chdir(ROOT)  # the path as a user types it, relative to the repository root
    out = tmp_path / "tiny"
    assert _export("onnx", "--recipe", "export/tiny-cpu.toml", "--batch", "1:2:4", "--out", str(out)) == 0
    manifest = json.loads((out / mf.MANIFEST).read_text())
    recipe = read_recipe("export/tiny-cpu.toml")
    assert manifest["recipe"] == {
        "path": "export/tiny-cpu.toml",
        "sha256": hashlib.sha256((ROOT / "export" / "tiny-cpu.toml").read_bytes()).hexdigest(),
        "keys": recipe.settings(),
        "overridden": ["batch"],
    }
    assert manifest["settings"] == {"precision": "fp32", "batch": [1, 2, 4], "height": [8, 64, 64],
                                    "width": [8, 64, 64], "opset": 17}
    assert list(manifest["components"]) == recipe.settings()["components"]
    assert manifest["format_version"] == mf.FORMAT_VERSION == 2
    capsys.readouterr()
    assert _export("verify", "--engines", str(out)) == 0  # the recipe section changes nothing verify checks

    # A folder written before recipes existed has no "recipe" key: it still reads and checks as version 2.
    del manifest["recipe"]
    (out / mf.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    older = mf.read_manifest(out)
    mf.check_files(out, older)
    assert "recipe" not in older
