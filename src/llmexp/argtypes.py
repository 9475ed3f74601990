"""argparse types for llmexp's small commands (generate, eval): a bad number is refused by argparse
itself, with the option named, exit code 2 and no traceback."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = _parse(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(text, float, "a number")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def non_empty_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give the text to answer")
    return text


def _parse(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def command_summary(doc: str) -> str:
    """A command's --help description: its module docstring's first paragraph on one line (the first
    line alone cut some off mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split())
