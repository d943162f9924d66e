"""CLIP's BPE tokenizer without a hub.

SD1.x uses CLIP ViT-L/14's byte-level BPE (49,408 tokens). Its merge list ships inside the
`open_clip_torch` wheel as `bpe_simple_vocab_16e6.txt.gz` (install that wheel with `--no-deps`: its
imports need torchvision, which must not be installed beside this torch). We convert it offline into the
`vocab.json` + `merges.txt` folder that `transformers.CLIPTokenizer.from_pretrained` reads.

A model folder that carries its own `tokenizer/` (every diffusers SD checkpoint does) never needs this.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
from pathlib import Path

from cg4ctr_fast.errors import InputError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49,152 - 256 - 2 = 48,894 merges: 256 byte symbols, their 256 end-of-word forms,
# the merges, and two special tokens make 49,408.
N_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's reversible byte → printable character table (GPT-2 / CLIP convention)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    # Order matters: token ids follow this table's insertion order (printable bytes first), so
    # "a</w>" gets CLIP's id 320.
    table = {b: chr(b) for b in printable}
    offset = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + offset)
            offset += 1
    return table


def find_bpe_file() -> Path:
    """Locate CLIP's merge list: $CG4CTR_CLIP_BPE, else inside the installed open_clip_torch wheel."""
    env = os.environ.get("CG4CTR_CLIP_BPE")
    if env:
        path = Path(env)
        if not path.is_file():
            raise InputError(f"CG4CTR_CLIP_BPE={env}: no such file")
        return path
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            "no CLIP tokenizer available: install it with `pip install --no-deps open_clip_torch` "
            "(carries CLIP's BPE file), set CG4CTR_CLIP_BPE, or load a model folder that has tokenizer/"
        ) from None
    for file in dist.files or []:
        if file.name == BPE_FILE_NAME:
            return Path(dist.locate_file(file))
    raise InputError(f"open_clip_torch is installed but carries no {BPE_FILE_NAME}")


def convert_bpe(bpe_file: Path, out_dir: Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for transformers' CLIPTokenizer."""
    with gzip.open(bpe_file, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    # Line 0 is a version header; the merges follow.
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_symbols = list(bytes_to_unicode().values())
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    if len(vocab) != 49408:
        raise InputError(f"{bpe_file}: expected 49408 tokens after conversion, got {len(vocab)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_suffix = f".tmp-{os.getpid()}"
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MODEL_MAX_LENGTH,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
            },
            indent=2,
        ),
    }
    # tokenizer_config.json goes last: its presence marks a complete folder.
    for name, text in files.items():
        tmp = out_dir / (name + tmp_suffix)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return out_dir


def cache_dir() -> Path:
    root = os.environ.get("CG4CTR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cg4ctr_fast"
    )
    return Path(root)


def clip_tokenizer_dir() -> Path:
    """A folder with CLIP's tokenizer files, converted once and cached."""
    out = cache_dir() / "clip-tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        convert_bpe(find_bpe_file(), out)
    return out


def load_clip_tokenizer(folder: str | os.PathLike | None = None, *, max_positions: int | None = None):
    """transformers.CLIPTokenizer from `folder`, or CLIP's vocabulary converted offline.

    max_positions: the text encoder's `max_position_embeddings` (77 for CLIP). A tokenizer_config.json
    without `model_max_length` leaves transformers' "unset" value, int(1e30), which overflows when used
    as a padding length; a value above the encoder's positions would index past them; a non-positive or
    non-integer one (-1, 0, 77.5, "77") cannot be a length. In each case the tokenizer's length becomes
    `max_positions` (the torch model-folder and engine-folder paths both pass it).

    Raises InputError when the folder's files cannot be read as a CLIP tokenizer, or when
    `max_positions` is None and model_max_length is not a positive integer.
    """
    from transformers import CLIPTokenizer

    path = Path(folder) if folder is not None else clip_tokenizer_dir()
    try:
        # from_pretrained on a folder: the vocab_file=/merges_file= keywords are ignored by transformers 5.
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{path}: cannot load the CLIP tokenizer: {text}") from None
    length = tokenizer.model_max_length
    usable = isinstance(length, int) and not isinstance(length, bool) and length > 0
    if max_positions is not None and not (usable and length <= max_positions):
        tokenizer.model_max_length = int(max_positions)
    elif not usable:
        # No encoder length to fall back on: -1, 0, 77.5 or "77" would fail later as a padding length.
        raise InputError(f"{path / 'tokenizer_config.json'}: model_max_length must be a positive integer, "
                         f"got {length!r}")
    return tokenizer
