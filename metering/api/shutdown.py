"""A request still running when ``metering api``'s graceful shutdown times out gets ``503``.

On SIGTERM uvicorn stops accepting connections and gives the requests in flight
``API_SHUTDOWN_TIMEOUT`` seconds; then it cancels them, and for one whose response had not
started it logs "Exception in ASGI application" with a traceback and answers a bare ``500
Internal Server Error``. Nothing failed: the process is going away, and the request can be sent
again to another instance. :class:`AnswerCancelledAtShutdown`, around the whole application,
answers such a request ``503`` ``application/problem+json`` with ``Retry-After`` instead, as the
API answers every other refusal (a load balancer and a client retry a 503; a 500 pages someone).
The limiter's decision for it is still emitted (the middleware's ``on_abandoned``, drained by
the application's shutdown).

Only uvicorn cancels the task that runs a request (at that timeout); a client that disconnects
does not cancel it. A request whose response had started is cancelled as before: its status was
sent, and the connection is closed. The wrapper costs nothing per request but its ``try``.
Tests: ``tests/integration/test_api_shutdown.py``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from metering.api.problems import Problem, problem_response

log = logging.getLogger(__name__)

#: Seconds a client is told to wait before sending a request refused at shutdown again.
RETRY_AFTER_SECONDS = 1


class AnswerCancelledAtShutdown:
    """ASGI wrapper: a request cancelled before its response started gets ``503``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError as cancelled:
            if scope["type"] != "http":
                raise
            refusal = problem_response(
                Problem(
                    503,
                    "the server is shutting down: send the request again",
                    slug="shutting-down",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            )
            try:
                await refusal(scope, receive, send)
            except Exception:  # its response had started (or the connection is gone)
                raise cancelled from None
            log.warning(
                "shutdown: %s %s was still running when the shutdown timeout ran out: answered 503",
                scope.get("method"),
                scope.get("path"),
            )
            # Handled: returning lets the task end, as the cancellation asked, without uvicorn
            # taking it for an application error.


__all__ = ["RETRY_AFTER_SECONDS", "AnswerCancelledAtShutdown"]
