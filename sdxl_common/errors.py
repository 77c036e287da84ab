"""Error kinds every command-line tool of the project maps to the same exit codes.

The codes follow pytest's convention, so CI scripts read all three tools alike:

  0  success                 the run passed (or the command did what it was asked)
  1  failure                 a parity stage failed or errored, a benchmark regressed
  2  bad input or usage      one line on stderr naming the problem and what to do
  3  internal error          a bug in the tool itself; `--debug` prints the traceback
  130 interrupted            Ctrl-C; nothing half-written is left behind
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input from the user: a file, an argument or a setting the tool cannot use.

    Subclasses name the kind (a checkpoint, a recording, a policy); the CLIs print the message
    on one line and exit with `EXIT_USAGE`.
    """


class MissingExtraError(InputError):
    """An optional dependency group is not installed (e.g. the torch/diffusers reference)."""

    def __init__(self, what: str, extra: str, missing: str):
        super().__init__(f"{what} needs {missing}, and they are not installed: "
                         f"pip install 'sdxl-parity[{extra}]'")
        self.extra = extra


class InputWarning(UserWarning):
    """Input that works but not as the user may expect (e.g. a prompt cut to 77 tokens).
    The CLIs print each distinct one once, on one line."""
