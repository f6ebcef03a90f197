"""Credentials masked out of a setting's value before it is shown: by ``metering config``, in
the start-up error for an invalid setting, in the log line of a store that failed."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MASK = "***"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: a query parameter that carries a credential (redis-py, libpq and clickhouse-connect read them)
_SECRET_PARAM = re.compile(r"(?i)((?:^|&)[^=&]*(?:pass|pwd|secret|token)[^=&]*=)[^&]*")


def _masked_userinfo(netloc: str) -> str:
    """``user:pw@host`` -> ``user:***@host`` (the last ``@`` ends the userinfo, as in urlsplit)."""
    userinfo, at, host = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{MASK}@{host}" if at and colon else netloc


def redact(value: str) -> str:
    """``value`` with the password of its URL, or of each ``user:pw@host:port`` item of a
    comma-separated list, masked; anything else unchanged."""
    if scheme := _URL.match(value):
        # Spliced by hand: urlunsplit would rewrite chdb:///path as chdb:/path.
        try:
            netloc = urlsplit(value).netloc
        except ValueError:  # a malformed URL (an unclosed "[" of an IPv6 host): all of it
            return f"{scheme[0]}{MASK}"
        rest = value[scheme.end() + len(netloc) :]
        path, question, query = rest.partition("?")
        query, hash_, fragment = query.partition("#")
        query = _SECRET_PARAM.sub(rf"\g<1>{MASK}", query)
        return f"{scheme[0]}{_masked_userinfo(netloc)}{path}{question}{query}{hash_}{fragment}"
    if "@" in value and not value.startswith(("{", "[")):  # not a JSON setting
        return ",".join(_masked_userinfo(item) for item in value.split(","))
    return value
