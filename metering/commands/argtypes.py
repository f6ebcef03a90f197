"""argparse ``type=`` checks shared by the commands (and the benchmarks): a bad value is refused
with a message naming it, and argparse exits 2 with ``--flag: message``."""

from __future__ import annotations

import argparse
import datetime as dt
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


def tcp_port(text: str, *, zero_is_off: bool = False) -> int:
    """A TCP port 1-65535; with ``zero_is_off``, also 0 (``--metrics-port 0``: none)."""
    low = 0 if zero_is_off else 1
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= 65535:
        span = "0-65535, 0 = off" if zero_is_off else "1-65535"
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port ({span})")
    return int(text)


def tcp_port_or_zero(text: str) -> int:
    """A TCP port 1-65535, or 0 for "off"."""
    return tcp_port(text, zero_is_off=True)


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """A whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}-{high}, got {text}")
        return value

    return parse


def tenant_id(text: str) -> str:
    """A valid tenant id (:func:`metering.ids.validate_tenant_id`)."""
    from metering.ids import InvalidIdentifier, validate_tenant_id

    try:
        return validate_tenant_id(text)
    except InvalidIdentifier as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def utc_day(text: str) -> dt.date:
    """A UTC day written YYYY-MM-DD."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None
