"""Usage questions as parameterized ClickHouse SQL (pure: no I/O).

Invariants, enforced here and tested in ``tests/unit/test_query_sql.py``:

- Every value that comes from a caller (tenant, meter, times, time zone, dimension names and
  values, limits) reaches ClickHouse as a bound parameter (``{name:Type}``, server-side binding).
  The only text spliced into SQL is chosen from fixed tables in this module (window functions,
  aggregation expressions, table names) or is the configured database name, itself checked
  against an identifier pattern. Dimension names are bound too, and also checked against a strict
  pattern and a maximum count, so a bad one is refused with a message rather than silently
  matching nothing.
- A question is answered over ``[start, end)`` exactly. The range is cut into segments: the
  part covered by whole rollup buckets is read from the coarsest rollup (``usage_day``,
  ``usage_hour``, ``usage_minute``) whose buckets each fall inside one window of the question,
  and the unaligned edges are read from ``usage_events``. Partial aggregates of the segments are
  merged (sums add, maxima max, ``uniqExact``/``argMax`` states merge), so the answer is the same
  as reading the raw events alone (``tests/integration/test_query_usage.py`` proves it).
- A rollup bucket is ``[b, b + size)`` in UTC. It lies inside one window of the question iff
  every UTC offset the time zone uses over the range is a multiple of the bucket size (day
  buckets: only offset 0, so DAY/MONTH windows in UTC; hour buckets: whole-hour zones such as
  Europe/Berlin across DST; minute buckets: zones like Asia/Kolkata). Questions with ``group_by``
  or dimension filters read the raw events, since rollups carry no dimensions.
- Windows follow local wall-clock boundaries in the time zone (``toStartOfDay(t, tz)`` and
  friends), so a DAY window across a DST change lasts 23 or 25 hours. A window's end is the next
  window's start, computed by ClickHouse with the same function.

Only billable rows (``billable = 1``) count unless the caller asks for rejected decisions
(``decision="rejected"``, kept for analytics) or both (``"all"``).

``UNIQUE_COUNT`` counts the distinct values of ``quantity`` in a window, as OpenMeter's
``UNIQUE_COUNT`` counts distinct values of a meter's value property (here: the event quantity;
emit an identifier as a number-valued quantity to count unique things). ``LATEST`` is the
quantity of the event with the greatest ``time`` (``argMax``); ties are broken arbitrarily.
"""

# ruff: noqa: S608 - the SQL text spliced here comes from this module's fixed tables only.
from __future__ import annotations

import datetime as dt
import enum
import functools
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from metering.ids import InvalidIdentifier, validate_meter, validate_tenant_id

UTC = dt.UTC

DIMENSION_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,63}")
DATABASE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_GROUP_BY = 5
MAX_FILTER_DIMENSIONS = 10
MAX_FILTER_VALUES = 100
MAX_FILTER_VALUE_LENGTH = 256
MAX_WINDOWS = 50_000
MAX_RESULT_ROWS = 100_000
MAX_SPAN = dt.timedelta(days=3661)
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = dt.datetime(2100, 1, 1, tzinfo=UTC)
MAX_SLIDING_MINUTES = 7 * 24 * 60
MAX_SLIDING_POINTS = 24 * 60
MAX_TOP = 1000
MAX_SEGMENT_BUCKETS = 2000

Path = Literal["rollup", "raw", "mixed"]


