"""docker-compose.yml is validated by the compose-spec reference loader (the library inside
`docker compose`), built from tools/composecheck, since no Docker engine runs here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STACK = {"redis", "kafka", "clickhouse", "postgres", "prometheus", "grafana", "api", "worker"}


def _go() -> str:
    """Go >= 1.24: on PATH, this kind's /usr/local/go, or the toolchain `scripts/bootstrap`
    fetched into var/go where neither is that new."""
    for go in (shutil.which("go"), "/usr/local/go/bin/go", str(ROOT / "var" / "go" / "bin" / "go")):
        if go and Path(go).exists():
            version = subprocess.run(
                [go, "env", "GOVERSION"], capture_output=True, text=True, check=False
            ).stdout.strip()
            if re.fullmatch(r"go1\.(2[4-9]|[3-9]\d)(\.\d+)?.*", version):
                return go
    raise AssertionError("no Go >= 1.24 (run scripts/bootstrap, which fetches one into var/go)")


def _composecheck(path: Path) -> subprocess.CompletedProcess[str]:
    go = _go()
    return subprocess.run(
        [go, "run", ".", str(path)],
        cwd=ROOT / "tools" / "composecheck",
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_compose_file_is_valid_and_every_long_running_service_has_a_healthcheck() -> None:
    proc = _composecheck(ROOT / "docker-compose.yml")
    assert proc.returncode == 0, proc.stderr
    services = dict(line.split() for line in proc.stdout.splitlines())
    assert set(services) >= STACK
    assert {name for name, health in services.items() if health == "healthcheck"} >= STACK


def test_the_validator_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n    depends_on: {db: {condition: maybe}}\n")
    proc = _composecheck(bad)
    assert proc.returncode == 1
    assert "invalid compose file" in proc.stderr


def test_api_and_worker_are_built_from_the_project_dockerfile_and_scraped_by_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["migrate"]["build"] == "."
    image = compose["services"]["migrate"]["image"]
    assert compose["services"]["api"]["image"] == image == compose["services"]["worker"]["image"]
    assert (ROOT / "Dockerfile").exists()
    prom = yaml.safe_load((ROOT / "dashboards/prometheus/prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {"api:8000", "worker:9101"}
