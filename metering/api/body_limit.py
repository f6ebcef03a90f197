"""A bound on request bodies: an over-large body gets ``413`` before the app holds it in memory.

A declared ``Content-Length`` over the bound is refused at once; a body sent without one
(chunked) is counted as it arrives and refused as soon as it passes the bound.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering.api.problems import Problem, send_problem


def _too_large(limit: int) -> str:
    return f"request body is larger than {limit} bytes"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_problem(send, Problem(400, "Content-Length is not a number"))
                    return
                if declared > self.max_bytes:
                    await send_problem(send, Problem(413, _too_large(self.max_bytes)))
                    return
        seen = 0
        limit = self.max_bytes

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the app's body read; its handler answers 413.
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counting_receive, send)
