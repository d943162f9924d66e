"""`cg4ctr`: generate ad creatives from the command line.

    cg4ctr generate --preset toy --image product.png --prompt "warm beach" --prompt "cool studio" --out out/

Every input is checked before any model loads. Bad input gets one line on stderr and exit code 2; an
internal error one line and exit code 1 naming the file that holds the traceback (`--debug` prints it);
nothing is left behind (the output folder is written to a temporary folder and renamed at the end).
The shared rules live in `cg4ctr_fast.cli.common`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from cg4ctr_fast.cli.common import (
    EXIT_BAD_INPUT,
    OneLineParser,
    add_overwrite,
    add_subcommand,
    add_subcommands,
    make_parser,
    quiet_libraries,
    run_cli,
)
from cg4ctr_fast.fileio import check_out_dir
from cg4ctr_fast.errors import InputError, check_utf8

PROG = "cg4ctr"
# Kept for the commands that still import them from here.
_quiet_libraries = quiet_libraries
__all__ = ["EXIT_BAD_INPUT", "OneLineParser", "build_parser", "main"]
# All creatives of one command share one denoising batch (2× with guidance): `--images-per-prompt 100000`
# was killed for memory even on the tiny preset. The demo makes 8 groups × 4 images = 32 per product.
MAX_CREATIVES = 64
# Guidance scales past ~20 already saturate SD images; at 1e308 the guided noise overflows float32 into NaN.
MAX_GUIDANCE = 100.0


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Generate CTR-oriented ad creatives.")
    sub = add_subcommands(parser)

    gen = add_subcommand(
        sub, "generate", "repaint a product image's background, one prompt per user group",
        description="Repaint a product image's background, one prompt per user group. The model runs at a working "
                    "size: by default the input is resized, aspect ratio kept, so its longer side equals the model's "
                    "resolution (64 px for tiny/toy, 512 for sd15-inpaint), each side rounded to a multiple of 8; "
                    "--height/--width set it instead. The creatives are written at the input's own size either way "
                    "(the product pixels pasted back), and creatives.json records the working size.")
    gen.add_argument("--preset", default="tiny",
                     help="toy: the demo's trained generator (run `cg4ctr demo` once); tiny: random weights, for "
                          "latency work (its images are noise); sd15-inpaint: needs --model or --random-weights")
    gen.add_argument("--model", help="local diffusers folder with the weights (unet/, vae/, text_encoder/, ...)")
    gen.add_argument("--random-weights", action="store_true", help="build the preset with random weights")
    gen.add_argument("--saliency", help="U2NetP weights (.pth or .safetensors) to find the product")
    gen.add_argument("--image", required=True, help="product image")
    gen.add_argument("--mask", help="mask image: white = background to repaint, black = product to keep")
    gen.add_argument("--prompt", action="append", required=True, help="one per user group; repeat the flag")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", required=True, help="output folder")
    add_overwrite(gen)
    gen.add_argument("--steps", type=int, default=None,
                     help="denoising steps, at most what the scheduler supports (default: the preset's)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                     "(default: the preset's)")
    gen.add_argument("--strength", type=float, default=1.0, help="how much of the background to redraw, (0, 1]")
    gen.add_argument("--eta", type=float, default=0.0,
                     help="stochasticity in [0, 1]: DDIM's eta, TCD's gamma (diffusers' eta); other schedulers "
                          "ignore it")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--scheduler", default=None, help="ddim | euler | dpm++ | ... (default: the model's)")
    gen.add_argument("--unet-channels", type=int, choices=(4, 9), default=None, help="UNet input channels, built-in presets only (default: the preset's, 9 = inpainting)")
    gen.add_argument("--seed", type=int, default=0, help="mixed into every creative's hashlib-derived seed")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--lora", action="append", default=None,
                     help="LoRA to fuse first: diffusers/kohya .safetensors, a peft folder, or a `cg4ctr-train "
                          "cycle` checkpoint's lora/ folder; repeat the flag to fuse several (diffusers' set_adapters "
                          "+ fuse_lora)")
    gen.add_argument("--lora-scale", type=float, action="append", default=None,
                     help="weight of each fused LoRA, finite, paired with --lora by position; one --lora-scale "
                          "with several --lora applies to all (default: 1.0)")
    gen.add_argument("--guidance-cutoff", type=float, default=None,
                     help="in (0, 1]: classifier-free guidance runs for the first ceil(cutoff x steps) steps, then "
                          "the UNet batch halves (default: 1.0, guidance on every step)")
    gen.add_argument("--cache-interval", type=int, default=None,
                     help="DeepCache-style feature reuse: the full UNet runs every N-th step, the other steps only "
                          "its shallow blocks (torch backend only; default: 1, every step full)")
    gen.add_argument("--preview-top-k", type=int, default=None,
                     help="rank every candidate by the reward model on a tiny decoder's preview and fully decode "
                          "only the best K per group (needs a preview decoder and --reward; default: off)")
    gen.add_argument("--deadline-ms", type=float, default=None,
                     help="latency budget of the generation in ms: the planner picks the plan (scheduler, steps, "
                          "guidance cut-off, cache interval, candidates, preview ranking) with the best measured "
                          "quality whose predicted p99 meets it, prints it and why, runs it and reports the "
                          "measured time. A deadline no plan meets exits 2 naming the fastest feasible time, "
                          "with nothing run. Model loading and one untimed warm-up call with the plan's shapes "
                          "are not counted")
    gen.add_argument("--cost-table", metavar="FILE",
                     help="cost table for --deadline-ms (written by `cg4ctr-bench --calibrate`; default: the one "
                          "cached for this model, device, backend and thread count, calibrated now when none is)")
    gen.add_argument("--quality-table", metavar="FILE",
                     help="quality table for --deadline-ms (default: the shipped toy set's, for --preset toy, once "
                          "measured; without one the planner ranks plans by UNet work and says so)")
    gen.add_argument("--engines", help="run a cg4ctr-export folder (ONNX or TensorRT engines) instead of torch")
    gen.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default=None,
                     help="backend for --engines (default: onnxruntime)")
    gen.add_argument("--height", type=int, default=None,
                     help="pixel height the model runs at: a multiple of 8 (and of the VAE's scale factor), at most "
                          "4096, within an engine folder's exported range (default: from the input's aspect ratio and "
                          "--width, else the longer side = the model's resolution)")
    gen.add_argument("--width", type=int, default=None, help="pixel width the model runs at; as --height")
    gen.add_argument("--reward", metavar="DIR",
                     help="reward model folder (written by `cg4ctr-train reward` / RewardModel.save): creatives.json "
                          "gets each creative's and the original image's calibrated CTR (default: the --engines "
                          "folder's reward engines when it was exported with --reward, else none)")
    gen.add_argument("--title", default="",
                     help="the product's title, as the reward model scores it (default: none)")
    gen.add_argument("--captions", choices=("none", "prompts"), default="none",
                     help="the caption the reward model scores with each creative: none, or its prompt (as the demo "
                          "does for models trained on the synthetic world, whose captions are style words); the "
                          "original image is always scored without one")
    gen.add_argument("--groups", metavar="FILE",
                     help="user groups for the reward model: a groups.json as `cg4ctr-sim` writes it ([{group_id, "
                          "features}, ...]); prompt g is scored for the g-th group in the file, or for the --group "
                          "ids (default: one neutral feature row for every prompt)")
    gen.add_argument("--group", action="append", metavar="ID",
                     help="group_id from --groups for each prompt, in prompt order; repeat the flag once per --prompt")

    demo = add_subcommand(sub, "demo", "run the whole system on held-out products with the shipped toy models (seed 0; "
                                        "another seed trains its own set first, ~50 min)")
    demo.add_argument("--out", default="out/demo", help="output folder")
    add_overwrite(demo)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0,
                      help="the toy world's and models' seed: 0 uses the shipped set; any other trains a set into the "
                           "cache first (~50 min on 2 cores), reused after")
    demo.add_argument("--products", type=int, default=4, help="held-out products")
    demo.add_argument("--images-per-group", type=int, default=4)
    demo.add_argument("--quiet", action="store_true", help="no progress bars or summary line")
    demo.add_argument("--retrain", action="store_true",
                      help="train the toy models into the cache (CG4CTR_CACHE or ~/.cache/cg4ctr_fast; reused once "
                           "there) instead of using the set shipped with the package; ~50 min on 2 CPU cores")

    from cg4ctr_fast.cli import store as store_cli

    store_cli.add_arguments(add_subcommand(sub, "store", "inspect, verify, export or clean a creative store"))
    _add_serve(sub)
    from cg4ctr_fast.cli import nearline as nearline_cli  # imports no ray: Ray loads in `run`

    nearline_cli.add_arguments(add_subcommand(sub, "nearline", "generate creatives for many products on Ray Data"))
    return parser


def _add_serve(sub) -> None:
    # cli/serve.py imports no server library at import: FastAPI and uvicorn (the `serve` extra) load in `run`.
    from cg4ctr_fast.cli import serve as serve_cli

    serve_cli.add_arguments(add_subcommand(sub, "serve", "serve creatives over HTTP: generate, store, select"))


def _store(args) -> int:
    from cg4ctr_fast.cli import store as store_cli

    return store_cli.run(args)


def _serve(args) -> int:
    from cg4ctr_fast.cli import serve as serve_cli

    return serve_cli.run(args)


def _check_inputs(args) -> None:
    """Every number, text and output path of `generate`, before anything loads."""
    from cg4ctr_fast.imaging import MAX_SIDE

    if args.steps is not None and args.steps <= 0:
        raise InputError(f"--steps must be a positive integer, got {args.steps}")
    if args.guidance is not None and not 0 <= args.guidance <= MAX_GUIDANCE:
        raise InputError(f"--guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {args.guidance}")
    if not (0.0 < args.strength <= 1.0):
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    if not (0.0 <= args.eta <= 1.0):
        raise InputError(f"--eta must be in [0, 1], got {args.eta}")
    if args.images_per_prompt <= 0:
        raise InputError(f"--images-per-prompt must be a positive integer, got {args.images_per_prompt}")
    if getattr(args, "preview_top_k", None) is not None and args.reward is None and not args.engines:
        # Before any model loads; an engine folder may carry its own reward model (checked once it is read).
        raise InputError("--preview-top-k ranks the candidates by the reward model: give --reward DIR (the toy "
                         "set's is cg4ctr_fast/assets/toy/reward)")
    if any(not p.strip() for p in args.prompt):
        raise InputError("--prompt must not be empty")
    if len(args.prompt) * args.images_per_prompt > MAX_CREATIVES:
        raise InputError(f"{len(args.prompt)} prompts × {args.images_per_prompt} images per prompt is over the "
                         f"{MAX_CREATIVES} creatives one command makes (one denoising batch, twice that with "
                         "guidance); split the prompts over several commands")
    for text in args.prompt:
        check_utf8(text, "--prompt")
    if args.negative_prompt is not None:
        check_utf8(args.negative_prompt, "--negative-prompt")
    if args.backend is not None and not args.engines:
        raise InputError("--backend needs --engines DIR (a folder written by cg4ctr-export)")
    _check_plan_flags(args)
    for flag, side in (("--height", args.height), ("--width", args.width)):
        # 8: the SD VAE downsamples by 8; MAX_SIDE (4096): the largest input side accepted, and a working size
        # past it would only upsample what no input can hold.
        if side is not None and not (0 < side <= MAX_SIDE and side % 8 == 0):
            raise InputError(f"{flag} must be a positive multiple of 8 up to {MAX_SIDE}, got {side}")
    check_utf8(args.title, "--title")
    # Checked here, as every input file is, because its content hash is recorded before the net loads.
    if args.saliency is not None and not Path(args.saliency).exists():
        raise InputError(f"--saliency {args.saliency}: no such file or folder")
    if args.group and not args.groups:
        raise InputError("--group needs --groups FILE (the groups.json that defines the group ids)")
    if args.group and len(args.group) != len(args.prompt):
        raise InputError(f"--group is given {len(args.group)} times for {len(args.prompt)} --prompt; give one group "
                         "id per prompt, in prompt order")
    check_out_dir(args.out, overwrite=args.overwrite)
    if args.overwrite and Path(args.out).is_dir():
        # Replacing --out deletes it: an input inside it would be deleted with it.
        out = Path(args.out).resolve()
        for flag in ("image", "mask", "model", "saliency", "lora", "engines", "reward", "groups"):
            values = getattr(args, flag, None)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and (out == Path(value).resolve() or out in Path(value).resolve().parents):
                    raise InputError(f"--{flag} {value} lies inside --out {args.out}, which --overwrite replaces; "
                                     "choose another --out")


def _check_plan_flags(args) -> None:
    """The lever flags and --deadline-ms: ranges, and no flag the planner would override."""
    import math

    if args.guidance_cutoff is not None and not (0.0 < args.guidance_cutoff <= 1.0):
        raise InputError(f"--guidance-cutoff must be in (0, 1], got {args.guidance_cutoff}")
    if args.cache_interval is not None and args.cache_interval < 1:
        raise InputError(f"--cache-interval must be a positive integer, got {args.cache_interval}")
    if args.preview_top_k is not None and not 1 <= args.preview_top_k <= args.images_per_prompt:
        raise InputError(f"--preview-top-k must be from 1 to --images-per-prompt ({args.images_per_prompt}), got "
                         f"{args.preview_top_k}")
    if args.deadline_ms is None:
        for flag, value in (("--cost-table", args.cost_table), ("--quality-table", args.quality_table)):
            if value is not None:
                raise InputError(f"{flag} is read by the planner: pass --deadline-ms MS too")
        return
    if not (math.isfinite(args.deadline_ms) and args.deadline_ms > 0):
        raise InputError(f"--deadline-ms must be a finite number of ms > 0, got {args.deadline_ms}")
    chosen = [flag for flag, value in (("--steps", args.steps), ("--guidance", args.guidance),
                                       ("--scheduler", args.scheduler), ("--guidance-cutoff", args.guidance_cutoff),
                                       ("--cache-interval", args.cache_interval),
                                       ("--preview-top-k", args.preview_top_k)) if value is not None]
    if chosen:
        raise InputError(f"--deadline-ms lets the planner choose {', '.join(chosen)}; drop them, or drop "
                         "--deadline-ms to set them yourself")
    if args.strength != 1.0:
        raise InputError("--deadline-ms plans full-strength generations; drop --strength")
    for flag, path in (("--cost-table", args.cost_table), ("--quality-table", args.quality_table)):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")


def _lora_pairs(args) -> list[tuple[str, float]]:
    """(path, scale) per --lora, scales paired by position (one scale for all, or none: 1.0)."""
    from cg4ctr_fast.export.lora import check_scale

    paths = list(args.lora or [])
    scales = list(args.lora_scale or [])
    if scales and not paths:
        raise InputError("--lora-scale applies to a LoRA: pass --lora FILE too")
    if len(scales) > 1 and len(scales) != len(paths):
        raise InputError(f"{len(scales)} --lora-scale for {len(paths)} --lora: give one scale per LoRA, in the same "
                         "order, or one for all")
    if len(scales) <= 1:
        scales = (scales or [1.0]) * len(paths)
    return [(path, check_scale(scale)) for path, scale in zip(paths, scales)]


def _toy_folders() -> tuple[Path, Path]:
    """The demo's trained toy generator and saliency folders: the shipped set's (hashes checked), else the
    cache's (`cg4ctr demo --retrain` builds them there)."""
    from cg4ctr_fast.training.toy import ToyConfig
    from cg4ctr_fast.training.toy_set import resolve_toy_root

    root = resolve_toy_root(ToyConfig())
    generator, saliency = root / "generator", root / "saliency"
    if not (generator / "model_index.json").is_file() or not (saliency / "saliency.safetensors").is_file():
        raise InputError(f"--preset toy: the toy models are not trained yet; run `cg4ctr demo` once (it trains "
                         f"and caches them in {root}) or pass --model DIR")
    return generator, saliency


