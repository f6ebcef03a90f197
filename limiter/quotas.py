"""Tenant quotas for the limiter: process memory, then Redis, then the quota DB.

A lookup tries, in order:

1. **local**: a dict in process memory. An entry younger than half ``QUOTA_LOCAL_TTL`` is served
   as is. An older one is still served, and a background refresh (a thread for :meth:`get`, a
   task for :meth:`aget`) fetches a new one, so a hot tenant's quota is renewed before it expires
   and the request path never waits on Redis or the database for it. While the invalidation
   listener runs, published changes keep cached entries right, so even an entry that expired
   while its tenant was idle is served while it is refreshed; without a listener such an entry
   is fetched in the request path instead.
2. **redis**: ``tenant_quota_cache:<tenant>`` (JSON, TTL ``TENANT_QUOTA_CACHE_TTL``).
3. **db**: the quota DB. Its answer is written back to Redis with ``SET NX``: a write-back never
   replaces an entry that :class:`QuotaAdmin` wrote for a newer change meanwhile.

A change (:class:`QuotaAdmin`) writes the DB, replaces the Redis entry (unless Redis holds a newer
version of the tenant: see :class:`QuotaAdmin`) and publishes the new quota on the channel
``tenant_quota_invalidate``; every :class:`QuotaCache` that listens
(:meth:`QuotaCache.start` / :meth:`QuotaCache.astart`) installs it at once. ``tenants.version``
orders changes: an older quota never replaces a newer one, and a refresh that started before a
change was applied is discarded, as is an older version read from a Redis entry that a change
made while Redis was down could not replace. Such a change is published again in the background
as soon as Redis answers (:class:`QuotaAdmin`). After the listener reconnects (messages may have
been missed), every local entry is refreshed.

The Redis layer goes through the limiter's :class:`limiter.breaker.CircuitBreaker` (the limiter
shares its breaker with the cache it is given, see :meth:`QuotaCache.use_breaker`): while the
breaker is open (Redis known to be down) a lookup does not touch Redis and goes straight to the DB,
as when the Redis read fails; a Redis read or write-back that fails for want of Redis counts as a
breaker failure, one that Redis answered as a success (it may be the half-open trial call).

When Redis and the DB fail, the last known quota is served (stale) and counted in
``tenant_quota_stale_served``; retries run in the background at most once per
``retry_interval``. A tenant the DB does not know gets ``QUOTA_DEFAULT_PLAN``'s limits, or
:class:`UnknownTenant` when ``QUOTA_UNKNOWN_TENANT=reject``. A tenant seen for the first time while
both sources are down cannot be proven known, so that same policy applies to it (the default plan,
counted as stale, or :class:`UnknownTenant`) until a source answers; background retries replace
the answer as soon as one does, and so does a concurrent lookup that got one. That placeholder never
replaces an answer a concurrent lookup installed. No other exception reaches the caller, except
:class:`metering.ids.InvalidIdentifier` for a malformed tenant id.

A DB row the limiter cannot use (the DB's constraints are looser than
:func:`metering.plans.check_limits`, and a row written by SQL may pass them) counts as a DB that
failed: it is logged with the tenant and the problem, neither cached nor written back to Redis,
and the lookup gets the last known quota or, for a tenant not seen yet, the unknown-tenant policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import queue
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from limiter.failure_policy import redis_unavailable
from limiter.metrics import (
    tenant_quota_cache_hits,
    tenant_quota_cache_misses,
    tenant_quota_stale_served,
)
from limiter.quota import Quota
from limiter.quota_provider import UnknownTenant
from limiter.scripts import LuaScript
from metering.ids import InvalidIdentifier, validate_tenant_id
from metering.plans import Limits, QuotaError, check_limits, plan_limits
from metering.quota_db import QuotaStore, TenantRecord
from metering.threads import NamedThread

if TYPE_CHECKING:
    import redis
    import redis.asyncio

    from limiter.breaker import CircuitBreaker
    from limiter.failure_policy import MasterBreakers
    from metering.settings import Settings

log = logging.getLogger(__name__)

INVALIDATION_CHANNEL: Final = "tenant_quota_invalidate"
CACHE_KEY_PREFIX: Final = "tenant_quota_cache:"
#: Failures of the sources: the last known quota is served instead.
_SOURCE_ERRORS = (RedisError, RedisClusterException, SQLAlchemyError, OSError)
#: Writes a change's Redis entry unless Redis holds a newer version (see :class:`QuotaAdmin`).
QUOTA_ENTRY: Final = LuaScript.from_package("quota_entry.lua")


def quota_cache_key(tenant: str) -> str:
    """``tenant_quota_cache:<tenant>`` for a validated tenant id."""
    return CACHE_KEY_PREFIX + validate_tenant_id(tenant)


def encode_quota(record: TenantRecord | None) -> str:
    """The JSON stored in Redis and published: a tenant's limits, or ``{"unknown": true}``."""
    if record is None:
        return json.dumps({"unknown": True})
    lim = record.limits
    return json.dumps(
        {
            "plan": record.plan,
            "rate_per_sec": lim.rate_per_sec,
            "burst": lim.burst,
            "daily_limit": lim.daily_limit,
            "window_limit": lim.window_limit,
            "window_seconds": lim.window_seconds,
            "version": record.version,
        },
        separators=(",", ":"),
    )


