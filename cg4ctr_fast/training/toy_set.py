"""The shipped toy set: the embedded default's trained models as one folder + manifest.json in the package.

`cg4ctr-train toy --out DIR` trains every toy model through `build_toy_models` (or reuses the cached ones of
the same configuration) and writes DIR with `export_toy_set`:

    DIR/
      manifest.json   format, package version, the command, the ToyConfig and its key, the world seed and the
                      equivalent `cg4ctr-sim logs` command, and per file its sha256, size and stored dtype
      config.json     the ToyConfig
      generator/ saliency/ reward/ prompt/   as `build_toy_models` writes them
      world/          world.json, groups.json and the three tables; not the PNGs under products/, masks/ and
                      creatives/ (only reward training reads them; 2.3 MB of the default set)

What changes on the way, and why:
- float32 weights are stored as float16 in the files of `FP16_FILES` (halves them). The loaders build
  float32 modules and copy these values in, so every computation stays float32; what fp16 storage changed
  in the demo's outputs was measured (README, "Presets and weights") before a file was put on this list.
- the generator's tokenizer is written as vocab.json + merges.txt (1.5 MB) instead of transformers' single
  tokenizer.json (3.6 MB), when `convert_bpe` of CLIP's merge list tokenizes every caption word of the
  world to the same ids; otherwise tokenizer.json is kept as it is.

`resolve_toy_models(config)` is the loader: the shipped set when its manifest's key is the config's key
(every file checked against its sha256 and size first: a changed file is one InputError naming it), else
the cache folder as `build_toy_models` writes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

from cg4ctr_fast.errors import InputError

FORMAT = "cg4ctr-toy-set"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Where the package keeps its shipped set; CG4CTR_TOY_SET names another folder (an empty or missing one:
# no shipped set, the cache is used as before the set shipped).
PACKAGE_SET = Path(__file__).resolve().parents[1] / "assets" / "toy"
ENV_SET = "CG4CTR_TOY_SET"
# Weight files stored as float16 (10.9 MB of the toy-v2 set instead of 21.7 MB as float32). Measured on the toy-v2
# set (`cg4ctr demo` as `make demo` runs it: 4 held-out products × 8 groups × 4 images, 20 steps), fp16-stored vs the
# float32 build: the same prompts, the same 21 creatives served and 11 originals kept; aggregate true-CTR lift
# −4.6465 % vs −4.6393 %; rewards within 2.9e-5 (relative 7.8e-4); creative pixels within 2/255 (3.5 % of pixels
# differ); object expansion within 1.0e-3 of the image. A later retrain whose outputs move materially keeps that
# file off this list (it is then copied as float32).
FP16_FILES = (
    "generator/unet/diffusion_pytorch_model.safetensors",
    "generator/vae/diffusion_pytorch_model.safetensors",
    "generator/text_encoder/model.safetensors",
    "saliency/saliency.safetensors",
    "reward/model.safetensors",
    "prompt/model.safetensors",
)
# Parts made from the core set after it, each by its own command (run in this order on the written set, {out}
# its folder): the LCM-LoRA, the tiny preview decoder, and the planner's quality table (measured with both).
# Their files join the manifest's "files" and each is described under "extras" (`register_extras`).
EXTRAS = (
    ("lcm_lora", "cg4ctr-train lcm --model {out}/generator --data {out}/world --out {out}/lcm_lora --steps 1100 "
                 "--threads 1 --save-dtype float16"),
    ("taesd", "cg4ctr-train taesd --model {out}/generator --data {out}/world --out {out}/taesd --steps 2500 "
              "--images 1024 --generated 2048 --save-dtype float16"),
    ("quality.json", "cg4ctr-bench --pareto --groups 1,8 --runs 5 --products 8 --json pareto.json "
                     "--quality-out {out}/quality.json"),
)
EXTRA_FP16_FILES = ("lcm_lora/pytorch_lora_weights.safetensors", "taesd/diffusion_pytorch_model.safetensors")
# Folders of the build that no shipped command reads: the world's images (reward training only).
LEFT_OUT = ("world/products", "world/masks", "world/creatives")
# fp16's largest finite value: a weight past it cannot be stored as fp16.
FP16_MAX = 65504.0

Log = Callable[[str], Any]


def shipped_set_dir() -> Path:
    return Path(os.environ.get(ENV_SET) or PACKAGE_SET)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> Optional[dict]:
    """The set's manifest, or None when `root` holds none; InputError when it is unreadable."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the toy set's manifest: {' '.join(str(exc).split())}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise InputError(f"{path}: not a {FORMAT} manifest")
    return manifest


