"""The self-cyclic training run's configuration: a TOML file read into frozen dataclasses.

    [run]       seed, cycles, products, what to update (the ablation arms flip these)
    [models]    folders of the generator, reward model, prompt model and logs; empty = the embedded toy models
    [generate]  how the training creatives are made each cycle
    [lora]      the LoRA and its optimizer (cg4ctr_fast.training.lora.LoraTrainConfig)
    [prompt]    the prompt model's update
    [eval]      the held-out evaluation
    [guard]     guards against reward hacking: a held-out judge, a reward ensemble, early stop
    [refresh]   fresh logs between cycles: the world logs the served creatives, the reward model is retrained
    [style]     K style LoRAs the prompt model chooses from per (product, group) (training/style.py)

Every key is checked: an unknown section or key, or a value of the wrong type, fails with one line naming it
(training/recipes.py). `cg4ctr-train ablate` also reads an [ablation] table (seeds, jobs, arms:
`load_ablation_config`); `load_cycle_config` refuses it. The recipes: training/cycle.toml, training/ablation.toml.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from cg4ctr_fast.errors import InputError
from cg4ctr_fast.training.lora import LoraTrainConfig
from cg4ctr_fast.training.recipes import build, read_toml


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


ENSEMBLE_RULES = ("min", "mean_std")
REFRESH_LOGS = ("topk", "all")


@dataclass(frozen=True)
class GuardSection:
    """Guards against reward over-optimisation (docs/cycle.md, "Guards"). The LoRA anchors live in [lora]
    (`anchor_weight`, `max_delta`)."""

    # A held-out reward model, trained on logs disjoint from the training reward model's (a second log
    # sample of the same world), scores what each cycle would serve on `judge_products` held-out products of
    # their own (never the evaluation's, so choosing a cycle by the judge does not peek at the evaluation).
    judge: bool = False
    judge_products: int = 4
    # With the judge: a cycle whose judged aggregate lift falls below the last accepted cycle's is undone
    # (its LoRA and prompt updates are discarded; a refreshed reward model is kept: logs are facts).
    accept: bool = False
    # With the judge: the run serves the cycle the judge scored best, not the last one (early stop), and
    # stops after `patience` cycles without a judged improvement (0 = run every cycle). With `accept` as
    # well, the models in effect are already the last accepted ones, so the last cycle is what is served.
    keep_best: bool = False
    patience: int = 0
    # Reward ensemble: `ensemble` members rank the creatives (1 = the reward model alone). Members: the given
    # reward model plus members retrained on the same logs with seeds 1 … n−1. Rule "min": the lowest member
    # score; "mean_std": mean − ensemble_k · std over members (population std).
    ensemble: int = 1
    ensemble_rule: str = "min"
    ensemble_k: float = 1.0
    judge_seed: int = 0  # the judge's log sample and training seed (not the run's seed: one judge per world)

    def __post_init__(self) -> None:
        if self.judge_products < 1:
            raise InputError(f"guard.judge_products must be ≥ 1, got {self.judge_products}")
        if (self.accept or self.keep_best or self.patience) and not self.judge:
            raise InputError("guard.accept, guard.keep_best and guard.patience need guard.judge = true")
        if self.patience < 0:
            raise InputError(f"guard.patience must be ≥ 0, got {self.patience}")
        if self.ensemble < 1:
            raise InputError(f"guard.ensemble must be ≥ 1, got {self.ensemble}")
        if self.ensemble_rule not in ENSEMBLE_RULES:
            raise InputError(f"guard.ensemble_rule must be one of {', '.join(ENSEMBLE_RULES)}, got {self.ensemble_rule!r}")
        if self.ensemble_k < 0:
            raise InputError(f"guard.ensemble_k must be ≥ 0, got {self.ensemble_k}")


@dataclass(frozen=True)
class RefreshSection:
    """Fresh logs between cycles: after each cycle the world shows the creatives served on the training products
    (and the original photo beside them, the A/B test's control) and logs impressions and clicks; the reward
    model is then retrained on its logs plus every fresh log so far."""

    enabled: bool = False
    # Mean impressions per logged (creative, group), scaled by the group's size: 1,680 = the base logs'
    # 14 days × 120 (sim.WorldConfig.mean_impressions), so a fresh creative is as well measured as a logged one.
    impressions: float = 1680.0
    served: str = "topk"  # which generated creatives are shown: the top-k per (product, group), or "all"
    epochs: int = 40  # the retraining's passes (the toy reward model's own)

    def __post_init__(self) -> None:
        if not self.impressions > 0:
            raise InputError(f"refresh.impressions must be > 0, got {self.impressions}")
        if self.served not in REFRESH_LOGS:
            raise InputError(f"refresh.served must be one of {', '.join(REFRESH_LOGS)}, got {self.served!r}")
        if self.epochs < 1:
            raise InputError(f"refresh.epochs must be ≥ 1, got {self.epochs}")


STYLE_CHOICE = ("none", "chosen", "random")
STYLE_MODES = ("per_row", "split")


@dataclass(frozen=True)
class StyleSection:
    """Style LoRAs in the loop (docs/cycle/style_loras.md). With `loras` = "chosen" the prompt model gains a
    category `style` ∈ {none, <family>…} and picks a style LoRA per (product, group) with its tokens; a chosen
    family's palette and lighting tokens are dropped from the prompt (`style.free_prompt`), as the LoRAs were
    trained. "random": the family is drawn uniformly per (product, group) instead (the check arm). The style
    LoRAs stay frozen; the cycle's own LoRA cannot run beside them (`run.update_lora` must be false): peft's
    mixed batch applies one adapter per row."""

    loras: str = "none"
    # One sub-folder per style family (`cg4ctr-train style` writes them); "" = trained once per (world, generator)
    # with `StyleLoraConfig(seed=seed)` and cached beside the guard models.
    folder: str = ""
    mode: str = "per_row"  # MixedLoraPipeline: per-row peft adapters on one UNet, or one fused UNet per LoRA
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loras not in STYLE_CHOICE:
            raise InputError(f"style.loras must be one of {', '.join(STYLE_CHOICE)}, got {self.loras!r}")
        if self.mode not in STYLE_MODES:
            raise InputError(f"style.mode must be one of {', '.join(STYLE_MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class CycleConfig:
    run: RunSection = field(default_factory=RunSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    prompt: PromptSection = field(default_factory=PromptSection)
    eval: EvalSection = field(default_factory=EvalSection)
    guard: GuardSection = field(default_factory=GuardSection)
    refresh: RefreshSection = field(default_factory=RefreshSection)
    style: StyleSection = field(default_factory=StyleSection)

    def __post_init__(self) -> None:
        if self.style.loras != "none" and self.run.update_lora:
            raise InputError("style.loras needs run.update_lora = false: the style LoRAs are per-row adapters and "
                             "peft runs one adapter per row, so the cycle's own LoRA cannot run beside them")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **sections: dict[str, Any]) -> "CycleConfig":
        """A copy with some keys changed: `config.replace(run={"seed": 3})`."""
        changed = {name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()}
        return dataclasses.replace(self, **changed)


def changed_keys(before: dict[str, Any], config: CycleConfig) -> list[str]:
    """The "section.key" names where a saved config (`CycleConfig.to_dict()` as JSON) differs from `config`.
    A section the saved config lacks (it was written before the section existed) counts as its defaults."""
    now = config.to_dict()
    defaults = CycleConfig().to_dict()
    return [f"{s}.{k}" for s in now for k in now[s] if before.get(s, defaults[s]).get(k) != now[s][k]]


# The arms of `cg4ctr-train ablate` (cg4ctr_fast.training.ablate runs them); kept beside the config sections they
# change, so [ablation] arms can be checked here without importing the runner.
BASE_ARMS = ("original", "random_prompts", "global_prompt", "lora_only", "prompt_only", "full")
STATIC_ARMS = ("original", "random_prompts", "global_prompt")
# Guard variants of the full loop: config sections changed on top of the run's config (docs/cycle.md, "Guards").
_JUDGE = {"judge": True, "accept": True, "keep_best": True}
_ANCHOR = {"anchor_weight": 1.0, "max_delta": 0.05}
VARIANT_ARMS: dict[str, dict[str, dict[str, Any]]] = {
    "full_refresh": {"refresh": {"enabled": True}},
    "full_judge": {"guard": _JUDGE},
    "full_ensemble": {"guard": {"ensemble": 3, "ensemble_rule": "min"}},
    "full_anchor": {"lora": _ANCHOR},
    # Early stop without undo: the loop runs on, the best-judged cycle is served, 2 cycles without a better one stop it.
    "full_early_stop": {"guard": {"judge": True, "keep_best": True, "patience": 2}},
    "full_guarded": {"refresh": {"enabled": True}, "guard": _JUDGE, "lora": _ANCHOR},
    # One LoRA against K (docs/cycle.md, "Style LoRAs in the loop"): all three with fresh logs, as full_refresh.
    "styles_refresh": {"refresh": {"enabled": True}, "style": {"loras": "chosen"}},
    "styles_random_refresh": {"refresh": {"enabled": True}, "style": {"loras": "random"}},
    "prompt_refresh": {"refresh": {"enabled": True}},
}
ARMS = BASE_ARMS + tuple(VARIANT_ARMS)


@dataclass(frozen=True)
class AblationSection:
    """`cg4ctr-train ablate`'s own settings, the [ablation] table of its config (training/ablation.toml); the
    flags --seeds, --jobs and --arms override them. `cg4ctr-train cycle` refuses a file with this table."""

    seeds: int = 3  # seeds run.seed … run.seed + seeds − 1
    jobs: int = 1  # seeds run at once, in separate processes
    # The arms to run (ARMS names; the static arms always run); None (the key left out) = all.
    arms: typing.Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise InputError(f"ablation.seeds must be ≥ 1, got {self.seeds}")
        if self.jobs < 1:
            raise InputError(f"ablation.jobs must be ≥ 1, got {self.jobs}")
        if self.arms is not None:
            if not self.arms:
                raise InputError("ablation.arms must name at least one arm (leave the key out for all)")
            unknown = sorted(set(self.arms) - set(ARMS))
            if unknown:
                raise InputError(f"ablation.arms: unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")


ABLATION = "ablation"


def load_cycle_config(path: str | os.PathLike) -> CycleConfig:
    """The cycle config in the TOML file at `path`. Raises InputError (one line, naming the file) for a missing
    file, invalid TOML, an unknown section or key, a wrong type, a value out of range, or an [ablation] table:
    that one belongs to `cg4ctr-train ablate`, and a single run silently dropping it would hide which seeds and
    arms the file asks for."""
    file, data = read_toml(path)
    if ABLATION in data:
        raise InputError(f"{file}: [{ABLATION}] is read by `cg4ctr-train ablate` only; a single cycle run takes "
                         "a config without it (training/cycle.toml)")
    return build(CycleConfig, data, file)


def load_ablation_config(path: str | os.PathLike) -> tuple[CycleConfig, AblationSection]:
    """(the cycle config, the [ablation] settings) in the TOML file at `path`; a file without [ablation] gets
    AblationSection() (3 seeds, 1 job, every arm). Errors as `load_cycle_config`."""
    file, data = read_toml(path)
    data = dict(data)
    ablation = data.pop(ABLATION, {})
    return build(CycleConfig, data, file), build(AblationSection, ablation, file, where=ABLATION)


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
