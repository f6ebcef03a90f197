"""The usage query layer: runs the SQL of :mod:`metering.query_sql` on a ClickHouse client.

The client is passed in (a clickhouse-connect client: a server over HTTP or the embedded chdb
engine), never made here. Every question is validated before any SQL runs, so a bad parameter
raises :class:`~metering.query_sql.QueryError` and touches nothing.

Sliding windows are minute-grained: "the last N minutes" at ``now`` is the N whole minutes up to
and including the minute ``now`` falls in, i.e. ``[m - N + 1, m + 1)`` in minutes where ``m`` is
``now``'s minute. A rolling series gives that sum at each of the last ``points`` minutes.
"""

from __future__ import annotations

import datetime as dt
import itertools
import types
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NoReturn

import msgspec

from metering.query_sql import (
    EARLIEST,
    LATEST_TIME,
    MAX_RESULT_ROWS,
    MAX_SLIDING_MINUTES,
    MAX_SLIDING_POINTS,
    MINUTE_WINDOW_SECONDS,
    UTC,
    Aggregation,
    DecisionFilter,
    Path,
    QueryError,
    SqlQuery,
    UsageQuery,
    Window,
    build_minute_series,
    build_statement,
    build_top_tenants,
    build_usage,
    validate_database,
    window_end_in_sql,
)

_INTEGRAL = {Aggregation.COUNT, Aggregation.UNIQUE_COUNT}
NO_GROUP: Mapping[str, str | None] = types.MappingProxyType({})  # shared, read-only


def _instants(
    starts_s: list[int], ends_s: list[int], zone: zoneinfo.ZoneInfo
) -> tuple[list[dt.datetime], list[dt.datetime]]:
    """Window bounds (epoch seconds) as datetimes in ``zone``, each instant converted once: a
    window's end is usually the next one's start."""
    fromtimestamp = dt.datetime.fromtimestamp
    starts = list(map(fromtimestamp, starts_s, itertools.repeat(zone)))
    known = dict(zip(starts_s, starts, strict=True)).get
    return starts, [known(e) or fromtimestamp(e, zone) for e in ends_s]


def rfc3339(t: dt.datetime) -> str:
    """``2026-03-29T00:00:00+01:00``; milliseconds only when there are some."""
    spec = "milliseconds" if t.microsecond else "seconds"
    return t.isoformat(timespec=spec)


def _rfc3339_cache() -> Callable[[dt.datetime], str]:
    """:func:`rfc3339`, remembered per instant for one answer's times (all in one zone).

    Not ``functools.lru_cache``: two times of one zone that differ only by ``fold`` (the
    repeated hour when the clocks go back) compare and hash equal (PEP 495), so the second would
    be given the first one's offset: ``02:00+02:00`` for ``02:00+01:00``."""
    texts: dict[tuple[dt.datetime, int], str] = {}

    def text(t: dt.datetime) -> str:
        key = (t, t.fold)
        found = texts.get(key)
        if found is None:
            found = texts[key] = rfc3339(t)
        return found

    return text


def _value(raw: Any, aggregation: Aggregation) -> float | int:
    return int(raw) if aggregation in _INTEGRAL else float(raw)


class UsageRow(msgspec.Struct, frozen=True, gc=False):
    """One window (or the whole range) and group: ``value`` over ``[window_start, window_end)``.

    An answer can hold tens of thousands of rows. Rows are structs the garbage collector does not
    track (their fields never refer back to a row): tracked rows (named tuples) set off
    collections while an answer was being built, which promoted them, so that a full collection
    of the process (10-40 ms) came about every hundred answers of a day of minutes."""

    window_start: dt.datetime
    window_end: dt.datetime
    value: float | int
    group: Mapping[str, str | None]

    def to_dict(self, text: Callable[[dt.datetime], str] = rfc3339) -> dict[str, Any]:
        return {
            "window_start": text(self.window_start),
            "window_end": text(self.window_end),
            "value": self.value,
            "group": dict(self.group),
        }


@dataclass(frozen=True)
class UsageResult:
    """The answer to a :class:`UsageQuery`. Windows without events are absent (sparse)."""

    query: UsageQuery
    rows: list[UsageRow]
    path: Path
    tables: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        q, zone = self.query, zoneinfo.ZoneInfo(self.query.tz)
        text = _rfc3339_cache()  # a window's end is the next's start
        return {
            "tenant": q.tenant,
            "meter": q.meter,
            "window": q.window.value if q.window else None,
            "aggregation": q.aggregation.value,
            "tz": q.tz,
            "from": rfc3339(q.start.astimezone(zone)),
            "to": rfc3339(q.end.astimezone(zone)),
            "data": [row.to_dict(text) for row in self.rows],
        }


