"""The dashboards query only what exists: every Prometheus metric a panel names is exported by
the code, and every ClickHouse panel's SQL runs against the migrated schema."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from metering.clickhouse.schema import migrate_client

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
METRIC_MODULES = [
    "limiter.metrics",
    "limiter.quotas",
    "metering.emitter",
    "streams.metrics",
    "metering.api.app",
]


def _targets(kind: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                if target["datasource"]["type"] == kind:
                    out.append((f"{path.name}: {panel['title']}", target))
    return out


def exported_sample_names() -> set[str]:
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
            "gauge": [""],
            "summary": ["_count", "_sum", ""],
        }.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=[\[{)])", expr))


def test_the_committed_json_is_what_the_builder_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("dash_build", DASHBOARDS / "build.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    assert json.loads((DASHBOARDS / "operations.json").read_text()) == module.operations()
    assert json.loads((DASHBOARDS / "usage.json").read_text()) == module.usage()


def test_every_prometheus_panel_queries_metrics_the_code_exports() -> None:
    exported = exported_sample_names()
    targets = _targets("prometheus")
    assert len(targets) >= 15
    for where, target in targets:
        names = metric_names(target["expr"])
        assert names, f"{where}: no metric found in {target['expr']!r}"
        missing = names - exported
        assert not missing, f"{where}: {sorted(missing)} not exported by the code"


def test_the_metric_name_extraction_finds_selectors_not_labels() -> None:
    assert metric_names("sum by (le) (rate(x_bucket[1m])) / sum(y_total{a='b'})") == {
        "x_bucket",
        "y_total",
    }
    assert metric_names("sum by (i) (a) > 0 and on (i) (time() - max by (i) (b)) > 300") == {
        "a",
        "b",
    }


@pytest.fixture
def migrated_db(clickhouse_client, clickhouse_db: str) -> str:
    migrate_client(clickhouse_client, clickhouse_db)
    return clickhouse_db


def grafana_macros(sql: str, database: str) -> str:
    """Expand the grafana-clickhouse-datasource macros the panels use, as the plugin does."""
    sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(\1, INTERVAL 60 second)", sql)
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        r"\1 >= toDateTime(now() - 3600) AND \1 <= toDateTime(now())",
        sql,
    )
    sql = re.sub(r"\bmetering\.(?=usage_)", f"{database}.", sql)  # tables, not 'metering.usage'
    return sql.replace("${meter}", "requests")


def test_every_clickhouse_panel_runs_against_the_schema(
    clickhouse_client, migrated_db: str
) -> None:
    targets = _targets("grafana-clickhouse-datasource")
    assert len(targets) >= 4
    clickhouse_client.command(
        f"INSERT INTO {migrated_db}.usage_events (id, type, source, tenant, meter, decision, "
        "billable, time, quantity, dimensions, kafka_topic, kafka_partition, kafka_offset) VALUES "
        "('e1', 'metering.ratelimit', 'test', 'acme', 'requests', 'allowed', 1, now64(3), 2, "
        "map('route', '/v1/x'), 'usage.events', 0, 0), "
        "('e2', 'metering.ratelimit', 'test', 'acme', 'requests', 'rejected', 0, now64(3), 1, "
        "map('route', '/v1/x', 'reason', 'daily'), 'usage.events', 0, 1)"
    )
    for where, target in targets:
        rows = clickhouse_client.query(grafana_macros(target["rawSql"], migrated_db)).result_rows
        assert rows, f"{where}: no rows for data that should show"
    dash = json.loads((DASHBOARDS / "usage.json").read_text())
    variable = dash["templating"]["list"][0]["query"]
    assert clickhouse_client.query(grafana_macros(variable, migrated_db)).result_rows == [
        ("requests",)
    ]


def _series_units(panel: dict[str, Any]) -> dict[str, str]:
    """Each Prometheus series' unit (by legend): an override naming it, else the panel's."""
    units = {t["legendFormat"]: panel["fieldConfig"]["defaults"]["unit"] for t in panel["targets"]}
    for override in panel["fieldConfig"]["overrides"]:
        matcher = override["matcher"]
        assert matcher["id"] == "byName", f"{panel['title']}: matcher {matcher}"
        assert matcher["options"] in units, f"{panel['title']}: no series {matcher['options']!r}"
        for prop in override["properties"]:
            if prop["id"] == "unit":
                units[matcher["options"]] = prop["value"]
    return units


def test_every_series_is_shown_in_a_unit_of_its_kind() -> None:
    """A rate or a count plotted in a panel of seconds or of a ratio reads as one: batch size
    p50 showed as seconds, stale quota lookups served per second as a percentage."""
    dash = json.loads((DASHBOARDS / "operations.json").read_text())
    units = {
        (panel["title"], legend): unit
        for panel in dash["panels"]
        for legend, unit in _series_units(panel).items()
    }
    for (title, legend), unit in units.items():
        if legend.endswith("/s"):
            assert unit in ("short", "reqps", "ops"), f"{title}: {legend!r} in {unit!r}"
    assert units["Sink delay and insert latency", "batch size p50"] == "short"
    assert units["Sink delay and insert latency", "insert p99"] == "s"
    assert units["Quota cache hit ratio", "stale served/s"] == "short"
    assert units["Quota cache hit ratio", "{{layer}}"] == "percentunit"


def test_the_operations_dashboard_shows_a_stuck_sink() -> None:
    """The lag alone read 0 while the sink was stuck; the time since its last write shows it."""
    dash = json.loads((DASHBOARDS / "operations.json").read_text())
    exprs = {t["expr"]: panel for panel in dash["panels"] for t in panel["targets"]}
    (stuck,) = [e for e in exprs if "streams_sink_last_write_timestamp_seconds" in e]
    assert stuck.startswith("time() - ") and exprs[stuck]["fieldConfig"]["defaults"]["unit"] == "s"
    assert any("streams_events_reread_total" in e for e in exprs)


ALERTS = DASHBOARDS / "prometheus" / "alerts.yml"
PROMETHEUS_BUILTIN = {"up"}  # series Prometheus makes itself for every target


def test_every_alert_queries_metrics_the_code_exports_and_says_what_broke() -> None:
    import yaml

    exported = exported_sample_names() | PROMETHEUS_BUILTIN
    rules = [r for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]]
    assert len(rules) >= 6
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        where = rule["alert"]
        used = metric_names(rule["expr"])
        assert used, f"{where}: no metric found in {rule['expr']!r}"
        assert not used - exported, f"{where}: {sorted(used - exported)} not exported"
        assert rule["labels"]["severity"] in {"page", "warning"}, where
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], where
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), where
    # The stuck sink, the drops and the aging spool are what lose or delay billing.
    assert {"MeteringWorkerStuck", "MeteringEventsDropped", "MeteringSpoolBacklogAging"} <= set(
        names
    )


def test_prometheus_loads_the_alerts_and_compose_mounts_them() -> None:
    import yaml

    prom = yaml.safe_load((DASHBOARDS / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./dashboards/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


ALERT_TESTS = DASHBOARDS / "prometheus" / "alerts.test.yml"


def test_the_alerts_fire_when_what_they_name_breaks() -> None:
    """promtool's rule unit tests (alerts.test.yml): each alert fires on the breakage it names,
    with its labels and rendered annotations, only after its `for`, and not while all is well.
    An alert that never fires pages nobody, and the test that would show it must not be skipped
    on a machine without promtool: CI then passes with the alerts unchecked."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed: it unit-tests the alert rules "
            "(apt-get install prometheus, or run scripts/bootstrap as root)"
        )
    # From the rules' directory: alerts.test.yml names its rule file relative to itself.
    for args in (["check", "rules", ALERTS.name], ["test", "rules", ALERT_TESTS.name]):
        proc = subprocess.run(
            [promtool, *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_silent() -> None:
    """A new alert without a case in alerts.test.yml would pass promtool unseen."""
    import yaml

    rules = [r for group in yaml.safe_load(ALERTS.read_text())["groups"] for r in group["rules"]]
    suite = yaml.safe_load(ALERT_TESTS.read_text())
    assert suite["rule_files"] == [ALERTS.name]
    cases = [case for test in suite["tests"] for case in test.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {r["alert"] for r in rules}
    assert not names - firing, f"{sorted(names - firing)}: no case where it fires"
    assert not names - silent, f"{sorted(names - silent)}: no case where it must not fire"
    assert not (firing | silent) - names, f"cases of unknown alerts: {(firing | silent) - names}"
