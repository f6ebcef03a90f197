"""Errors as RFC 9457 problem details (``application/problem+json``), for every error the API
sends: raised :class:`Problem`\\ s, validation errors, 404/405/413 from routing, and a last-resort
500 that never echoes internals.

Pure-ASGI middlewares (auth, rate limit, body limit) run outside FastAPI's exception handling, so
they answer with :func:`send_problem`, which writes the same body directly.

A problem's header values pass through :func:`header_value` on both paths: an error answer must
never itself fail (a value the server cannot encode) or break the response (a CR/LF, which the
server refuses by dropping the connection), whatever text reached it.
"""

from __future__ import annotations

import http
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Send

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE_BASE = "urn:metering:problem:"

log = logging.getLogger(__name__)

#: RFC 9110 ``token``: what a header name may be.
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: The longest header value a problem sends (more is cut off).
HEADER_VALUE_MAX = 1024


def problem_type(slug: str) -> str:
    """The problem type URI for ``slug`` (``about:blank`` means "see the status code")."""
    return "about:blank" if slug == "about:blank" else PROBLEM_TYPE_BASE + slug


class Problem(Exception):
    """An error the API answers as problem details. ``extra`` members go into the body
    (for example ``errors``, a list of per-item errors)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str = "about:blank",
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = problem_type(slug)
        self.title = title or _phrase(status)
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return problem_body(
            self.status, self.detail, title=self.title, type_=self.type, **self.extra
        )


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    type_: str = "about:blank",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": type_,
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
    }
    body.update(extra)
    return body


def header_value(value: object) -> str:
    """``value`` as a header value that encodes and cannot split the header: visible ASCII and
    spaces only (any other character becomes ``?``), at most :data:`HEADER_VALUE_MAX`
    characters."""
    text = str(value)[:HEADER_VALUE_MAX]
    return "".join(c if " " <= c <= "~" else "?" for c in text).strip()


def safe_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with every value made safe by :func:`header_value`; a header whose name is
    not an RFC 9110 token is left out (and logged: names come from code, not from input)."""
    out = {}
    for name, value in headers.items():
        if not _FIELD_NAME.fullmatch(name):
            log.error("dropped a problem header with an invalid name: %r", name)
            continue
        out[name] = header_value(value)
    return out


def problem_response(problem: Problem) -> Response:
    return Response(
        json.dumps(problem.body(), default=str),
        status_code=problem.status,
        media_type=PROBLEM_JSON,
        headers=safe_headers(problem.headers),
    )


async def send_problem(
    send: Send,
    problem: Problem,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Answer an ASGI HTTP request with ``problem`` (for pure-ASGI middlewares)."""
    payload = json.dumps(problem.body(), default=str).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers.extend(
        (k.lower().encode("ascii"), v.encode("ascii"))
        for k, v in safe_headers(problem.headers).items()
    )
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def validation_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """Pydantic's errors as ``{"location", "message"}`` pairs a client can read (no inputs
    echoed back: they can be large or secret)."""
    out = []
    for err in exc.errors():
        message = str(err.get("msg", "invalid value"))
        ctx = err.get("ctx") or {}
        if err.get("type") == "json_invalid" and "error" in ctx:
            message = f"body is not valid JSON: {ctx['error']}"
        out.append({"location": _location(err.get("loc", ())), "message": message})
    return out


#: What a 503 for a failing store tells the client to wait before trying again, in seconds.
STORE_RETRY_AFTER = 5
#: At most one log line per store per this many seconds: an outage fails every request.
STORE_LOG_EVERY = 5.0
_store_logged_at: dict[str, float] = {}


def store_problem(
    exc: BaseException,
    settings: Any = None,
    *,
    detail: str | None = None,
    slug: str = "store-unavailable",
    store: str | None = None,
) -> Problem | None:
    """A 503 naming the store if a store's client (the quota DB, ClickHouse, Redis, Kafka)
    raised ``exc``, else None. The client is told which store failed and when to try again,
    never the store's address or error text; the operator's log gets the store's one-line
    message (:func:`metering.commands.store_errors.store_failure` for ``settings``, the app's:
    the setting, password masked, and a hint such as "run `metering db migrate`"), at most once
    per :data:`STORE_LOG_EVERY` seconds per store. ``store``: the store the caller knows it
    called, for errors outside its client's classes (an ``OSError``); the answer is then never
    None."""
    from metering.commands.store_errors import failing_store

    store = failing_store(exc) or store
    if store is None:
        return None
    log_store_failure(store, exc, settings)
    return Problem(
        503,
        detail or f"{store} is unavailable; try again later",
        slug=slug,
        headers={"Retry-After": str(STORE_RETRY_AFTER)},
        store=store,
    )


def log_store_failure(store: str, exc: BaseException, settings: Any = None) -> None:
    """Log a store's failure for the operator (throttled per store; see :func:`store_problem`)."""
    from metering.commands.store_errors import store_failure

    now = time.monotonic()
    if now - _store_logged_at.get(store, -1e18) >= STORE_LOG_EVERY:
        _store_logged_at[store] = now
        line = store_failure(exc, settings) or f"{store}: {type(exc).__name__}"
        log.warning("answering 503: %s", line, exc_info=exc)


def _app_settings(request: Request) -> Any:
    context = getattr(request.app.state, "context", None)
    return getattr(context, "settings", None)


class StoreFailureRoute(APIRoute):
    """A route whose store fails (down, unreachable, not migrated) answers 503 with a problem
    naming the store and a Retry-After, instead of the last-resort 500: the request was fine,
    the service cannot serve it now. Every router of the API uses this route class."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                problem = store_problem(exc, _app_settings(request))
                if problem is None:
                    raise
                raise problem from exc

        return handle


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error the app raises a problem+json answer."""

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> Response:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        errors = validation_errors(exc)
        detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5])
        return problem_response(
            Problem(422, detail or "invalid request", slug="invalid-request", errors=errors)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's "There was an error parsing the body" when a JSON body is not UTF-8.
            return problem_response(
                Problem(400, f"request body is not UTF-8 JSON: {exc.__cause__}", slug="bad-json")
            )
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return problem_response(Problem(exc.status_code, detail, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "internal error; the event was logged"))