@dataclass(frozen=True)
class SlidingPoint:
    """The total over ``[window_start, window_end)``, a window of the requested N minutes."""

    window_start: dt.datetime
    window_end: dt.datetime
    value: float | int

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_start": rfc3339(self.window_start),
            "window_end": rfc3339(self.window_end),
            "value": self.value,
        }


@dataclass(frozen=True)
class SlidingResult:
    tenant: str
    meter: str
    minutes: int
    aggregation: Aggregation
    points: list[SlidingPoint]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "meter": self.meter,
            "minutes": self.minutes,
            "aggregation": self.aggregation.value,
            "data": [p.to_dict() for p in self.points],
        }


@dataclass(frozen=True)
class TenantUsage:
    tenant: str
    value: float | int


@dataclass(frozen=True)
class TopTenants:
    meter: str
    window_start: dt.datetime
    window_end: dt.datetime
    aggregation: Aggregation
    tenants: list[TenantUsage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "meter": self.meter,
            "window_start": rfc3339(self.window_start),
            "window_end": rfc3339(self.window_end),
            "aggregation": self.aggregation.value,
            "data": [{"tenant": t.tenant, "value": t.value} for t in self.tenants],
        }


def _bounded_int(value: object, param: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise QueryError(param, f"must be a whole number from {low} to {high}")
    return value


def _now_minute_end(now: dt.datetime | None) -> int:
    """Epoch seconds of the end of the minute ``now`` falls in."""
    now = dt.datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise QueryError("now", "must carry a UTC offset")
    return (int(now.timestamp()) // 60 + 1) * 60


def rolling_sums(
    minute_values: dict[int, float | int], first_end_s: int, points: int, minutes: int
) -> list[tuple[int, float]]:
    """``points`` rolling totals: for each end ``e`` (every minute from ``first_end_s``), the sum
    of ``minute_values[m]`` (keyed by minute start, epoch seconds) over ``[e - 60*minutes, e)``.

    Prefix sums are kept as exact fractions, so each total is the correctly rounded sum of its
    minutes (no drift from adding and subtracting floats along the series)."""
    lo = first_end_s - 60 * minutes
    dense = [Fraction(0)] * (points - 1 + minutes)
    for m, v in minute_values.items():
        idx = (m - lo) // 60
        if 0 <= idx < len(dense):
            dense[idx] += Fraction(v)
    prefix = list(itertools.accumulate(dense, initial=Fraction(0)))
    return [(first_end_s + 60 * k, float(prefix[k + minutes] - prefix[k])) for k in range(points)]


#: The step at which :meth:`UsageQueries.check_zone` compares the two time-zone databases: no
#: zone has changed its offset at other than a whole half hour of UTC.
ZONE_CHECK_STEP_SECONDS = 1800
_ZONE_CHECK_SQL = (
    "SELECT groupArray(timeZoneOffset(toDateTime(t, {tz:String}))) FROM "
    "(SELECT arrayJoin(range({a:UInt32}, {b:UInt32}, {step:UInt32})) AS t)"
)
#: (zone, year) -> the instants at which the two databases give different offsets, as
#: ``(instant, Python's offset, ClickHouse's)``; empty: alike. Per process (one process talks
#: to one ClickHouse), shared by every :class:`UsageQueries` (the API makes one per request).
_ZONE_YEARS: dict[tuple[str, int], tuple[tuple[int, int, int], ...]] = {}
_ZONE_YEARS_KEPT = 10_000


def python_offsets(tz: str, starts: range) -> list[int]:
    """The UTC offsets (seconds) Python's ``zoneinfo`` gives ``tz`` at each of ``starts``."""
    zone = zoneinfo.ZoneInfo(tz)
    out = []
    for t in starts:
        offset = dt.datetime.fromtimestamp(t, zone).utcoffset()
        out.append(int(offset.total_seconds()) if offset is not None else 0)
    return out


def _refuse_zone(tz: str, year: int, t: int, ours: int, theirs: int) -> NoReturn:
    when = dt.datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%MZ")
    raise QueryError(
        "tz",
        f"{tz}: this server's time zone database and ClickHouse's disagree on its UTC offset in"
        f" {year} (at {when}: {ours:+d} s against {theirs:+d} s), so its windows and months"
        " cannot be computed consistently; use another zone or UTC until the two are updated"
        " to the same release",
    )


class UsageQueries:
    """Usage, sliding-window and top-tenant questions against one database of one client."""

    def __init__(self, client: Any, database: str = "metering") -> None:
        self.client = client
        self.database = validate_database(database)

    def check_zone(
        self,
        tz: str,
        start: dt.datetime,
        end: dt.datetime,
        margin: dt.timedelta = dt.timedelta(days=2),
    ) -> None:
        """Refuse ``tz`` (:class:`QueryError` on ``tz``) if Python's time-zone database and
        ClickHouse's give it different UTC offsets within ``[start - margin, end + margin)``.

        ClickHouse cuts the windows (its own copy of the IANA database); Python computes a
        statement's month bounds, the windows' labels and which rollup may answer
        (``zoneinfo``: the host's copy, or the ``tzdata`` package). The billing audit found them
        a release apart on this machine (2025b, 2026c), differing for America/Vancouver,
        Africa/Casablanca and others: a statement billed events to the wrong month and
        disagreed with the MONTH window of ``/v1/usage``. A wrong bill is worse than none: a
        question whose span they disagree on is refused, saying why, until the two agree.
        ``margin`` covers the DAY windows at the span's edges (a MONTH window's bounds are
        checked as they come: :meth:`check_zone_instants`). The databases are compared every
        half hour of each year the span touches, once per process and year (~25 ms), and the
        differences kept."""
        if tz == "UTC":
            return
        lo = int((start - margin).timestamp())
        hi = int((end + margin).timestamp())
        first = max(start - margin, EARLIEST).year
        last = min(end + margin, LATEST_TIME).year
        for year in range(first, last + 1):
            for t, ours, theirs in self._zone_differences(tz, year):
                if lo <= t < hi:
                    _refuse_zone(tz, year, t, ours, theirs)

    def check_zone_instants(self, tz: str, instants: Iterable[int]) -> None:
        """:meth:`check_zone` for single instants (epoch seconds): the bounds of windows that
        ClickHouse cut and Python labels, which may lie outside the question's span (a MONTH
        window begins up to a month before it)."""
        if tz == "UTC":
            return
        for t in instants:
            year = dt.datetime.fromtimestamp(t, UTC).year
            for d, ours, theirs in self._zone_differences(tz, year):
                if d <= t < d + ZONE_CHECK_STEP_SECONDS:
                    _refuse_zone(tz, year, d, ours, theirs)

    def _zone_differences(self, tz: str, year: int) -> tuple[tuple[int, int, int], ...]:
        """``(instant, Python's offset, ClickHouse's)`` where the two differ in ``year``
        (remembered per process: see ``_ZONE_YEARS``)."""
        found = _ZONE_YEARS.get((tz, year))
        if found is not None:
            return found
        a = max(int(dt.datetime(year, 1, 1, tzinfo=UTC).timestamp()), 0)
        b = int(dt.datetime(year + 1, 1, 1, tzinfo=UTC).timestamp())
        starts = range(a, b, ZONE_CHECK_STEP_SECONDS)
        (theirs,) = self.run(
            SqlQuery(_ZONE_CHECK_SQL, {"tz": tz, "a": a, "b": b, "step": ZONE_CHECK_STEP_SECONDS})
        )[0]
        ours = python_offsets(tz, starts)
        found = tuple((t, x, y) for t, x, y in zip(starts, ours, theirs, strict=True) if x != y)
        if len(_ZONE_YEARS) >= _ZONE_YEARS_KEPT:
            _ZONE_YEARS.clear()
        _ZONE_YEARS[tz, year] = found
        return found

    def run(self, query: SqlQuery) -> list[tuple[Any, ...]]:
        """Execute ``query`` with its parameters bound server-side."""
        result = self.client.query(
            query.sql, parameters=query.parameters, settings=query.settings or None
        )
        return list(result.result_rows)

    # --- usage --------------------------------------------------------------------------------

    def run_columns(self, query: SqlQuery) -> list[list[Any]]:
        """Execute ``query``; the answer as one list per column (no tuple per row is made)."""
        result = self.client.query(
            query.sql,
            parameters=query.parameters,
            settings=query.settings or None,
            column_oriented=True,
        )
        return list(result.result_columns)

    def usage(self, q: UsageQuery, *, force_raw: bool = False) -> UsageResult:
        """Usage of ``q.meter`` by window and group; rollups where they answer, raw otherwise."""
        self.check_zone(q.tz, q.start, q.end)
        sql = build_usage(q, self.database, force_raw=force_raw)
        columns = self.run_columns(sql)
        count = len(columns[0]) if columns else 0
        if count > MAX_RESULT_ROWS:
            raise QueryError(
                "group_by", f"the answer has more than {MAX_RESULT_ROWS} rows; narrow the query"
            )
        if not count:
            return UsageResult(q, [], sql.path, sql.tables)
        zone = zoneinfo.ZoneInfo(q.tz)
        number = int if q.aggregation in _INTEGRAL else float
        if q.window is None:
            starts: Iterable[dt.datetime] = itertools.repeat(q.start.astimezone(zone), count)
            ends: Iterable[dt.datetime] = itertools.repeat(q.end.astimezone(zone), count)
        else:
            window_starts = columns.pop(0)
            if window_end_in_sql(q.window):
                window_ends = columns.pop(0)
            else:
                window_ends = [s + MINUTE_WINDOW_SECONDS for s in window_starts]
            if q.window == Window.MONTH:  # may begin up to a month before the question
                self.check_zone_instants(q.tz, {*window_starts, *window_ends})
            starts, ends = _instants(window_starts, window_ends, zone)
        *group_columns, values = columns
        names = q.group_by
        groups: Iterable[Mapping[str, str | None]] = (
            [dict(zip(names, g, strict=True)) for g in zip(*group_columns, strict=True)]
            if names
            else itertools.repeat(NO_GROUP, count)
        )
        out = list(map(UsageRow, starts, ends, map(number, values), groups))
        return UsageResult(q, out, sql.path, sql.tables)

    # --- sliding windows ------------------------------------------------------------------------

    def sliding(
        self,
        tenant: str,
        meter: str,
        minutes: int,
        *,
        points: int = 1,
        now: dt.datetime | None = None,
        aggregation: Aggregation | str = Aggregation.SUM,
        decision: DecisionFilter | str = DecisionFilter.BILLABLE,
        force_raw: bool = False,
    ) -> SlidingResult:
        """Rolling totals over the last ``minutes`` minutes, at each of the last ``points``
        minutes (oldest first; the last point ends with the minute ``now`` falls in)."""
        minutes = _bounded_int(minutes, "minutes", 1, MAX_SLIDING_MINUTES)
        points = _bounded_int(points, "points", 1, MAX_SLIDING_POINTS)
        last_end = _now_minute_end(now)
        first_end = last_end - 60 * (points - 1)
        sql = build_minute_series(
            tenant,
            meter,
            first_end - 60 * minutes,
            last_end,
            self.database,
            aggregation=aggregation,
            decision=decision,
            force_raw=force_raw,
        )
        agg = Aggregation(str(aggregation).upper())
        per_minute = {int(m): _value(v, agg) for m, v in self.run(sql)}
        series = [
            SlidingPoint(
                dt.datetime.fromtimestamp(end - 60 * minutes, UTC),
                dt.datetime.fromtimestamp(end, UTC),
                _value(total, agg),
            )
            for end, total in rolling_sums(per_minute, first_end, points, minutes)
        ]
        return SlidingResult(tenant, meter, minutes, agg, series)

    def top_tenants(
        self,
        meter: str,
        minutes: int = 60,
        limit: int = 10,
        *,
        now: dt.datetime | None = None,
        aggregation: Aggregation | str = Aggregation.SUM,
        decision: DecisionFilter | str = DecisionFilter.BILLABLE,
        force_raw: bool = False,
    ) -> TopTenants:
        """The ``limit`` tenants with the most usage of ``meter`` over the last ``minutes``."""
        minutes = _bounded_int(minutes, "minutes", 1, MAX_SLIDING_MINUTES)
        end = _now_minute_end(now)
        start = end - 60 * minutes
        sql = build_top_tenants(
            meter,
            start,
            end,
            limit,
            self.database,
            aggregation=aggregation,
            decision=decision,
            force_raw=force_raw,
        )
        agg = Aggregation(str(aggregation).upper())
        tenants = [TenantUsage(t, _value(v, agg)) for t, v in self.run(sql)]
        return TopTenants(
            meter,
            dt.datetime.fromtimestamp(start, UTC),
            dt.datetime.fromtimestamp(end, UTC),
            agg,
            tenants,
        )

    # --- billing --------------------------------------------------------------------------------

    def meter_totals(
        self, tenant: str, start: dt.datetime, end: dt.datetime, *, force_raw: bool = False
    ) -> list[tuple[str, float, int]]:
        """Billable ``(meter, quantity, events)`` per meter over ``[start, end)``."""
        sql = build_statement(tenant, start, end, self.database, force_raw=force_raw)
        return [(str(m), float(q), int(n)) for m, q, n in self.run(sql)]


__all__ = [
    "SlidingPoint",
    "SlidingResult",
    "TenantUsage",
    "TopTenants",
    "UsageQueries",
    "UsageResult",
    "UsageRow",
    "rfc3339",
    "rolling_sums",
]
