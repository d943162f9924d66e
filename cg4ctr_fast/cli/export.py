"""`cg4ctr-export`: validated ONNX folders and TensorRT engines from the torch stack.

    cg4ctr-export onnx --preset tiny --out engines/tiny [--lora FILE --lora-scale 0.8 ...] [--saliency u2netp.pth]
                       [--reward models/reward] [--dtype fp32|fp16] [--batch 1:1:8] [--height 64:64:128]
                       [--width 64] [--opset 17] [--unet-channels 9] [--overwrite]
    cg4ctr-export onnx --recipe export/sd15-inpaint-h100.toml --model DIR --out engines/sd15 [--dtype fp32 ...]
    cg4ctr-export engine --engines engines/tiny --out engines/tiny-trt [--refittable] [--timing-cache FILE]
    cg4ctr-export refit --engines engines/tiny-trt --lora FILE [--lora-scale S]
    cg4ctr-export verify --engines engines/tiny [--model DIR] [--lora FILE ...] [--saliency FILE] [--reward DIR]
    cg4ctr-export env

One name for an engine folder: `--engines DIR` names a folder to read, ONNX (`cg4ctr-export onnx`) or TensorRT
(`cg4ctr-export engine`), in every command (`cg4ctr generate --engines`, `cg4ctr-bench --engines`); `--out`
names a folder to write. The older `engine --onnx`, `refit --engine` and `verify FOLDER` still work, hidden.

Several LoRAs: repeat --lora (and --lora-scale, paired by position; none = all 1.0), e.g. an LCM-LoRA with a
style LoRA: `--lora lcm.safetensors --lora style.safetensors --lora-scale 1.0 --lora-scale 0.8`. They are fused
together through diffusers' set_adapters + fuse_lora (cg4ctr_fast.export.lora.fuse_loras). `refit` swaps in one.

Recipes (`--recipe FILE`, cg4ctr_fast.export.recipe): a TOML file of one target's settings under the flags' own
names (export/*.toml in the repository). A flag given on the command line overrides its key: which flags were
given is read from the command line itself (`given_options`), so `--dtype fp32` overrides a recipe's fp16 even
though fp32 is the flag's default. The manifest records the recipe (path, sha256, keys, overridden keys).

Exit codes: 0 done; 1 a component out of tolerance, or an internal error (one line naming the file with the
traceback; --debug prints it); 2 bad input: arguments, a missing/modified/truncated file, a source that is not
the one exported (one line on stderr, nothing written); 130 interrupted (nothing written: every folder is built
beside its target and renamed at the end). An existing non-empty --out is refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from cg4ctr_fast.cli.common import EXIT_INTERNAL, OneLineParser, complete_parser, make_parser, run_cli
from cg4ctr_fast.cli.main import MAX_CREATIVES
from cg4ctr_fast.fileio import check_out_dir
from cg4ctr_fast.errors import InputError

EXIT_VALIDATION = EXIT_INTERNAL  # out of tolerance: not the user's input, but nothing is written either
PROG = "cg4ctr-export"
ENGINES_HELP = "engine folder to read: written by `cg4ctr-export onnx` (or `engine`)"


def _engines_flag(parser: argparse.ArgumentParser, help_text: str, *old: str) -> None:
    """--engines DIR, plus the command's older spellings as hidden aliases of the same value."""
    parser.add_argument("--engines", metavar="DIR", default=None, help=help_text)
    for flag in old:
        parser.add_argument(flag, dest="engines_alias", metavar="DIR", default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Export the creative pipeline's components: ONNX, TensorRT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    onnx = sub.add_parser("onnx", help="export every component to ONNX, validated against torch")
    onnx.add_argument("--preset", default="tiny",
                      help="tiny | sd15-inpaint | toy (the demo's trained generator and saliency, as --model)")
    onnx.add_argument("--model", help="local diffusers folder with the weights (recorded by its content hash)")
    onnx.add_argument("--random-weights", action="store_true", help="the preset's architecture with random weights")
    onnx.add_argument("--seed", type=int, default=0, help="weights seed for built-in presets / --random-weights")
    onnx.add_argument("--saliency", help="U2NetP weights (.pth / .safetensors, or a cg4ctr-train saliency folder): exports the saliency component")
    onnx.add_argument("--reward", metavar="DIR",
                      help="RewardModel folder (RewardModel.save): exports reward_image and reward_head")
    onnx.add_argument("--lora", action="append", default=None,
                      help="LoRA to fuse: diffusers .safetensors, kohya .safetensors or a peft folder; repeat to "
                           "fuse several together")
    onnx.add_argument("--lora-scale", type=float, action="append", default=None,
                      help="scale of each --lora, paired by position (default: 1.0 for all)")
    onnx.add_argument("--out", required=True, help="output folder, written atomically")
    onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, at the end)")
    onnx.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="precision of the graphs")
    onnx.add_argument("--batch", default="1:1:8", help="creatives per call MIN:OPT:MAX, MAX at most "
                      f"{MAX_CREATIVES} (the UNet gets 2× with guidance)")
    onnx.add_argument("--height", default=None, metavar="MIN:OPT:MAX",
                      help="image height in pixels, MIN:OPT:MAX or one number (fixed); multiples of 8 "
                           "(default: 8:R:R, R = the model's resolution)")
    onnx.add_argument("--width", default=None, metavar="MIN:OPT:MAX",
                      help="image width in pixels, as --height (default: 8:R:R)")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (14..20)")
    onnx.add_argument("--unet-channels", type=int, choices=(4, 9), default=None, help="built-in presets only")
    onnx.add_argument("--components", default=None,
                      help="comma list (default: text_encoder,unet,vae_encoder,vae_decoder[,saliency]"
                           "[,reward_image,reward_head])")
    onnx.add_argument("--recipe", metavar="FILE", default=None,
                      help="TOML file of a target's settings (export/*.toml: preset, dtype, batch, height, width, "
                           "opset, components, ...); a flag given here overrides its key")

    engine = sub.add_parser("engine", help="TensorRT engines from an ONNX folder (needs an NVIDIA GPU)")
    _engines_flag(engine, "ONNX engine folder to build from (written by `cg4ctr-export onnx`)", "--onnx")
    engine.add_argument("--out", required=True, help="TensorRT engine folder to write")
    engine.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (atomically, at the end)")
    engine.add_argument("--refittable", action="store_true", help="allow `refit` (can be slower; validated)")
    engine.add_argument("--timing-cache", default=None, help="TensorRT timing cache file, read and updated")

    refit = sub.add_parser("refit", help="swap the LoRA of a refittable engine folder without a rebuild")
    _engines_flag(refit, "TensorRT engine folder built with --refittable (replaced atomically)", "--engine")
    refit.add_argument("--lora", action="append", required=True, help="the new LoRA file or peft folder (one)")
    refit.add_argument("--lora-scale", type=float, action="append", default=None, help="LoRA scale (default: 1.0)")

    verify = sub.add_parser("verify", help="re-check an ONNX folder: every file's sha256, onnx.checker, "
                                           "ONNX Runtime vs torch")
    _engines_flag(verify, "ONNX engine folder to verify")
    verify.add_argument("folder", nargs="?", default=None, help=argparse.SUPPRESS)  # the older positional form
    verify.add_argument("--model", help="the source model folder, when it moved (checked by content hash)")
    verify.add_argument("--lora", action="append", default=None,
                        help="a LoRA, when it moved (checked by sha256); repeat for several")
    verify.add_argument("--saliency", help="the saliency weights, when they moved (checked by sha256)")
    verify.add_argument("--reward", metavar="DIR", help="the RewardModel folder, when it moved (checked by sha256)")

    sub.add_parser("env", help="library versions and the GPU")
    return parser


