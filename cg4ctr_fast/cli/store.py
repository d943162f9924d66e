"""`cg4ctr store stats|verify|export|gc --store DIR`: inspect and maintain a creative store.

    cg4ctr store stats --store X [--json]          rows, products, model ids, files, bytes, WAL size
    cg4ctr store verify --store X                  every row's file against its sha256; exit 1 on a problem
    cg4ctr store export --store X --parquet F      one Parquet row per creative (refuses an existing F
                                                   without --overwrite)
    cg4ctr store gc --store X                      remove files no row names and stale temporary files

A path that is not a store, or a store of another schema version: one line, exit 2 (never creates a store).
`cg4ctr` calls `add_arguments(parser)` for its `store` subcommand and `run(args)`; `python -m
cg4ctr_fast.cli.store ...` runs the same commands on their own.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from cg4ctr_fast.cli.common import (
    EXIT_OK,
    add_overwrite,
    add_subcommand,
    check_out_file,
    make_parser,
    run_cli,
)
from cg4ctr_fast.errors import InputError

EXIT_PROBLEMS = 1
PROG = "cg4ctr store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `stats`, `verify`, `export` and `gc` subcommands (dest `store_command`) to `parser`."""
    from cg4ctr_fast.cli.common import OneLineParser

    sub = parser.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND",
                                parser_class=OneLineParser)
    stats = add_subcommand(sub, "stats", "rows, products, model ids, files, bytes and WAL size of a store")
    _add_store(stats)
    stats.add_argument("--json", action="store_true", help="print the numbers as one JSON object")

    verify = add_subcommand(sub, "verify", "check every row's image file against its sha256 (exit 1 on a problem)",
                            description="Check the database, that every creative's and product's image file exists "
                                        "and hashes to its name, and every embedding's size. Problems are printed "
                                        "one per line and exit 1; files no row names and leftover temporary files "
                                        "are warnings (gc removes them); a clean store prints one OK line.")
    _add_store(verify)

    export = add_subcommand(sub, "export", "write one Parquet row per creative (embedding as list<float32>)")
    _add_store(export)
    export.add_argument("--parquet", required=True, metavar="FILE", help="the Parquet file to write (atomically)")
    add_overwrite(export, "--parquet file")

    gc = add_subcommand(sub, "gc", "remove image files no row names and stale temporary files",
                        description="Remove image files no row names (left by an interrupted write) and temporary "
                                    "files older than --temp-min-age-s. Never removes a file a row names; safe while "
                                    "the store is being read and written.")
    _add_store(gc)
    gc.add_argument("--temp-min-age-s", type=float, default=300.0,
                    help="remove temporary files only once they are this old, in seconds (a live write keeps one "
                         "for milliseconds)")
    gc.add_argument("--json", action="store_true", help="print the counts as one JSON object")


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, metavar="DIR", help="the store folder (holds store.sqlite3)")


def _open(args):
    from cg4ctr_fast.serving.store import CreativeStore

    return CreativeStore(args.store, create=False)  # a typo must not create an empty store


def _stats(args) -> int:
    with _open(args) as store:
        stats = store.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return EXIT_OK
    models = ", ".join(f"{m} ({n})" for m, n in stats["model_ids"].items()) or "none"
    lines = [
        ("store", stats["root"]), ("schema version", stats["schema_version"]),
        ("creative rows", f"{stats['rows']} ({stats['creative_ids']} distinct images)"),
        ("products", stats["products"]), ("model ids", models),
        ("scores", f"{stats['scores']} creative, {stats['product_scores']} original"),
        ("image files", f"{stats['files']} ({_size(stats['bytes'])})"),
        ("temporary files", stats["temp_files"]),
        ("database", f"{_size(stats['db_bytes'])} + WAL {_size(stats['wal_bytes'])}"),
    ]
    for key, value in lines:
        print(f"{key + ':':17} {value}")
    return EXIT_OK


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _verify(args) -> int:
    with _open(args) as store:
        report = store.verify_report()
    for line in report.problems:
        print(line)
    for line in report.warnings:
        print(f"warning: {line}")
    extra = f", {len(report.warnings)} warnings" if report.warnings else ""
    if report.problems:
        print(f"{args.store}: {len(report.problems)} problems in {report.checked} stored files{extra}")
        return EXIT_PROBLEMS
    print(f"OK: {args.store}: {report.checked} stored files match their sha256{extra}")
    return EXIT_OK


def _export(args) -> int:
    out = check_out_file(args.parquet, flag="--parquet", overwrite=args.overwrite)
    with _open(args) as store:
        count = store.export_parquet(out)
    print(f"wrote {count} creative rows to {out}")
    return EXIT_OK


def _gc(args) -> int:
    import math

    if not (math.isfinite(args.temp_min_age_s) and args.temp_min_age_s >= 0):
        raise InputError(f"--temp-min-age-s must be a number ≥ 0, got {args.temp_min_age_s}")
    with _open(args) as store:
        result = store.gc(temp_min_age_s=args.temp_min_age_s)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"removed {result['orphans_removed']} unreferenced files ({_size(result['orphan_bytes'])}) and "
              f"{result['temp_removed']} temporary files ({_size(result['temp_bytes'])}); "
              f"{result['kept_files']} files kept")
    return EXIT_OK


COMMANDS = {"stats": _stats, "verify": _verify, "export": _export, "gc": _gc}


def run(args: argparse.Namespace) -> int:
    """Run the parsed `store` subcommand; returns the exit code (0 ok, 1 verify found problems).  Bad input
    (InputError, StoreError) is raised for the caller's `run_cli` to print as one line with exit code 2."""
    return COMMANDS[args.store_command](args)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(PROG, "Inspect and maintain a creative store.")
    add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
