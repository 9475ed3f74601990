"""Pure scoring of a completion against a numeric answer (shared by the eval and the reward)."""

from __future__ import annotations

import re
from typing import Optional

_AFTER_EQUALS = re.compile(r"=\s*(-?\d+(?:\.\d+)?)")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(completion: str) -> Optional[float]:
    """The number after the first '=' ('3 + 4 = 7' -> 7.0), else the last number, else None."""
    match = _AFTER_EQUALS.search(completion)
    if match:
        return float(match.group(1))
    numbers = _NUMBER.findall(completion)
    return float(numbers[-1]) if numbers else None


def is_match(completion: str, answer: str) -> bool:
    value = extract_number(completion)
    return value is not None and value == float(answer)


def closeness(completion: str, answer: str) -> float:
    """1 / (1 + |predicted - answer|): 1.0 when exact, 0.5 when off by one, 0.0 with no number."""
    value = extract_number(completion)
    return 0.0 if value is None else 1.0 / (1.0 + abs(value - float(answer)))