def verify_toy_set(root: Path) -> dict:
    """Check every file the manifest lists against its size and sha256; returns the manifest.

    InputError, one line naming the first file that is missing or differs (hashing the default set, 13 MB,
    takes ~0.03 s)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise InputError(f"{root}: not a toy set (no {MANIFEST})")
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            raise InputError(f"{path}: missing from the toy set ({root / MANIFEST} lists it); reinstall the package "
                             f"or rebuild the set with `cg4ctr-train toy --out {root}`")
        if path.stat().st_size != entry.get("size") or _sha256(path) != entry.get("sha256"):
            raise InputError(f"{path}: does not match its sha256 in {root / MANIFEST} (the file was changed); "
                             f"reinstall the package or rebuild the set with `cg4ctr-train toy --out {root}`")
    return manifest


def shipped_toy_root(config) -> Optional[Path]:
    """The shipped set's folder when it was made with `config` (its key), verified; else None."""
    root = shipped_set_dir()
    manifest = read_manifest(root)
    if manifest is None or manifest.get("config_key") != config.key():
        return None
    verify_toy_set(root)
    return root


def resolve_toy_root(config) -> Path:
    """Where the toy models of `config` are read from: the shipped set when it matches, else the cache."""
    from cg4ctr_fast.training import toy

    return shipped_toy_root(config) or toy.toy_root(config)


def resolve_toy_models(config, *, cache: Optional[Path] = None, retrain: bool = False, progress: bool = True,
                       log: Log = print):
    """The toy models of `config`: the shipped set when it matches (no training; not with `cache` or `retrain`),
    else `build_toy_models` (trains what the cache lacks, reuses the rest)."""
    from cg4ctr_fast.training.toy import ToyModels, build_toy_models

    root = None if (retrain or cache is not None) else shipped_toy_root(config)
    if root is None:
        return build_toy_models(config, cache=cache, progress=progress, log=log)
    return ToyModels(root=root, world=root / "world", generator=root / "generator", saliency=root / "saliency",
                     reward=root / "reward", prompt=root / "prompt")


# --------------------------------------------------------------------------------------------
# writing a set
# --------------------------------------------------------------------------------------------

