"""Writes the Grafana dashboards (JSON) from one readable description.

    python dashboards/build.py        # rewrites dashboards/*.json

Panels stay short here; tests/integration/test_dashboards.py checks that every metric a Prometheus
panel queries is one the code exports, and that every ClickHouse panel's SQL runs against the
schema that `metering db migrate` creates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROM = {"type": "prometheus", "uid": "prometheus"}
CH = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}


def _panel(pid: int, title: str, kind: str, targets: list[dict[str, Any]], x: int, y: int,
           w: int = 12, h: int = 8, unit: str = "short", desc: str = "",
           units: dict[str, str] | None = None) -> dict[str, Any]:
    """``units``: series (by legend) whose unit is not the panel's ``unit``; they get their
    own unit and the right-hand axis, so a count does not read as seconds or a percentage."""
    return {
        "id": pid, "title": title, "type": kind, "description": desc,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "datasource": targets[0]["datasource"],
        "fieldConfig": {"defaults": {"unit": unit},
                        "overrides": [_unit_override(n, u) for n, u in (units or {}).items()]},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": targets,
    }


def _unit_override(series: str, unit: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byName", "options": series},
        "properties": [{"id": "unit", "value": unit},
                       {"id": "custom.axisPlacement", "value": "right"}],
    }


def prom(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": PROM, "expr": expr, "legendFormat": legend, "refId": ref}


def sql(query: str, ref: str = "A", fmt: int = 1) -> dict[str, Any]:
    # format 1 = time series, 0 = table (grafana-clickhouse-datasource)
    return {"datasource": CH, "rawSql": query.strip(), "refId": ref, "format": fmt,
            "queryType": "sql", "editorType": "sql"}


def operations() -> dict[str, Any]:
    p = [
        _panel(1, "Decisions per second", "timeseries", [
            prom("sum(rate(rate_limiter_decision_seconds_count[1m]))", "decisions/s"),
            prom("sum by (reason) (rate(rate_limiter_rejections_total[1m]))",
                 "rejected: {{reason}}", "B"),
        ], 0, 0, unit="reqps"),
        _panel(2, "Decision latency", "timeseries", [
            prom("histogram_quantile(0.5, sum by (le) "
                 "(rate(rate_limiter_decision_seconds_bucket[1m])))", "p50"),
            prom("histogram_quantile(0.99, sum by (le) "
                 "(rate(rate_limiter_decision_seconds_bucket[1m])))", "p99", "B"),
        ], 12, 0, unit="s"),
        _panel(3, "Redis down events and daily quota hits", "timeseries", [
            prom("sum(rate(redis_down_events_total[1m]))", "redis down decisions/s"),
            prom("sum(rate(daily_quota_hits_total[1m]))", "daily quota hits/s", "B"),
            prom("sum(rate(token_bucket_consumed_total[1m]))", "tokens consumed/s", "C"),
        ], 0, 8),
        _panel(4, "Quota cache hit ratio", "timeseries", [
            prom("sum by (layer) (rate(tenant_quota_cache_hits_total[5m])) / "
                 "(sum by (layer) (rate(tenant_quota_cache_hits_total[5m])) + "
                 "sum by (layer) (rate(tenant_quota_cache_misses_total[5m])))", "{{layer}}"),
            prom("sum(rate(tenant_quota_stale_served_total[5m]))", "stale served/s", "B"),
        ], 12, 8, unit="percentunit", units={"stale served/s": "short"}),
        _panel(5, "Emitter: events and spool", "timeseries", [
            prom("sum(rate(metering_events_emitted_total[1m]))", "emitted/s"),
            prom("sum(rate(metering_events_spooled_total[1m]))", "spooled/s", "B"),
            prom("sum(rate(metering_events_replayed_total[1m]))", "replayed/s", "C"),
            prom("sum by (reason) (rate(metering_events_dropped_total[1m]))",
                 "DROPPED {{reason}}", "D"),
            prom("sum(metering_emitter_spool_events)", "in spool", "E"),
        ], 0, 16),
        _panel(6, "Consumer lag", "timeseries", [
            prom("sum by (partition) (streams_consumer_lag)", "partition {{partition}}"),
        ], 12, 16),
        _panel(7, "Sink throughput", "timeseries", [
            prom("sum(rate(streams_events_consumed_total[1m]))", "consumed/s"),
            prom("sum(rate(streams_events_inserted_total[1m]))", "inserted/s", "B"),
            prom("sum(rate(streams_events_duplicate_total[1m]))", "duplicates dropped/s", "C"),
            prom("sum by (reason) (rate(streams_events_dead_lettered_total[1m]))",
                 "dead-lettered {{reason}}", "D"),
            prom("sum(rate(streams_events_reread_total[1m]))", "re-read after a failed batch/s",
                 "E"),
        ], 0, 24, desc="consumed: each offset once per assignment; the re-reads of failed "
                        "batches are apart (a retried batch counted again showed several times "
                        "the input while nothing was inserted)."),
        _panel(8, "Sink delay and insert latency", "timeseries", [
            prom("histogram_quantile(0.99, sum by (le) "
                 "(rate(streams_end_to_end_delay_seconds_bucket[1m])))", "end-to-end p99"),
            prom("histogram_quantile(0.99, sum by (le) "
                 "(rate(streams_sink_insert_seconds_bucket[1m])))", "insert p99", "B"),
            prom("histogram_quantile(0.5, sum by (le) "
                 "(rate(streams_sink_batch_size_bucket[1m])))", "batch size p50", "C"),
        ], 12, 24, unit="s", units={"batch size p50": "short"}),
        _panel(9, "Sink and hand-off failures", "timeseries", [
            prom("sum(rate(streams_sink_insert_failures_total[1m]))", "failed batches/s"),
            prom("sum(streams_sink_unpositioned_partitions)",
                 "partitions waiting on ClickHouse", "B"),
            prom("sum(rate(streams_handoff_failures_total[1m]))", "failed hand-offs/s", "C"),
            prom("sum(increase(streams_handoff_fenced_total[5m]))",
                 "partitions fenced (evicted worker), 5 min", "D"),
            prom("sum(increase(streams_changelog_superseded_total[5m]))",
                 "late changelog records skipped, 5 min", "E"),
        ], 0, 32),
        _panel(10, "Seconds since the sink last wrote", "timeseries", [
            prom("time() - max by (instance) (streams_sink_last_write_timestamp_seconds)",
                 "{{instance}}"),
        ], 12, 32, unit="s", desc="Per worker, since its last batch written to ClickHouse (or "
                                  "its start). It grows while idle too: with a consumer lag "
                                  "above 0 it is how long the sink has been stuck."),
        _panel(11, "Redis clock offset", "timeseries", [
            prom("max by (instance) (rate_limiter_redis_clock_offset_seconds)", "{{instance}}"),
        ], 0, 40, unit="s", desc="The Redis server's clock minus each API host's, as the "
                                 "limiter sees it (about 1 s of its own error). Decision events "
                                 "carry Redis's time and the workers judge them by theirs: "
                                 "past EVENT_MAX_FUTURE_SKEW (300 s) ahead they are "
                                 "dead-lettered. Fix with NTP on the Redis and worker hosts."),
    ]
    return _dashboard("metering-operations", "Metering: operations", p, ["metering", "ops"])


def usage() -> dict[str, Any]:
    p = [
        _panel(1, "Usage per tenant ($meter)", "timeseries", [sql("""
