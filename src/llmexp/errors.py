"""User-facing errors: one clear message, exit code 2, no traceback.

Anything the user can fix (config, data, model paths) raises :class:`UserError` or
:class:`ConfigError`; the CLI prints it and exits with code 2. Set LLMEXP_TRACEBACK=1 to see
the full traceback as well (the message suggests it where it sums up another exception).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    fix: Optional[str] = None

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


class UserError(Exception):
    """A problem the user can fix; its message names the key or file and the fix."""


class ProblemsError(UserError):
    """Every problem found at once, one per line with its key and fix, under a count of them."""

    where: str  # "in the configuration", "with llmexp plugins": how the count is headed

    def __init__(self, problems: Iterable[Problem]):
        self.problems: List[Problem] = list(dict.fromkeys(problems))  # each once: two checks can find the same
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} {self.where}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


class ConfigError(ProblemsError):
    where = "in the configuration"


def counted(n: int, noun: str) -> str:
    """'1 row', '2 rows': a count with its noun, in messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def suggest(name: str, valid: Iterable[str], key: Optional[str] = None) -> str:
    """The valid names, with the closest one to ``name`` first when there is one."""
    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    listing = f"valid: {', '.join(valid)}"
    if close:
        return f"did you mean {close[0]!r}? ({listing})"
    return listing


def report(error: BaseException) -> int:
    """Print a user error to stderr and return the exit code."""
    if os.environ.get("LLMEXP_TRACEBACK"):
        import traceback

        traceback.print_exception(type(error), error, error.__traceback__)
    sys.stderr.write(f"llmexp: error: {error}\n")
    if not os.environ.get("LLMEXP_TRACEBACK") and error.__cause__ is not None:
        # Only where the message sums up another exception (a plugin's, a reward function's): its
        # frames say more. A plain user error's message is all there is to it.
        sys.stderr.write("(set LLMEXP_TRACEBACK=1 for the full traceback)\n")
    sys.stderr.flush()
    return getattr(error, "exit_code", EXIT_USER_ERROR)


_CTRL_C = {"seen": False}


def _note_ctrl_c(signum, frame):  # noqa: ARG001 - a signal handler's signature
    _CTRL_C["seen"] = True
    raise KeyboardInterrupt


def quiet_exits(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command's ``main`` so that output piped into a reader that stops early
    (``llmexp plugins | head -1``) ends the command quietly instead of with a BrokenPipeError, and
    Ctrl+C where nothing else handles it (while the libraries load, say) ends it with one line and
    exit code 130 instead of a traceback of the import it stopped. A library that turns the
    KeyboardInterrupt into an error of its own (OmegaConf, interrupted while it builds a config,
    raised an AttributeError) ends the same way: Ctrl+C was pressed."""
    import functools
    import signal

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(ValueError):  # (not the main thread: leave its handler alone)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, _note_ctrl_c)
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            sys.stderr.write("llmexp: interrupted (Ctrl+C)\n")
            sys.exit(130)
        except BrokenPipeError:
            # Python's recipe: point stdout at devnull so the flush at exit cannot fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except Exception:  # noqa: BLE001 - only after Ctrl+C: what the interrupted code raised instead
            if not _CTRL_C["seen"]:
                raise
            sys.stderr.write("llmexp: interrupted (Ctrl+C)\n")
            sys.exit(130)

    return wrapped
