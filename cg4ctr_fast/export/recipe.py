"""Export recipes: the settings of `cg4ctr-export onnx` for one target, kept in a TOML file.

The repository's `export/` folder holds one recipe per target (`export/tiny-cpu.toml`,
`export/sd15-inpaint-h100.toml`, ...); `cg4ctr-export onnx --recipe FILE --out DIR` runs one. Keys are the
command's own flags in snake_case, with the values the flags take:

    preset = "sd15-inpaint"      # --preset (tiny | sd15-inpaint | toy)
    random_weights = false       # --random-weights (true/false)
    seed = 0                     # --seed
    unet_channels = 9            # --unet-channels (4 | 9)
    dtype = "fp16"               # --dtype (fp32 | fp16)
    batch = "1:1:8"              # --batch MIN:OPT:MAX creatives per call (or one integer: fixed)
    height = "8:512:512"         # --height MIN:OPT:MAX pixels (or one integer: fixed)
    width = "8:512:512"          # --width
    opset = 17                   # --opset
    components = ["text_encoder", "unet"]   # --components (an array, or the flag's comma list)

A recipe describes a target, not a machine: the inputs (--model, --saliency, --reward, --lora, --lora-scale)
and the output (--out, --overwrite) are paths that differ from one machine to the next, so they stay on the
command line and a recipe that sets one is refused. A flag given on the command line overrides the recipe's
key; the manifest records the recipe (path, sha256, keys) and which keys were overridden.

Every value is checked as the flag's would be, by the command's own parser definitions (types, choices) and
parsers (`parse_side`, `parse_components`, the `ExportSettings` range checks, the opset range, and the
command's own batch and preset checks), so a recipe `cg4ctr-export onnx` would refuse is refused when it
loads: one line naming the file and the key (InputError; exit 2 in the command). The command hands its
argparse actions and checks to :func:`load_recipe` (`cg4ctr_fast.cli.export.read_recipe`), so this module
never imports the command line.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from cg4ctr_fast.errors import InputError

# Keys that name an input or an output: given on the command line, never in a recipe (see the module docstring).
COMMAND_LINE_ONLY = {
    "model": "--model DIR",
    "saliency": "--saliency FILE",
    "reward": "--reward DIR",
    "lora": "--lora FILE",
    "lora_scale": "--lora-scale S",
    "out": "--out DIR",
    "overwrite": "--overwrite",
    "recipe": "--recipe FILE",
}
# Flags whose value may also be one TOML integer (a fixed profile: MIN = OPT = MAX), as the flag takes "512".
_PROFILE_KEYS = ("batch", "height", "width")


@dataclass(frozen=True)
class ExportRecipe:
    """A recipe file, checked. None: the file does not set that key (the command line or its default decides).

    path: the file as given; sha256: of its bytes (hex). The values are in the flags' own forms: batch, height,
    width as 'MIN:OPT:MAX' text (pixels for height/width, creatives per call for batch); components as a tuple
    of names in export order.
    """

    path: str
    sha256: str
    preset: Optional[str] = None
    random_weights: Optional[bool] = None
    seed: Optional[int] = None
    unet_channels: Optional[int] = None
    dtype: Optional[str] = None
    batch: Optional[str] = None
    height: Optional[str] = None
    width: Optional[str] = None
    opset: Optional[int] = None
    components: Optional[tuple[str, ...]] = None

    def settings(self) -> dict[str, Any]:
        """The keys the file sets, JSON-ready (components as a list), in RECIPE_KEYS order."""
        values = {key: getattr(self, key) for key in RECIPE_KEYS if getattr(self, key) is not None}
        if "components" in values:
            values["components"] = list(values["components"])
        return values

    def flag_values(self) -> dict[str, Any]:
        """The keys the file sets, as argparse stores the flags (components as the comma list)."""
        values = self.settings()
        if "components" in values:
            values["components"] = ",".join(values["components"])
        return values


RECIPE_KEYS = tuple(f.name for f in fields(ExportRecipe) if f.name not in ("path", "sha256"))


def _toml_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                       (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"  # TOML dates and times


def _load_toml(path: Path, data: bytes) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as a package
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise InputError(f"{path}: reading a recipe needs Python ≥ 3.11 or the tomli package") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}): a recipe is a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({' '.join(str(exc).split())})") from None


def _check_value(key: str, value: Any, action, checks: Mapping[str, Callable[[str], Any]]) -> Any:
    """One key's value in the flag's own form, checked as the flag's parser checks it; InputError (no path)."""
    from cg4ctr_fast.export.contracts import ExportSettings, parse_components, parse_side

    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch such as --random-weights
        if not isinstance(value, bool):
            raise InputError(f"must be true or false (the switch {flag}), got {_toml_type(value)}")
        return value
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"must be an integer (as {flag} takes), got {_toml_type(value)} {value!r}")
    elif key == "components":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        elif not isinstance(value, str):
            raise InputError(f"must be an array of component names (or the comma list {flag} takes), got "
                             f"{_toml_type(value)} {value!r}")
    elif key in _PROFILE_KEYS and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # one number: a fixed size, as `--height 512`
    elif not isinstance(value, str):
        what = "a 'MIN:OPT:MAX' string or one integer" if key in _PROFILE_KEYS else "a string"
        raise InputError(f"must be {what} (as {flag} takes), got {_toml_type(value)} {value!r}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise InputError(f"invalid choice {value!r} for {flag} (choose from {choices})")

    # The checks the command runs on the parsed flags, in the same functions.
    if key == "batch":
        ExportSettings(batch=checks["batch"](value))
    elif key in ("height", "width"):
        ExportSettings(**{key: parse_side(value, flag)})
    elif key == "components":
        return parse_components(value)  # export order, unknown names refused
    elif key == "preset":
        checks["preset"](value)
    elif key == "opset":
        from cg4ctr_fast.export.onnx_export import MAX_OPSET, MIN_OPSET

        if not (MIN_OPSET <= value <= MAX_OPSET):
            raise InputError(f"--opset must be in {MIN_OPSET}..{MAX_OPSET}, got {value}")
    return value


def load_recipe(path: str | Path, actions: Mapping[str, Any],
                checks: Mapping[str, Callable[[str], Any]]) -> ExportRecipe:
    """Read and check a recipe file (TOML; keys and values in the module docstring).

    actions: the `onnx` command's argparse actions by dest (types, choices, flag names); checks: the command's
    "batch" and "preset" checks (text -> value, InputError when refused). Both come from the command line's
    module (`cg4ctr_fast.cli.export.read_recipe` passes them).

    Raises InputError, one line naming the file (and the key): a missing or unreadable file, text that is not
    TOML, a file with no keys, an unknown key, a key that belongs on the command line (a path), a value of the
    wrong TOML type, or a value the flag would refuse (a bad MIN:OPT:MAX, an unknown component or preset, ...).
    """
    file = Path(path)
    if not file.exists():
        raise InputError(f"recipe {file}: no such file")
    if not file.is_file():
        raise InputError(f"recipe {file}: not a file (a recipe is a TOML file, e.g. export/tiny-cpu.toml)")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InputError(f"recipe {file}: cannot be read ({exc.strerror or exc})") from None
    table = _load_toml(file, data)
    if not table:
        raise InputError(f"{file}: holds no keys (a recipe sets some of: {', '.join(RECIPE_KEYS)})")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in COMMAND_LINE_ONLY:
            raise InputError(f"{file}: key {key!r} is not a recipe key: a recipe holds a target's settings, not "
                             f"paths; give {COMMAND_LINE_ONLY[key]} on the command line")
        if key not in RECIPE_KEYS:
            raise InputError(f"{file}: unknown key {key!r} (recipe keys: {', '.join(RECIPE_KEYS)})")
        try:
            values[key] = _check_value(key, value, actions[key], checks)
        except InputError as exc:
            raise InputError(f"{file}: key {key!r}: {exc}") from None
    return ExportRecipe(path=str(path), sha256=hashlib.sha256(data).hexdigest(), **values)
