"""What a server or a job runs: the generator, the reward model, the user groups and the prompt model, and the API
key, checked from configs and files only (no weights load), in one line each (InputError) before any work starts.

`cg4ctr serve`, `cg4ctr nearline` and the Ray Serve application (`serving.ray_app`) read the same flags or
arguments through these checks. `args`: any object with the flags' attributes (an argparse Namespace, or a
SimpleNamespace built from an application's arguments).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cg4ctr_fast.errors import InputError

__all__ = ["REWARD_FILES", "toy_paths", "read_api_key", "check_source", "check_reward"]

REWARD_FILES = ("model.safetensors", "config.json", "vocab.json")


def toy_paths():
    from cg4ctr_fast.training.toy import ToyConfig
    from cg4ctr_fast.training.toy_set import resolve_toy_root

    root = resolve_toy_root(ToyConfig())  # the shipped set (hashes checked), else the cache
    return root, root / "reward", root / "world" / "groups.json", root / "prompt"


def read_api_key(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    file = Path(path)
    if file.is_dir():
        raise InputError(f"--api-key-file {path}: is a directory, expected the file holding the key")
    if not file.is_file():
        raise InputError(f"--api-key-file {path}: no such file")
    try:
        key = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--api-key-file {path}: cannot read it ({' '.join(str(exc).split())})") from None
    if not key:
        raise InputError(f"--api-key-file {path}: empty (write the key in it)")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise InputError(f"--api-key-file {path}: the key must be one line of printable characters, no spaces")
    return key


def check_source(args) -> dict:
    """Which generator, checked from configs only (no weights); returns the constructor's arguments."""
    from cg4ctr_fast.config import PRESETS, get_preset
    from cg4ctr_fast.models.diffusion import check_steps, folder_scheduler, inspect_model_folder, make_scheduler

    given = [flag for flag, value in (("--preset", args.preset), ("--model", args.model),
                                      ("--engines", args.engines)) if value is not None]
    if len(given) != 1:
        raise InputError("give one of --preset NAME, --model DIR or --engines DIR"
                         + (f" (got {', '.join(given)})" if given else ""))
    if args.backend is not None and not args.engines:
        raise InputError("--backend needs --engines DIR (a folder written by cg4ctr-export)")
    if args.saliency is not None and not Path(args.saliency).exists():
        raise InputError(f"--saliency {args.saliency}: no such file or folder")
    if args.engines:
        if not (Path(args.engines) / "manifest.json").is_file():
            raise InputError(f"--engines {args.engines}: not a cg4ctr-export folder (no manifest.json)")
        return {"kind": "engines", "path": args.engines, "backend": args.backend or "onnxruntime",
                "saliency": args.saliency}
    if args.model or args.preset == "toy":
        path = args.model
        saliency = args.saliency
        if args.preset == "toy":
            root = toy_paths()[0]
            path = str(root / "generator")
            if not (Path(path) / "model_index.json").is_file():
                raise InputError(f"--preset toy: no toy models in {root} (the package's set is missing or "
                                 "CG4CTR_TOY_SET points elsewhere); `cg4ctr demo --retrain` trains them into the "
                                 "cache, or pass --model DIR")
            if saliency is None and (root / "saliency").is_dir():
                saliency = str(root / "saliency")
        folder = inspect_model_folder(path)
        if args.steps is not None:
            check_steps(folder_scheduler(folder), args.steps, flag="--steps")
        return {"kind": "model", "path": path, "saliency": saliency}
    if args.preset not in PRESETS:
        raise InputError(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted([*PRESETS, 'toy']))}")
    preset = get_preset(args.preset)
    if not preset.buildable:
        raise InputError(f"preset {preset.name!r} has no built-in weights; pass --model DIR (a local diffusers "
                         "folder) instead")
    if args.steps is not None:
        check_steps(make_scheduler(preset.scheduler, preset.scheduler_kwargs()), args.steps, flag="--steps")
    return {"kind": "preset", "name": preset.name, "saliency": args.saliency}


def check_reward(args) -> tuple[str, Optional[str], Optional[str]]:
    """(reward folder, groups file or None, prompt model folder or None), defaulting to the cached toy models."""
    import json

    from cg4ctr_fast.training.data import _load_groups_json

    root, toy_reward, toy_groups, toy_prompt = toy_paths()
    reward, groups, prompt = args.reward, args.groups, args.prompt_model
    toy_default = reward is None
    if reward is None:
        if not all((toy_reward / name).is_file() for name in REWARD_FILES):
            raise InputError(f"no reward model: pass --reward DIR (a `cg4ctr-train reward` folder) and --groups FILE "
                             f"(no toy models in {root}; `cg4ctr demo --retrain` trains them into the cache)")
        reward = str(toy_reward)
    if groups is None and (toy_default or args.preset == "toy") and toy_groups.is_file():
        groups = str(toy_groups)
    if prompt is None and toy_default and groups == str(toy_groups) and (toy_prompt / "config.json").is_file():
        prompt = str(toy_prompt)
    folder = Path(reward)
    if not folder.is_dir():
        raise InputError(f"--reward {reward}: no such folder")
    missing = [name for name in REWARD_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"--reward {reward}: not a reward model folder ({missing[0]} is missing)")
    try:
        group_dim = int(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("group_dim", 1))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"--reward {reward}: config.json: cannot read it ({' '.join(str(exc).split())})") from None
    if groups is not None:
        if Path(groups).is_dir():
            raise InputError(f"--groups {groups}: is a directory, expected a groups.json file")
        if not Path(groups).is_file():
            raise InputError(f"--groups {groups}: no such file")
        _, features = _load_groups_json(Path(groups))
        if features.shape[1] != group_dim:
            raise InputError(f"--groups {groups}: groups have {features.shape[1]} features each, the reward model "
                             f"expects {group_dim}")
    if prompt is not None and not (Path(prompt) / "config.json").is_file():
        raise InputError(f"--prompt-model {prompt}: not a prompt model folder (no config.json)")
    return reward, groups, prompt