SELECT $__timeInterval(bucket) AS time, tenant, sum(quantity_sum) AS usage
FROM metering.usage_minute
WHERE $__timeFilter(bucket) AND billable = 1 AND meter = '${meter}'
GROUP BY time, tenant
ORDER BY time
""")], 0, 0, w=24),
        _panel(2, "Top tenants over the range ($meter)", "bargauge", [sql("""
SELECT tenant, sum(quantity_sum) AS usage
FROM metering.usage_minute_by_time
WHERE $__timeFilter(bucket) AND billable = 1 AND meter = '${meter}'
GROUP BY tenant
ORDER BY usage DESC
LIMIT 10
""", fmt=0)], 0, 8),
        _panel(3, "Daily quota consumption today (UTC): allowed vs rejected by the daily limit",
               "table", [sql("""
SELECT tenant,
       sumIf(quantity, decision = 'allowed') AS used_today,
       countIf(decision = 'rejected' AND dimensions['reason'] = 'daily') AS daily_limit_rejections,
       countIf(decision = 'rejected') AS all_rejections
FROM metering.usage_events
WHERE time >= toStartOfDay(now('UTC')) AND type = 'metering.ratelimit'
GROUP BY tenant
ORDER BY used_today DESC
LIMIT 50
""", fmt=0)], 12, 8),
        _panel(4, "Rejections per route", "timeseries", [sql("""
SELECT $__timeInterval(time) AS time, dimensions['route'] AS route, count() AS rejections
FROM metering.usage_events
WHERE $__timeFilter(time) AND type = 'metering.ratelimit' AND decision = 'rejected'
GROUP BY time, route
ORDER BY time
""")], 0, 16, w=24),
    ]
    dash = _dashboard("metering-usage", "Metering: usage", p, ["metering", "usage"])
    dash["templating"] = {"list": [{
        "name": "meter", "type": "query", "datasource": CH, "refresh": 2,
        "query": "SELECT DISTINCT meter FROM metering.usage_day ORDER BY meter",
        "current": {"text": "requests", "value": "requests"},
    }]}
    return dash


def _dashboard(uid: str, title: str, panels: list[dict[str, Any]],
               tags: list[str]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "tags": tags, "timezone": "utc", "schemaVersion": 39,
        "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "panels": panels, "templating": {"list": []}, "annotations": {"list": []},
        "editable": True,
    }


def main() -> None:
    for name, dash in (("operations.json", operations()), ("usage.json", usage())):
        (HERE / name).write_text(json.dumps(dash, indent=2) + "\n")
        print(f"wrote dashboards/{name}")


if __name__ == "__main__":
    main()