def fp16_copy(src: Path, dst: Path) -> dict[str, Any]:
    """Write the safetensors file `src` to `dst` with its float32 tensors as float16 (others and the metadata
    unchanged). Returns {"tensors", "converted", "max_abs_error", "max_rel_error"} over the converted values.
    InputError when a value is past fp16's range."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    from cg4ctr_fast.fileio import atomic_write_bytes

    tensors, converted, max_abs, max_rel = {}, 0, 0.0, 0.0
    with safe_open(str(src), framework="pt") as handle:
        metadata = handle.metadata()
        for key in handle.keys():
            value = handle.get_tensor(key)
            if value.dtype == torch.float32:
                if value.numel() and float(value.abs().max()) > FP16_MAX:
                    raise InputError(f"{src}: tensor {key} has values past float16's range; keep this file float32")
                half = value.to(torch.float16)
                error = (half.float() - value).abs()
                if value.numel():
                    max_abs = max(max_abs, float(error.max()))
                    # Relative error on values ≥ 1e-4: below that fp16 is subnormal and only the absolute error means much.
                    big = value.abs() >= 1e-4
                    if big.any():
                        max_rel = max(max_rel, float((error[big] / value.abs()[big]).max()))
                value = half
                converted += 1
            tensors[key] = value.contiguous()
    atomic_write_bytes(dst, save(tensors, metadata=metadata))
    return {"tensors": len(tensors), "converted": converted, "max_abs_error": max_abs, "max_rel_error": max_rel}


def _slim_tokenizer(src: Path, dst: Path, vocabulary: dict) -> bool:
    """Write CLIP's tokenizer as vocab.json + merges.txt into `dst` when it gives the ids of the tokenizer in
    `src` on every caption word of the world (and a full caption); False (nothing written) otherwise."""
    from cg4ctr_fast.models.tokenizer import convert_bpe, find_bpe_file, load_clip_tokenizer

    try:
        bpe = find_bpe_file()
    except InputError:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        slim = convert_bpe(bpe, Path(tmp) / "tokenizer")
        a, b = load_clip_tokenizer(src), load_clip_tokenizer(slim)
        words = [w for tokens in vocabulary.values() for w in tokens]
        texts = words + [" ".join(words), "", "a photo of a product, 100% OK!"]
        if any(a(t).input_ids != b(t).input_ids for t in texts):
            return False
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copyfile(slim / name, dst / name)
    return True


def reference_outputs(root: Path) -> dict:
    """What the set's prompt and reward models give on the first held-out product for every group: the
    prompt model's proposals and the reward model's calibrated CTR of the product photo with them. Stored in
    the manifest from the float32 build, so a test can check the stored (fp16) weights still give them."""
    import numpy as np

    from cg4ctr_fast.models.prompt import PromptModel
    from cg4ctr_fast.models.reward import RewardModel
    from cg4ctr_fast.sim import load_dataset
    from cg4ctr_fast.training.toy import HELD_OUT_ITEM_BASE, item_features_for

    root = Path(root)
    dataset = load_dataset(root / "world")
    product = dataset.world.product(HELD_OUT_ITEM_BASE)
    groups = np.stack([np.asarray(g["features"], dtype=np.float32) for g in dataset.groups])
    item = item_features_for(dataset.world, HELD_OUT_ITEM_BASE, dataset.items)
    prompts = PromptModel.load(root / "prompt").propose(groups, np.repeat(item[None], len(groups), axis=0))
    rewards = RewardModel.load(root / "reward").score_images([product.image] * len(groups),
                                                             [product.title] * len(groups), prompts, groups)
    return {"item_id": HELD_OUT_ITEM_BASE, "prompts": list(prompts), "reward_ctr": [float(r) for r in rewards]}


def export_toy_set(src: Path, out: Path, config, *, command: str, fp16: tuple[str, ...] = FP16_FILES,
                   log: Log = print) -> dict:
    """Write the set built in `src` (a `build_toy_models` folder of `config`) to `out`, atomically, with its
    manifest. Returns the manifest."""
    from cg4ctr_fast import __version__ as package_version
    from cg4ctr_fast.fileio import atomic_dir
    from cg4ctr_fast.training.toy import TOY_VERSION

    src = Path(src)
    world = json.loads((src / "world" / "world.json").read_text())
    with atomic_dir(out) as tmp:
        notes: dict[str, Any] = {}
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue  # a temporary file of an interrupted build
            if any(rel.startswith(prefix + "/") for prefix in LEFT_OUT):
                continue
            if rel.startswith("generator/tokenizer/"):
                continue  # written below
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if rel in fp16:
                notes[rel] = fp16_copy(path, target)
            else:
                shutil.copyfile(path, target)
        tokenizer_src, tokenizer_dst = src / "generator" / "tokenizer", tmp / "generator" / "tokenizer"
        if tokenizer_src.is_dir():
            if _slim_tokenizer(tokenizer_src, tokenizer_dst, world.get("vocabulary", {})):
                notes["generator/tokenizer"] = "CLIP's BPE as vocab.json + merges.txt (convert_bpe): same ids"
            else:
                shutil.copytree(tokenizer_src, tokenizer_dst)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            files[rel] = {"sha256": _sha256(path), "size": path.stat().st_size}
            if rel in notes:
                files[rel]["stored"] = "float16 (float32 tensors converted; loaded back into float32 modules)"
                files[rel]["fp16_conversion"] = notes[rel]
        commands = {
            "set": command,
            "world": (f"cg4ctr-sim logs --out world --seed {config.seed} --products {config.products} "
                      f"--creatives-per-product {config.creatives_per_product} --days {config.days}"),
        }
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "package_version": package_version,
            "toy_version": TOY_VERSION,
            "config_key": config.key(),
            "config": asdict(config),
            "world_seed": int(world.get("seed", config.seed)),
            "world_fingerprint": world.get("fingerprint"),
            "commands": commands,
            "trained_by": ("cg4ctr_fast.training.toy.build_toy_models(config): the world by sim.write_dataset (as "
                           "commands.world), saliency by training.saliency.train_saliency, reward by "
                           "training.reward.train_reward, prompt by training.toy.train_prompt_on_dataset, the "
                           "generator by training.base.train_generator, its steering.json by "
                           "training.toy.steering_effect"),
            "left_out": [f"{p}/" for p in LEFT_OUT],
            # From the build's float32 weights (before the fp16 conversion): tests/test_toy_set.py checks them.
            "reference_outputs": reference_outputs(src),
            "notes": {k: v for k, v in notes.items() if isinstance(v, str)},
            "total_bytes": sum(f["size"] for f in files.values()),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"[toy] wrote {out}: {len(files)} files, {manifest['total_bytes'] / 1e6:.1f} MB, manifest.json")
    return manifest


def register_extras(root: Path, commands: dict[str, str], *, log: Log = print) -> dict:
    """Add the `EXTRAS` present under `root` to its manifest, atomically: every file's sha256 and size under
    "files", and manifest["extras"][name] = {"command": commands[name], "files": [...]}; "total_bytes" updated.

    commands: the exact command that made each extra (name → text); an extra present without one, or a name
    that is not in `EXTRAS`, is an InputError. Returns the new manifest. Raises InputError when `root` holds no
    manifest or a listed core file no longer matches it (`verify_toy_set`)."""
    from cg4ctr_fast.fileio import atomic_write_bytes

    root = Path(root)
    manifest = verify_toy_set(root)
    names = [name for name, _ in EXTRAS]
    unknown = sorted(set(commands) - set(names))
    if unknown:
        raise InputError(f"register_extras: {unknown[0]!r} is not an extra of the toy set ({', '.join(names)})")
    files = {rel: entry for rel, entry in manifest["files"].items()
             if not any(rel == n or rel.startswith(n + "/") for n in names)}
    extras = {}
    for name in names:
        path = root / name
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        if not members:
            continue
        if name not in commands:
            raise InputError(f"register_extras: {path} is present but no command says how it was made")
        rels = [m.relative_to(root).as_posix() for m in members]
        for member, rel in zip(members, rels):
            files[rel] = {"sha256": _sha256(member), "size": member.stat().st_size}
            if rel in EXTRA_FP16_FILES:
                files[rel]["stored"] = "float16 (written so by its trainer's --save-dtype float16)"
        extras[name] = {"command": commands[name], "files": rels}
    manifest = dict(manifest, files=dict(sorted(files.items())), extras=extras,
                    total_bytes=sum(f["size"] for f in files.values()))
    atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    log(f"[toy] {root / MANIFEST}: extras {', '.join(extras) or 'none'}; {len(files)} files, "
        f"{manifest['total_bytes'] / 1e6:.1f} MB")
    return manifest