def onnx_actions() -> dict[str, argparse.Action]:
    """The `onnx` command's options by dest (e.g. "dtype"): their types, choices and flags, which recipes reuse."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["onnx"]._actions if a.option_strings}


def given_options(argv: Sequence[str]) -> frozenset[str]:
    """The dests of the options `argv` gives explicitly, whatever their value (argparse fills in the rest).

    Parsed again with every default suppressed, so an absent option leaves no attribute: `--dtype fp32` is
    given even though fp32 is the default. Call it on an argv that already parsed (it cannot fail then).
    """
    parser = complete_parser(build_parser())
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return frozenset(vars(parser.parse_args(list(argv))))


def check_batch(text: str) -> tuple[int, int, int]:
    """--batch MIN:OPT:MAX (or one number) → three ints, MAX at most MAX_CREATIVES; InputError (one line)."""
    from cg4ctr_fast.export.contracts import parse_batch

    batch = parse_batch(text)
    if batch[2] > MAX_CREATIVES:
        # One call's creatives share one denoising batch; `cg4ctr generate` makes at most this many per command.
        raise InputError(f"--batch max must be at most {MAX_CREATIVES} creatives per call (the most one "
                         f"`cg4ctr generate` makes), got {batch[2]}")
    return batch


def check_preset(name: str) -> str:
    """--preset: a built-in preset, or toy (the demo's trained tiny stack); InputError (one line) otherwise."""
    from cg4ctr_fast.config import PRESETS

    if name != "toy" and name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(sorted([*PRESETS, 'toy']))}")
    return name