def _model_facts(args, preset):
    """(the run's scheduler, the VAE's scale factor), from configs only (no weights): checks --steps and
    --height/--width up front, and validates a --model folder as a whole before anything loads."""
    from cg4ctr_fast.models.diffusion import folder_scheduler, inspect_model_folder, make_scheduler, swap_scheduler

    if args.model:
        folder = inspect_model_folder(args.model)
        scheduler = folder_scheduler(folder)
        # diffusers' rule: vae_scale_factor = 2 ** (len(block_out_channels) - 1); 8 for SD 1.x/2.x.
        scale = 2 ** (len(folder.configs["vae"].get("block_out_channels", (128, 256, 512, 512))) - 1)
    else:
        scheduler = make_scheduler(preset.scheduler, preset.scheduler_kwargs())
        scale = preset.vae.scale_factor
    return (swap_scheduler(scheduler, args.scheduler) if args.scheduler else scheduler), scale


def _side_from_aspect(other: int, this: int, given: int, multiple: int) -> int:
    """The side that keeps other:this when `this` becomes `given`, rounded to the nearest `multiple` (≥ one),
    in integers as `imaging.working_size` rounds: e.g. a 52×44 input at --height 96 runs 112 wide."""
    return max(1, (2 * other * given + this * multiple) // (2 * this * multiple)) * multiple


def _requested_size(args, size: tuple[int, int], multiple: int, ranges) -> Optional[tuple[int, int]]:
    """(width, height) from --width/--height for an input of `size`, or None when neither is given.

    One given: the other keeps the input's aspect ratio (diffusers would fall back to the model's square
    resolution and distort it). `multiple`: 8 and the VAE's scale factor; `ranges`: an engine folder's exported
    {"height": (min, max), "width": (min, max)}, or None. InputError, one line, for a side out of bounds.
    """
    from cg4ctr_fast.imaging import MAX_SIDE

    if args.width is None and args.height is None:
        return None
    w0, h0 = size
    width = args.width or _side_from_aspect(w0, h0, args.height, multiple)
    height = args.height or _side_from_aspect(h0, w0, args.width, multiple)
    sides = (("width", width, args.width), ("height", height, args.height))
    # A side the user gave is checked before one derived from it, so the refusal names what was typed.
    for name, value, given in sorted(sides, key=lambda side: side[2] is None):
        how = "" if given else f" (from the input's {w0}×{h0} aspect ratio; give --{name} too)"
        if value % multiple:
            raise InputError(f"--{name} {value} is not a multiple of {multiple} (8 and the model's VAE scale factor)")
        if value > MAX_SIDE:
            raise InputError(f"--{name} would be {value}{how}, over the {MAX_SIDE} limit")
        if ranges is not None:
            lo, hi = ranges[name]
            if not lo <= value <= hi:
                raise InputError(f"--{name} {value}{how} is outside the engine folder's exported range {lo}..{hi}; "
                                 f"re-export with cg4ctr-export onnx --{name} MIN:OPT:MAX")
    return width, height


def _engine_manifest(folder: str) -> dict:
    """The folder's manifest.json as far as `generate` reads it before loading; {} when unreadable
    (`CreativePipeline.from_engines` then refuses the folder with the reason)."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _engine_sides(manifest: dict) -> tuple[int, Optional[dict]]:
    """(the VAE scale factor, {"height": (min, max), "width": (min, max)}) an engine folder was exported for;
    (8, None) when its manifest does not say."""
    try:
        scale = int(manifest["stack"]["vae_scale_factor"])
        ranges = {name: (int(manifest["settings"][name][0]), int(manifest["settings"][name][-1]))
                  for name in ("height", "width")}
    except (KeyError, TypeError, ValueError, IndexError):
        return 8, None
    return scale, ranges


def _engine_has_reward(manifest: dict) -> bool:
    from cg4ctr_fast.export.contracts import REWARD_COMPONENTS

    components = manifest.get("components")
    return isinstance(components, dict) and all(name in components for name in REWARD_COMPONENTS)


def _read_groups(args) -> Optional[tuple[list, "np.ndarray"]]:
    """(group id of each prompt, float32 [n_prompts, group_dim] feature rows) from --groups / --group, or None."""
    import numpy as np

    from cg4ctr_fast.training.data import _load_groups_json

    if not args.groups:
        return None
    path = Path(args.groups)
    ids, features = _load_groups_json(path)  # one reader for groups.json: the reward trainer's
    if args.group:
        missing = [g for g in args.group if str(g) not in ids]
        if missing:
            raise InputError(f"--group {missing[0]}: no such group_id in {path} (it has {', '.join(ids[:8])}"
                             f"{', ...' if len(ids) > 8 else ''})")
        chosen = [ids.index(str(g)) for g in args.group]
    else:
        if len(ids) < len(args.prompt):
            raise InputError(f"--groups {path}: {len(ids)} groups for {len(args.prompt)} prompts; prompt g is scored "
                             "for the g-th group, so give at least one group per prompt, or map them with --group")
        chosen = list(range(len(args.prompt)))
    return [ids[i] for i in chosen], np.asarray(features[chosen], dtype=np.float32)


def _load_pipeline(args, preset, saliency, loras, reward_model, planning):
    """The pipeline `generate` runs: an engine folder's, or torch modules with the LoRAs fused (the plan's
    LCM-LoRA first when it chose the LCM UNet). Several LoRAs fuse together through `export.lora.fuse_loras`
    (diffusers' set_adapters + fuse_lora) before the slots are built."""
    from cg4ctr_fast.pipeline import CreativePipeline

    if args.engines:
        return CreativePipeline.from_engines(
            args.engines, backend=args.backend or "onnxruntime", saliency=saliency, scheduler=args.scheduler,
            reward=False if reward_model is not None else None,  # an explicit --reward replaces the folder's
        )
    wanted = list(loras)
    if planning is not None and planning.plan is not None and planning.plan.unet == "lcm":
        wanted.insert(0, (planning.lcm_lora, 1.0))
    if len(wanted) <= 1:
        return CreativePipeline.from_preset(
            preset.name,
            model=args.model,
            random_weights=args.random_weights,
            unet_in_channels=args.unet_channels,
            scheduler=args.scheduler,
            saliency=saliency,
            lora=wanted[0][0] if wanted else None,
            lora_scale=wanted[0][1] if wanted else 1.0,
        )
    from cg4ctr_fast.config import with_unet_channels
    from cg4ctr_fast.export.lora import fuse_loras
    from cg4ctr_fast.models.diffusion import build_modules, load_modules

    if args.model:
        modules = load_modules(args.model)
    else:
        modules = build_modules(with_unet_channels(preset, args.unet_channels) if args.unet_channels else preset,
                                seed=0)
    fuse_loras(modules, wanted)
    return CreativePipeline.from_modules(modules, scheduler=args.scheduler, saliency=saliency)


def _attach_preview(pipe) -> None:
    """Attach the shipped tiny preview decoder unless one is attached already (`planner.attach_toy_preview_decoder`)."""
    from cg4ctr_fast.planner import attach_toy_preview_decoder

    attach_toy_preview_decoder(pipe, "--preview-top-k needs a preview decoder")


class _Planning:
    """`generate --deadline-ms`: the cost and quality tables, the chosen plan, and the report against it."""

    def __init__(self, args, *, toy: bool, preset, provenance: dict, requested, rgb, reward: bool, saliency: bool):
        import torch

        from cg4ctr_fast import planner
        from cg4ctr_fast.imaging import working_size

        self.args, self.reward, self.saliency = args, reward, saliency
        self.groups, self.served = len(args.prompt), args.images_per_prompt
        self.lcm_lora = planner.toy_lcm_lora() if toy else None
        self.backend = (args.backend or "onnxruntime") if args.engines else "torch"
        self.levers = planner.detect_levers(backend=self.backend, lcm_lora=self.lcm_lora,
                                            preview_decoder=toy and planner.toy_preview_decoder() is not None,
                                            reward=reward, unet="base" if args.engines else None)
        resolution = preset.resolution
        if args.model and not args.engines:
            from cg4ctr_fast.models.diffusion import inspect_model_folder

            configs = inspect_model_folder(args.model).configs
            scale = 2 ** (len(configs["vae"].get("block_out_channels", (128, 256, 512, 512))) - 1)
            resolution = int(configs["unet"].get("sample_size", resolution // scale)) * scale
        # The table is keyed by the longer working side: a smaller or non-square input runs no slower.
        self.side = max(requested) if requested else max(working_size(rgb.width, rgb.height, resolution))
        if args.engines:
            model = f"engines-{(provenance.get('engines_manifest_sha256') or 'unknown')[:12]}"
        elif args.model:
            model = f"{'toy' if toy else 'model'}-{provenance['model_sha256'][:12]}"
        else:
            model = f"{preset.name}-random-seed0-c{args.unet_channels or preset.unet.in_channels}"
        self.key = planner.cost_table_key(model, "float32", self.side, torch.get_num_threads())
        if args.cost_table:
            self.cost_path = Path(args.cost_table)
        elif args.engines and (Path(args.engines) / planner.ENGINE_COST_FILE).is_file():
            self.cost_path = Path(args.engines) / planner.ENGINE_COST_FILE
        else:
            self.cost_path = planner.default_cost_path("cpu", self.backend, self.key)
        self.cost = planner.CostTable.load(self.cost_path) if self.cost_path.is_file() else None
        if self.cost is not None:
            reason = self.cost.mismatch(device_type="cpu", backend=self.backend, side=self.side)
            if reason and args.cost_table:
                raise InputError(f"--cost-table {args.cost_table} does not fit this run: {reason}; measure one with "
                                 "`cg4ctr-bench --calibrate` for this model, backend and size")
            if reason:
                self.say(f"the cost table {self.cost_path} does not fit this run ({reason}): measuring it again")
                self.cost = None
            elif self.cost.meta.get("torch_threads") not in (None, torch.get_num_threads()):
                self.say(f"note: the cost table was measured with {self.cost.meta['torch_threads']} torch threads, "
                         f"this run has {torch.get_num_threads()}: its times may not hold")
        if self.cost is not None and not args.cost_table:
            # A cached table measured without a stage this call runs would count it as free: measure again.
            lacking = [name for name, used in (("reward", reward), ("saliency", saliency))
                       if used and name not in self.cost.stages]
            if lacking:
                self.say(f"the cached cost table {self.cost_path} has no {' or '.join(lacking)} timing: measuring "
                         "it again")
                self.cost = None
        quality_path = args.quality_table or (planner.shipped_quality_path() if toy else None)
        self.quality = (planner.QualityTable.load(quality_path)
                        if quality_path is not None and Path(quality_path).is_file() else None)
        self.quality_path = quality_path if self.quality is not None else None
        self.plan = self.why = None
        self.calibrated = None

    def say(self, text: str) -> None:
        if not self.args.quiet:
            print(text, file=sys.stderr, flush=True)

    def choose(self) -> None:
        """Plan from the cost table (DeadlineInfeasible when none fits); nothing when no table exists yet."""
        from cg4ctr_fast.planner import plan_for

        if self.cost is None:
            return
        self.plan, self.why = plan_for(self.args.deadline_ms, self.groups, self.cost, self.quality,
                                       served_per_group=self.served, reward=self.reward, saliency=self.saliency,
                                       levers=self.levers)
        self.p99 = self.cost.predict(self.plan, self.groups, reward=self.reward, saliency=self.saliency, stat="p99")
        self.p50 = self.cost.predict(self.plan, self.groups, reward=self.reward, saliency=self.saliency, stat="p50")
        p = self.plan
        self.say(f"plan: {p.name} (scheduler {p.scheduler}, {p.steps} steps, guidance {p.guidance_scale:g}, "
                 f"cut-off {p.guidance_cutoff:g}, cache interval {p.cache_interval}, {p.images_per_prompt} "
                 f"candidate(s) per group, preview ranking {'top ' + str(p.preview_top_k) if p.preview_top_k else 'off'}"
                 f", {p.unet} UNet); cost table {self.cost_path}"
                 + (f", quality table {self.quality_path}" if self.quality_path else ", no quality table"))
        self.say(f"why: {self.why}")

    def finish(self, pipe, reload):
        """Calibrate now when no table was cached, plan, and set the pipeline up for the plan."""
        from cg4ctr_fast.models.diffusion import swap_scheduler
        from cg4ctr_fast.planner import calibration_batches, measure_cost_table

        if self.cost is None:
            started = time.perf_counter()
            runs = 20
            self.say(f"no cost table for {self.key} at {self.cost_path}: calibrating a small one now ({runs} runs "
                     "per stage, p99 = their maximum; `cg4ctr-bench --calibrate` measures a full one)")
            if self.levers.preview:
                _attach_preview(pipe)  # so its decode is timed too
            self.cost = measure_cost_table(pipe, batches=calibration_batches(self.groups * self.served,
                                                                             preview=self.levers.preview),
                                           runs=runs, warmup=2, reward=pipe.reward, height=self.side, width=self.side,
                                           text_prompts=self.groups)
            self.cost.meta["calibrated_by"] = "cg4ctr generate --deadline-ms (on the fly)"
            self.cost.save(self.cost_path)
            self.calibrated = time.perf_counter() - started
            self.say(f"calibrated in {self.calibrated:.1f} s; saved to {self.cost_path}")
            self.choose()
            if self.plan.unet == "lcm":  # the LCM-LoRA is fused at load: load again with it
                reward = pipe.reward
                pipe = reload()
                pipe.reward = reward
        pipe.scheduler = swap_scheduler(pipe.scheduler, self.plan.scheduler)
        if self.plan.preview_top_k is not None:
            _attach_preview(pipe)
        return pipe

    def report(self, measured_ms: float, timer) -> dict:
        """Print and return the measured latency against the deadline and the prediction, with the stages."""
        deadline = self.args.deadline_ms
        met = measured_ms <= deadline
        stages = {k: 1000 * v for k, v in (timer.snapshot() if timer is not None else {}).items()}
        timing = ", ".join(f"{k};dur={v:.1f}" for k, v in stages.items())
        self.say(f"latency: {measured_ms:.0f} ms measured against the {deadline:g} ms deadline "
                 f"({'met' if met else 'MISSED'}; predicted p50 {self.p50.total_ms:.0f} ms, p99 "
                 f"{self.p99.total_ms:.0f} ms; model loading and one warm-up call not counted); Server-Timing: {timing}")
        return {"plan": self.plan.to_dict(), "name": self.plan.name, "why": self.why, "deadline_ms": deadline,
                "measured_ms": measured_ms, "met": met, "predicted_p99_ms": self.p99.total_ms,
                "predicted_p50_ms": self.p50.total_ms, "predicted_stages_p99_ms": self.p99.stages,
                "measured_stages_ms": stages, "cost_table": str(self.cost_path),
                "calibrated_now_s": self.calibrated, "quality_table": str(self.quality_path) if self.quality_path
                else None}


def cmd_generate(args) -> int:
    import numpy as np

    from cg4ctr_fast.cli.common import package_version
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.export.manifest import folder_sha256, sha256_file
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.imaging import load_image, load_mask, load_product, to_rgb_and_alpha_mask, working_size
    from cg4ctr_fast.models.diffusion import check_steps

    _check_inputs(args)
    # 1. Which weights: an engine folder, a model folder, the trained toy generator, or a preset in code.
    from cg4ctr_fast.config import PRESETS

    toy = args.preset == "toy"
    if not toy and args.preset not in PRESETS:
        raise InputError(f"unknown preset {args.preset!r}; choose one of: {', '.join(sorted([*PRESETS, 'toy']))}")
    preset = get_preset("tiny" if toy else args.preset)  # the toy generator is the tiny stack, trained
    saliency = args.saliency
    manifest: dict = {}
    if args.engines:
        clashing = [flag for flag, value in (("--model", args.model), ("--random-weights", args.random_weights),
                                             ("--unet-channels", args.unet_channels), ("--lora", args.lora),
                                             ("--preset toy", toy)) if value]
        if clashing:
            raise InputError(f"--engines runs an exported folder; {', '.join(clashing)} apply to the torch stack "
                             "(fuse a LoRA at export: cg4ctr-export onnx --lora)")
        manifest = _engine_manifest(args.engines)
        source_preset = (manifest.get("source") or {}).get("preset") if isinstance(manifest.get("source"), dict) else None
        preset = get_preset(source_preset if isinstance(source_preset, str) else preset.name)
    elif toy:
        clashing = [flag for flag, value in (("--model", args.model), ("--random-weights", args.random_weights),
                                             ("--unet-channels", args.unet_channels)) if value]
        if clashing:
            raise InputError(f"--preset toy is the demo's trained generator; {', '.join(clashing)} do not apply")
        generator, toy_saliency = _toy_folders()
        args.model = str(generator)
        if saliency is None and args.mask is None:
            saliency = str(toy_saliency)  # the net's config.json there sets its input size and threshold
    elif args.model is not None:
        # These build a preset's architecture in code; with a folder's weights they were silently ignored.
        clashing = [flag for flag, value in (("--random-weights", args.random_weights),
                                             ("--unet-channels", args.unet_channels)) if value]
        if clashing:
            raise InputError(f"--model loads a folder's own architecture and weights; {', '.join(clashing)} apply "
                             "to built-in presets only")
    elif not args.random_weights and not preset.buildable:
        raise InputError(f"preset {preset.name!r} needs --model PATH (a local diffusers folder) or --random-weights")
    steps = args.steps or preset.default_steps
    guidance = preset.default_guidance if args.guidance is None else args.guidance

    # 2. Read and check every input before any model loads: bad input fails in milliseconds.
    if args.engines:
        scale, ranges = _engine_sides(manifest)
    else:
        scheduler, scale = _model_facts(args, preset)
        check_steps(scheduler, steps, args.strength, flag="--steps")
        ranges = None
    loras = _lora_pairs(args)
    lora = None
    if loras:
        from cg4ctr_fast.export import lora as lora_mod

        records = [lora_mod.lora_record(path, scale) for path, scale in loras]  # InputError if unusable
        lora = lora_mod.manifest_lora(records)
    source = load_image(args.image, what="image")
    rgb, alpha_mask = to_rgb_and_alpha_mask(source)
    mask = load_mask(args.mask, rgb.size) if args.mask else None
    if mask is None and alpha_mask is None and saliency is None and not args.engines:
        raise InputError("no mask: pass --mask, an image with transparency, or --saliency WEIGHTS")
    requested = _requested_size(args, rgb.size, max(8, scale), ranges)
    reward_model = None
    if args.reward:
        from cg4ctr_fast.models.reward import RewardModel

        reward_model = RewardModel.load(args.reward)
    engine_reward = bool(args.engines) and reward_model is None and _engine_has_reward(manifest)
    reward_flags = [flag for flag, value in (("--title", args.title), ("--captions", args.captions != "none"),
                                             ("--groups", args.groups)) if value]
    if reward_flags and reward_model is None and not engine_reward:
        raise InputError(f"{', '.join(reward_flags)} describe what the reward model scores; pass --reward DIR (or "
                         "--engines DIR exported with --reward)")
    groups = _read_groups(args)
    if reward_model is not None and groups is not None:
        _check_group_dim(groups[1], reward_model.config.group_dim, args.groups)
    # Provenance by content, hashed before loading (the bytes this run reads): paths are only hints.
    used_saliency = saliency if (mask is None and alpha_mask is None) else None
    provenance = {
        "image_sha256": sha256_file(args.image),
        "model_sha256": folder_sha256(args.model) if args.model else None,
        # --saliency takes a weights file or a `cg4ctr-train saliency` folder (weights + config.json).
        "saliency_sha256": (None if not used_saliency else folder_sha256(used_saliency)
                            if Path(used_saliency).is_dir() else sha256_file(used_saliency)),
        # No manifest: from_engines refuses the folder below in one line (exit 2).
        "engines_manifest_sha256": sha256_file(Path(args.engines) / "manifest.json")
        if args.engines and (Path(args.engines) / "manifest.json").is_file() else None,
        "reward_sha256": _reward_sha256(args.reward) if args.reward else None,
        "groups_sha256": sha256_file(args.groups) if args.groups else None,
    }

    # 2b. With --deadline-ms: the plan, from a cost table, before any model loads (an impossible deadline exits
    # here, nothing run). Without a cached table one is calibrated once the pipeline is loaded.
    planning = None
    if args.deadline_ms is not None:
        planning = _Planning(args, toy=toy, preset=preset, provenance=provenance, requested=requested, rgb=rgb,
                             reward=reward_model is not None or engine_reward, saliency=mask is None and alpha_mask is None)
        planning.choose()

    # 3. Load and run.
    started = time.perf_counter()
    pipe = _load_pipeline(args, preset, saliency, loras, reward_model, planning)
    width, height = requested or working_size(rgb.width, rgb.height, pipe.max_side)
    # The reward model scores (image, title, caption, user group); the pipeline passes images and group indices.
    scorer = reward_model if reward_model is not None else getattr(pipe.reward, "engine", None)
    if scorer is None and pipe.reward is not None:
        raise RuntimeError(f"the engine folder's reward {type(pipe.reward).__name__} has no scoring engine")
    table = None
    if scorer is not None:
        from cg4ctr_fast.runtime.onnxruntime_backend import default_group_features

        dim = scorer.config.group_dim
        if groups is not None:
            table = _check_group_dim(groups[1], dim, args.groups)
        else:
            table = np.tile(default_group_features(dim), (len(args.prompt), 1))
        captions = list(args.prompt) if args.captions == "prompts" else None
        pipe.reward = scorer.pipeline_scorer(table, title=args.title, captions=captions)
    levers: dict = {name: value for name, value in (("guidance_cutoff", args.guidance_cutoff),
                                                    ("cache_interval", args.cache_interval),
                                                    ("preview_top_k", args.preview_top_k)) if value is not None}
    per_prompt = args.images_per_prompt
    if planning is not None:
        pipe = planning.finish(pipe, lambda: _load_pipeline(args, preset, saliency, loras, reward_model, planning))
        steps, guidance, per_prompt, levers = (planning.plan.steps, planning.plan.guidance_scale,
                                               planning.plan.images_per_prompt, planning.plan.pipeline_kwargs())
    elif args.preview_top_k is not None:
        _attach_preview(pipe)

    def run(show_progress: bool):
        return pipe(args.prompt, source, mask_image=mask, negative_prompt=args.negative_prompt,
                    num_inference_steps=steps, guidance_scale=guidance, strength=args.strength, eta=args.eta,
                    num_images_per_prompt=per_prompt, height=height, width=width, seed=args.seed,
                    show_progress=show_progress, **levers)

    if planning is not None:
        from cg4ctr_fast.runtime.timing import StageTimer

        # One untimed call with the plan's shapes first, as a serving process is warm: a process's first call
        # pays one-off set-up (ONNX Runtime's first run at a shape: VAE encode 930-1,290 ms against 6-14 ms
        # warm), which the cost table, measured warm, does not hold. Same seeds, so the same creatives.
        run(show_progress=False)
        pipe.clear_prompt_cache()  # the timed call encodes its prompts, as the cost table prices it
        pipe.timer = StageTimer(pipe.components.device)
    run_started = time.perf_counter()
    creatives = run(show_progress=not args.quiet and planning is None)  # a bar would be in the measured time
    original_rewards = None
    if scorer is not None:
        # The original image is always a candidate: scored for every group as displayed (oriented, sRGB, over
        # white where transparent), with the title and no caption (no prompt made it), as the demo scores it.
        n = len(args.prompt)
        original = load_product(source).model_rgb
        scored = time.perf_counter()
        original_rewards = [float(s) for s in scorer.score_images([original] * n, [args.title] * n, [""] * n, table)]
        if pipe.timer is not None:
            pipe.timer.seconds["reward"] += time.perf_counter() - scored
    plan_record = None
    if planning is not None:
        plan_record = planning.report(1000 * (time.perf_counter() - run_started), pipe.timer)
        pipe.timer = None

    # 4. Write the folder atomically.
    out = Path(args.out)
    records = []
    group_ids = groups[0] if groups is not None else None
    with atomic_dir(out) as tmp:
        creatives[0].mask.save(tmp / "mask.png")
        for creative in creatives:
            name = f"creative_g{creative.group:03d}_{creative.index:02d}.png"
            creative.image.save(tmp / name)
            records.append(
                {
                    "file": name,
                    "prompt": creative.prompt,
                    "group": creative.group,
                    "group_id": group_ids[creative.group] if group_ids else None,
                    "index": creative.index,
                    "seed": creative.seed,
                    "reward": creative.reward,
                    "preview_reward": getattr(creative, "preview_reward", None),
                    "original_reward": original_rewards[creative.group] if original_rewards else None,
                    "model_id": pipe.components.info.model_id,
                    "mask_file": "mask.png",
                }
            )
        meta = {
            "package_version": package_version(),
            "image": str(Path(args.image).resolve()),  # a hint; image_sha256 identifies it
            "image_sha256": provenance["image_sha256"],
            "image_size": list(rgb.size),  # [width, height] as displayed: every creative's size
            "width": width,  # the working size the model ran at
            "height": height,
            "preset": None if args.engines or (args.model and not toy) else ("toy" if toy else preset.name),
            "model": _model_record(args, toy, preset, pipe, provenance, manifest),
            "lora": lora if lora is not None else (manifest.get("lora") if args.engines else None),
            "backend": pipe.components.backend,
            "engines": None if not args.engines else {
                "path": str(Path(args.engines).resolve()),
                "manifest_sha256": provenance["engines_manifest_sha256"],
            },
            "saliency": _saliency_record(args, used_saliency, mask, alpha_mask, provenance),
            "reward": _reward_record(args, reward_model, scorer, provenance),
            "steps": steps,
            "guidance": guidance,
            "strength": args.strength,
            "eta": args.eta,
            "levers": levers,
            "plan": plan_record,
            "scheduler": type(pipe.scheduler).__name__,
            "seed": args.seed,
            "negative_prompt": args.negative_prompt,
            "groups": _group_summary(args.prompt, creatives, group_ids, original_rewards),
            "creatives": records,
        }
        (tmp / "creatives.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not args.quiet:
        elapsed = time.perf_counter() - started
        print(f"wrote {len(creatives)} creatives to {out} in {elapsed:.1f} s", file=sys.stderr)
    return 0


def _check_group_dim(features, dim: int, path) -> "np.ndarray":
    if features.shape[1] != dim:
        raise InputError(f"--groups {path}: groups have {features.shape[1]} features each, the reward model "
                         f"expects {dim}")
    return features


def _reward_sha256(folder: str) -> dict:
    """sha256 of each file of a RewardModel folder (weights, config with its calibration, vocabularies), as
    `cg4ctr-export onnx --reward` records it."""
    from cg4ctr_fast.export.manifest import sha256_file
    from cg4ctr_fast.models.reward import CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE

    return {name: sha256_file(Path(folder) / name) for name in (WEIGHTS_FILE, CONFIG_FILE, VOCAB_FILE)}


def _model_record(args, toy: bool, preset, pipe, provenance: dict, manifest: dict) -> dict:
    """Where the weights came from, by content: a preset's name only when the preset built them."""
    if args.engines:
        source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
        return {"source": "engines", "model_id": pipe.components.info.model_id,
                "exported_from": {key: source.get(key) for key in ("preset", "model_sha256", "random_weights")}}
    if args.model:
        return {"source": "toy" if toy else "folder", "path": str(Path(args.model).resolve()),
                "sha256": provenance["model_sha256"], "model_id": pipe.components.info.model_id}
    return {"source": "preset", "preset": preset.name, "random_weights": True,
            "unet_channels": args.unet_channels, "model_id": pipe.components.info.model_id}


def _saliency_record(args, used_saliency, mask, alpha_mask, provenance: dict) -> Optional[dict]:
    """The saliency net that made the mask, when one did (neither --mask nor transparency gave it)."""
    if mask is not None or alpha_mask is not None:
        return None
    if used_saliency:
        return {"path": str(Path(used_saliency).resolve()), "sha256": provenance["saliency_sha256"]}
    return {"source": "engines"} if args.engines else None  # the folder's exported net, in its manifest


def _reward_record(args, reward_model, scorer, provenance: dict) -> Optional[dict]:
    if scorer is None:
        return None
    if reward_model is None:
        record: dict = {"source": "engines"}  # reward_image/ and reward_head/ of the folder, in its manifest
    else:
        record = {"source": "folder", "path": str(Path(args.reward).resolve()), "sha256": provenance["reward_sha256"]}
    return {**record, "title": args.title, "captions": args.captions,
            "groups": None if not args.groups else {"path": str(Path(args.groups).resolve()),
                                                   "sha256": provenance["groups_sha256"]}}


def _group_summary(prompts, creatives, group_ids, original_rewards) -> list[dict]:
    """Per group: its best creative against the original image. A creative is chosen only when the reward model
    scores it strictly above the original (`training.metrics.pick_over_original`), else the original is kept."""
    import numpy as np

    from cg4ctr_fast.training.metrics import pick_over_original

    rows = []
    for g, prompt in enumerate(prompts):
        mine = [c for c in creatives if c.group == g]
        row = {"group": g, "group_id": group_ids[g] if group_ids else None, "prompt": prompt,
               "original_reward": None, "best_reward": None, "chosen": None}
        if original_rewards is not None:
            rewards = [c.reward for c in mine]
            best = int(np.argmax(rewards))
            pick = pick_over_original(rewards, original_rewards[g])
            row.update(original_reward=original_rewards[g], best_reward=rewards[best],
                       chosen="original" if pick is None else f"creative_g{g:03d}_{mine[pick].index:02d}.png")
        rows.append(row)
    return rows


def cmd_demo(args) -> int:
    from cg4ctr_fast.cli.demo import run_demo

    for name, value in (("--steps", args.steps), ("--products", args.products),
                        ("--images-per-group", args.images_per_group)):
        if value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value}")
    summary = run_demo(Path(args.out), steps=args.steps, seed=args.seed, quiet=args.quiet,
                       n_products=args.products, images_per_group=args.images_per_group, retrain=args.retrain)
    if args.quiet:
        return 0
    head, kept = summary["aggregate_true_ctr_lift"], summary["original_kept"]
    print(
        f"wrote {len(summary['creatives'])} creatives, contact_sheet.png, creatives.json and report.md to "
        f"{args.out} in {summary['seconds']:.0f} s; aggregate true-CTR lift over the original "
        f"{head['lift']:+.1%} [95 % CI {head['ci95'][0]:+.1%}, {head['ci95'][1]:+.1%}] (mean of per-group ratios "
        f"{head['mean_of_ratios']:+.1%}; original kept in {kept['count']} of {kept['of']})",
        file=sys.stderr,
    )
    return 0


def _demo(args) -> int:
    check_out_dir(args.out, overwrite=args.overwrite)
    return cmd_demo(args)


def _nearline(args) -> int:
    from cg4ctr_fast.cli import nearline as nearline_cli

    return nearline_cli.run(args)


COMMANDS = {"generate": cmd_generate, "demo": _demo, "store": _store, "serve": _serve, "nearline": _nearline}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from cg4ctr_fast.planner import DeadlineInfeasible

    # torch's OpenMP threads wait passively (sleep) rather than spin between ops, unless the environment says
    # otherwise; libgomp reads this once, when torch loads (not yet imported here). Measured on the 2 cores with
    # one core busy elsewhere: spinning made a 2-step toy plan's stages 10-20x slower (UNet batch 1: 1,512 ms
    # against 66 ms), and a deadline planned from them impossible (the cg4ctr-bench --omp-wait note).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    # A deadline no plan meets is the caller's to change: one line and exit 2, as for any bad input.
    return run_cli(PROG, build_parser(), lambda args: COMMANDS[args.command](args), argv,
                   extra_errors=((DeadlineInfeasible, EXIT_BAD_INPUT, "error"),))


if __name__ == "__main__":
    sys.exit(main())
