"""The self-cyclic training run's configuration: a TOML file read into frozen dataclasses.

    [run]       seed, cycles, products, what to update (the ablation arms flip these)
    [models]    folders of the generator, reward model, prompt model and logs; empty = the embedded toy models
    [generate]  how the training creatives are made each cycle
    [lora]      the LoRA and its optimizer (cg4ctr_fast.training.lora.LoraTrainConfig)
    [prompt]    the prompt model's update
    [eval]      the held-out evaluation

Every key is checked: an unknown section or key, or a value of the wrong type, fails with one line naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.lora import LoraTrainConfig


@dataclass(frozen=True)
class RunSection:
    seed: int = 0
    cycles: int = 4
    train_products: int = 8  # logged items the cycles generate for (drawn per seed)
    eval_products: int = 4  # held-out items (never in the logs), different per seed
    update_lora: bool = True
    update_prompt: bool = True
    threads: int = 0  # torch threads; 0 = leave torch's default

    def __post_init__(self) -> None:
        if self.cycles < 0:
            raise InputError(f"run.cycles must be ≥ 0, got {self.cycles}")
        if self.train_products < 1 or self.eval_products < 1:
            raise InputError("run.train_products and run.eval_products must be ≥ 1")
        if self.threads < 0:
            raise InputError(f"run.threads must be ≥ 0, got {self.threads}")


@dataclass(frozen=True)
class ModelsSection:
    # Empty strings mean: the embedded toy models (`make demo` builds and caches them).
    world: str = ""
    generator: str = ""
    reward: str = ""
    prompt: str = ""


@dataclass(frozen=True)
class GenerateSection:
    prompts_per_group: int = 2  # sampled from the prompt model's top-p nucleus (exploration)
    images_per_prompt: int = 2
    steps: int = 15
    guidance: float = 5.0
    top_p: float = 0.9
    top_k: int = 2  # creatives kept per (product, group) by reward
    # The reward model reads a caption beside the image. True: the prompt is that caption (as in the logs,
    # where each creative's caption is the prompt it was rendered from). False: an empty caption, so the
    # ranking rests on pixels, title and group only and the prompt model cannot please the caption tower.
    reward_sees_prompt: bool = True

    def __post_init__(self) -> None:
        if min(self.prompts_per_group, self.images_per_prompt, self.steps, self.top_k) < 1:
            raise InputError("generate.prompts_per_group, images_per_prompt, steps and top_k must be ≥ 1")
        if self.top_k > self.prompts_per_group * self.images_per_prompt:
            raise InputError(
                f"generate.top_k ({self.top_k}) exceeds the creatives per (product, group) "
                f"({self.prompts_per_group} × {self.images_per_prompt})"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"generate.top_p must be in (0, 1], got {self.top_p}")
        if self.guidance < 0:
            raise InputError(f"generate.guidance must be ≥ 0, got {self.guidance}")


@dataclass(frozen=True)
class PromptSection:
    epochs: int = 20
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.epochs < 0 or not self.lr > 0:
            raise InputError(f"prompt.epochs must be ≥ 0 and prompt.lr > 0, got {self.epochs} and {self.lr}")


@dataclass(frozen=True)
class EvalSection:
    images_per_group: int = 4
    steps: int = 15

    def __post_init__(self) -> None:
        if self.images_per_group < 1 or self.steps < 1:
            raise InputError("eval.images_per_group and eval.steps must be ≥ 1")


@dataclass(frozen=True)
class CycleConfig:
    run: RunSection = field(default_factory=RunSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    prompt: PromptSection = field(default_factory=PromptSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **sections: dict[str, Any]) -> "CycleConfig":
        """A copy with some keys changed: `config.replace(run={"seed": 3})`."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed)


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise InputError(f"config: [{where}] must be a table, got {type(value).__name__}")
        return from_mapping(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config: {where} must be a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_convert(v, item_hint, f"{where}[{k}]") for k, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"config: {where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config: {where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"config: {where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def from_mapping(cls, data: dict[str, Any], where: str = ""):
    """Build dataclass `cls` from a (TOML) mapping; unknown keys and wrong types fail with one line."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        place = f"[{where}]" if where else "the top level"
        raise InputError(f"config: unknown key {unknown[0]!r} in {place} (known: {', '.join(names)})")
    kwargs = {name: _convert(data[name], hints[name], f"{where}.{name}" if where else name)
              for name in names if name in data}
    return cls(**kwargs)


def load_cycle_config(path: str | os.PathLike) -> CycleConfig:
    import tomllib

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: config file not found")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{file}: not valid TOML ({exc})") from None
    try:
        return from_mapping(CycleConfig, data)
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None


def to_toml(config: CycleConfig) -> str:
    """The config as TOML (what the run saves beside its checkpoints; `load_cycle_config` reads it back)."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
