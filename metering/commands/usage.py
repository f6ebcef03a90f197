"""``metering usage query|sliding|top`` and ``metering billing TENANT YYYY-MM``: the query layer
from the command line, as readable tables or ``--json`` (statements also ``--csv``).

Bad input (a parameter the query layer refuses) exits with code 2 and a message naming it.
With the embedded engine, run these where no other process holds the data folder (chdb allows
one process per folder), or point ``CLICKHOUSE_URL`` at a server.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from metering.billing import billing_statement
from metering.ids import printable
from metering.queries import UsageQueries, rfc3339
from metering.query_sql import Aggregation, DecisionFilter, QueryError, UsageQuery, Window
from metering.settings import load_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = sub.add_parser("usage", help="usage of a meter: windows, sliding sums, top tenants")
    usub = usage.add_subparsers(dest="usage_command", metavar="ACTION", required=True)

    query = usub.add_parser("query", help="usage over [from, to) by window, zone and group")
    query.add_argument("--tenant", required=True)
    query.add_argument("--meter", required=True)
    query.add_argument("--from", dest="start", required=True, help="RFC 3339, inclusive")
    query.add_argument("--to", dest="end", required=True, help="RFC 3339, exclusive")
    query.add_argument("--window", choices=[w.value for w in Window], default=None)
    query.add_argument("--tz", default="UTC", help="IANA time zone of the windows")
    query.add_argument(
        "--aggregation", choices=[a.value for a in Aggregation], default=Aggregation.SUM.value
    )
    query.add_argument("--group-by", action="append", default=[], help="dimension (repeatable)")
    query.add_argument("--filter", action="append", default=[], help="dimension=value (repeatable)")
    _common(query)
    query.add_argument("--raw", action="store_true", help="read only the raw events")
    query.set_defaults(handler=_query)

    sliding = usub.add_parser("sliding", help="rolling totals over the last N minutes")
    sliding.add_argument("--tenant", required=True)
    sliding.add_argument("--meter", required=True)
    sliding.add_argument("--minutes", type=int, default=60)
    sliding.add_argument("--points", type=int, default=1, help="one rolling value per minute")
    sliding.add_argument("--aggregation", choices=["SUM", "COUNT"], default="SUM")
    _common(sliding)
    sliding.set_defaults(handler=_sliding)

    top = usub.add_parser("top", help="the tenants with the most usage over the last N minutes")
    top.add_argument("--meter", required=True)
    top.add_argument("--minutes", type=int, default=60)
    top.add_argument("--limit", type=int, default=10)
    top.add_argument("--aggregation", choices=["SUM", "COUNT"], default="SUM")
    _common(top)
    top.set_defaults(handler=_top)

    billing = sub.add_parser("billing", help="a tenant's monthly statement per meter")
    billing.add_argument("tenant")
    billing.add_argument("month", help="YYYY-MM")
    billing.add_argument("--tz", default="UTC", help="the tenant's IANA time zone")
    fmt = billing.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    billing.set_defaults(handler=_billing)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decision",
        choices=[d.value for d in DecisionFilter],
        default="billable",
        help="billable usage (default), rejected decisions, or all",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _queries() -> UsageQueries:
    from metering.cli import CommandError
    from metering.clickhouse.client import clickhouse_client
    from metering.commands.store_errors import (
        EngineHolder,
        embedded_engine_held,
        engine_holder,
    )

    settings = load_settings()

    def held(holder: EngineHolder | None) -> CommandError:
        # The embedded engine allows one process per data folder: a running `metering up` or
        # `metering api` owns it, and answers the same questions over HTTP.
        who = holder.describe() if holder else "a running `metering up`"
        url = (holder.api_url if holder else None) or "http://127.0.0.1:8000"
        ask = (
            'ask it over HTTP instead, e.g. curl -H "Authorization: Bearer '
            f'$(metering token <tenant>)" {url}/v1/billing/<tenant>/<yyyy-mm>'
            " (or /v1/usage, /v1/usage/sliding)"
            if holder is None or holder.api_url
            else "stop it, or ask a `metering up` or `metering api` that owns the folder"
        )
        return CommandError(
            f"the embedded ClickHouse ({settings.clickhouse_url}) is in use by {who}; {ask}"
        )

    if holder := engine_holder(settings):
        raise held(holder)
    try:
        client = clickhouse_client(
            settings.clickhouse_url, timeout=settings.clickhouse_query_timeout
        )
    except Exception as exc:
        if embedded_engine_held(settings, exc):
            raise held(engine_holder(settings)) from None
        raise
    return UsageQueries(client, settings.clickhouse_database)


def _bad_input(exc: Exception) -> int:
    print(f"metering: {exc}", file=sys.stderr)
    return 2


def _time(text: str, param: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(param, f"must be an RFC 3339 time, not {text!r}") from None
    return value


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) for row in rows)
        for i in range(len(headers))
    ]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    # A dimension value is whatever a tenant sent (any characters): escaped, so it cannot
    # forge a row of the table or send escape sequences to the operator's terminal.
    return printable(str(value))


def _print(payload: dict[str, Any], as_json: bool, table: str) -> int:
    print(json.dumps(payload, indent=2) if as_json else table)
    return 0


def _query(args: argparse.Namespace) -> int:
    try:
        filters: dict[str, list[str]] = {}
        for item in args.filter:
            name, sep, value = item.partition("=")
            if not sep:
                raise QueryError("filter", f"must be dimension=value, not {item!r}")
            filters.setdefault(name, []).append(value)
        q = UsageQuery(
            tenant=args.tenant,
            meter=args.meter,
            start=_time(args.start, "from"),
            end=_time(args.end, "to"),
            window=args.window,
            tz=args.tz,
            aggregation=args.aggregation,
            group_by=tuple(n for g in args.group_by for n in g.split(",") if n),
            filters=filters,
            decision=args.decision,
        )
        result = _queries().usage(q, force_raw=args.raw)
    except QueryError as exc:
        return _bad_input(exc)
    headers = ["window_start", "window_end", *q.group_by, q.aggregation.value.lower()]
    rows = [
        [rfc3339(r.window_start), rfc3339(r.window_end), *r.group.values(), r.value]
        for r in result.rows
    ]
    table = render_table(headers, rows) + f"\n({len(rows)} rows, {result.path} path)"
    return _print(result.to_dict(), args.json, table)


def _sliding(args: argparse.Namespace) -> int:
    try:
        result = _queries().sliding(
            args.tenant,
            args.meter,
            args.minutes,
            points=args.points,
            aggregation=args.aggregation,
            decision=args.decision,
        )
    except QueryError as exc:
        return _bad_input(exc)
    rows = [[rfc3339(p.window_start), rfc3339(p.window_end), p.value] for p in result.points]
    table = render_table(["window_start", "window_end", args.aggregation.lower()], rows)
    return _print(result.to_dict(), args.json, table)


def _top(args: argparse.Namespace) -> int:
    try:
        result = _queries().top_tenants(
            args.meter,
            args.minutes,
            args.limit,
            aggregation=args.aggregation,
            decision=args.decision,
        )
    except QueryError as exc:
        return _bad_input(exc)
    rows = [[i, t.tenant, t.value] for i, t in enumerate(result.tenants, start=1)]
    table = render_table(["rank", "tenant", args.aggregation.lower()], rows)
    table += f"\n{rfc3339(result.window_start)} .. {rfc3339(result.window_end)}"
    return _print(result.to_dict(), args.json, table)


def _billing(args: argparse.Namespace) -> int:
    try:
        statement = billing_statement(_queries(), args.tenant, args.month, args.tz)
    except QueryError as exc:
        return _bad_input(exc)
    if args.csv:
        sys.stdout.write(statement.to_csv())
        return 0
    rows = [[line.meter, line.quantity, line.events] for line in statement.lines]
    table = (
        f"{statement.tenant} {statement.month} ({statement.tz}): "
        f"{rfc3339(statement.period_start)} .. {rfc3339(statement.period_end)}\n"
        + render_table(["meter", "quantity", "events"], rows)
    )
    return _print(statement.to_dict(), args.json, table)
