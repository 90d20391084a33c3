"""Argument checks for component constructors (trunks, heads, schedulers, LR schedules,
recipes): one message that names the argument, its valid range and the value given.

``True`` is not a number here (Python counts it as 1), and neither is NaN or inf: a config
that says ``dropout: true`` or ``tau: .inf`` is a mistake, not a setting.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "a number"


def number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """``value`` if it is a finite number (an int if ``integer``) within the bounds; else a
    ValueError such as "scheduler.tau must be > 0 (a finite number), got inf."."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or isinstance(value, int))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {_range(low, high, low_open, high_open)} ({kind}), got {value!r}.")
    return value


def sizes(value: Any, name: str, example: str = "[64, 64]", allow_empty: bool = False) -> list[int]:
    """A list of layer sizes, each an integer >= 1; empty only if ``allow_empty``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not (value or allow_empty):
        raise ValueError(f"{name} must list layer sizes, each an integer >= 1, e.g. {example}; got {value!r}.")
    return [number(v, f"{name}[{i}]", 1, integer=True) for i, v in enumerate(value)]


def probability(value: Any, name: str) -> float:
    """A dropout probability: in [0, 1)."""
    return number(value, name, 0, 1, high_open=True)
