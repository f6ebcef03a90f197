"""argparse ``type=`` checks shared by the commands (and the benchmarks): a bad value is refused
with a message naming it, and argparse exits 2 with ``--flag: message``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """A number of ``kind`` > 0 (finite, for floats)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


_positive_int = positive(int)


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts, seconds, ports)."""
    return int(_positive_int(text))