def read_recipe(path: str):
    """The recipe file at `path`, checked with this command's own flag definitions and checks
    (:func:`cg4ctr_fast.export.recipe.load_recipe`); InputError (one line) for a bad recipe."""
    from cg4ctr_fast.export.recipe import load_recipe

    return load_recipe(path, onnx_actions(), {"batch": check_batch, "preset": check_preset})


def apply_recipe(args, given: frozenset[str]) -> dict[str, Any]:
    """Fill `args` from the --recipe file: each key the command line did not give (`given`); returns the
    manifest's "recipe" section (path, sha256, keys, overridden). InputError (one line) for a bad recipe, and
    for --saliency / --reward with recipe components that leave them out (they would be dropped silently)."""
    from cg4ctr_fast.export.contracts import REWARD_COMPONENTS
    from cg4ctr_fast.export.manifest import recipe_record

    recipe = read_recipe(args.recipe)
    for key, value in recipe.flag_values().items():
        if key not in given:
            setattr(args, key, value)
    if recipe.components is not None and "components" not in given:
        for flag, value, names in (("--saliency", args.saliency, ("saliency",)),
                                   ("--reward", args.reward, REWARD_COMPONENTS)):
            if value and not set(names) & set(recipe.components):
                wanted = ",".join((*recipe.components, *names))
                raise InputError(f"{args.recipe}: key 'components' leaves out {', '.join(names)}, but {flag} was "
                                 f"given: pass --components {wanted} (or drop {flag})")
    overridden = [key for key in recipe.settings() if key in given]
    return recipe_record(str(args.recipe), recipe.sha256, recipe.settings(), overridden)


def engines_arg(args) -> str:
    """The one engine folder the command reads: --engines, or an older spelling; two different ones clash."""
    given = [v for v in (args.engines, getattr(args, "engines_alias", None), getattr(args, "folder", None)) if v]
    if not given:
        raise InputError(f"{args.command}: --engines DIR is required (the engine folder to read)")
    if len(set(given)) > 1:
        raise InputError(f"{args.command}: two engine folders given ({' and '.join(given)}); pass one --engines DIR")
    return given[0]


def lora_args(args) -> list[tuple[str, float]]:
    """The (path, scale) pairs of the repeated --lora / --lora-scale flags, paired by position.

    No --lora-scale means 1.0 for every LoRA; otherwise one finite scale per --lora (check_scale). InputError
    (one line) for a --lora-scale without a --lora (alone it would do nothing) or counts that differ.
    """
    from cg4ctr_fast.export.lora import check_scale

    loras, scales = list(getattr(args, "lora", None) or []), list(args.lora_scale or [])
    if scales and not loras:
        raise InputError("--lora-scale needs --lora FILE (the LoRA it scales)")
    for scale in scales:
        check_scale(scale)
    if scales and len(scales) != len(loras):
        raise InputError(f"{len(scales)} --lora-scale for {len(loras)} --lora: give one scale per --lora, in the "
                         "same order, or none (all 1.0)")
    return list(zip(loras, scales or [1.0] * len(loras)))


