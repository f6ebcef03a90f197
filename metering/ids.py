"""Identifiers that reach Redis keys, Kafka keys and SQL: checked once, here.

A tenant id is 1-64 characters of ``[A-Za-z0-9._:-]`` starting with a letter or digit. That keeps
it safe inside a Redis key (no ``{``/``}``, which would break the Cluster hash tag), a Kafka key,
a file name and a URL path segment. A meter name is the same shape, 1-64 characters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

TENANT_ID_MAX = 64
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_METER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


class InvalidIdentifier(ValueError):
    """An identifier from outside does not have the allowed length or characters."""


def validate_tenant_id(tenant: object) -> str:
    """Return ``tenant`` if it is a valid tenant id, else raise :class:`InvalidIdentifier`."""
    if not isinstance(tenant, str):
        raise InvalidIdentifier(f"tenant id must be a string, not {type(tenant).__name__}")
    if not _TENANT_RE.fullmatch(tenant):
        shown = tenant if len(tenant) <= 80 else tenant[:77] + "..."
        raise InvalidIdentifier(
            f"invalid tenant id {shown!r}: 1-{TENANT_ID_MAX} characters of A-Z a-z 0-9 . _ : -, "
            "starting with a letter or digit"
        )
    return tenant


def is_valid_tenant_id(tenant: object) -> bool:
    return isinstance(tenant, str) and _TENANT_RE.fullmatch(tenant) is not None


def validate_meter(meter: object) -> str:
    """Return ``meter`` if it is a valid meter name, else raise :class:`InvalidIdentifier`."""
    if not isinstance(meter, str) or not _METER_RE.fullmatch(meter):
        raise InvalidIdentifier(
            f"invalid meter name {meter!r}: 1-64 characters of A-Z a-z 0-9 . _ : -, "
            "starting with a letter or digit"
        )
    return meter


def printable(text: str) -> str:
    """``text`` with every character that is not printable (controls, escapes, line breaks)
    written as its Python escape, for a terminal or a log line: a tenant's dimension value or
    token claim must not move the cursor, forge a table row or set a window title."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def tenant_claim(claims: Mapping[str, Any]) -> tuple[str, Any]:
    """The claim of verified token ``claims`` that names the tenant, and its value (None when
    absent): ``tenant_id``, or ``sub`` only when the token has no ``tenant_id`` at all. One
    present but empty or null (a user bound to no tenant) is the value to check and refuse,
    never replaced by ``sub`` (a user's id is not a tenant)."""
    claim = "tenant_id" if "tenant_id" in claims else "sub"
    return claim, claims.get(claim)
