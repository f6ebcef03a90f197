"""The API of ``metering up``, serving its port from the first second of the start-up.

:class:`EmbeddedApi` runs uvicorn on an event loop of its own, in a thread, in front of a
:class:`StartupGate`. Until the caller calls :meth:`EmbeddedApi.open` (Redis answers, the quota
DB and ClickHouse are migrated) the gate itself answers:

- ``/healthz`` 200 (the process runs, as always);
- ``/readyz`` and every other path 503 ``application/problem+json`` with ``Retry-After: 1``,
  naming what is still starting. Nothing reaches a store that is not migrated yet.

``open()`` builds the real application (:func:`metering.api.app.create_app`), runs its lifespan
and from then on hands it every request, so ``/readyz`` is the API's own check (Redis and the
quota DB answer). Kafka is not waited for: the emitter spools what arrives before it answers.
On :meth:`EmbeddedApi.stop` uvicorn drains the connections and the application's lifespan ends,
which flushes the emitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from metering.threads import NamedThread

log = logging.getLogger("metering.up")

# The API's problem helpers (metering.api.problems, limiter.middleware) import FastAPI or the
# limiter, ~0.5 s this gate answers during; its one 503 body is written here.
PROBLEM_JSON = "application/problem+json"


class ApiStartError(RuntimeError):
    """The API could not serve: its port is in use, or the application could not be built."""


class StartupGate:
    """ASGI application answering for the real one until it is built; then passing through."""

    def __init__(
        self,
        build: Callable[[], Any],
        opened: threading.Event,
        preload: Callable[[], None] | None = None,
        on_serving: Callable[[], None] | None = None,
    ) -> None:
        self._build = build
        self._preload = preload
        self._on_serving = on_serving
        self._opened = opened
        self.app: Any = None
        self.error: BaseException | None = None
        self.built = threading.Event()  #: set once the application serves, or failed to build
        self.waiting_for = "redis, migrations"
        self._lifespans = contextlib.AsyncExitStack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._starting(scope, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later

    async def _starting(self, scope: Scope, send: Send) -> None:
        body: dict[str, Any]
        extra: list[tuple[bytes, bytes]]
        if scope["path"] == "/healthz":
            status, body, ctype, extra = 200, {"status": "ok"}, "application/json", []
        else:
            detail = f"starting: waiting for {self.waiting_for}"
            if self.error is not None:
                detail = f"start-up failed: {type(self.error).__name__}: {self.error}"[:300]
            body = {"type": "about:blank", "title": "Service Unavailable", "status": 503}
            body["detail"] = detail
            status, ctype, extra = 503, PROBLEM_JSON, [(b"retry-after", b"1")]
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(payload)).encode()),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        builder = asyncio.create_task(self._open_when_told())
        try:
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        finally:  # also when uvicorn gives up (its port in use) and cancels this
            builder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await builder
            try:
                await self._lifespans.aclose()  # the application's shutdown: flushes the emitter
            except Exception:
                log.exception("the API's shutdown failed")
        await send({"type": "lifespan.shutdown.complete"})

    async def _open_when_told(self) -> None:
        try:
            if self._preload is not None:  # imports, off the loop: /healthz keeps answering
                await asyncio.to_thread(self._preload)
            while not self._opened.is_set():
                await asyncio.sleep(0.02)
            app = self._build()
            await self._lifespans.enter_async_context(app.router.lifespan_context(app))
            self.app = app
            if self._on_serving is not None:
                self._on_serving()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("the API could not start")
            self.error = exc
        finally:
            self.built.set()


class EmbeddedApi:
    """uvicorn in a thread of its own, serving a :class:`StartupGate` from the start."""

    def __init__(
        self,
        host: str,
        port: int,
        build: Callable[[], Any],
        *,
        preload: Callable[[], None] | None = None,
        on_serving: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._opened = threading.Event()
        self.gate = StartupGate(build, self._opened, preload, on_serving)
        self.server: Any = None
        self.failure: BaseException | None = None
        self._thread = NamedThread(target=self._run, name="metering-api", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def open(self) -> None:
        """Build the application and serve it (its stores are migrated, Redis answers)."""
        self._opened.set()

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Wait until the application serves; raise what stopped it (a port in use, a build
        that failed)."""
        deadline = time.monotonic() + timeout
        while not (self.gate.built.wait(0.05) and self.server and self.server.started):
            self._raise_if_stopped()
            if self.gate.error is not None:
                raise ApiStartError(f"the API could not start: {self.gate.error}")
            if time.monotonic() > deadline:
                raise ApiStartError(f"the API did not start within {timeout:.0f}s")
        if self.gate.error is not None:
            raise ApiStartError(f"the API could not start: {self.gate.error}")

    def _raise_if_stopped(self) -> None:
        if not self._thread.is_alive() and self._thread.ident is not None:
            raise ApiStartError(
                f"the API stopped: it could not serve {self.base_url}"
                + (f" ({self.failure!r})" if self.failure else "")
            )

    def stop(self, timeout: float = 30.0) -> None:
        """Drain the connections, run the application's shutdown, wait for the thread."""
        if self.server is not None:
            self.server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # the main thread owns SIGINT/SIGTERM
                pass

            @property
            def capture_signals(self) -> Any:  # uvicorn >= 0.29 uses this context manager
                return contextlib.nullcontext

        self.server = Server(
            uvicorn.Config(
                self.gate,
                host=self.host,
                port=self.port,
                log_level="warning",
                lifespan="on",
                access_log=False,
            )
        )
        try:
            # uvicorn's own loop choice (uvloop when installed), as `metering api` gets it.
            with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
                runner.run(self.server.serve())
        except BaseException as exc:  # uvicorn leaves with SystemExit when it cannot bind
            self.failure = exc
