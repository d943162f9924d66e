"""`cg4ctr-export`: validated ONNX folders and TensorRT engines from the torch stack.

    cg4ctr-export onnx --preset tiny --out engines/tiny [--lora FILE --lora-scale 0.8] [--saliency u2netp.pth]
                       [--reward models/reward] [--dtype fp32|fp16] [--batch 1:1:8] [--height 64 --width 64] [--opset 17] [--unet-channels 9]
    cg4ctr-export engine --onnx engines/tiny --out engines/tiny-trt [--refittable] [--timing-cache FILE]
    cg4ctr-export refit --engine engines/tiny-trt --lora FILE [--lora-scale S]
    cg4ctr-export verify engines/tiny [--reward models/reward]
    cg4ctr-export env

Exit codes: 0 done; 1 a component out of tolerance (nothing written); 2 bad input (one line on stderr, nothing
written); 130 interrupted (nothing written: every folder is built beside its target and renamed at the end).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from cg4ctr_fast.cli.main import EXIT_BAD_INPUT, OneLineParser, _quiet_libraries
from cg4ctr_fast.errors import InputError

EXIT_VALIDATION = 1
PROG = "cg4ctr-export"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Export the creative pipeline's components: ONNX, TensorRT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    onnx = sub.add_parser("onnx", help="export every component to ONNX, validated against torch")
    onnx.add_argument("--preset", default="tiny", help="tiny | sd15-inpaint (default: tiny)")
    onnx.add_argument("--model", help="local diffusers folder with the weights")
    onnx.add_argument("--random-weights", action="store_true", help="the preset's architecture with random weights")
    onnx.add_argument("--seed", type=int, default=0, help="weights seed for built-in presets / --random-weights")
    onnx.add_argument("--saliency", help="U2NetP weights (.pth / .safetensors): exports the saliency component")
    onnx.add_argument("--reward", metavar="DIR",
                      help="RewardModel folder (RewardModel.save): exports reward_image and reward_head")
    onnx.add_argument("--lora", help="LoRA to fuse: diffusers .safetensors, kohya .safetensors or a peft folder")
    onnx.add_argument("--lora-scale", type=float, default=1.0)
    onnx.add_argument("--out", required=True, help="output folder (replaced atomically if it is an export folder)")
    onnx.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="precision of the graphs")
    onnx.add_argument("--batch", default="1:1:8", help="creatives per call MIN:OPT:MAX (the UNet gets 2× with guidance)")
    onnx.add_argument("--height", type=int, default=None, help="opt image height (default: the model's resolution)")
    onnx.add_argument("--width", type=int, default=None, help="opt image width (default: the model's resolution)")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--unet-channels", type=int, choices=(4, 9), default=None, help="built-in presets only")
    onnx.add_argument("--components", default=None,
                      help="comma list (default: text_encoder,unet,vae_encoder,vae_decoder[,saliency]"
                           "[,reward_image,reward_head])")

    engine = sub.add_parser("engine", help="TensorRT engines from an ONNX folder (needs an NVIDIA GPU)")
    engine.add_argument("--onnx", required=True, help="folder written by `cg4ctr-export onnx`")
    engine.add_argument("--out", required=True)
    engine.add_argument("--refittable", action="store_true", help="allow `refit` (can be slower; validated)")
    engine.add_argument("--timing-cache", default=None, help="TensorRT timing cache file, read and updated")

    refit = sub.add_parser("refit", help="swap the LoRA of a refittable engine folder without a rebuild")
    refit.add_argument("--engine", required=True)
    refit.add_argument("--lora", required=True)
    refit.add_argument("--lora-scale", type=float, default=1.0)

    verify = sub.add_parser("verify", help="re-check an ONNX folder: hashes, onnx.checker, ONNX Runtime vs torch")
    verify.add_argument("folder")
    verify.add_argument("--model", help="source model folder, when it moved since the export")
    verify.add_argument("--lora", help="the LoRA file, when it moved since the export")
    verify.add_argument("--saliency", help="the saliency weights, when they moved since the export")
    verify.add_argument("--reward", metavar="DIR", help="the RewardModel folder, when it moved since the export")

    sub.add_parser("env", help="library versions and the GPU")
    return parser


def cmd_onnx(args) -> int:
    from cg4ctr_fast.export.contracts import parse_batch, parse_components
    from cg4ctr_fast.export.onnx_export import ExportRequest, export_onnx

    request = ExportRequest(
        out=args.out,
        preset=args.preset,
        model=args.model,
        random_weights=args.random_weights,
        seed=args.seed,
        saliency=args.saliency,
        lora=args.lora,
        lora_scale=args.lora_scale,
        precision=args.dtype,
        batch=parse_batch(args.batch),
        height=args.height,
        width=args.width,
        opset=args.opset,
        unet_channels=args.unet_channels,
        components=parse_components(args.components) if args.components else None,
        reward=args.reward,
    )
    export_onnx(request)
    return 0


def cmd_engine(args) -> int:
    from cg4ctr_fast.export.tensorrt_build import build_engines

    build_engines(args.onnx, args.out, refittable=args.refittable, timing_cache=args.timing_cache)
    return 0


def cmd_refit(args) -> int:
    from cg4ctr_fast.export.tensorrt_build import refit_engines

    refit_engines(args.engine, args.lora, lora_scale=args.lora_scale)
    return 0


def cmd_verify(args) -> int:
    from cg4ctr_fast.export.verify import verify_folder

    verify_folder(args.folder, model=args.model, lora=args.lora, saliency=args.saliency, reward=args.reward)
    return 0


def cmd_env(args) -> int:
    from cg4ctr_fast.export.manifest import gpu_description, library_versions

    for name, version in library_versions(("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime",
                                           "onnxscript", "tensorrt", "triton")).items():
        print(f"{name:<15}{version or 'not installed'}")
    try:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
    except ImportError:
        providers = "-"
    print(f"{'ort providers':<15}{providers}")
    print(f"{'gpu':<15}{gpu_description() or 'none'}")
    return 0


COMMANDS = {"onnx": cmd_onnx, "engine": cmd_engine, "refit": cmd_refit, "verify": cmd_verify, "env": cmd_env}


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    from cg4ctr_fast.export.tensorrt_build import TensorRTUnavailable
    from cg4ctr_fast.export.validate import ValidationFailed

    try:
        return COMMANDS[args.command](args)
    except TensorRTUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValidationFailed as exc:
        print(f"{PROG}: validation failed: {exc}", file=sys.stderr)
        return EXIT_VALIDATION
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
