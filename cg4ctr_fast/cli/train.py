"""`cg4ctr-train`: train the project's models from the command line.

    cg4ctr-train reward --data DIR --out MODEL_DIR [--epochs N] [--seed S] [--test-fraction F] [--quiet]
    cg4ctr-train toy --out DIR [--config default|small|FILE] [--cache DIR]
    cg4ctr-train cycle --config FILE --out RUN_DIR [--resume]
    cg4ctr-train ablate --config FILE [--seeds N] [--jobs N] [--arms A,B] --out DIR
    cg4ctr-train taesd --model GENERATOR_DIR --out DIR [--data WORLD_DIR] [--steps N] [--resume]

Subcommands live in `SUBCOMMANDS` (name → Subcommand(help, add_arguments, run)); to add one, write
its two functions and add an entry.  `run(args)` returns the exit code and raises `InputError` for bad
input, which `main` (`cg4ctr_fast.cli.common.run_cli`) prints as one line on stderr with exit code 2.
Every output path is checked before any work: an existing, non-empty `--out` needs `--overwrite`.
Outputs are written to a temporary folder renamed at the end, so a failed run leaves nothing behind;
`cycle` writes one such folder per cycle and resumes from the last one (`--resume`), `ablate` resumes
when rerun on the same folder.
`cg4ctr-train lcm --model GENERATOR_DIR --out DIR [--config FILE]` distils an LCM-LoRA (4 steps, no guidance) from
a generator; it checkpoints beside --out (.NAME.lcm-partial) and continues from there with `--resume`.
The TOML recipes of cycle, ablate, toy and lcm live in the repository's top-level training/ folder; a flag the user
passes overrides the file's key (those flags default to None, so an unpassed one never does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

from cg4ctr_fast.cli.common import (
    add_overwrite,
    add_subcommand,
    add_subcommands,
    make_parser,
    run_cli,
)
from cg4ctr_fast.fileio import check_out_dir, check_run_dir
from cg4ctr_fast.errors import InputError

PROG = "cg4ctr-train"


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------
# reward
# --------------------------------------------------------------------------------------------

def _reward_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="logs folder: sim world, CreativeRanking list + images/, or CG4CTR JSON + images/")
    p.add_argument("--out", required=True, help="model folder to write (model.safetensors, config.json, vocab.json, metrics.json)")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training items (default 40)")
    p.add_argument("--seed", type=int, default=0, help="item split, batch order, initial weights (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of ITEMS held out for the metrics (default 0.2)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of the remaining items kept to fit the calibration (default 0.15)")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this square side (default 64)")
    p.add_argument("--batch-items", type=int, default=4, help="items per step, all their groups (default 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads while training (default 1: the ops are small, and extra threads slow down badly on a busy machine)")
    p.add_argument("--layout", choices=("sim", "creative_ranking", "cg4ctr_json"), default=None,
                   help="data layout (default: detected)")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary line")


def _run_reward(args: argparse.Namespace) -> int:
    from cg4ctr_fast.training.data import load_ad_log
    from cg4ctr_fast.training.reward import RewardTrainConfig, save_reward_run, train_reward

    config = RewardTrainConfig(
        epochs=args.epochs, seed=args.seed, test_fraction=args.test_fraction, val_fraction=args.val_fraction,
        image_size=args.image_size, batch_items=args.batch_items, lr=args.lr, threads=args.threads,
    )
    out = check_out_dir(args.out, overwrite=args.overwrite)
    if not Path(args.data).is_dir():
        raise InputError(f"--data {args.data}: folder not found")
    log = load_ad_log(args.data, layout=args.layout)
    result = train_reward(log, config, progress=not args.quiet)
    save_reward_run(result, out)
    if not args.quiet:
        test = result.metrics["test"]

        def fmt(key: str) -> str:
            value = test.get(key)
            return "n/a" if value is None else f"{value:.3f}"

        print(
            f"wrote {out}: held-out items {result.metrics['counts']['test_items']}, AUC {fmt('auc')}, NE {fmt('ne')}, "
            f"pairwise {fmt('pairwise_accuracy')}, uplift@1 {fmt('uplift_at_1')} "
            f"({result.metrics['seconds']:.0f} s)",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# saliency, base (toy generator), prompt: trained on a synthetic-world folder (`cg4ctr-sim logs`)
# --------------------------------------------------------------------------------------------


def _world_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a synthetic-world folder written by `cg4ctr-sim logs`")
    p.add_argument("--out", required=True, help="output folder")
    add_overwrite(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")


def _load_world_data(args):
    from cg4ctr_fast.sim import load_dataset

    check_out_dir(args.out, overwrite=args.overwrite)
    if not (Path(args.data) / "world.json").is_file():
        raise InputError(f"{args.data}: not a synthetic-world folder (no world.json); write one with `cg4ctr-sim logs`")
    try:
        return load_dataset(args.data)
    except InputError:
        raise
    except (OSError, ValueError) as exc:  # a damaged parquet file: pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{args.data}: cannot read the dataset: {type(exc).__name__}: {exc}") from None


def _say(args: argparse.Namespace, text: str) -> None:
    """A summary line on stderr; --quiet silences it (one rule for every subcommand, as in the README)."""
    if not args.quiet:
        print(text, file=sys.stderr)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value}")


def _saliency_arguments(p: argparse.ArgumentParser) -> None:
    _world_arguments(p)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images", type=int, default=600, help="training creatives drawn from the world")
    p.add_argument("--size", type=int, default=64, help="training (and inference) image size")


def _run_saliency(args: argparse.Namespace) -> int:
    from cg4ctr_fast.training.saliency import SaliencyTrainConfig, save_trained_saliency, train_saliency
    from cg4ctr_fast.training.toy import saliency_dataset

    for name, value in (("--steps", args.steps), ("--images", args.images), ("--size", args.size)):
        _positive(name, value)
    dataset = _load_world_data(args)
    items = sorted(int(i) for i in dataset.items["item_id"])
    images, masks = saliency_dataset(dataset.world, args.images, items, args.seed)
    model, metrics = train_saliency(images, masks, SaliencyTrainConfig(seed=args.seed, size=args.size, steps=args.steps),
                                    progress=not args.quiet)
    save_trained_saliency(model, metrics, args.out)
    _say(args, f"saliency: held-out IoU {metrics['test_iou']:.3f}, MAE {metrics['test_mae']:.3f} → {args.out}")
    return 0


def _base_arguments(p: argparse.ArgumentParser) -> None:
    _world_arguments(p)
    p.add_argument("--images", type=int, default=3072, help="training creatives drawn from the world")
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--unet-steps", type=int, default=2400)
    p.add_argument("--steering", action="store_true", help="also measure how prompts steer the result")


def _run_base(args: argparse.Namespace) -> int:
    import json

    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.training.base import BaseTrainConfig, train_generator
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, generator_dataset, steering_effect

    for name, value in (("--images", args.images), ("--vae-steps", args.vae_steps), ("--unet-steps", args.unet_steps)):
        _positive(name, value)
    dataset = _load_world_data(args)
    items = sorted(int(i) for i in dataset.items["item_id"])
    cfg = BaseTrainConfig(seed=args.seed, n_images=args.images, vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    data = generator_dataset(dataset.world, cfg.n_images, items, args.seed)
    # One atomic folder for the weights and steering.json: train_generator replaces the empty `tmp`.
    with atomic_dir(args.out) as tmp:
        train_generator(data, tmp, cfg, progress=not args.quiet, log=lambda m: _say(args, m))
        if args.steering:
            from cg4ctr_fast.pipeline import CreativePipeline

            pipe = CreativePipeline.from_pretrained(str(tmp))
            effect = steering_effect(pipe, dataset.world, [HELD_OUT_ITEM_BASE + k for k in range(4)], seed=args.seed)
            (tmp / "steering.json").write_text(json.dumps(effect, indent=2) + "\n")
            for name, row in effect.items():
                _say(args, f"steering {name}: {row['feature']} Cohen's d {row['cohens_d']:+.2f}")
    return 0


# --------------------------------------------------------------------------------------------
# lcm: an LCM-LoRA distilled from a generator (training.lcm), for few-step sampling without guidance
# --------------------------------------------------------------------------------------------


# The flags that override a key of the --config file (LcmDistillConfig's fields): (field, type, help without the
# default). Their argparse default is None, so a flag the user did not pass leaves the file's value alone.
_LCM_FLAGS = (
    ("steps", int, "optimizer steps"),
    ("batch", int, "examples per step"),
    ("lr", float, "peak learning rate, cosine decay"),
    ("rank", int, "LoRA rank; sets alpha = rank too"),
    ("w_min", float, "smallest teacher guidance scale, the pipeline's guidance_scale"),
    ("w_max", float, "largest teacher guidance scale"),
    ("num_ddim_timesteps", int, "DDIM solver grid over the 1000 training timesteps; skip = 1000 / N"),
    ("images", int, "training creatives, encoded once"),
    ("seed", int, "images, batch draws"),
    ("checkpoint_every", int, "steps between checkpoints"),
)


def _flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _lcm_arguments(p: argparse.ArgumentParser) -> None:
    from cg4ctr_fast.training.lcm import LcmDistillConfig

    d = LcmDistillConfig()
    p.add_argument("--config", default=None, help="TOML file of LcmDistillConfig's keys (training/lcm.toml); the "
                   "flags below override its keys (default: none, LcmDistillConfig's defaults)")
    p.add_argument("--model", required=True, help="generator folder (diffusers layout, 9-channel inpainting UNet; "
                   "the toy set's generator/): the frozen teacher, and the UNet the LoRA adapts")
    p.add_argument("--out", required=True, help="LoRA folder to write (pytorch_lora_weights.safetensors, "
                   "lcm_config.json, metrics.json)")
    p.add_argument("--data", default=None, help="synthetic-world folder whose products and captions make the "
                   "inpainting examples (default: world/ beside --model, as in a toy set)")
    for field, kind, text in _LCM_FLAGS:
        p.add_argument(_flag_name(field), type=kind, default=None,
                       help=f"{text} (default {getattr(d, field)}, or the --config file's)")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of the LoRA weights (default float32; loading casts to the UNet's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out (.NAME.lcm-partial)")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary line")


def _lcm_config(args: argparse.Namespace):
    """The LcmDistillConfig of a `cg4ctr-train lcm` command line: the --config file's (else the defaults), with
    the flags the user passed on top; --rank sets alpha = rank, as without a file. Raises InputError (one line)."""
    import dataclasses

    from cg4ctr_fast.training.lcm import LcmDistillConfig, load_lcm_config

    base = load_lcm_config(args.config) if args.config is not None else LcmDistillConfig()
    given = {field: getattr(args, field) for field, _kind, _text in _LCM_FLAGS if getattr(args, field) is not None}
    if "rank" in given:
        given["alpha"] = float(given["rank"])
    return dataclasses.replace(base, **given)


def _run_lcm(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from cg4ctr_fast.models.diffusion import load_modules
    from cg4ctr_fast.training.lcm import distill_lcm_lora, half_lora_file, world_creatives

    _positive("--threads", args.threads)
    out = check_out_dir(args.out, overwrite=args.overwrite)
    config = _lcm_config(args)
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: folder not found")
    world = Path(args.data) if args.data else Path(args.model).parent / "world"
    if not (world / "world.json").is_file():
        flag = "--data" if args.data else f"--model {args.model}: no world/ beside it;"
        raise InputError(f"{flag} {world}: not a synthetic-world folder (no world.json); name one with --data")
    torch.set_num_threads(args.threads)
    modules = load_modules(args.model)
    creatives = world_creatives(world, config.images, config.seed)
    # The command as given: the file and the flags that were passed (lcm_config.json records the full config).
    argv = ["cg4ctr-train", "lcm"]
    if args.config is not None:
        argv += ["--config", args.config]
    argv += ["--model", args.model, "--out", args.out]
    if args.data:
        argv += ["--data", args.data]
    for field, _kind, _text in _LCM_FLAGS:
        if getattr(args, field) is not None:
            argv += [_flag_name(field), str(getattr(args, field))]
    if args.save_dtype != "float32":
        argv += ["--save-dtype", args.save_dtype]
    command = shlex.join(argv)
    metrics = distill_lcm_lora(modules, creatives, out, config, resume=args.resume, progress=not args.quiet,
                               command=command, extra={"teacher": str(args.model), "world": str(world),
                                                       "save_dtype": args.save_dtype},
                               log=lambda m: _say(args, m))
    if args.save_dtype == "float16":
        half_lora_file(out)
    _say(args, f"LCM-LoRA: pseudo-Huber loss {metrics['loss_first']:.5f} -> {metrics['loss_last']:.5f} over "
               f"{metrics['steps']} steps ({metrics['seconds']:.0f} s) -> {out}")
    return 0


def _prompt_arguments(p: argparse.ArgumentParser) -> None:
    _world_arguments(p)
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--top-k", type=int, default=2, help="creatives per (item, group) taken as positives")


def _run_prompt(args: argparse.Namespace) -> int:
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.training.toy import ToyConfig, train_prompt_on_dataset

    _positive("--epochs", args.epochs)
    _positive("--top-k", args.top_k)
    dataset = _load_world_data(args)
    with atomic_dir(args.out) as tmp:  # the model and its metrics.json appear together or not at all
        metrics = train_prompt_on_dataset(dataset, tmp,
                                          ToyConfig(seed=args.seed, prompt_epochs=args.epochs, prompt_top_k=args.top_k))
    _say(args, f"prompt model: oracle-token agreement {metrics['oracle_token_agreement_mean']:.2f}, proposal CTR / "
               f"best caption CTR {metrics['proposal_ctr_over_best_caption_ctr']:.2f} → {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# toy: every model of the embedded default, written as a shipped set (folder + manifest.json)
# --------------------------------------------------------------------------------------------


def _toy_arguments(p: argparse.ArgumentParser) -> None:
    from cg4ctr_fast.training.toy import TOY_CONFIGS

    p.add_argument("--out", required=True, help="set folder to write (the package ships cg4ctr_fast/assets/toy)")
    p.add_argument("--config", default="default",
                   help=f"ToyConfig: a preset ({', '.join(sorted(TOY_CONFIGS))}: default is the shipped set, ~50 min "
                        "on 2 CPU cores when nothing is cached; small takes seconds, for tests) or a TOML file "
                        "(training/toy.toml, training/toy-small.toml: the presets as recipes)")
    p.add_argument("--cache", default=None, help="where the models are trained (and reused when already trained "
                   "with this config) before the set is written (default: the cache folder, CG4CTR_CACHE or "
                   "~/.cache/cg4ctr_fast)")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")


def _run_toy(args: argparse.Namespace) -> int:
    from cg4ctr_fast.training.toy import build_toy_models, resolve_toy_config
    from cg4ctr_fast.training.toy_set import export_toy_set

    out = check_out_dir(args.out, overwrite=args.overwrite)
    config = resolve_toy_config(args.config)
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    models = build_toy_models(config, cache=Path(args.cache) if args.cache else None, progress=not args.quiet, log=say)
    # As given: a preset name or the file's path (manifest.json records the ToyConfig itself beside it).
    command = f"cg4ctr-train toy --out {args.out} --config {args.config}"
    export_toy_set(models.root, out, config, command=command, log=say)
    return 0


# --------------------------------------------------------------------------------------------
# cycle, ablate: self-cyclic training of the LoRA and the prompt model (cg4ctr_fast.training.cycle)
# --------------------------------------------------------------------------------------------


def _cycle_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML file: [run] [models] [generate] [lora] [prompt] [eval] "
                   "[guard] [refresh] [style] (training/cycle.toml; a file with [ablation] is for `ablate`)")
    p.add_argument("--out", required=True, help="run folder: config, one atomic checkpoint per cycle, metrics.json/png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished cycle")
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-cycle or summary lines")


def _run_cycle(args: argparse.Namespace) -> int:
    from cg4ctr_fast.training.cycle import main_log, run_cycles
    from cg4ctr_fast.training.cycle_config import load_cycle_config

    check_run_dir(args.out)
    config = load_cycle_config(args.config)
    history = run_cycles(config, Path(args.out), resume=args.resume, progress=not args.quiet, log=main_log(args.quiet))
    last = history[-1]["eval"]
    best = ""
    if config.guard.keep_best:
        best = f"; serve cycle {history[-1]['best_cycle']}, the judge's best ({args.out}/cycles/cycle_{history[-1]['best_cycle']:03d})"
    _say(args, f"cycle {history[-1]['cycle']}: held-out aggregate CTR lift {last['aggregate_lift']:+.1%} (cycle 0: "
               f"{history[0]['eval']['aggregate_lift']:+.1%}; mean of ratios {last['lift_mean_of_ratios']:+.1%}){best} → "
               f"{args.out}")
    return 0


def _ablate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML file as for `cycle`, plus an optional [ablation] table "
                   "of seeds, jobs and arms that the flags below override (training/ablation.toml); [run] "
                   "update_* are set per arm")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds run.seed … run.seed+N−1 (default: the file's ablation.seeds, else 3)")
    p.add_argument("--out", required=True, help="folder: one run per seed and arm, results.json, results.md, lift_per_cycle.png (and style_share.png with style arms); rerun to resume")
    p.add_argument("--jobs", type=int, default=None,
                   help="seeds run at once, in separate processes (default: the file's ablation.jobs, else 1)")
    p.add_argument("--arms", default=None, help="comma-separated arms to run (default: the file's ablation.arms, "
                   "else all; the original, random-prompt and global-prompt arms always run), e.g. "
                   "full,full_refresh,full_judge")
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-cycle or summary lines")


def _run_ablate(args: argparse.Namespace) -> int:
    from cg4ctr_fast.training.ablate import ARMS, STATIC_ARMS, run_ablation
    from cg4ctr_fast.training.cycle import main_log
    from cg4ctr_fast.training.cycle_config import load_ablation_config

    check_run_dir(args.out)
    config, ablation = load_ablation_config(args.config)
    # A flag the user passed wins over the file's [ablation] key (the flags default to None for that reason).
    seeds = ablation.seeds if args.seeds is None else args.seeds
    jobs = ablation.jobs if args.jobs is None else args.jobs
    arms = None if ablation.arms is None else list(ablation.arms)
    if args.arms is not None:
        arms = list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))  # in order, once each
        if not arms:
            raise InputError("--arms names no arm (leave it out for the file's arms, or all)")
    # The command with the values in effect, so results.md says what ran even if the file changes later.
    command = f"cg4ctr-train ablate --config {args.config} --seeds {seeds} --out {args.out}"
    if jobs > 1:
        command += f" --jobs {jobs}"
    if arms is not None and set(arms) | set(STATIC_ARMS) != set(ARMS):
        command += f" --arms {','.join(arms)}"
    results = run_ablation(config, seeds, Path(args.out), progress=not args.quiet, log=main_log(args.quiet),
                           jobs=jobs, command=command, arms=arms)
    for key, label in (("full_last_over_cycle0", "full loop, last cycle over cycle 0"),
                       ("full_over_global_prompt", "full over global prompt")):
        if key in results["comparisons"]:
            c = results["comparisons"][key]
            _say(args, f"aggregate CTR, {label}: {c['lift']:+.1%} [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}]")
    _say(args, f"→ {args.out}/results.md")
    return 0


# --------------------------------------------------------------------------------------------
# style: K style LoRAs from designers' seed sets (cg4ctr_fast.training.style)
# --------------------------------------------------------------------------------------------


def _style_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder: loras/<family>/ (diffusers LoRA files), style_loras.json, "
                   "style_samples.png, style_steering.png; LoRAs already there are reused when trained with the "
                   "same settings; a cycle config's [style] folder = OUT/loras")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per style LoRA (default 1000)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--eval-products", type=int, default=6, help="held-out products of the steering measure (default 6)")
    p.add_argument("--retrain", action="store_true", help="train every LoRA again even when --out holds one trained with the same settings")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _run_style(args: argparse.Namespace) -> int:
    import torch

    from cg4ctr_fast.training.lora import LoraTrainConfig
    from cg4ctr_fast.training.style import StyleLoraConfig, run_style_experiment

    check_run_dir(args.out)
    if args.eval_products < 1 or args.threads < 1:
        raise InputError("--eval-products and --threads must be ≥ 1")
    torch.set_num_threads(args.threads)
    config = StyleLoraConfig(lora=LoraTrainConfig(steps=args.steps, lr=args.lr))
    run_style_experiment(args.out, eval_products=args.eval_products, config=config, retrain=args.retrain,
                         log=(lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)))
    _say(args, f"style LoRAs → {args.out}/loras; steering report → {args.out}/style_loras.json")
    return 0


# --------------------------------------------------------------------------------------------
# taesd: a tiny preview decoder (AutoencoderTiny) distilled from a generator's VAE
# --------------------------------------------------------------------------------------------


def _taesd_arguments(p: argparse.ArgumentParser) -> None:
    from cg4ctr_fast.training.taesd import TaesdTrainConfig

    d = TaesdTrainConfig()
    p.add_argument("--model", required=True, help="generator folder with vae/ (the toy set's generator/), or a VAE folder")
    p.add_argument("--out", required=True, help="AutoencoderTiny folder to write (config.json, "
                   "diffusion_pytorch_model.safetensors, metrics.json)")
    p.add_argument("--data", default=None, help="synthetic-world folder whose creatives are the training images "
                   "(default: world/ beside --model, as in a toy set)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"latents per step (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate, cosine decay (default {d.lr})")
    p.add_argument("--images", type=int, default=d.images, help=f"training creatives, encoded once (default {d.images})")
    p.add_argument("--generated", type=int, default=d.generated,
                   help="further training latents made by the generator's own denoising loop (default 0; needs "
                        "--model to be a generator folder)")
    p.add_argument("--seed", type=int, default=d.seed, help="images, initial weights, batch order (default 0)")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default=d.save_dtype,
                   help="storage dtype of the weights (default float32; loading casts to the pipeline's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while training (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out (.NAME.checkpoint)")
    add_overwrite(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary line")


def _run_taesd(args: argparse.Namespace) -> int:
    import torch

    from cg4ctr_fast.training.taesd import TaesdTrainConfig, default_world, train_taesd

    for name, value in (("--steps", args.steps), ("--batch", args.batch), ("--images", args.images),
                        ("--threads", args.threads)):
        _positive(name, value)
    out = check_out_dir(args.out, overwrite=args.overwrite)
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: folder not found")
    world = args.data or default_world(args.model)
    if world is None:
        raise InputError(f"--model {args.model}: no world/ beside it; name a synthetic-world folder with --data")
    if not (Path(world) / "world.json").is_file():
        raise InputError(f"--data {world}: not a synthetic-world folder (no world.json); write one with `cg4ctr-sim logs`")
    torch.set_num_threads(args.threads)
    if args.generated < 0:
        raise InputError(f"--generated must be 0 or a positive integer, got {args.generated}")
    config = TaesdTrainConfig(seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr, images=args.images,
                              generated=args.generated, save_dtype=args.save_dtype)
    metrics = train_taesd(args.model, world, out, config, resume=args.resume, progress=not args.quiet,
                          log=lambda m: _say(args, m))
    _say(args, f"TAESD decoder: L1 {metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}; held-out preview vs "
               f"full decode L1 {metrics['preview_vs_full_l1']:.4f} ({metrics['seconds']:.0f} s) -> {out}")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "reward": Subcommand("train the multimodal CTR reward model on click logs", _reward_arguments, _run_reward),
    "saliency": Subcommand("train the U2NetP saliency net on a synthetic world", _saliency_arguments, _run_saliency),
    "base": Subcommand("train the toy generator (VAE, UNet, text encoder) on a synthetic world",
                       _base_arguments, _run_base),
    "lcm": Subcommand("distil an LCM-LoRA from a generator: 4 steps without guidance instead of 20 guided",
                      _lcm_arguments, _run_lcm),
    "prompt": Subcommand("train the prompt model on a synthetic world's logs", _prompt_arguments, _run_prompt),
    "toy": Subcommand("train every toy model of the embedded default and write them as a set with manifest.json",
                      _toy_arguments, _run_toy),
    "cycle": Subcommand("self-cyclic training: LoRA and prompt model alternate on reward-ranked creatives",
                        _cycle_arguments, _run_cycle),
    "ablate": Subcommand("the self-cyclic ablation arms over several seeds, with confidence intervals",
                         _ablate_arguments, _run_ablate),
    "style": Subcommand("train K style LoRAs from the world's style families and measure how each steers",
                        _style_arguments, _run_style),
    "taesd": Subcommand("distil a tiny preview decoder (AutoencoderTiny) from a generator's VAE",
                        _taesd_arguments, _run_taesd),
}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Train cg4ctr_fast models.")
    sub = add_subcommands(parser)
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(add_subcommand(sub, name, command.help))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(PROG, build_parser(), lambda args: SUBCOMMANDS[args.command].run(args), argv)


if __name__ == "__main__":
    sys.exit(main())
