"""The one convention shared by the five commands (cg4ctr, cg4ctr-bench, cg4ctr-export, cg4ctr-sim, cg4ctr-train).

- Usage errors and every failure the user's own input can cause (arguments, images, model folders, LoRA
  files, configs) end in one line on stderr, ``PROG: error: ...``, and exit code 2 (`EXIT_BAD_INPUT`).
- An unexpected internal error ends in one line with exit code 1 (`EXIT_INTERNAL`) naming the file the full
  traceback was written to; ``--debug`` prints the traceback instead.
- Ctrl-C ends with exit code 130 and one line.
- Every ``--help`` shows each option's default; every command has ``--version``.
- Output paths are checked before any work (`check_out_dir`, `check_out_file`): an existing, non-empty
  ``--out`` folder is refused unless ``--overwrite`` is given, and then it is replaced atomically at the end.
- Library log lines (diffusers, transformers, huggingface_hub) stay off stderr (`quiet_libraries`).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from cg4ctr_fast.errors import InputError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# The reader of our output went away (`cg4ctr ... 2>&1 | head`): 128 + SIGPIPE, as a shell reports it.
EXIT_BROKEN_PIPE = 141

# Loggers of the libraries we drive; their INFO/WARNING lines describe their internals, not the user's input.
_LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "torch._dynamo", "torch._inductor", "peft")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in --help (argparse's `%(default)s`), except where the help already does."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a switch: off unless given, nothing to show
            return text
        if action.default is None:
            # Unset means "not used" or "derived" (the preset's, the model's): the help says which.
            return f"{text} (default: not set)".strip()
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2 (the usage text is one `--help` away)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        # argparse prints no line at all for an option without help, so its default would not show either.
        if action.help is None and action.option_strings and action.nargs != 0:
            action.help = "(default: %(default)s)" if action.default is not None else "(default: not set)"
        return action

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def package_version() -> str:
    """The installed distribution's version, or the source tree's when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cg4ctr_fast")
    except PackageNotFoundError:
        return "0+unknown"


def make_parser(prog: str, description: str) -> OneLineParser:
    """A top-level parser with `--version` and `--debug`, the flags every command shares."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {package_version()}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    return parser


_DEBUG_HELP = "on an internal error, print the full traceback instead of writing it to a file"


def add_subcommands(parser: argparse.ArgumentParser):
    """The subcommand table of `parser`; add each with `add_subcommand` so it takes `--debug` too."""
    return parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)


def add_subcommand(subparsers, name: str, help: str, description: Optional[str] = None) -> OneLineParser:
    """A subcommand parser that also accepts `--debug` after the subcommand (`cg4ctr generate --debug`)."""
    sub = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    # SUPPRESS: an absent flag must not reset a `--debug` given before the subcommand.
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return sub


def complete_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every subcommand of `parser` the `--debug` flag it lacks (run_cli does this for each command)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--debug" not in sub._option_string_actions:
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


def add_overwrite(parser: argparse.ArgumentParser, what: str = "--out") -> None:
    """The `--overwrite` flag of the one rule for an existing output (see `check_out_dir`)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing, non-empty {what} (atomically, once the work succeeded)")


def quiet_libraries() -> None:
    """Keep library log lines and progress bars off stderr; our own bars and one-line errors are the output."""
    # "critical", not "error": diffusers logs a failed LoRA load at ERROR (a 3-line size-mismatch dump)
    # before raising the exception we turn into one line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "critical")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "critical")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Our own bars cover the long steps; transformers' per-file load/save bars would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # Deprecation and user warnings raised inside libraries are about their code, not the user's input.
    for module in ("diffusers", "transformers", "huggingface_hub", "torch", "onnx", "onnxruntime", "peft"):
        warnings.filterwarnings("ignore", module=module)


def check_out_file(path: str | os.PathLike[str], *, flag: str, overwrite: Optional[bool] = None) -> Path:
    """Check an output file path (e.g. `--json x.json`) before any work: a folder that exists and can be written.

    With `overwrite` given (True/False), an existing file is refused unless it is True, as for `--out`
    folders; None leaves existing files to be replaced (reports rewritten on every run).
    """
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{flag} {out}: is a folder, expected a file path")
    if overwrite is False and out.exists():
        raise InputError(f"{flag} {out}: file exists; pass --overwrite to replace it, or choose another path")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{flag} {out}: {parent} is not a folder")
    if not parent.is_dir():
        raise InputError(f"{flag} {out}: folder {parent} does not exist")
    try:  # atomic writes create a temporary file beside the target
        handle, probe = tempfile.mkstemp(prefix=".cg4ctr-probe-", dir=parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{flag} {out}: cannot write files in {parent} ({exc.strerror or exc})") from None
    return out


def _write_traceback(prog: str) -> Optional[Path]:
    """Write the current exception's traceback to a log file; its path, or None when nothing can be written."""
    folder = Path(os.environ.get("CG4CTR_LOG_DIR") or Path(tempfile.gettempdir()) / "cg4ctr_fast")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prog}-{stamp}-{os.getpid()}.log"
        path.write_text(f"{prog} {package_version()}\nargv: {sys.argv!r}\n\n{traceback.format_exc()}")
    except OSError:
        return None
    return path


def run_cli(prog: str, parser: argparse.ArgumentParser, dispatch: Callable[[argparse.Namespace], int],
            argv: Optional[Sequence[str]] = None,
            extra_errors: Sequence[tuple[type, int, str]] = ()) -> int:
    """Parse `argv`, run `dispatch(args)` and turn every failure into one line and an exit code.

    `extra_errors` maps further exception types to (exit code, label), e.g. a failed validation to exit 1
    with ``validation failed``; they are checked before `InputError`.
    """
    quiet_libraries()
    args = complete_parser(parser).parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(dispatch(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: nothing half-written is left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Nothing can be told to a reader that left; outputs are atomic (whole or absent). Point both streams at
        # /dev/null so Python's flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):
                pass
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line
        for kind, code, label in extra_errors:
            if isinstance(exc, kind):
                print(f"{prog}: {label}: {_one_line(exc)}", file=sys.stderr)
                return code
        if isinstance(exc, InputError):
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if debug:
            traceback.print_exc()
            return EXIT_INTERNAL
        where = _write_traceback(prog)
        told = f"full traceback in {where}" if where else "the traceback could not be written to a file"
        print(f"{prog}: internal error: {type(exc).__name__}: {_one_line(exc)[:300]} ({told}; "
              "rerun with --debug to print it)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