def to_quota(limits: Limits) -> Quota:
    return Quota(
        rate_per_sec=limits.rate_per_sec,
        burst=limits.burst,
        daily_limit=limits.daily_limit,
        window_limit=limits.window_limit,
        window_seconds=limits.window_seconds,
    )


@dataclass(slots=True)
class _Entry:
    """A cached answer. ``quota is None`` means: unknown tenant, rejected."""

    quota: Quota | None
    version: int  # tenants.version; 0 for an unknown tenant
    refresh_at: float  # monotonic time after which a lookup triggers a refresh
    expires_at: float  # monotonic time after which serving it counts as stale
    failing: bool = False  # the last refresh failed: serve it, retry in the background
    placeholder: bool = False  # made while both sources failed for a newcomer: no answer yet
    since: float = 0.0  # monotonic time this version was first held (see QuotaCache._install)


class _SourceDown(Exception):
    """Neither Redis nor the DB could answer."""


class QuotaCache:
    """The :class:`limiter.quota_provider.QuotaProvider` of the product (see module docstring).

    ``redis`` serves :meth:`get` and the listener thread, ``aredis`` serves :meth:`aget` and the
    listener task; either may be ``None`` (that path then skips the Redis layer, or, for
    :meth:`aget`, runs the sync client in a thread). ``breaker`` guards the lookups' Redis calls
    (not the listener's); without one, a limiter given this cache shares its own.
    """

    def __init__(
        self,
        store: QuotaStore,
        redis: redis.Redis | None = None,
        *,
        aredis: redis.asyncio.Redis | None = None,
        local_ttl: float = 5.0,
        redis_ttl: int = 30,
        unknown_tenant: Literal["default", "reject"] = "default",
        default_plan: str = "free",
        retry_interval: float = 1.0,
        max_entries: int = 100_000,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if local_ttl <= 0 or redis_ttl <= 0 or retry_interval <= 0 or max_entries < 1:
            raise QuotaError("local_ttl, redis_ttl, retry_interval and max_entries must be > 0")
        if unknown_tenant not in ("default", "reject"):
            raise QuotaError(
                f"unknown_tenant must be 'default' or 'reject', not {unknown_tenant!r}"
            )
        self.store = store
        self.redis = redis
        self.aredis = aredis
        self.local_ttl = float(local_ttl)
        self.redis_ttl = int(redis_ttl)
        self.unknown_tenant = unknown_tenant
        self.default_plan = default_plan
        self.default_quota = to_quota(plan_limits(default_plan))
        self.retry_interval = float(retry_interval)
        self.max_entries = max_entries
        self.breaker = breaker
        self._masters: MasterBreakers | None = None  # see use_master_breakers
        self._local: dict[str, _Entry] = {}
        self._changes = 0  # invalidations applied; a cold fetch that overlaps one is discarded
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._refresher: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener_task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self.reconnects = 0  # times the invalidation listener lost and regained Redis
        # With a listener, cached entries are kept right by published changes, so even an
        # expired one is served while it is refreshed; without one, it is reloaded first.
        self._listening = False
        self._subscribed = threading.Event()
        # Bound children: the warm path must not pay for a label lookup.
        self._hit = {
            layer: tenant_quota_cache_hits.labels(layer=layer) for layer in ("local", "redis", "db")
        }
        self._miss = {
            layer: tenant_quota_cache_misses.labels(layer=layer)
            for layer in ("local", "redis", "db")
        }

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        store: QuotaStore | None = None,
        redis: redis.Redis | None = None,
        aredis: redis.asyncio.Redis | None = None,
    ) -> QuotaCache:
        return cls(
            store or QuotaStore(settings.quota_db_url),
            redis,
            aredis=aredis,
            local_ttl=settings.quota_local_ttl,
            redis_ttl=settings.tenant_quota_cache_ttl,
            unknown_tenant=settings.quota_unknown_tenant,
            default_plan=settings.quota_default_plan,
        )

    # --- the request path -----------------------------------------------------------------------
    def get(self, tenant: str) -> Quota:
        """The tenant's quota; no I/O when it is cached. Raises :class:`UnknownTenant` only when
        the tenant is unknown and unknown tenants are rejected."""
        e = self._local.get(tenant)
        if e is not None:
            now = time.monotonic()
            if now >= e.refresh_at:
                if now >= e.expires_at and not e.failing and not self._listening:
                    return self._answer(tenant, self._load_now(tenant, e))
                self._schedule(tenant, e, now)
            if e.failing and now >= e.expires_at:
                tenant_quota_stale_served.inc()
            self._hit["local"].inc()
            return self._answer(tenant, e)
        self._miss["local"].inc()
        return self._answer(tenant, self._load_now(tenant, None))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task of the running loop that belongs to this cache: closing the
        cache (:meth:`aclose`, the app's shutdown) cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aget(self, tenant: str) -> Quota:
        """:meth:`get` for an event loop: refreshes run as tasks, lookups never block the loop."""
        e = self._local.get(tenant)
        if e is not None:
            now = time.monotonic()
            if now >= e.refresh_at:
                if now >= e.expires_at and not e.failing and not self._listening:
                    return self._answer(tenant, await self._aload_now(tenant, e))
                e.refresh_at = now + self.retry_interval
                self.spawn(self._arefresh(tenant, e))
            if e.failing and now >= e.expires_at:
                tenant_quota_stale_served.inc()
            self._hit["local"].inc()
            return self._answer(tenant, e)
        self._miss["local"].inc()
        return self._answer(tenant, await self._aload_now(tenant, None))

    def daily_seed(self, tenant: str, day: dt.date) -> int:
        """The tenant's backfilled usage for UTC ``day`` (0 when the DB cannot answer: logged)."""
        try:
            return self.store.daily_usage(tenant, day)
        except _SOURCE_ERRORS as exc:
            log.warning("daily seed for %s on %s unavailable, seeding 0: %s", tenant, day, exc)
            return 0

    async def adaily_seed(self, tenant: str, day: dt.date) -> int:
        return await asyncio.to_thread(self.daily_seed, tenant, day)

    # --- answers ---------------------------------------------------------------------------------
    def _answer(self, tenant: str, e: _Entry) -> Quota:
        if e.quota is None:
            raise UnknownTenant(f"unknown tenant {tenant!r}")
        return e.quota

    def _entry(self, data: dict[str, Any] | None, now: float) -> _Entry:
        """An entry from a Redis/pub-sub payload (``None`` or ``unknown``: the unknown policy)."""
        refresh_at, expires_at = now + self.local_ttl / 2, now + self.local_ttl
        if data is None or data.get("unknown"):
            quota = self.default_quota if self.unknown_tenant == "default" else None
            return _Entry(quota, 0, refresh_at, expires_at, since=now)
        limits = check_limits(
            data["rate_per_sec"],
            data["burst"],
            data["daily_limit"],
            data.get("window_limit"),
            data.get("window_seconds"),
        )
        return _Entry(to_quota(limits), int(data["version"]), refresh_at, expires_at, since=now)

    def _decode(self, raw: bytes | str) -> dict[str, Any] | None:
        """A cached payload, or ``None`` when it is corrupt (then the DB answers)."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            self._entry(data, 0.0)  # validates
            return data
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a corrupt quota cache entry %r: %s", raw, exc)
            return None

    def _fallback(self, tenant: str, previous: _Entry | None) -> _Entry:
        """Both sources failed: keep serving what we had, or the default plan for a newcomer."""
        now = time.monotonic()
        if previous is None:  # cannot be proven known: the unknown-tenant policy applies
            with self._lock:
                current = self._local.get(tenant)
                if current is not None:
                    # A concurrent lookup got an answer meanwhile (or a change was applied):
                    # it stands. Replacing it by the placeholder would serve a known tenant
                    # the default plan until the next retry.
                    return current
                log.warning(
                    "quota of %s unavailable; treating it as unknown until a source answers",
                    tenant,
                )
                quota = self.default_quota if self.unknown_tenant == "default" else None
                previous = _Entry(quota, 0, now, now, placeholder=True)
                self._store_entry(tenant, previous)
        previous.failing = True
        previous.refresh_at = now + self.retry_interval
        if now >= previous.expires_at:
            tenant_quota_stale_served.inc()
        return previous

    # --- installing entries ---------------------------------------------------------------------
    def _store_entry(self, tenant: str, entry: _Entry) -> None:
        """Install ``entry`` last in the dict's order, which is the order of eviction: a tenant
        in use is reloaded every ``local_ttl`` at most, so a full cache drops the tenant
        refreshed least recently (a least-recently-used order at that resolution, kept with
        no work on the lookup path). Under the lock."""
        local = self._local
        if tenant in local:
            # Moved to the end. A lookup on another thread between these two steps misses and
            # loads the tenant itself; its fetch then finds this entry installed and keeps it.
            del local[tenant]
        elif len(local) >= self.max_entries:
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                local.pop(next(iter(local)))  # the least recently installed
        local[tenant] = entry

    def _install(self, tenant: str, entry: _Entry, seen: _Entry | None, changes: int) -> _Entry:
        """Install a fetched entry unless a change was applied while it was being fetched, or
        it is an older version than the one held.

        A placeholder (a newcomer's entry made while both sources failed) holds no answer, so a
        fetch that overlapped its making replaces it, unless a change was applied meanwhile.

        An older version comes from a Redis entry that a change could not replace (Redis was
        down when it was made, while this process applied it): installing it would bring the
        old quota back until that entry expires. Such an entry outlives the newer version's
        arrival here by at most ``redis_ttl``; an older version fetched after that can only be a
        tenant deleted and created again (versions restart at 1), and is installed."""
        with self._lock:
            current = self._local.get(tenant)
            if current is not None and current.placeholder and self._changes == changes:
                seen = current  # it holds no answer: this fetch replaces it
            if current is not seen or (seen is None and self._changes != changes):
                return current or entry  # a newer answer arrived meanwhile; it stays
            if current is not None and not current.placeholder:
                now = time.monotonic()
                if entry.version and entry.version < current.version:
                    if now < current.since + self.redis_ttl:
                        log.debug(
                            "quota of %s: ignoring version %d (stale cache), keeping %d",
                            tenant,
                            entry.version,
                            current.version,
                        )
                        current.refresh_at = now + self.retry_interval
                        return current
                elif entry.version == current.version:
                    entry.since = current.since
            self._store_entry(tenant, entry)
            return entry

    def apply_change(self, tenant: str, payload: dict[str, Any] | None) -> bool:
        """Apply a published change (``None``: tenant deleted). True if a cached entry changed.

        Only tenants this process has cached are touched; an older version never replaces a
        newer one.
        """
        now = time.monotonic()
        with self._lock:
            self._changes += 1
            current = self._local.get(tenant)
            if current is None:
                return False
            if payload is None:
                del self._local[tenant]
                return True
            entry = self._entry(payload, now)
            if entry.version and entry.version < current.version:
                return False
            if entry.version == current.version and not current.placeholder:
                entry.since = current.since
            self._local[tenant] = entry
            return True

    def refresh_all(self) -> None:
        """Make every cached entry refresh on its next lookup (after missed invalidations)."""
        with self._lock:
            self._changes += 1
            for tenant, e in list(self._local.items()):
                # New objects: a refresh already in flight (fetched before the gap) is discarded.
                self._local[tenant] = dataclasses.replace(e, refresh_at=0.0, failing=False)

    def clear(self) -> None:
        with self._lock:
            self._changes += 1
            self._local.clear()

    # --- the breaker around the Redis layer ------------------------------------------------------
    def use_breaker(self, breaker: CircuitBreaker) -> CircuitBreaker:
        """Guard the Redis layer of lookups with ``breaker`` (the limiter's, so that a quota read
        that fails opens the breaker its decisions use, and an open breaker spares the read),
        unless the cache already has one: the breaker in use is returned."""
        if self.breaker is None:
            self.breaker = breaker
        return self.breaker

    def use_master_breakers(self, masters: MasterBreakers) -> MasterBreakers:
        """On a Redis Cluster: guard each lookup's Redis calls with the breaker of the master
        that serves its key, one of ``masters`` (the limiter's: see
        :class:`limiter.failure_policy.MasterBreakers`), instead of the breaker in use, unless
        the cache already has per-master breakers around the same breaker (another limiter's):
        the ones in use are returned."""
        if self._masters is None or self._masters.default is not masters.default:
            self._masters = masters
        return self._masters

    def _breaker_for(self, key: str) -> CircuitBreaker | None:
        masters = self._masters
        return self.breaker if masters is None else masters.for_key(key.encode())

    @staticmethod
    def _redis_allowed(breaker: CircuitBreaker | None) -> bool:
        """May this lookup call Redis? No while the breaker is open (Redis known to be down), nor
        while another caller makes the half-open trial call; yes otherwise (the trial call
        included: its outcome is reported like any other)."""
        return breaker is None or breaker.allow()

    @staticmethod
    def _redis_answered(breaker: CircuitBreaker | None) -> None:
        if breaker is not None:
            breaker.record_success()

    @staticmethod
    def _redis_failed(
        exc: BaseException, breaker: CircuitBreaker | None, background: bool = False
    ) -> None:
        """A Redis call of a lookup failed: a failure of the breaker if Redis is unavailable; an
        error reply (Redis is up) reports back like a success.

        Not a background refresh's failure: no request waited for it (each is served from the
        local entry), and its timeout may be the event loop's, not Redis's (a saturated loop
        resumes redis-py's read after its socket timeout although the reply is in: the overload
        audit saw three such refreshes open the breaker over a healthy Redis, and 2,122 requests
        answered 503). The limiter's own calls tell an outage, and open the breaker then."""
        if breaker is None:
            return
        if redis_unavailable(exc):
            if background:
                return
            breaker.record_failure()
        elif isinstance(exc, ResponseError):
            breaker.record_success()

    # --- fetching (sync) -------------------------------------------------------------------------
    def _db_payload(self, tenant: str, record: TenantRecord | None) -> str:
        """The DB's answer as cached; a row the limiter cannot use raises :class:`_SourceDown`."""
        payload = encode_quota(record)
        if record is not None:
            try:
                self._entry(json.loads(payload), 0.0)  # validates
            except ValueError as exc:  # QuotaError, InvalidQuota
                log.error("the quota DB row of tenant %s cannot be used: %s", tenant, exc)
                raise _SourceDown(f"invalid quota DB row: {exc}") from exc
        return payload

    def _fetch(self, tenant: str, background: bool = False) -> dict[str, Any] | None:
        """Redis, then the DB (written back to Redis). Raises :class:`_SourceDown`.

        While the breaker keeps Redis out, the Redis layer is passed over as if it had failed.
        A ``background`` refresh's failures are not the breaker's (see :meth:`_redis_failed`)."""
        key = quota_cache_key(tenant)
        breaker = self._breaker_for(key)
        redis_ok = self.redis is not None
        if self.redis is not None:
            raw = None
            if not self._redis_allowed(breaker):
                redis_ok = False  # known to be down: not waited for
            else:
                try:
                    raw = self.redis.get(key)
                except _SOURCE_ERRORS as exc:
                    self._redis_failed(exc, breaker, background)
                    log.debug("quota cache read failed for %s: %s", tenant, exc)
                    redis_ok = False
                else:
                    self._redis_answered(breaker)
            data = self._decode(raw) if raw is not None else None
            if data is not None:
                self._hit["redis"].inc()
                return None if data.get("unknown") else data
            self._miss["redis"].inc()
        try:
            record = self.store.get_tenant(tenant)
        except _SOURCE_ERRORS as exc:
            raise _SourceDown(str(exc)) from exc
        (self._hit if record else self._miss)["db"].inc()
        payload = self._db_payload(tenant, record)
        if redis_ok and self.redis is not None and self._redis_allowed(breaker):
            try:
                self.redis.set(key, payload, ex=self.redis_ttl, nx=True)
            except _SOURCE_ERRORS as exc:
                self._redis_failed(exc, breaker, background)
                log.debug("quota cache write-back failed for %s: %s", tenant, exc)
            else:
                self._redis_answered(breaker)
        return json.loads(payload) if record else None

    def _load_now(self, tenant: str, previous: _Entry | None, background: bool = False) -> _Entry:
        if previous is None:
            validate_tenant_id(tenant)
        changes = self._changes
        try:
            data = self._fetch(tenant, background)
        except _SourceDown as exc:
            log.debug("quota sources down for %s: %s", tenant, exc)
            return self._fallback(tenant, previous)
        return self._install(tenant, self._entry(data, time.monotonic()), previous, changes)

    def _schedule(self, tenant: str, e: _Entry, now: float) -> None:
        """Queue one background refresh of ``tenant`` (further lookups wait for its outcome)."""
        e.refresh_at = now + self.retry_interval
        if self._refresher is None or not self._refresher.is_alive():
            with self._lock:
                if self._refresher is None or not self._refresher.is_alive():
                    self._refresher = NamedThread(
                        target=self._refresh_loop, name="quota-refresh", daemon=True
                    )
                    self._refresher.start()
        self._queue.put(tenant)

    def _refresh_loop(self) -> None:
        while (tenant := self._queue.get()) is not None:
            seen = self._local.get(tenant)
            if seen is None:
                continue
            try:
                self._load_now(tenant, seen, background=True)
            except Exception:  # a refresh must never kill the refresher
                log.exception("background refresh of the quota of %s failed", tenant)

    # --- fetching (async) ------------------------------------------------------------------------
    async def _afetch(self, tenant: str, background: bool = False) -> dict[str, Any] | None:
        if self.aredis is None:
            return await asyncio.to_thread(self._fetch, tenant, background)
        key = quota_cache_key(tenant)
        breaker = self._breaker_for(key)
        redis_ok, raw = True, None
        if not self._redis_allowed(breaker):
            redis_ok = False  # known to be down: not waited for
        else:
            try:
                raw = await self.aredis.get(key)
            except _SOURCE_ERRORS as exc:
                self._redis_failed(exc, breaker, background)
                log.debug("quota cache read failed for %s: %s", tenant, exc)
                redis_ok = False
            else:
                self._redis_answered(breaker)
        data = self._decode(raw) if raw is not None else None
        if data is not None:
            self._hit["redis"].inc()
            return None if data.get("unknown") else data
        self._miss["redis"].inc()
        try:
            record = await asyncio.to_thread(self.store.get_tenant, tenant)
        except _SOURCE_ERRORS as exc:
            raise _SourceDown(str(exc)) from exc
        (self._hit if record else self._miss)["db"].inc()
        payload = self._db_payload(tenant, record)
        if redis_ok and self._redis_allowed(breaker):
            try:
                await self.aredis.set(key, payload, ex=self.redis_ttl, nx=True)
            except _SOURCE_ERRORS as exc:
                self._redis_failed(exc, breaker, background)
                log.debug("quota cache write-back failed for %s: %s", tenant, exc)
            else:
                self._redis_answered(breaker)
        return json.loads(payload) if record else None

    async def _aload_now(
        self, tenant: str, previous: _Entry | None, background: bool = False
    ) -> _Entry:
        if previous is None:
            validate_tenant_id(tenant)
        changes = self._changes
        try:
            data = await self._afetch(tenant, background)
        except _SourceDown as exc:
            log.debug("quota sources down for %s: %s", tenant, exc)
            return self._fallback(tenant, previous)
        return self._install(tenant, self._entry(data, time.monotonic()), previous, changes)

    async def _arefresh(self, tenant: str, seen: _Entry) -> None:
        try:
            await self._aload_now(tenant, seen, background=True)
        except Exception:
            log.exception("background refresh of the quota of %s failed", tenant)

    # --- invalidation listener -------------------------------------------------------------------
    def _on_message(self, raw: bytes | str) -> None:
        try:
            msg = json.loads(raw)
            tenant = validate_tenant_id(msg["tenant"])
            payload = msg.get("quota")
            if payload is not None and not isinstance(payload, dict):
                raise ValueError("quota is not an object")
            self.apply_change(tenant, payload)
        except (ValueError, KeyError, TypeError, InvalidIdentifier, QuotaError) as exc:
            log.warning("ignoring a bad quota invalidation %r: %s", raw, exc)

    def _watch_reconnects(self, pubsub: Any) -> None:
        """redis-py may reconnect a subscription by itself (its retry policy); what was published
        in the gap is lost, so every reconnect refreshes the whole cache."""
        if pubsub.connection is not None:
            pubsub.connection.register_connect_callback(self._on_listener_reconnect)

    def _unwatch_reconnects(self, pubsub: Any) -> None:
        if pubsub.connection is not None:  # the connection may go back to a pool
            pubsub.connection.deregister_connect_callback(self._on_listener_reconnect)

    def _on_listener_reconnect(self, _connection: Any) -> None:
        self.reconnects += 1
        self.refresh_all()

    def start(self) -> QuotaCache:
        """Start the invalidation listener thread (needs ``redis``); returns ``self``.

        Returns once subscribed (or after 2 s if Redis is down; it keeps retrying)."""
        if self.redis is None:
            raise QuotaError("the invalidation listener needs a Redis client")
        if self._listener is None:
            self._stop.clear()
            self._listener = NamedThread(
                target=self._listen, name="quota-invalidation", daemon=True
            )
            self._listener.start()
            self._listening = True
            self._subscribed.wait(2.0)
        return self

    def _listen(self) -> None:
        assert self.redis is not None
        first = True
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(INVALIDATION_CHANNEL)
                self._watch_reconnects(pubsub)
                if not first:
                    self.refresh_all()
                first = False
                self._subscribed.set()
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.2)
                    if msg and msg.get("type") == "message":
                        self._on_message(msg["data"])
            except _SOURCE_ERRORS as exc:
                log.warning("quota invalidation listener lost Redis (%s); reconnecting", exc)
                self.reconnects += 1
                first = False
                self._stop.wait(self.retry_interval)
            finally:
                self._unwatch_reconnects(pubsub)
                with contextlib.suppress(*_SOURCE_ERRORS):
                    pubsub.close()

    async def astart(self) -> QuotaCache:
        """Start the invalidation listener as a task of the running loop (needs ``aredis``)."""
        if self.aredis is None:
            raise QuotaError("the async invalidation listener needs an async Redis client")
        if self._listener_task is None:
            subscribed = asyncio.Event()
            self._listener_task = asyncio.get_running_loop().create_task(self._alisten(subscribed))
            self._listening = True
            try:
                await asyncio.wait_for(subscribed.wait(), 2.0)
            except TimeoutError:
                log.warning("quota invalidation listener not subscribed yet; it keeps retrying")
        return self

    async def _alisten(self, subscribed: asyncio.Event) -> None:
        assert self.aredis is not None
        first = True
        while True:
            pubsub = self.aredis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(INVALIDATION_CHANNEL)
                self._watch_reconnects(pubsub)
                if not first:
                    self.refresh_all()
                first = False
                subscribed.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg and msg.get("type") == "message":
                        self._on_message(msg["data"])
            except _SOURCE_ERRORS as exc:
                log.warning("quota invalidation listener lost Redis (%s); reconnecting", exc)
                self.reconnects += 1
                first = False
                await asyncio.sleep(self.retry_interval)
            finally:
                self._unwatch_reconnects(pubsub)
                with contextlib.suppress(*_SOURCE_ERRORS):
                    await pubsub.aclose()

    def close(self) -> None:
        """Stop the listener thread and the refresher (idempotent)."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=2.0)
            self._listener = None
            self._listening = self._listener_task is not None
        if self._refresher is not None:
            self._queue.put(None)
            self._refresher.join(timeout=2.0)
            self._refresher = None

    async def aclose(self) -> None:
        """Stop the listener task and pending refresh tasks, then what :meth:`close` stops."""
        tasks = [t for t in (self._listener_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._listener_task = None
        self._listening = False
        self.close()


def _kept_newer(tenant: str, record: TenantRecord | None) -> None:
    """``quota_entry.lua`` kept a newer version than ``record``'s (never for a deletion)."""
    log.info(
        "quota of %s: Redis holds a newer version than %s; the entry is kept, the change "
        "published all the same (caches that hold a newer version ignore it)",
        tenant,
        record.version if record is not None else "a deletion",
    )


def unpublished_warning(local_ttl: float, redis_ttl: float, *, retrying: bool) -> str:
    """What an operator is told of a change stored while Redis could not be told: every
    process applies it once its local copy (``local_ttl``) and the Redis entry (``redis_ttl``)
    have expired, sooner if a retry (``retrying``: a long-lived process) reaches Redis."""
    retry = "the publish is retried in the background and " if retrying else ""
    return (
        f"stored, but Redis could not be told; {retry}processes apply the change within "
        f"{local_ttl + redis_ttl:g}s"
    )


class QuotaAdmin:
    """Changes quotas so they take effect at once: DB, then the Redis entry, then a publish.

    The Redis entry is written only if Redis does not hold a newer version of the tenant
    (``quota_entry.lua``: one call, one key, so a Redis Cluster runs it too). The DB orders two
    changes of a tenant (``tenants.version``), but their writes may reach Redis in the other
    order: two admin requests at once, a retried publish, a call that timed out and that the
    server still runs. An audit saw the DB at version 7 and Redis at version 5 after a plain
    SET of the older change landed last; every process that did not hold the tenant (a new
    replica) enforced the old quota until the entry expired, as :meth:`QuotaCache.apply_change`
    only protects processes that hold it. So between a tenant's creation and its deletion, its
    Redis entry only ever moves to a newer version (or an equal one: the same change).

    A deletion has no version (the row is gone; a tenant created again starts over at version
    1), so it cannot be ordered against a change of the same tenant made at the same time: its
    ``{"unknown": true}`` entry always replaces the one held, and any change replaces it in turn.
    Such a race may leave the entry of the one that reached Redis last for up to ``redis_ttl``,
    as before versions were compared; so may a tenant created again while Redis still holds a
    higher version of its previous life (its deletion never reached Redis), which the caches
    that hold the tenant keep as well (see :meth:`QuotaCache._install`).

    If Redis cannot be reached, the change is still stored and the methods report
    ``published=False`` in :attr:`last_published`. Redis then still holds the old quota, which
    every other process would read back (and this one too, but for the version check of
    :meth:`QuotaCache._install`) until its entry expires; so the publish is retried in the
    background (a thread for :meth:`publish`, a task of the running loop for :meth:`apublish`)
    every ``retry_interval`` seconds until Redis answers: the entry is written as above (a newer
    change made meanwhile elsewhere is kept; a deletion's entry is deleted instead, and the next
    lookup reads the DB, so that a late ``{"unknown": true}`` never undoes the tenant being
    created again meanwhile elsewhere) and the change published. Retries stop after
    ``retry_for`` seconds (default ``redis_ttl``: by then the stale entry has expired on its
    own, and caches pick the change up within ``QUOTA_LOCAL_TTL``); a later change of the tenant
    that is published supersedes its pending retry.
    """

    #: changes awaiting a retry at most; beyond, the oldest is given up (logged)
    MAX_PENDING: Final = 10_000

    def __init__(
        self,
        store: QuotaStore,
        redis: redis.Redis | None = None,
        *,
        aredis: redis.asyncio.Redis | None = None,
        redis_ttl: int = 30,
        local: QuotaCache | None = None,
        retry_interval: float = 0.25,
        retry_for: float | None = None,
    ) -> None:
        if retry_interval <= 0 or (retry_for is not None and retry_for <= 0):
            raise QuotaError("retry_interval and retry_for must be > 0")
        self.store = store
        self.redis = redis
        self.aredis = aredis
        self.redis_ttl = int(redis_ttl)
        self.local = local
        self.last_published = False
        self.retry_interval = float(retry_interval)
        self.retry_for = float(self.redis_ttl if retry_for is None else retry_for)
        # tenant -> (the change to tell Redis (None: deleted; its message is made again from
        # it), monotonic time to give up); insertion ordered
        self._pending: dict[str, tuple[TenantRecord | None, float]] = {}
        self._pending_lock = threading.Lock()
        self._retry_thread: threading.Thread | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._stop = threading.Event()

    @staticmethod
    def _message(tenant: str, record: TenantRecord | None) -> str:
        quota = json.loads(encode_quota(record)) if record else None
        return json.dumps({"tenant": tenant, "quota": quota}, separators=(",", ":"))

    def _entry_args(self, tenant: str, record: TenantRecord | None) -> tuple[str | int, ...]:
        """KEYS and ARGV of the ``quota_entry.lua`` call that writes ``record``'s entry."""
        version = record.version if record is not None else 0
        return (quota_cache_key(tenant), encode_quota(record), version, self.redis_ttl)

    def _write_entry(self, client: redis.Redis, tenant: str, record: TenantRecord | None) -> None:
        """Replace ``tenant``'s Redis entry by ``record``'s unless Redis holds a newer version
        (see the class docstring). One round trip: ``EVALSHA``, or, from a server that does not
        know the script (a restart, a failover, ``SCRIPT FLUSH``), ``EVAL``, which makes it
        known there. Not redis-py's ``register_script``: it binds a client, and a lazy Cluster
        client (:class:`limiter.redis_factory.LazyRedisCluster`) would have to reach the
        cluster as the admin is made."""
        args = self._entry_args(tenant, record)
        try:
            written = client.evalsha(QUOTA_ENTRY.sha.decode(), 1, *args)
        except NoScriptError:
            written = client.eval(QUOTA_ENTRY.source.decode(), 1, *args)
        if not written:
            _kept_newer(tenant, record)

    async def _awrite_entry(
        self, client: redis.asyncio.Redis, tenant: str, record: TenantRecord | None
    ) -> None:
        """:meth:`_write_entry` on an asyncio client."""
        args = self._entry_args(tenant, record)
        try:
            written = await client.evalsha(QUOTA_ENTRY.sha.decode(), 1, *args)
        except NoScriptError:
            written = await client.eval(QUOTA_ENTRY.source.decode(), 1, *args)
        if not written:
            _kept_newer(tenant, record)

    @property
    def pending(self) -> int:
        """Changes stored but not yet told to Redis (their retries run in the background)."""
        with self._pending_lock:
            return len(self._pending)

    def set_quota(self, tenant: str, **changes: Any) -> TenantRecord:
        """Store the change (see :meth:`QuotaStore.set_quota`) and publish it."""
        record = self.store.set_quota(tenant, **changes)
        self.publish(tenant, record)
        return record

    def delete_tenant(self, tenant: str) -> bool:
        deleted = self.store.delete_tenant(tenant)
        self.publish(tenant, None)
        return deleted

    def publish(self, tenant: str, record: TenantRecord | None) -> bool:
        """Replace the Redis entry and publish the change; False if Redis could not be told
        (the publish is then retried in a background thread, see the class docstring)."""
        message = self._message(tenant, record)
        if self.local is not None:
            self.local.apply_change(tenant, json.loads(message)["quota"])
        self.last_published = False
        if self.redis is None:
            return False
        try:  # two calls, not a pipeline: a Cluster pipeline refuses PUBLISH
            self._write_entry(self.redis, tenant, record)
            self.redis.publish(INVALIDATION_CHANNEL, message)
        except _SOURCE_ERRORS as exc:
            log.warning("quota of %s stored but not published (retrying): %s", tenant, exc)
            self._add_pending(tenant, record)
            self._start_retry_thread()
            self.last_published = False
            return False
        self._supersede(tenant)
        self.last_published = True
        return True

    async def aset_quota(self, tenant: str, **changes: Any) -> TenantRecord:
        record = await asyncio.to_thread(self.store.set_quota, tenant, **changes)
        await self.apublish(tenant, record)
        return record

    async def apublish(self, tenant: str, record: TenantRecord | None) -> bool:
        """:meth:`publish` for an event loop; a failed publish is retried by a task of it.

        :attr:`last_published` is set last, with no await after it: read right after this
        returns (or :meth:`aset_quota` does), it is this call's outcome even while other
        changes are being published on the same loop."""
        if self.aredis is None:
            published = await asyncio.to_thread(self.publish, tenant, record)
            self.last_published = published
            return published
        message = self._message(tenant, record)
        if self.local is not None:
            self.local.apply_change(tenant, json.loads(message)["quota"])
        try:
            await self._awrite_entry(self.aredis, tenant, record)
            await self.aredis.publish(INVALIDATION_CHANNEL, message)
        except _SOURCE_ERRORS as exc:
            log.warning("quota of %s stored but not published (retrying): %s", tenant, exc)
            self._add_pending(tenant, record)
            self._start_retry_task()
            self.last_published = False
            return False
        self._supersede(tenant)
        self.last_published = True
        return True

    # --- retries of failed publishes -------------------------------------------------------------
    def _add_pending(self, tenant: str, record: TenantRecord | None) -> None:
        with self._pending_lock:
            self._pending.pop(tenant, None)  # to the end: the newest
            self._pending[tenant] = (record, time.monotonic() + self.retry_for)
            while len(self._pending) > self.MAX_PENDING:
                dropped = next(iter(self._pending))
                del self._pending[dropped]
                log.warning("too many quota changes await Redis; not retrying %s's", dropped)

    def _supersede(self, tenant: str) -> None:
        """A change of ``tenant`` reached Redis: an older one pending for it is not retried."""
        if self._pending:
            with self._pending_lock:
                self._pending.pop(tenant, None)

    def _due(self) -> list[tuple[str, TenantRecord | None]]:
        """The pending (tenant, change) pairs, less those given up on (logged)."""
        now = time.monotonic()
        with self._pending_lock:
            for tenant, (_, give_up_at) in list(self._pending.items()):
                if now >= give_up_at:
                    del self._pending[tenant]
                    log.warning(
                        "quota change of %s never reached Redis within %gs; its old cache "
                        "entry has expired, caches read the change from the DB",
                        tenant,
                        self.retry_for,
                    )
            return [(t, record) for t, (record, _) in self._pending.items()]

    def _retried(self, tenant: str, record: TenantRecord | None) -> None:
        with self._pending_lock:
            pending = self._pending.get(tenant)
            if pending is not None and pending[0] == record:  # not superseded meanwhile
                del self._pending[tenant]
        log.info("quota change of %s published after Redis came back", tenant)

    def _start_retry_thread(self) -> None:
        with self._pending_lock:
            if self._retry_thread is None or not self._retry_thread.is_alive():
                self._stop.clear()
                self._retry_thread = NamedThread(
                    target=self._retry_loop, name="quota-publish-retry", daemon=True
                )
                self._retry_thread.start()

    def _retry_loop(self) -> None:
        assert self.redis is not None
        while not self._stop.wait(self.retry_interval):
            for tenant, record in self._due():
                message = self._message(tenant, record)
                try:  # a newer change made meanwhile elsewhere is never undone (class docstring)
                    if record is None:
                        self.redis.delete(quota_cache_key(tenant))
                    else:
                        self._write_entry(self.redis, tenant, record)
                    self.redis.publish(INVALIDATION_CHANNEL, message)
                except _SOURCE_ERRORS as exc:  # still down: the rest waits for the next round
                    log.debug("quota publish retry for %s failed: %s", tenant, exc)
                    break
                except Exception:  # a retry must never kill the retrier
                    log.exception("quota publish retry for %s failed", tenant)
                    break
                self._retried(tenant, record)
            with self._pending_lock:
                if not self._pending:
                    self._retry_thread = None
                    return

    def _start_retry_task(self) -> None:
        if self._retry_task is None or self._retry_task.done():
            # A task of the app's QuotaCache, where there is one: its shutdown cancels it.
            self._retry_task = (
                self.local.spawn(self._aretry_loop())
                if self.local is not None
                else asyncio.get_running_loop().create_task(self._aretry_loop())
            )

    async def _aretry_loop(self) -> None:
        assert self.aredis is not None
        while True:
            await asyncio.sleep(self.retry_interval)
            for tenant, record in self._due():
                message = self._message(tenant, record)
                try:
                    if record is None:
                        await self.aredis.delete(quota_cache_key(tenant))
                    else:
                        await self._awrite_entry(self.aredis, tenant, record)
                    await self.aredis.publish(INVALIDATION_CHANNEL, message)
                except _SOURCE_ERRORS as exc:
                    log.debug("quota publish retry for %s failed: %s", tenant, exc)
                    break
                except Exception:
                    log.exception("quota publish retry for %s failed", tenant)
                    break
                self._retried(tenant, record)
            if not self._pending:  # no await since the check: a new failure starts a new task
                return

    def close(self) -> None:
        """Stop retrying failed publishes (idempotent); what is pending is given up."""
        self._stop.set()
        thread = self._retry_thread
        if thread is not None:
            thread.join(timeout=2.0)

    async def aclose(self) -> None:
        """Cancel the retry task, then what :meth:`close` stops."""
        task, self._retry_task = self._retry_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(self.close)


__all__ = [
    "CACHE_KEY_PREFIX",
    "INVALIDATION_CHANNEL",
    "QuotaAdmin",
    "QuotaCache",
    "encode_quota",
    "quota_cache_key",
    "to_quota",
]
