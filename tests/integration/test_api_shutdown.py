"""``metering api``'s uvicorn (``server_config``) at a shutdown that times out: a request still
running gets 503 problem+json with Retry-After, not uvicorn's bare 500 (the "never a 500" rule:
nothing failed, the instance is going away and the request can go to another)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import httpx
import pytest
import uvicorn

from metering.commands.api import server_config
from tests.integration.test_api_server import free_port


class Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a thread of the test, not the main one
        pass

    @property
    def capture_signals(self) -> Any:
        return contextlib.nullcontext


def serve(app: Any, port: int, shutdown_timeout: int) -> tuple[Server, threading.Thread]:
    server = Server(server_config(app, "127.0.0.1", port, "warning", shutdown_timeout))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


def slow_app(started: threading.Event, responding: bool) -> Any:
    """An app whose requests take a minute: before their response starts, or after."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if responding:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        started.set()
        await asyncio.sleep(60)

    return app


@pytest.mark.timeout(60)
@pytest.mark.parametrize("responding", [False, True])
def test_a_request_still_running_when_the_shutdown_times_out_gets_503_not_500(
    responding: bool,
) -> None:
    started = threading.Event()
    port = free_port()
    server, thread = serve(slow_app(started, responding), port, shutdown_timeout=1)
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append(httpx.get(f"http://127.0.0.1:{port}/slow", timeout=30))
        except httpx.HTTPError as exc:
            answers.append(exc)

    for _ in range(100):  # until it listens
        if server.started:
            break
        threading.Event().wait(0.05)
    client = threading.Thread(target=ask)
    client.start()
    assert started.wait(10)
    server.should_exit = True  # as SIGTERM does
    client.join(30)
    thread.join(30)
    assert not thread.is_alive()
    (answer,) = answers
    if not responding:
        assert isinstance(answer, httpx.Response)
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["detail"] == "the server is shutting down: send the request again"
    else:  # its 200 was sent: the connection is closed before the body ends, as before
        assert isinstance(answer, httpx.HTTPError)
