"""One ClickHouse client per URL: the embedded engine (``chdb:///path``) or a server (``http://``).

The embedded engine allows ONE data folder per process, so :func:`clickhouse_client` hands out
the same client for the same ``chdb://`` URL and refuses a second, different folder with a
clear error instead of a crash deep inside the engine. The same SQL serves both backends.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect

_lock = threading.Lock()
_embedded: dict[str, Any] = {}


class ClickHouseConfigError(ValueError):
    """A ClickHouse URL cannot be used (bad scheme, or a second embedded data folder)."""


#: The most seconds a connection to a ClickHouse server may take to open (within ``timeout``).
CONNECT_TIMEOUT = 10.0


def clickhouse_client(url: str, *, timeout: float | None = None) -> Any:
    """A clickhouse-connect client for ``url`` (``chdb:///path``, ``http(s)://``, ``clickhouse://``).

    ``timeout``: the seconds a call to a ClickHouse server may wait for its answer (and at most
    :data:`CONNECT_TIMEOUT` of them to connect), so a hung server fails a query in that time
    rather than after clickhouse-connect's default of 300 s. None keeps that default (the
    worker's inserts and migrations). The embedded engine runs in-process: no network, no
    timeout."""
    scheme = urlsplit(url).scheme
    if scheme == "chdb":
        with _lock:
            if url in _embedded:
                return _embedded[url]
            if _embedded:
                (other,) = _embedded
                raise ClickHouseConfigError(
                    f"this process already uses the embedded ClickHouse at {other!r}; the embedded "
                    f"engine allows one data folder per process, so {url!r} cannot be opened here"
                )
            client = clickhouse_connect.get_client(dsn=url)
            _embedded[url] = client
            return client
    if scheme in {"http", "https", "clickhouse", "clickhouses"}:
        if timeout is None:
            return clickhouse_connect.get_client(dsn=url)
        return clickhouse_connect.get_client(
            dsn=url,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            send_receive_timeout=timeout,
        )
    raise ClickHouseConfigError(f"CLICKHOUSE_URL={url!r}: must be chdb:///path or http(s)://…")


def adopt_embedded_client(url: str, client: Any) -> None:
    """Register an already-open embedded client (tests make theirs first) under ``url``."""
    with _lock:
        _embedded.setdefault(url, client)


__all__ = ["ClickHouseConfigError", "adopt_embedded_client", "clickhouse_client"]
