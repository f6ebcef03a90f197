"""The API of `metering up` serves its port before the application can be built: /healthz says
the process runs, everything else is 503 "starting" (never a store that is not migrated yet);
once opened, the real application answers, and on stop its shutdown runs."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from metering.embedded import ApiStartError, EmbeddedApi


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_answering(base: str, timeout: float = 20.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"{base}/healthz", timeout=1)
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class RealApp:
    """A stand-in for create_app(): records when it was built, started and shut down."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def build(self) -> FastAPI:
        self.events.append("built")

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            self.events.append("started")
            yield
            self.events.append("shut down")

        app = FastAPI(lifespan=lifespan)

        @app.get("/readyz")
        async def readyz() -> dict[str, str]:
            return {"status": "ready"}

        @app.get("/v1/limits/{tenant}")
        async def limits(tenant: str) -> dict[str, str]:
            return {"tenant": tenant}

        return app


@pytest.fixture
def real() -> RealApp:
    return RealApp()


@pytest.fixture
def api(real: RealApp) -> Iterator[EmbeddedApi]:
    api = EmbeddedApi("127.0.0.1", _free_port(), real.build)
    api.start()
    yield api
    api.stop()


def test_before_it_is_opened_only_healthz_says_ok_and_nothing_reaches_the_app(
    api: EmbeddedApi, real: RealApp
) -> None:
    assert _wait_answering(api.base_url).json() == {"status": "ok"}
    for path in ("/readyz", "/v1/limits/acme", "/metrics"):
        r = httpx.get(f"{api.base_url}{path}", timeout=2)
        assert r.status_code == 503, path
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["retry-after"] == "1"
        assert r.json()["detail"].startswith("starting: waiting for")
    assert real.events == []  # not even built


def test_once_opened_the_real_app_answers_and_its_shutdown_runs_on_stop(
    api: EmbeddedApi, real: RealApp
) -> None:
    _wait_answering(api.base_url)
    api.open()
    api.wait_serving()
    assert real.events == ["built", "started"]
    assert httpx.get(f"{api.base_url}/readyz", timeout=2).json() == {"status": "ready"}
    assert httpx.get(f"{api.base_url}/v1/limits/acme", timeout=2).json() == {"tenant": "acme"}
    api.stop()
    assert real.events == ["built", "started", "shut down"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api.base_url}/healthz", timeout=1)


def test_an_app_that_cannot_be_built_is_reported_and_readyz_says_why() -> None:
    def broken() -> Any:
        raise ValueError("JWT_SECRET is missing")

    api = EmbeddedApi("127.0.0.1", _free_port(), broken)
    api.start()
    try:
        _wait_answering(api.base_url)
        api.open()
        with pytest.raises(ApiStartError, match="JWT_SECRET is missing"):
            api.wait_serving()
        r = httpx.get(f"{api.base_url}/readyz", timeout=2)
        assert r.status_code == 503
        assert "start-up failed: ValueError: JWT_SECRET is missing" in r.json()["detail"]
    finally:
        api.stop()


def test_a_port_in_use_is_an_error_naming_the_address(real: RealApp) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = EmbeddedApi("127.0.0.1", port, real.build)
        api.start()
        try:
            api.open()
            with pytest.raises(ApiStartError, match=f"127.0.0.1:{port}"):
                api.wait_serving(timeout=20)
        finally:
            api.stop()
    assert not any(t.name == "metering-api" and t.is_alive() for t in threading.enumerate())