def _toy_request(args) -> None:
    """--preset toy: the demo's trained toy generator, as `cg4ctr generate --preset toy` runs it.

    It is the tiny stack with trained weights, so it is exported as --model (its folder, recorded by content
    hash) with --preset tiny, and its saliency net unless --saliency names another. InputError (one line) when
    it is not trained yet, or with flags that build a preset's own weights.
    """
    from cg4ctr_fast.cli.main import _toy_folders

    clashing = [flag for flag, value in (("--model", args.model), ("--random-weights", args.random_weights),
                                         ("--unet-channels", args.unet_channels)) if value]
    if clashing:
        raise InputError(f"--preset toy is the demo's trained generator; {', '.join(clashing)} do not apply")
    generator, saliency = _toy_folders()
    args.preset, args.model = "tiny", str(generator)
    if args.saliency is None:
        args.saliency = str(saliency)


def cmd_onnx(args) -> int:
    from cg4ctr_fast.export.contracts import parse_components, parse_side
    from cg4ctr_fast.export.onnx_export import ExportRequest, export_onnx

    recipe = None
    if getattr(args, "recipe", None) is not None:
        # main() records which flags the command line gave; without that record every recipe key applies.
        recipe = apply_recipe(args, getattr(args, "given_options", frozenset()))
    loras = lora_args(args)
    batch = check_batch(args.batch)
    check_preset(args.preset)
    # "" is a list of no components, not the default set (None: the flag was not given).
    components = parse_components(args.components) if args.components is not None else None
    if args.preset == "toy":
        _toy_request(args)
    request = ExportRequest(
        out=args.out,
        preset=args.preset,
        model=args.model,
        random_weights=args.random_weights,
        seed=args.seed,
        saliency=args.saliency,
        # One LoRA as before (lora/lora_scale); several fused together (loras).
        lora=loras[0][0] if len(loras) == 1 else None,
        lora_scale=loras[0][1] if len(loras) == 1 else 1.0,
        loras=tuple(loras) if len(loras) > 1 else (),
        precision=args.dtype,
        batch=batch,
        height=parse_side(args.height, "--height"),
        width=parse_side(args.width, "--width"),
        opset=args.opset,
        unet_channels=args.unet_channels,
        components=components,
        reward=args.reward,
        overwrite=args.overwrite,
        recipe=recipe,
    )
    export_onnx(request)
    return 0


def cmd_engine(args) -> int:
    from cg4ctr_fast.export.tensorrt_build import build_engines

    source = engines_arg(args)
    check_out_dir(args.out, overwrite=args.overwrite)
    build_engines(source, args.out, refittable=args.refittable, timing_cache=args.timing_cache)
    return 0


def cmd_refit(args) -> int:
    from cg4ctr_fast.export.tensorrt_build import refit_engines

    loras = lora_args(args)
    if len(loras) > 1:
        raise InputError(f"refit swaps in one LoRA, {len(loras)} given: fuse several at export "
                         "(cg4ctr-export onnx --lora A --lora B, then cg4ctr-export engine)")
    refit_engines(engines_arg(args), loras[0][0], lora_scale=loras[0][1])
    return 0


def cmd_verify(args) -> int:
    from cg4ctr_fast.export.verify import verify_folder

    verify_folder(engines_arg(args), model=args.model, lora=args.lora, saliency=args.saliency, reward=args.reward)
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
    from cg4ctr_fast.export.validate import ValidationFailed

    argv = list(sys.argv[1:] if argv is None else argv)

    def dispatch(args) -> int:
        if args.command == "onnx" and args.recipe is not None:
            args.given_options = given_options(argv)  # recipe keys yield to these flags only
        # TensorRTUnavailable is an InputError: run_cli prints it as `cg4ctr-export: error: ...`, exit 2.
        return COMMANDS[args.command](args)

    return run_cli(PROG, build_parser(), dispatch, argv,
                   extra_errors=((ValidationFailed, EXIT_VALIDATION, "validation failed"),))


if __name__ == "__main__":
    sys.exit(main())
