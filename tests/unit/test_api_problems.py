"""Problem answers (RFC 9457) never fail themselves: whatever text reaches a header, the answer
encodes and cannot split the header; a JSON body that is not UTF-8 is named as such."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from metering.api.problems import (
    Problem,
    install_problem_handlers,
    problem_response,
    send_problem,
)

HOSTILE = {
    "WWW-Authenticate": 'Bearer error_description="\u0410 a\r\nX-Injected: yes"',
    "X-Long": "v" * 5000,
    "Bad Name\r\nX-Injected": "yes",
}


def _visible_ascii(value: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in value)


async def test_send_problem_writes_only_safe_header_values() -> None:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await send_problem(send, Problem(401, "no", headers=HOSTILE))  # type: ignore[arg-type]
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 401
    assert headers[b"www-authenticate"] == b'Bearer error_description="? a??X-Injected: yes"'
    assert len(headers[b"x-long"]) == 1024  # bounded
    assert all(_visible_ascii(k) and _visible_ascii(v) for k, v in headers.items())
    assert not any(b"injected" in k for k in headers)  # the header with a bad name is left out


def test_problem_response_writes_only_safe_header_values() -> None:
    response = problem_response(Problem(401, "no", headers=HOSTILE))
    values = {k: v for k, v in response.raw_headers}
    assert values[b"www-authenticate"] == b'Bearer error_description="? a??X-Injected: yes"'
    assert all(_visible_ascii(k) and _visible_ascii(v) for k, v in response.raw_headers)
    assert not any(b"injected" in k for k in values)


class Body(BaseModel):
    name: str


@pytest.fixture
def json_body_app() -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.put("/thing")
    async def put_thing(body: Body) -> dict[str, str]:
        return {"name": body.name}

    return app


async def test_a_json_body_that_is_not_utf8_is_a_400_naming_utf8(json_body_app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=json_body_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.put(
            "/thing",
            content=b'{"name": "\xff"}',
            headers={"Content-Type": "application/json"},
        )
        ok = await c.put("/thing", json={"name": "\u00e9"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:metering:problem:bad-json"
    assert r.json()["detail"] == (
        "request body is not UTF-8 JSON: 'utf-8' codec can't decode byte 0xff in position 10: "
        "invalid start byte"
    )
    assert ok.json() == {"name": "\u00e9"}
