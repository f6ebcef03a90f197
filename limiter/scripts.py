"""The limiter's Lua scripts and how their calls are encoded.

Each script is a ``.lua`` file beside this module, read once; its SHA1 is computed locally, so
calls go out as ``EVALSHA`` from the first one. A server that does not know the script (after
``SCRIPT FLUSH``, a restart or a failover) answers ``NOSCRIPT``; the limiter then loads it with
``SCRIPT LOAD`` (on a Cluster, redis-py sends that to every primary) and sends the call again.

Calls are encoded once per tenant and day (the keys) and once per quota (its numbers): the hot
path only joins pre-encoded parts. Two forms exist: an argument tuple for redis-py's generic
``execute_command``/pipelines (Cluster), and the packed RESP bytes for a direct connection.

A call declares only the keys it may touch: the bucket and the day's counter, and the two
window keys only for a quota with a rolling window (the scripts read ``KEYS[3]``/``KEYS[4]``
only then). While a Cluster migrates a slot, a script call whose declared keys are not all on
the same side is refused with ``TRYAGAIN``; window keys that never exist would make every call
of the tenant refused for the whole migration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from limiter.clock import utc_day
from limiter.keys import tenant_keys
from limiter.quota import Quota

NUM_KEYS = 4  # with a rolling window; without one, the first NUM_KEYS_NO_WINDOW
NUM_KEYS_NO_WINDOW = 2
DAY_GRACE_SECONDS = 3600  # a day counter outlives its UTC day by this much (late settles)
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: bytes
    sha: bytes

    @classmethod
    def from_package(cls, filename: str) -> LuaScript:
        source = resources.files("limiter").joinpath(filename).read_bytes()
        return cls(filename, source, hashlib.sha1(source).hexdigest().encode())  # noqa: S324


ACQUIRE = LuaScript.from_package("acquire.lua")
SETTLE = LuaScript.from_package("settle.lua")
#: settle.lua's first reply element when the day it was given is not the server's
SETTLE_WRONG_DAY = -2
SCRIPTS = (ACQUIRE, SETTLE)

# Reply statuses of acquire.lua.
ALLOWED, REJECTED, WRONG_DAY, NEED_SEED = 1, 0, -1, -2


def resp_bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def resp_command(parts: Sequence[bytes]) -> bytes:
    """One command in the Redis protocol (RESP array of bulk strings)."""
    return b"*%d\r\n" % len(parts) + b"".join(resp_bulk(p) for p in parts)


def quota_args(quota: Quota) -> tuple[bytes, ...]:
    return (
        repr(float(quota.rate_per_sec)).encode(),
        b"%d" % quota.burst,
        b"%d" % quota.daily_limit,
        b"%d" % (quota.window_limit or 0),
        b"%d" % (quota.window_seconds or 0),
    )


_SMALL_INTS = tuple(b"%d" % i for i in range(1025))
_SMALL_BULKS = tuple(resp_bulk(b) for b in _SMALL_INTS)


class CallEncoder:
    """Builds the script calls; caches keys per (tenant, day) and arguments per quota."""

    def __init__(self, day_grace_seconds: int = DAY_GRACE_SECONDS) -> None:
        self._grace = b"%d" % day_grace_seconds
        self._grace_bulk = resp_bulk(self._grace)
        self._keys: dict[str, tuple[int, tuple[bytes, ...], tuple[bytes, bytes]]] = {}
        self._quotas: dict[Quota, tuple[tuple[bytes, ...], bytes, int]] = {}

    def keys(self, tenant: str, day: int, windowed: bool = True) -> tuple[tuple[bytes, ...], bytes]:
        """The script KEYS for ``tenant`` on epoch ``day`` (the window's two only if
        ``windowed``), and the packed EVALSHA head."""
        entry = self._keys.get(tenant)
        if entry is None or entry[0] != day:
            if len(self._keys) >= _CACHE_MAX:
                self._keys.clear()
            keys = tenant_keys(tenant, utc_day(day)[0])
            heads = tuple(
                b"*%d\r\n" % (3 + n + 8)
                + b"".join(resp_bulk(p) for p in (b"EVALSHA", ACQUIRE.sha, b"%d" % n, *keys[:n]))
                for n in (NUM_KEYS_NO_WINDOW, NUM_KEYS)
            )
            entry = self._keys[tenant] = (day, keys, (heads[0], heads[1]))
        if windowed:
            return entry[1], entry[2][1]
        return entry[1][:NUM_KEYS_NO_WINDOW], entry[2][0]

    def _quota(self, quota: Quota) -> tuple[tuple[bytes, ...], bytes, int]:
        """The quota's arguments, packed, and how many keys its calls declare."""
        entry = self._quotas.get(quota)
        if entry is None:
            if len(self._quotas) >= _CACHE_MAX:
                self._quotas.clear()
            args = quota_args(quota)
            n = NUM_KEYS if quota.window_limit else NUM_KEYS_NO_WINDOW
            entry = self._quotas[quota] = (args, b"".join(resp_bulk(a) for a in args), n)
        return entry

    def acquire_args(
        self, tenant: str, day: int, cost: int, quota: Quota, seed: bytes
    ) -> tuple[bytes | str | int, ...]:
        """``execute_command`` arguments of one acquire.lua call (``seed`` b"" = none)."""
        args, _, n = self._quota(quota)
        keys, _ = self.keys(tenant, day, n == NUM_KEYS)
        cost_b = _SMALL_INTS[cost] if cost <= 1024 else b"%d" % cost
        return ("EVALSHA", ACQUIRE.sha, n, *keys, cost_b, *args, seed, self._grace)

    def acquire_packed(self, tenant: str, day: int, cost: int, quota: Quota, seed: bytes) -> bytes:
        """The same call as RESP bytes, ready for a connection."""
        _, packed_args, n = self._quota(quota)
        _, head = self.keys(tenant, day, n == NUM_KEYS)
        cost_bulk = _SMALL_BULKS[cost] if cost <= 1024 else resp_bulk(b"%d" % cost)
        return b"".join((head, cost_bulk, packed_args, resp_bulk(seed), self._grace_bulk))

    def settle_args(
        self, tenant: str, day: int, delta: int, quota: Quota, *, today: bool = False
    ) -> tuple[bytes | str | int, ...]:
        """One settle.lua call into ``day``; ``today``: ``day`` is the client's estimate of the
        server's day, which the script checks (WRONG_DAY, :data:`SETTLE_WRONG_DAY`)."""
        q, _, n = self._quota(quota)
        keys, _ = self.keys(tenant, day, n == NUM_KEYS)
        check = b"%d" % day if today else b""
        return (
            "EVALSHA", SETTLE.sha, n, *keys, b"%d" % delta, q[0], q[1], q[3], q[4], check
        )  # fmt: skip


def packed(args: Sequence[bytes | str | int]) -> bytes:
    """RESP bytes of an ``execute_command`` argument tuple."""
    return resp_command([a if isinstance(a, bytes) else str(a).encode() for a in args])
