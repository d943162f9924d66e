"""`cg4ctr`: generate ad creatives from the command line.

    cg4ctr generate --preset tiny --image product.png --prompt "warm beach" --prompt "cool studio" --out out/

Bad input gets one line on stderr and exit code 2; nothing is left behind (the output folder is written
to a temporary folder and renamed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from cg4ctr_fast.errors import InputError

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the usage text is one `--help` away)."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _quiet_libraries() -> None:
    # transformers warns about torchvision-backed image processors on import; irrelevant to us.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # Our own bars cover the long steps; transformers' per-file load/save bars would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cg4ctr", description="Generate CTR-oriented ad creatives.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="repaint a product image's background, one prompt per user group")
    gen.add_argument("--preset", default="tiny", help="tiny | sd15-inpaint (default: tiny)")
    gen.add_argument("--model", help="local diffusers folder with the weights (unet/, vae/, text_encoder/, ...)")
    gen.add_argument("--random-weights", action="store_true", help="build the preset with random weights")
    gen.add_argument("--saliency", help="U2NetP weights (.pth or .safetensors) to find the product")
    gen.add_argument("--image", required=True, help="product image")
    gen.add_argument("--mask", help="mask image: white = background to repaint, black = product to keep")
    gen.add_argument("--prompt", action="append", required=True, help="one per user group; repeat the flag")
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
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

    demo = sub.add_parser("demo", help="train (or reuse) the toy models and run the whole system on held-out products")
    demo.add_argument("--out", default="out/demo", help="output folder (replaced if it exists)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--products", type=int, default=4, help="held-out products")
    demo.add_argument("--images-per-group", type=int, default=4)
    demo.add_argument("--quiet", action="store_true")
    return parser


def _check_numbers(args) -> None:
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
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: output folder exists and is not empty; choose another --out")


def cmd_generate(args) -> int:
    from cg4ctr_fast.config import get_preset
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.imaging import load_image, load_mask, to_rgb_and_alpha_mask

    _check_numbers(args)
    preset = get_preset(args.preset)
    if args.backend is not None and not args.engines:
        raise InputError("--backend needs --engines DIR (a folder written by cg4ctr-export)")
    if args.engines:
        clashing = [flag for flag, value in (("--model", args.model), ("--random-weights", args.random_weights),
                                             ("--unet-channels", args.unet_channels), ("--lora", args.lora)) if value]
        if clashing:
            raise InputError(f"--engines runs an exported folder; {', '.join(clashing)} apply to the torch stack "
                             "(fuse a LoRA at export: cg4ctr-export onnx --lora)")
        preset = get_preset(_engine_preset(args.engines) or args.preset)
    elif args.model is None and not args.random_weights and not preset.buildable:
        raise InputError(f"preset {preset.name!r} needs --model PATH (a local diffusers folder) or --random-weights")
    # Read and check every input before any model loads: bad input fails in milliseconds.
    if args.lora:
        from cg4ctr_fast.export.lora import check_scale, resolve_lora

        resolve_lora(args.lora)
        check_scale(args.lora_scale)
    source = load_image(args.image, what="image")
    rgb, alpha_mask = to_rgb_and_alpha_mask(source)
    mask = load_mask(args.mask, rgb.size) if args.mask else None
    if mask is None and alpha_mask is None and args.saliency is None and not args.engines:
        raise InputError("no mask: pass --mask, an image with transparency, or --saliency WEIGHTS")

    from cg4ctr_fast.pipeline import CreativePipeline

    started = time.perf_counter()
    if args.engines:
        pipe = CreativePipeline.from_engines(
            args.engines, backend=args.backend or "onnxruntime", saliency=args.saliency, scheduler=args.scheduler
        )
    else:
        pipe = CreativePipeline.from_preset(
            args.preset,
            model=args.model,
            random_weights=args.random_weights,
            unet_in_channels=args.unet_channels,
            scheduler=args.scheduler,
            saliency=args.saliency,
            lora=args.lora,
            lora_scale=args.lora_scale,
        )
    steps = args.steps or preset.default_steps
    guidance = preset.default_guidance if args.guidance is None else args.guidance
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
            "preset": preset.name,
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
    lifts = summary["mean_true_ctr_lift_of_chosen_by_group"]
    print(
        f"wrote {len(summary['creatives'])} creatives, contact_sheet.png, creatives.json and report.md to "
        f"{args.out} in {summary['seconds']:.0f} s; mean true-CTR lift of the chosen creative "
        f"{sum(lifts.values()) / len(lifts):+.1%} over the original",
        file=sys.stderr,
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "demo":
            return cmd_demo(args)
    except InputError as exc:
        print(f"cg4ctr: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    parser.error(f"unknown command {args.command!r}")
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
