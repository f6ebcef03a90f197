"""``metering tenants set | show | list``: tenants' quotas in the quota DB.

``set`` stores the change, replaces the Redis cache entry and publishes it, so every process
applies it within a second. Bad input (unknown plan, a limit out of range, a malformed tenant id)
exits with code 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from metering.commands.argtypes import positive
from metering.ids import InvalidIdentifier, validate_tenant_id
from metering.plans import PLANS, QuotaError, plan_limits
from metering.quota_db import QuotaStore, TenantRecord
from metering.settings import Settings, load_settings

log = logging.getLogger(__name__)


def _tenant(text: str) -> str:
    try:
        return validate_tenant_id(text)
    except InvalidIdentifier as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = sub.add_parser("tenants", help="tenants and their quotas")
    tsub = tenants.add_subparsers(dest="tenants_command", metavar="ACTION", required=True)

    set_ = tsub.add_parser(
        "set",
        help="create or change a tenant's quota (takes effect everywhere within a second)",
        description="Limits not given keep their value: from --plan's defaults when a plan is "
        "named, else from the tenant's current row; a new tenant without a plan needs "
        "--rate, --burst and --daily.",
    )
    set_.add_argument("tenant", type=_tenant)
    set_.add_argument("--rate", type=positive(float), help="tokens per second")
    set_.add_argument("--burst", type=positive(int), help="bucket size (largest burst)")
    set_.add_argument("--daily", type=positive(int), help="units per UTC day")
    set_.add_argument("--window-limit", type=positive(int), help="units per rolling window")
    set_.add_argument("--window-seconds", type=positive(int), help="rolling window length")
    set_.add_argument("--no-window", action="store_true", help="remove the rolling window")
    set_.add_argument("--plan", choices=list(PLANS), help="plan (its limits are the defaults)")
    set_.add_argument("--json", action="store_true", help="print the stored row as JSON")
    set_.set_defaults(handler=_set)

    show = tsub.add_parser("show", help="a tenant's stored quota (or what an unknown one gets)")
    show.add_argument("tenant", type=_tenant)
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_show)

    list_ = tsub.add_parser("list", help="every tenant in the quota DB")
    list_.add_argument("--json", action="store_true")
    list_.set_defaults(handler=_list)


def _store(settings: Settings) -> QuotaStore:
    return QuotaStore(settings.quota_db_url)


def _redis(settings: Settings) -> Any:
    """The client that tells Redis of a change, or None when none can be made now (a Cluster
    client asks the nodes for the slot map as it is made): the change is stored all the same,
    as when a single node is down, and the caches take it up after their TTLs."""
    from redis.exceptions import RedisClusterException, RedisError

    from limiter.redis_factory import redis_from_settings
    from metering.commands.store_errors import redis_setting

    try:
        return redis_from_settings(settings)
    except (RedisError, RedisClusterException) as exc:
        log.warning("Redis (%s) cannot be reached: %s", redis_setting(settings), exc)
        return None


def _row(rec: TenantRecord) -> str:
    lim = rec.limits
    window = f"{lim.window_limit}/{lim.window_seconds}s" if lim.window_limit else "-"
    return (
        f"{rec.tenant:30} {rec.plan:10} {lim.rate_per_sec:>10g} {lim.burst:>8} "
        f"{lim.daily_limit:>12} {window:>14} v{rec.version}"
    )


_HEADER = f"{'tenant':30} {'plan':10} {'rate/s':>10} {'burst':>8} {'daily':>12} {'window':>14}"


def _bad_input(exc: Exception) -> int:
    print(f"metering: {exc}", file=sys.stderr)
    return 2


def _set(args: argparse.Namespace) -> int:
    if args.no_window and (args.window_limit or args.window_seconds):
        return _bad_input(ValueError("--no-window cannot be combined with --window-limit/-seconds"))
    settings = load_settings()
    changes: dict[str, Any] = {
        "plan": args.plan,
        "rate_per_sec": args.rate,
        "burst": args.burst,
        "daily_limit": args.daily,
    }
    if args.no_window:
        changes.update(window_limit=None, window_seconds=None)
    else:
        if args.window_limit is not None:
            changes["window_limit"] = args.window_limit
        if args.window_seconds is not None:
            changes["window_seconds"] = args.window_seconds
    from limiter.quotas import QuotaAdmin, unpublished_warning

    store = _store(settings)
    try:
        admin = QuotaAdmin(store, _redis(settings), redis_ttl=settings.tenant_quota_cache_ttl)
        record = admin.set_quota(args.tenant, **changes)
    except (QuotaError, InvalidIdentifier) as exc:
        return _bad_input(exc)
    finally:
        store.close()
    print(json.dumps(record.as_dict()) if args.json else f"{_HEADER}\n{_row(record)}")
    if not admin.last_published:
        warning = unpublished_warning(
            settings.quota_local_ttl, settings.tenant_quota_cache_ttl, retrying=False
        )  # this process exits now: no retry of its own
        print(f"metering: warning: {warning}", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    settings = load_settings()
    store = _store(settings)
    try:
        record = store.get_tenant(args.tenant)
    finally:
        store.close()
    if record is not None:
        print(json.dumps(record.as_dict()) if args.json else f"{_HEADER}\n{_row(record)}")
        return 0
    if settings.quota_unknown_tenant == "reject":
        outcome = "its requests are rejected (QUOTA_UNKNOWN_TENANT=reject)"
    else:
        lim = plan_limits(settings.quota_default_plan)
        outcome = (
            f"it gets plan {settings.quota_default_plan!r}: {lim.rate_per_sec:g}/s, "
            f"burst {lim.burst}, {lim.daily_limit}/day (QUOTA_UNKNOWN_TENANT=default)"
        )
    print(f"metering: tenant {args.tenant!r} is not in the quota DB; {outcome}", file=sys.stderr)
    return 1


def _list(args: argparse.Namespace) -> int:
    store = _store(load_settings())
    try:
        records = store.list_tenants()
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.as_dict() for r in records]))
    else:
        print(_HEADER)
        for rec in records:
            print(_row(rec))
    return 0
