"""The OpenAPI document describes the errors as the API answers them: problem+json, with the
401, 429 and 503 the middlewares give, and none of FastAPI's default validation bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api_support import admin, api_client, api_settings, auth


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, kafka_bootstrap: str):  # type: ignore[no-untyped-def]
    return api_settings(tmp_path, redis_url, kafka_bootstrap)


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op) for path, ops in schema["paths"].items() for method, op in ops.items()
    ]


async def test_every_error_is_documented_as_problem_json(settings, tenant: str) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        schema = (await client.get("/openapi.json")).json()
        # A validation error as the API answers it, checked against the documented schema.
        r = await client.put(f"/v1/tenants/{tenant}/quota", json={"burst": "x"}, headers=admin())
        q = await client.get(f"/v1/tenants/{tenant}/quota")  # no token
    assert "HTTPValidationError" not in json.dumps(schema)
    problem = schema["components"]["schemas"]["Problem"]
    for path, method, op in _operations(schema):
        for status, response in op["responses"].items():
            if status[0] in "45":
                assert response["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (method, path, status)
    for status, answer in (("422", r), ("401", q)):
        assert answer.status_code == int(status)
        assert answer.headers["content-type"] == "application/problem+json"
        body = answer.json()
        assert set(problem["required"]) <= set(body)
        types = {"string": str, "integer": int, "array": list}
        for name, value in body.items():
            if name in problem["properties"]:
                assert isinstance(value, types[problem["properties"][name]["type"]]), name
        documented = schema["paths"]["/v1/tenants/{tenant}/quota"][
            "put" if status == "422" else "get"
        ]
        assert status in documented["responses"]


async def test_the_middlewares_answers_are_documented_where_they_apply(settings) -> None:  # type: ignore[no-untyped-def]
    async with api_client(settings) as client:
        schema = (await client.get("/openapi.json", headers=auth("t-openapi"))).json()
    responses = {(p, m): set(op["responses"]) for p, m, op in _operations(schema)}
    assert {"401", "429", "503"} <= responses[("/v1/events", "post")]
    assert {"401", "503"} <= responses[("/v1/admin/reconcile", "get")]
    assert "429" not in responses[("/v1/admin/reconcile", "get")]  # not metered
    assert not {"401", "429"} & responses[("/healthz", "get")]
