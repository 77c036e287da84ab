"""What the three command lines (`sdxl-ms`, `sdxl-parity`, `sdxl-bench`) share: `--version`,
`--debug`, `--quiet`, and one place that turns exceptions into exit codes (`sdxl_common.errors`)."""
from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import Callable

from . import progress
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, InputError, InputWarning


def version_text(prog: str) -> str:
    """`prog 0.1.0 (mindspore 2.10.0)`, read from package metadata without importing MindSpore."""
    from importlib import metadata

    try:
        ours = metadata.version("sdxl-parity")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    try:
        ms = metadata.version("mindspore")
    except metadata.PackageNotFoundError:
        ms = "not installed"
    return f"{prog} {ours} (mindspore {ms})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (`prog: error: ...; see prog --help`), exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_text(parser.prog))


def add_global_options(parser: argparse.ArgumentParser, quiet: bool = True) -> None:
    """--debug (and --quiet) before the subcommand; `common_options` repeats them after it."""
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an internal error")
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bars or progress lines")


def common_options(quiet: bool = True) -> argparse.ArgumentParser:
    """A parent parser with --debug (and --quiet) for every subcommand. Defaults are suppressed
    so the top-level parser's defaults survive when the flag is given before the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the traceback of an internal error")
    if quiet:
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars or progress lines")
    return p


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace runs collapsed)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _show_input_warnings(prog: str) -> None:
    """Print each distinct `InputWarning` once as `prog: warning: ...` (inside catch_warnings)."""
    original = warnings.showwarning
    shown = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, InputWarning):
            original(message, category, filename, lineno, file, line)
        elif str(message) not in shown:  # the same prompt reaches both tokenizers
            shown.add(str(message))
            print(f"{prog}: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    warnings.simplefilter("always", InputWarning)


def run_command(prog: str, func: Callable[[argparse.Namespace], int],
                args: argparse.Namespace) -> int:
    """Run `func(args)` and map what it raises to the project's exit codes."""
    debug = getattr(args, "debug", False)
    progress.set_enabled(not getattr(args, "quiet", False))
    try:
        with warnings.catch_warnings():
            _show_input_warnings(prog)
            return func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InputError, OSError) as e:
        # OSError: a path the user named cannot be read or written (missing, permissions, full)
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - the tool's own bug: one line, or the traceback
        if debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = " (an internal error; rerun with --debug for the traceback)"
        print(f"{prog}: error: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