class QueryError(ValueError):
    """A question cannot be asked as given; ``param`` names the parameter that is wrong."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class Window(enum.StrEnum):
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


class Aggregation(enum.StrEnum):
    SUM = "SUM"
    COUNT = "COUNT"
    MAX = "MAX"
    UNIQUE_COUNT = "UNIQUE_COUNT"
    LATEST = "LATEST"


class DecisionFilter(enum.StrEnum):
    """Which rows count: billable usage (the default), rejected decisions, or both."""

    BILLABLE = "billable"
    REJECTED = "rejected"
    ALL = "all"


# --- validation of what callers send -------------------------------------------------------------


def _enum(kind: type[enum.StrEnum], value: object, param: str) -> Any:
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        try:
            return kind(value.upper() if kind is not DecisionFilter else value.lower())
        except ValueError:
            pass
    allowed = ", ".join(m.value for m in kind)
    raise QueryError(param, f"must be one of {allowed}, not {_shown(value)}")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@functools.cache
def _known_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def validate_tz(tz: object) -> str:
    """Return ``tz`` if it is an IANA time zone name known here, else raise ``QueryError``."""
    if isinstance(tz, str) and (tz == "UTC" or tz in _known_zones()):
        return tz
    raise QueryError(
        "tz", f"must be an IANA time zone name such as Europe/Berlin, not {_shown(tz)}"
    )


def validate_dimension_name(name: object, param: str) -> str:
    if isinstance(name, str) and DIMENSION_NAME_RE.fullmatch(name):
        return name
    raise QueryError(
        param,
        f"invalid dimension name {_shown(name)}: 1-64 characters of A-Z a-z 0-9 _ . : -, "
        "starting with a letter, digit or _",
    )


def validate_database(name: str) -> str:
    if not DATABASE_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid ClickHouse database name {name!r}")
    return name


def _tenant(value: object) -> str:
    try:
        return validate_tenant_id(value)
    except InvalidIdentifier as exc:
        raise QueryError("tenant", str(exc)) from None


def _meter(value: object) -> str:
    try:
        return validate_meter(value)
    except InvalidIdentifier as exc:
        raise QueryError("meter", str(exc)) from None


def _instant(value: object, param: str) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise QueryError(param, f"must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise QueryError(param, "must carry a UTC offset (RFC 3339, e.g. 2026-03-01T00:00:00Z)")
    if value.microsecond % 1000:
        raise QueryError(param, "has sub-millisecond precision; times are stored in milliseconds")
    bounds = f"must lie between {EARLIEST:%Y-%m-%d} and {LATEST_TIME:%Y-%m-%d}"
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before year 1 in UTC
        raise QueryError(param, bounds) from None
    if not EARLIEST <= value <= LATEST_TIME:
        raise QueryError(param, bounds)
    return value


def _epoch_ms(t: dt.datetime) -> int:
    return (t - EARLIEST) // dt.timedelta(milliseconds=1)


@dataclass(frozen=True)
class UsageQuery:
    """Usage of one tenant's meter over ``[start, end)``, validated on construction.

    Strings are accepted for the enums (case-insensitive); ``filters`` maps a dimension name to the
    values it may take (values of one dimension are OR-ed, dimensions AND-ed).
    """

    tenant: str
    meter: str
    start: dt.datetime
    end: dt.datetime
    window: Window | None = None
    tz: str = "UTC"
    aggregation: Aggregation = Aggregation.SUM
    group_by: tuple[str, ...] = ()
    filters: Mapping[str, Sequence[str]] = field(default_factory=dict)
    decision: DecisionFilter = DecisionFilter.BILLABLE

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("tenant", _tenant(self.tenant))
        put("meter", _meter(self.meter))
        put("start", _instant(self.start, "from"))
        put("end", _instant(self.end, "to"))
        if self.end <= self.start:
            raise QueryError("to", "must be later than from")
        if self.end - self.start > MAX_SPAN:
            raise QueryError("to", f"the range may span at most {MAX_SPAN.days} days")
        put("window", None if self.window is None else _enum(Window, self.window, "window"))
        put("tz", validate_tz(self.tz))
        put("aggregation", _enum(Aggregation, self.aggregation, "aggregation"))
        put("decision", _enum(DecisionFilter, self.decision, "decision"))
        put("group_by", _group_by(self.group_by))
        put("filters", _filters(self.filters))
        if self.window is not None:
            windows = estimate_windows(self.start, self.end, self.window)
            if windows > MAX_WINDOWS:
                raise QueryError(
                    "window",
                    f"{self.window.value} windows over this range would be about {windows} rows; "
                    f"at most {MAX_WINDOWS} (choose a coarser window or a shorter range)",
                )


def _group_by(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise QueryError("group_by", "must be a list of dimension names")
    names = tuple(validate_dimension_name(v, "group_by") for v in value)
    if len(names) > MAX_GROUP_BY:
        raise QueryError("group_by", f"at most {MAX_GROUP_BY} dimensions")
    if len(set(names)) != len(names):
        raise QueryError("group_by", "names a dimension twice")
    return names


def _filters(value: object) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise QueryError("filter", "must map dimension names to values")
    if len(value) > MAX_FILTER_DIMENSIONS:
        raise QueryError("filter", f"at most {MAX_FILTER_DIMENSIONS} dimensions")
    out: dict[str, tuple[str, ...]] = {}
    for name, values in value.items():
        validate_dimension_name(name, "filter")
        vals = (values,) if isinstance(values, str) else tuple(values)
        if not vals or len(vals) > MAX_FILTER_VALUES:
            raise QueryError("filter", f"{name}: 1-{MAX_FILTER_VALUES} values")
        for v in vals:
            if not isinstance(v, str) or len(v) > MAX_FILTER_VALUE_LENGTH:
                raise QueryError(
                    "filter", f"{name}: values are strings of at most {MAX_FILTER_VALUE_LENGTH}"
                )
            try:
                v.encode()
            except UnicodeEncodeError:  # a lone surrogate: undecodable bytes of a command line
                raise QueryError("filter", f"{name}: value {v!r} is not valid UTF-8") from None
        out[name] = vals
    return out


_NOMINAL_SECONDS = {
    Window.MINUTE: 60,
    Window.HOUR: 3600,
    Window.DAY: 86400,
    Window.MONTH: 28 * 86400,
}


def estimate_windows(start: dt.datetime, end: dt.datetime, window: Window) -> int:
    """An upper bound on the number of windows in ``[start, end)`` (for refusing huge answers)."""
    return int((end - start).total_seconds() // _NOMINAL_SECONDS[window]) + 2


# --- time zones and rollup granularity -----------------------------------------------------------

MINUTE_S, HOUR_S, DAY_S = 60, 3600, 86400


@dataclass(frozen=True)
class Rollup:
    table: str
    seconds: int


MINUTE_ROLLUP = Rollup("usage_minute", MINUTE_S)
HOUR_ROLLUP = Rollup("usage_hour", HOUR_S)
DAY_ROLLUP = Rollup("usage_day", DAY_S)
MINUTE_BY_TIME_ROLLUP = Rollup("usage_minute_by_time", MINUTE_S)
ROLLUPS_FINE_TO_COARSE = (MINUTE_ROLLUP, HOUR_ROLLUP, DAY_ROLLUP)


@functools.lru_cache(maxsize=4096)
def _year_offsets(tz: str, year: int) -> frozenset[int]:
    """The UTC offsets (seconds) ``tz`` uses during ``year``. Sampled every 6 hours: no zone
    has kept an offset for less than that, so every regime of the year is seen."""
    zone = zoneinfo.ZoneInfo(tz)
    t = dt.datetime(year, 1, 1, tzinfo=UTC) - dt.timedelta(days=1)
    stop = dt.datetime(year + 1, 1, 1, tzinfo=UTC) + dt.timedelta(days=1)
    offsets = set()
    while t < stop:
        offset = t.astimezone(zone).utcoffset()
        offsets.add(int(offset.total_seconds()) if offset is not None else 0)
        t += dt.timedelta(hours=6)
    return frozenset(offsets)


def zone_offsets(tz: str, start: dt.datetime, end: dt.datetime) -> frozenset[int]:
    """Every UTC offset ``tz`` uses between ``start`` and ``end`` (a superset: whole years)."""
    out: set[int] = set()
    for year in range(start.year, end.year + 1):
        out |= _year_offsets(tz, year)
    return frozenset(out)


def coarsest_rollup(
    window: Window | None, tz: str, start: dt.datetime, end: dt.datetime
) -> Rollup | None:
    """The coarsest rollup whose every bucket lies inside one window of the question."""
    if window is None:
        return DAY_ROLLUP
    limit = {Window.MINUTE: MINUTE_S, Window.HOUR: HOUR_S}.get(window, DAY_S)
    offsets = zone_offsets(tz, start, end)
    for rollup in reversed(ROLLUPS_FINE_TO_COARSE):
        if rollup.seconds <= limit and all(o % rollup.seconds == 0 for o in offsets):
            return rollup
    return None


@dataclass(frozen=True)
class Segment:
    """A part ``[lo_ms, hi_ms)`` of the range, read from ``rollup`` (or the raw events if None)."""

    lo_ms: int
    hi_ms: int
    rollup: Rollup | None


def segments(
    start_ms: int,
    end_ms: int,
    coarsest: Rollup | None,
    max_buckets: int = MAX_SEGMENT_BUCKETS,
) -> list[Segment]:
    """Cut ``[start_ms, end_ms)`` into raw edges and rollup-aligned middles, coarsest inside.

    Going in from each edge: raw up to the first whole minute, minute buckets up to the first
    whole hour, hour buckets up to the first whole day, day buckets in the middle (each level
    only if allowed by ``coarsest``). Then, since each table read costs the engine a few
    milliseconds while a few thousand rollup rows cost little, the rollup parts are merged into
    one read of their finest level when its buckets over their span number at most
    ``max_buckets`` (a Berlin month: one read of 745 hours rather than hours + days + hours).
    Segments are ordered, disjoint and cover the range.
    """
    levels = (
        []
        if coarsest is None
        else [r for r in ROLLUPS_FINE_TO_COARSE if r.seconds <= coarsest.seconds]
    )
    left: list[Segment] = []
    right: list[Segment] = []
    lo, hi = start_ms, end_ms
    source: Rollup | None = None
    for level in levels:
        size = level.seconds * 1000
        a = -(-lo // size) * size
        b = hi // size * size
        if a >= b:
            break
        if lo < a:
            left.append(Segment(lo, a, source))
        if b < hi:
            right.append(Segment(b, hi, source))
        lo, hi, source = a, b, level
    parts = left + ([Segment(lo, hi, source)] if lo < hi else []) + right[::-1]
    rolled = [i for i, seg in enumerate(parts) if seg.rollup is not None]
    if len(rolled) > 1:
        first, last = rolled[0], rolled[-1]
        # The finest level among them: its buckets tile the span (coarser ones may not).
        level = min((seg.rollup for seg in parts if seg.rollup), key=lambda r: r.seconds)
        span = parts[last].hi_ms - parts[first].lo_ms
        if span // (level.seconds * 1000) <= max_buckets:
            merged = Segment(parts[first].lo_ms, parts[last].hi_ms, level)
            return [*parts[:first], merged, *parts[last + 1 :]]
    return parts


def path_of(parts: list[Segment]) -> Path:
    kinds = {s.rollup is None for s in parts}
    if kinds == {True}:
        return "raw"
    return "rollup" if kinds == {False} else "mixed"


# --- SQL -----------------------------------------------------------------------------------------

# Per aggregation: (raw final, rollup final, raw partial, rollup partial, merge of partials {p}).
_AGGREGATES: dict[Aggregation, tuple[str, str, str, str, str]] = {
    Aggregation.SUM: (
        "sum(quantity)",
        "sum(quantity_sum)",
        "sum(quantity)",
        "sum(quantity_sum)",
        "sum({p})",
    ),
    Aggregation.COUNT: ("count()", "sum(event_count)", "count()", "sum(event_count)", "sum({p})"),
    Aggregation.MAX: (
        "max(quantity)",
        "max(quantity_max)",
        "max(quantity)",
        "max(quantity_max)",
        "max({p})",
    ),
    Aggregation.UNIQUE_COUNT: (
        "uniqExact(quantity)",
        "uniqExactMerge(quantity_uniq)",
        "uniqExactState(quantity)",
        "uniqExactMergeState(quantity_uniq)",
        "uniqExactMerge({p})",
    ),
    Aggregation.LATEST: (
        "argMax(quantity, time)",
        "argMaxMerge(quantity_latest)",
        "argMaxState(quantity, time)",
        "argMaxMergeState(quantity_latest)",
        "argMaxMerge({p})",
    ),
}

# Window start of a time column ``{c}`` in the zone, and the next window's start given ``ws``.
_WINDOW_START = {
    Window.MINUTE: "toStartOfMinute({c}, {{tz:String}})",
    Window.HOUR: "toStartOfHour({c}, {{tz:String}})",
    Window.DAY: "toStartOfDay({c}, {{tz:String}})",
    Window.MONTH: "toDateTime(toStartOfMonth({c}, {{tz:String}}), {{tz:String}})",
}
# The next window starts within (nominal length * 1.5) of this one's start, DST or not. A MINUTE
# window ends ``ws + INTERVAL 1 MINUTE``, i.e. 60 s after its start in every zone: the caller adds
# those seconds (see ``window_end_in_sql``), since each expression costs the engine planning time.
MINUTE_WINDOW_SECONDS = 60
# Windows of a fixed length in UTC, when a rollup of the same bucket size may serve them.
_WINDOW_SECONDS = {Window.MINUTE: MINUTE_S, Window.HOUR: HOUR_S, Window.DAY: DAY_S}
_WINDOW_NEXT = {
    Window.HOUR: "toStartOfHour(ws + INTERVAL 90 MINUTE, {tz:String})",
    Window.DAY: "toStartOfDay(ws + INTERVAL 36 HOUR, {tz:String})",
    Window.MONTH: "toDateTime(toStartOfMonth(ws + INTERVAL 45 DAY, {tz:String}), {tz:String})",
}

_DECISION_SQL = {
    DecisionFilter.BILLABLE: " AND billable = 1",
    DecisionFilter.REJECTED: " AND billable = 0",
    DecisionFilter.ALL: "",
}


@dataclass(frozen=True)
class SqlQuery:
    """SQL with ``{name:Type}`` placeholders and the values to bind to them."""

    sql: str
    parameters: dict[str, Any]
    path: Path = "raw"
    tables: tuple[str, ...] = ()

    @property
    def settings(self) -> dict[str, Any]:
        """Engine settings to send with the query (standard ClickHouse settings)."""
        return dict(ROLLUP_READ_SETTINGS) if self.path == "rollup" else {}


# A rollup read takes one narrow primary-key range of a few small columns: moving its conditions
# to PREWHERE (a read step of their own) costs the engine more planning than it saves (~0.7 ms
# of a ~8 ms day of minutes, embedded engine).
ROLLUP_READ_SETTINGS: dict[str, Any] = {"optimize_move_to_prewhere": 0}


def _segment_where(seg: Segment, i: int, params: dict[str, Any]) -> str:
    if seg.rollup is None:
        params[f"lo{i}"], params[f"hi{i}"] = seg.lo_ms, seg.hi_ms
        return (
            f"time >= fromUnixTimestamp64Milli({{lo{i}:Int64}}, 'UTC') "
            f"AND time < fromUnixTimestamp64Milli({{hi{i}:Int64}}, 'UTC')"
        )
    # A DateTime compares with its epoch seconds as is (and still narrows the primary key).
    params[f"lo{i}"], params[f"hi{i}"] = seg.lo_ms // 1000, seg.hi_ms // 1000
    return f"bucket >= {{lo{i}:UInt32}} AND bucket < {{hi{i}:UInt32}}"


def _table(database: str, seg: Segment) -> str:
    return f"{database}.{seg.rollup.table if seg.rollup else 'usage_events'}"


def _segmented_select(
    parts: list[Segment],
    database: str,
    where: str,
    params: dict[str, Any],
    key_columns: Callable[[Segment], list[str]],
    keys: list[str],
    measures: list[tuple[str, Aggregation]],
) -> str:
    """``SELECT keys, measures`` over the segments, merging the segments' partial aggregates.

    ``key_columns(segment)`` gives the key expressions (``... AS key``) for that segment's table;
    ``measures`` are ``(alias, aggregation)``. With no keys, an empty range gives no row.
    """
    group = f" GROUP BY {', '.join(keys) if keys else 'tuple()'}"
    if len(parts) == 1:
        seg = parts[0]
        cols = [f"{_AGGREGATES[a][1 if seg.rollup else 0]} AS {alias}" for alias, a in measures]
        return (
            f"SELECT {', '.join([*key_columns(seg), *cols])} FROM {_table(database, seg)}"
            f" WHERE {where} AND {_segment_where(seg, 0, params)}{group}"
        )
    subs = []
    for i, seg in enumerate(parts):
        cols = [f"{_AGGREGATES[a][3 if seg.rollup else 2]} AS p_{alias}" for alias, a in measures]
        subs.append(
            f"SELECT {', '.join([*key_columns(seg), *cols])} FROM {_table(database, seg)}"
            f" WHERE {where} AND {_segment_where(seg, i, params)}{group}"
        )
    merged = [f"{_AGGREGATES[a][4].format(p='p_' + alias)} AS {alias}" for alias, a in measures]
    return f"SELECT {', '.join([*keys, *merged])} FROM ({' UNION ALL '.join(subs)}){group}"


def _tables(parts: list[Segment]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.rollup.table if s.rollup else "usage_events" for s in parts))


def window_end_in_sql(window: Window | None) -> bool:
    """Whether :func:`build_usage` rows carry ``we_s``: every window but MINUTE, whose end is
    ``ws_s + MINUTE_WINDOW_SECONDS``."""
    return window in _WINDOW_NEXT


def build_usage(q: UsageQuery, database: str, *, force_raw: bool = False) -> SqlQuery:
    """The SQL answering ``q``: rows ``(ws_s, we_s, g0.., value)`` ordered by window and group.

    ``ws_s``/``we_s`` are the window's bounds in epoch seconds (absent without a window; ``we_s``
    is absent for MINUTE windows, see :func:`window_end_in_sql`). ``force_raw`` reads only
    ``usage_events`` (the reference the rollup path is checked against).

    A question read from one segment (the common case, e.g. a day of minutes from
    ``usage_minute``) is one flat ``SELECT ... GROUP BY``, its keys named in a ``WITH`` clause;
    several segments merge their partial aggregates in an outer query. The embedded engine spends
    most of a small query planning it, so the SQL is kept to the fewest expressions.
    """
    database = validate_database(database)
    raw_only = force_raw or bool(q.group_by) or bool(q.filters)
    coarsest = None if raw_only else coarsest_rollup(q.window, q.tz, q.start, q.end)
    parts = segments(_epoch_ms(q.start), _epoch_ms(q.end), coarsest)
    params: dict[str, Any] = {"tenant": q.tenant, "meter": q.meter, "tz": q.tz}
    where = "tenant = {tenant:String} AND meter = {meter:String}" + _DECISION_SQL[q.decision]
    dims: list[str] = []
    for j, name in enumerate(q.group_by):
        params[f"gk{j}"] = name
        dims.append(
            f"if(mapContains(dimensions, {{gk{j}:String}}), dimensions[{{gk{j}:String}}], NULL)"
            f" AS g{j}"
        )
    for j, (name, values) in enumerate(q.filters.items()):
        params[f"fk{j}"], params[f"fv{j}"] = name, list(values)
        # dimensions[k] is '' for an event without k: only events that carry k match
        where += (
            f" AND mapContains(dimensions, {{fk{j}:String}})"
            f" AND dimensions[{{fk{j}:String}}] IN {{fv{j}:Array(String)}}"
        )
    groups = [f"g{j}" for j in range(len(q.group_by))]
    window = q.window

    def key_columns(seg: Segment) -> list[str]:
        if window is None:
            return dims
        col = "bucket" if seg.rollup else "time"
        return [_WINDOW_START[window].format(c=col) + " AS ws", *dims]

    keys = (["ws"] if window else []) + groups
    bounds = []
    if window is not None:
        bounds.append("toUnixTimestamp(ws) AS ws_s")
        if window_end_in_sql(window):
            bounds.append(f"toUnixTimestamp({_WINDOW_NEXT[window]}) AS we_s")
    tail = f" ORDER BY {', '.join(keys)}" if keys else ""
    if q.group_by:  # without groups there are at most MAX_WINDOWS rows
        params["row_limit"] = MAX_RESULT_ROWS + 1
        tail += " LIMIT {row_limit:UInt32}"
    if len(parts) == 1:
        seg = parts[0]
        aliases = key_columns(seg)
        if window is not None and seg.rollup and seg.rollup.seconds == _WINDOW_SECONDS.get(window):
            aliases[0] = "bucket AS ws"  # each bucket is one whole window (see coarsest_rollup)
        value = f"{_AGGREGATES[q.aggregation][1 if seg.rollup else 0]} AS value"
        sql = (
            (f"WITH {', '.join(aliases)} " if aliases else "")
            + f"SELECT {', '.join([*bounds, *groups, value])} FROM {_table(database, seg)}"
            + f" WHERE {where} AND {_segment_where(seg, 0, params)}"
            + f" GROUP BY {', '.join(keys) if keys else 'tuple()'}{tail}"
        )
    else:
        body = _segmented_select(
            parts, database, where, params, key_columns, keys, [("value", q.aggregation)]
        )
        sql = f"SELECT {', '.join([*bounds, *groups, 'value'])} FROM ({body}){tail}"
    if "{tz:String}" not in sql:  # e.g. minutes read from usage_minute: bound only when used
        del params["tz"]
    return SqlQuery(sql, params, path_of(parts), _tables(parts))


def build_statement(
    tenant: str, start: dt.datetime, end: dt.datetime, database: str, *, force_raw: bool = False
) -> SqlQuery:
    """Billable usage per meter over ``[start, end)``: rows ``(meter, quantity, events)``."""
    database = validate_database(database)
    start, end = _instant(start, "from"), _instant(end, "to")
    parts = segments(_epoch_ms(start), _epoch_ms(end), None if force_raw else DAY_ROLLUP)
    params: dict[str, Any] = {"tenant": _tenant(tenant)}
    body = _segmented_select(
        parts,
        database,
        "tenant = {tenant:String} AND billable = 1",
        params,
        lambda seg: ["meter"],
        ["meter"],
        [("quantity", Aggregation.SUM), ("events", Aggregation.COUNT)],
    )
    return SqlQuery(f"{body} ORDER BY meter", params, path_of(parts), _tables(parts))


def _minute_range(lo_s: int, hi_s: int) -> tuple[int, int]:
    if lo_s % MINUTE_S or hi_s % MINUTE_S or lo_s >= hi_s:
        raise ValueError("a minute range must be whole minutes with lo < hi")
    return lo_s * 1000, hi_s * 1000


def _sliding_aggregation(aggregation: object) -> Aggregation:
    agg = _enum(Aggregation, aggregation, "aggregation")
    if agg not in (Aggregation.SUM, Aggregation.COUNT):
        raise QueryError("aggregation", "sliding windows add up SUM or COUNT only")
    return agg


def build_minute_series(
    tenant: str,
    meter: str,
    lo_s: int,
    hi_s: int,
    database: str,
    *,
    aggregation: Aggregation | str = Aggregation.SUM,
    decision: DecisionFilter | str = DecisionFilter.BILLABLE,
    force_raw: bool = False,
) -> SqlQuery:
    """One tenant's per-minute totals over whole minutes ``[lo_s, hi_s)``: rows
    ``(minute_s, value)``, only minutes with events (read from ``usage_minute``)."""
    database = validate_database(database)
    lo_ms, hi_ms = _minute_range(lo_s, hi_s)
    agg = _sliding_aggregation(aggregation)
    dec = _enum(DecisionFilter, decision, "decision")
    parts = [Segment(lo_ms, hi_ms, None if force_raw else MINUTE_ROLLUP)]
    params: dict[str, Any] = {"tenant": _tenant(tenant), "meter": _meter(meter)}
    body = _segmented_select(
        parts,
        database,
        "tenant = {tenant:String} AND meter = {meter:String}" + _DECISION_SQL[dec],
        params,
        lambda seg: [
            f"toUnixTimestamp(toStartOfMinute({'bucket' if seg.rollup else 'time'})) AS m"
        ],
        ["m"],
        [("value", agg)],
    )
    return SqlQuery(f"{body} ORDER BY m", params, path_of(parts), _tables(parts))


def build_top_tenants(
    meter: str,
    lo_s: int,
    hi_s: int,
    limit: int,
    database: str,
    *,
    aggregation: Aggregation | str = Aggregation.SUM,
    decision: DecisionFilter | str = DecisionFilter.BILLABLE,
    force_raw: bool = False,
) -> SqlQuery:
    """The ``limit`` tenants with the most usage of ``meter`` over whole minutes ``[lo_s, hi_s)``:
    rows ``(tenant, value)``, largest first (ties by tenant id). Reads ``usage_minute_by_time``,
    whose sort key starts with the bucket, so a recent range reads a few granules only."""
    database = validate_database(database)
    lo_ms, hi_ms = _minute_range(lo_s, hi_s)
    if not isinstance(limit, int) or not 1 <= limit <= MAX_TOP:
        raise QueryError("limit", f"must be between 1 and {MAX_TOP}")
    agg = _sliding_aggregation(aggregation)
    dec = _enum(DecisionFilter, decision, "decision")
    parts = [Segment(lo_ms, hi_ms, None if force_raw else MINUTE_BY_TIME_ROLLUP)]
    params: dict[str, Any] = {"meter": _meter(meter), "top": limit}
    body = _segmented_select(
        parts,
        database,
        "meter = {meter:String}" + _DECISION_SQL[dec],
        params,
        lambda seg: ["tenant"],
        ["tenant"],
        [("value", agg)],
    )
    sql = f"{body} ORDER BY value DESC, tenant LIMIT {{top:UInt32}}"
    return SqlQuery(sql, params, path_of(parts), _tables(parts))
