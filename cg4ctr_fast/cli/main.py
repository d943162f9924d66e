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
    check_out_dir,
    make_parser,
    quiet_libraries,
    run_cli,
)
from cg4ctr_fast.errors import InputError, check_utf8

PROG = "cg4ctr"
# Kept for the commands that still import them from here.
_quiet_libraries = quiet_libraries
__all__ = ["EXIT_BAD_INPUT", "OneLineParser", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Generate CTR-oriented ad creatives.")
    sub = add_subcommands(parser)

    gen = add_subcommand(sub, "generate", "repaint a product image's background, one prompt per user group")
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
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--scheduler", default=None, help="ddim | euler | dpm++ | ... (default: the model's)")
    gen.add_argument("--unet-channels", type=int, choices=(4, 9), default=None, help="built-in presets only")
    gen.add_argument("--seed", type=int, default=0, help="mixed into every creative's hashlib-derived seed")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--lora", help="LoRA to fuse first: diffusers/kohya .safetensors, a peft folder, or a "
                     "`cg4ctr-train cycle` checkpoint's lora/ folder")
    gen.add_argument("--lora-scale", type=float, default=1.0)
    gen.add_argument("--engines", help="run a cg4ctr-export folder (ONNX or TensorRT engines) instead of torch")
    gen.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default=None,
                     help="backend for --engines (default: onnxruntime)")

    demo = add_subcommand(sub, "demo", "train (or reuse) the toy models and run the whole system on held-out products")
    demo.add_argument("--out", default="out/demo", help="output folder")
    add_overwrite(demo)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--products", type=int, default=4, help="held-out products")
    demo.add_argument("--images-per-group", type=int, default=4)
    demo.add_argument("--quiet", action="store_true")
    return parser


def _check_inputs(args) -> None:
    """Every number, text and output path of `generate`, before anything loads."""
    if args.steps is not None and args.steps <= 0:
        raise InputError(f"--steps must be a positive integer, got {args.steps}")
    if args.guidance is not None and not (args.guidance >= 0 and args.guidance < float("inf")):
        raise InputError(f"--guidance must be a finite number ≥ 0, got {args.guidance}")
    if not (0.0 < args.strength <= 1.0):
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    if args.images_per_prompt <= 0:
        raise InputError(f"--images-per-prompt must be a positive integer, got {args.images_per_prompt}")
    if any(not p.strip() for p in args.prompt):
        raise InputError("--prompt must not be empty")
    for text in args.prompt:
        check_utf8(text, "--prompt")
    if args.negative_prompt is not None:
        check_utf8(args.negative_prompt, "--negative-prompt")
    if args.backend is not None and not args.engines:
        raise InputError("--backend needs --engines DIR (a folder written by cg4ctr-export)")
    check_out_dir(args.out, overwrite=args.overwrite)


def _toy_folders() -> tuple[Path, Path]:
    """The demo's trained toy generator and saliency folders (`cg4ctr demo` builds and caches them)."""
    from cg4ctr_fast.training.toy import ToyConfig, toy_root

    root = toy_root(ToyConfig())
    generator, saliency = root / "generator", root / "saliency"
    if not (generator / "model_index.json").is_file() or not (saliency / "saliency.safetensors").is_file():
        raise InputError(f"--preset toy: the toy models are not trained yet; run `cg4ctr demo` once (it trains "
                         f"and caches them in {root}) or pass --model DIR")
    return generator, saliency


def _scheduler_for(args, preset):
    """The scheduler the run will use, built from configs only (no weights), to check --steps up front."""
    from cg4ctr_fast.models.diffusion import folder_scheduler, inspect_model_folder, make_scheduler, swap_scheduler

    if args.model:
        scheduler = folder_scheduler(inspect_model_folder(args.model))  # validates the whole folder too
    else:
        scheduler = make_scheduler(preset.scheduler, preset.scheduler_kwargs())
    return swap_scheduler(scheduler, args.scheduler) if args.scheduler else scheduler


