"""``metering worker-health``: the compose health check of the worker. Serving ``/metrics``
alone said nothing of a sink whose inserts hang (prometheus-client answers from its own
thread); the check reads the lag and the time of the last write."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from metering.cli import main
from metering.commands.worker import stuck_reason

NOW = 1_800_000_000.0


def metrics(lag: dict[str, float], last_write: float | None) -> str:
    lines = ["# TYPE streams_consumer_lag gauge"]
    lines += [f'streams_consumer_lag{{partition="{p}"}} {v}' for p, v in lag.items()]
    if last_write is not None:
        lines += [
            "# TYPE streams_sink_last_write_timestamp_seconds gauge",
            f"streams_sink_last_write_timestamp_seconds {last_write}",
        ]
    return "\n".join(lines) + "\n"


def test_messages_waiting_with_no_write_for_too_long_is_stuck() -> None:
    reason = stuck_reason(metrics({"0": 300, "1": 20}, NOW - 400), NOW, 300)
    assert reason == (
        "320 messages wait and the sink has written nothing for 400s (more than 300s)"
    )


@pytest.mark.parametrize(
    ("lag", "idle"),
    [
        ({"0": 0, "1": 0}, 4000),  # idle: nothing to write, however long
        ({}, 4000),  # no partition assigned yet
        ({"0": 50}, 10),  # behind, but writing
    ],
)
def test_an_idle_or_writing_worker_is_healthy(lag: dict[str, float], idle: float) -> None:
    assert stuck_reason(metrics(lag, NOW - idle), NOW, 300) is None


def test_metrics_of_something_else_are_not_a_healthy_worker() -> None:
    assert stuck_reason(metrics({"0": 0}, None), NOW, 300) == (
        "its metrics have no streams_sink_last_write_timestamp_seconds (not a worker?)"
    )


@pytest.fixture
def served() -> Iterator[tuple[list[str], str]]:
    """A /metrics endpoint answering whatever ``body[0]`` holds."""
    body = [""]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = body[0].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield body, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_exits_1_naming_why_and_0_when_healthy(
    served: tuple[list[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    body, url = served
    body[0] = metrics({"0": 7}, time.time() - 120)
    assert main(["worker-health", "--url", url, "--stuck-after", "60"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("metering worker-health: stuck: 7 messages wait and the sink has ")
    body[0] = metrics({"0": 7}, time.time())
    assert main(["worker-health", "--url", url, "--stuck-after", "60"]) == 0


def test_a_silent_worker_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/metrics"  # nothing listens once closed
    assert main(["worker-health", "--url", url]) == 1
    assert capsys.readouterr().err.startswith(f"metering worker-health: {url} does not answer: ")


def test_a_bad_stuck_after_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["worker-health", "--stuck-after", "-1"])
    assert exit_.value.code == 2
    assert "argument --stuck-after: must be > 0, got -1" in capsys.readouterr().err
