"""`cg4ctr nearline`: generate, score and store creatives for many products on Ray Data (the `ray` extra).

    cg4ctr nearline --products DIR|FILE.parquet --store out/store [--preset toy|tiny | --model DIR | --engines DIR]
                    [--groups groups.json] [--group-ids 0,3,5] [--images-per-group 1] [--steps N]
                    [--ray-address local|auto|ADDRESS] [--actors 2] [--batch 4] [--gpus-per-actor 1]

Every flag and input is checked before Ray starts (one line, exit 2). Re-running the same command writes only
what the store lacks (the key is product, group, index, model id). Progress: Ray Data's bars; the summary goes
to stderr (and as one JSON object to stdout with --json). Exit 0 when every product was generated or already
stored, 1 when the runtime refused some (each named in the summary).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from cg4ctr_fast.errors import InputError

PROG = "cg4ctr nearline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `nearline` subcommand's flags."""
    parser.add_argument("--products", required=True, metavar="PATH",
                        help="a folder of product images (id = file stem; <stem>.mask.png beside one is its mask), "
                             "or Parquet (a file or a folder of them) with an `image` column of paths/URLs and "
                             "optional product_id, mask, title")
    parser.add_argument("--store", required=True, metavar="DIR", help="creative store folder (created if missing)")
    source = parser.add_argument_group("generator (one of)")
    source.add_argument("--preset", default=None, help="toy: the embedded generator; tiny: random weights")
    source.add_argument("--model", metavar="DIR", help="local diffusers folder (SD 1.x/2.x inpainting)")
    source.add_argument("--engines", metavar="DIR", help="a cg4ctr-export folder (ONNX Runtime or TensorRT)")
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default=None,
                        help="backend for --engines (default: onnxruntime)")
    parser.add_argument("--saliency", metavar="PATH", help="U2NetP weights or folder (default: toy's with --preset "
                        "toy); without one, products need a mask file or transparency")
    parser.add_argument("--reward", metavar="DIR", help="reward model folder (default: the embedded toy one)")
    parser.add_argument("--groups", metavar="FILE", help="user groups, a groups.json (default: the toy world's)")
    parser.add_argument("--group-ids", metavar="IDS", default=None,
                        help="comma-separated group ids to generate for (default: every group in --groups)")
    parser.add_argument("--prompt-model", metavar="DIR", help="prompt model folder (default: the toy one)")
    parser.add_argument("--images-per-group", type=int, default=1, help="creatives per (product, group)")
    parser.add_argument("--seed", type=int, default=0, help="mixed into every creative's derived seed")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's, 20)")
    parser.add_argument("--max-batch", type=int, default=32, help="creatives per denoising batch in one actor")
    parser.add_argument("--ray-address", default="local",
                        help="local: start Ray in this process; auto: join the cluster `ray start` made on this "
                             "node; or a Ray address (ray://host:10001)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="with --ray-address local: logical CPUs Ray may use (default: every core)")
    parser.add_argument("--actors", type=int, default=2, help="actor pool size (one CreativeRuntime each)")
    parser.add_argument("--batch", type=int, default=4, help="products per task (one map_batches batch)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (1 on GPU clusters)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor")
    parser.add_argument("--images-url", default=None, metavar="URL",
                        help="where actors write the PNG files, any fsspec URL every node can reach (default: the "
                             "store's images/ folder, for a single machine)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_flags(args) -> tuple[str, ...]:
    for flag, value in (("--actors", args.actors), ("--batch", args.batch), ("--max-batch", args.max_batch),
                        ("--images-per-group", args.images_per_group)):
        if value <= 0:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if args.max_batch > 64:
        raise InputError(f"--max-batch {args.max_batch} is over the 64 creatives one denoising batch holds")
    if args.steps is not None and args.steps <= 0:
        raise InputError(f"--steps must be a positive integer, got {args.steps}")
    if not 0 <= args.seed < 2**63:
        raise InputError(f"--seed must be from 0 to 2**63 - 1, got {args.seed}")
    for flag, value in (("--gpus-per-actor", args.gpus_per_actor), ("--cpus-per-actor", args.cpus_per_actor)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"{flag} must be a number ≥ 0, got {value}")
    if args.num_cpus is not None and args.num_cpus <= 0:
        raise InputError(f"--num-cpus must be a positive integer, got {args.num_cpus}")
    address = args.ray_address.strip()
    # Ray's own forms: local, auto, ray://host:port (Ray Client) or host:port (a cluster's GCS). Anything else
    # fails inside ray.init with a ValueError; an unreachable address makes ray.init retry for minutes.
    if not (address in ("local", "auto") or re.fullmatch(r"(ray://)?[A-Za-z0-9._\-\[\]:]+:\d{1,5}", address)):
        raise InputError(f"--ray-address {args.ray_address!r}: want local, auto, ray://HOST:PORT or HOST:PORT")
    if args.images_url:
        import fsspec

        protocol = fsspec.core.split_protocol(args.images_url)[0] or "file"
        try:
            fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as exc:
            raise InputError(f"--images-url {args.images_url}: {' '.join(str(exc).split())}") from None
    if args.gpus_per_actor > 0 and address == "local":
        import torch

        if torch.cuda.device_count() == 0:  # a local Ray would keep the actors pending forever
            raise InputError("--gpus-per-actor: this machine has no CUDA GPU; a local Ray cannot place the actors "
                             "(use --ray-address auto on a GPU cluster)")
    store = Path(args.store)
    if store.exists() and not store.is_dir():
        raise InputError(f"--store {args.store}: is a file, expected a folder")
    if args.group_ids is None:
        return ()
    ids = tuple(g.strip() for g in args.group_ids.split(","))
    if not all(ids):
        raise InputError(f"--group-ids {args.group_ids!r}: an empty group id")
    if len(set(ids)) != len(ids):
        raise InputError(f"--group-ids {args.group_ids!r}: a group id given twice")
    return ids


def build_job(args):
    """The checked `NearlineJob` for these flags; InputError (one line) for any bad input. No Ray, no weights."""
    from cg4ctr_fast.serving.sources import check_reward, check_source
    from cg4ctr_fast.serving.nearline import NearlineJob, list_products, model_id_for
    from cg4ctr_fast.serving.runtime import _load_groups

    wanted = _check_flags(args)
    list_products(args.products)
    source = check_source(args)
    reward, groups, prompt = check_reward(args)
    config = json.loads((Path(reward) / "config.json").read_text(encoding="utf-8"))
    known, _ = _load_groups(groups, int(config.get("group_dim", 1)))
    if wanted:
        unknown = [g for g in wanted if g not in known]
        if unknown:
            raise InputError(f"--group-ids: unknown group id {unknown[0]!r}; known: {', '.join(known[:10])}"
                             + (" …" if len(known) > 10 else ""))
    if prompt is None:
        raise InputError("no prompt model: pass --prompt-model DIR (nearline proposes one prompt per group)")
    return NearlineJob(
        products=args.products, store=args.store, source=source, reward=reward, groups=groups, prompt_model=prompt,
        group_ids=tuple(wanted or known), model_id=model_id_for(source), images_per_group=args.images_per_group,
        seed=args.seed, steps=args.steps, max_batch=args.max_batch, actors=args.actors, batch=args.batch,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, images_url=args.images_url)


def run(args) -> int:
    """Check, start Ray, run the job, print the summary; the exit code."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise InputError(f"cg4ctr nearline needs the ray extra ({exc.name} is missing): pip install "
                         "'cg4ctr_fast[ray]'") from None
    from cg4ctr_fast.serving.nearline import init_ray, run_nearline

    job = build_job(args)
    init_ray(args.ray_address, num_cpus=args.num_cpus)
    summary = run_nearline(job, progress=not args.quiet)
    for line in summary.lines():
        print(f"{PROG}: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.to_dict()))
    return 1 if summary.refused else 0