def cmd_generate(args) -> int:
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.imaging import load_image, load_mask, to_rgb_and_alpha_mask
    from cg4ctr_fast.models.diffusion import check_steps

    _check_inputs(args)
    # 1. Which weights: an engine folder, a model folder, the trained toy generator, or a preset in code.
    toy = args.preset == "toy"
    preset = get_preset("tiny" if toy else args.preset)  # the toy generator is the tiny stack, trained
    saliency, pipe_options = args.saliency, {}
    if args.engines:
        clashing = [flag for flag, value in (("--model", args.model), ("--random-weights", args.random_weights),
                                             ("--unet-channels", args.unet_channels), ("--lora", args.lora)) if value]
        if clashing:
            raise InputError(f"--engines runs an exported folder; {', '.join(clashing)} apply to the torch stack "
                             "(fuse a LoRA at export: cg4ctr-export onnx --lora)")
        preset = get_preset(_engine_preset(args.engines) or preset.name)
    elif toy:
        clashing = [flag for flag, value in (("--model", args.model), ("--random-weights", args.random_weights),
                                             ("--unet-channels", args.unet_channels)) if value]
        if clashing:
            raise InputError(f"--preset toy is the demo's trained generator; {', '.join(clashing)} do not apply")
        generator, toy_saliency = _toy_folders()
        args.model = str(generator)
        if saliency is None and args.mask is None:
            saliency = str(toy_saliency / "saliency.safetensors")
            config = json.loads((toy_saliency / "config.json").read_text())
            pipe_options = {"saliency_size": config["size"], "saliency_threshold": config["threshold"]}
    elif args.model is None and not args.random_weights and not preset.buildable:
        raise InputError(f"preset {preset.name!r} needs --model PATH (a local diffusers folder) or --random-weights")
    steps = args.steps or preset.default_steps
    guidance = preset.default_guidance if args.guidance is None else args.guidance

    # 2. Read and check every input before any model loads: bad input fails in milliseconds.
    if not args.engines:
        check_steps(_scheduler_for(args, preset), steps, args.strength, flag="--steps")
    if args.lora:
        from cg4ctr_fast.export.lora import check_scale, resolve_lora

        resolve_lora(args.lora)
        check_scale(args.lora_scale)
    source = load_image(args.image, what="image")
    rgb, alpha_mask = to_rgb_and_alpha_mask(source)
    mask = load_mask(args.mask, rgb.size) if args.mask else None
    if mask is None and alpha_mask is None and saliency is None and not args.engines:
        raise InputError("no mask: pass --mask, an image with transparency, or --saliency WEIGHTS")

    # 3. Load and run.
    from cg4ctr_fast.pipeline import CreativePipeline

    started = time.perf_counter()
    if args.engines:
        pipe = CreativePipeline.from_engines(
            args.engines, backend=args.backend or "onnxruntime", saliency=saliency, scheduler=args.scheduler
        )
    else:
        pipe = CreativePipeline.from_preset(
            preset.name,
            model=args.model,
            random_weights=args.random_weights,
            unet_in_channels=args.unet_channels,
            scheduler=args.scheduler,
            saliency=saliency,
            lora=args.lora,
            lora_scale=args.lora_scale,
            **pipe_options,
        )
    creatives = pipe(
        args.prompt,
        source,
        mask_image=mask,
        negative_prompt=args.negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        strength=args.strength,
        num_images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        show_progress=not args.quiet,
    )

    # 4. Write the folder atomically.
    out = Path(args.out)
    records = []
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
                    "index": creative.index,
                    "seed": creative.seed,
                    "reward": creative.reward,
                    "model_id": pipe.components.info.model_id,
                    "mask_file": "mask.png",
                }
            )
        meta = {
            "image": str(Path(args.image)),
            "preset": "toy" if toy else preset.name,
            "backend": pipe.components.backend,
            "engines": str(Path(args.engines)) if args.engines else None,
            "steps": steps,
            "guidance": guidance,
            "strength": args.strength,
            "scheduler": type(pipe.scheduler).__name__,
            "seed": args.seed,
            "creatives": records,
        }
        (tmp / "creatives.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not args.quiet:
        elapsed = time.perf_counter() - started
        print(f"wrote {len(creatives)} creatives to {out} in {elapsed:.1f} s", file=sys.stderr)
    return 0


def _engine_preset(folder: str) -> Optional[str]:
    """The preset an exported folder came from (for step/guidance defaults), if its manifest says so."""
    try:
        preset = json.loads((Path(folder) / "manifest.json").read_text())["source"]["preset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # from_engines refuses such a folder with the reason
    return preset if isinstance(preset, str) else None


def cmd_demo(args) -> int:
    from cg4ctr_fast.cli.demo import run_demo

    for name, value in (("--steps", args.steps), ("--products", args.products),
                        ("--images-per-group", args.images_per_group)):
        if value <= 0:
            raise InputError(f"{name} must be a positive integer, got {value}")
    summary = run_demo(Path(args.out), steps=args.steps, seed=args.seed, quiet=args.quiet,
                       n_products=args.products, images_per_group=args.images_per_group)
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


COMMANDS = {"generate": cmd_generate, "demo": _demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(PROG, build_parser(), lambda args: COMMANDS[args.command](args), argv)


if __name__ == "__main__":
    sys.exit(main())
