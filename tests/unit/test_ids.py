from __future__ import annotations

import pytest

from metering.ids import InvalidIdentifier, validate_meter, validate_tenant_id


@pytest.mark.parametrize("tenant", ["acme", "a", "A-1_b.c:d", "x" * 64])
def test_valid_tenant_ids_pass(tenant: str) -> None:
    assert validate_tenant_id(tenant) == tenant


@pytest.mark.parametrize(
    "tenant", ["", "x" * 65, "-lead", "has space", "br{ace}", "new\nline", "ü", "a*", None, 5]
)
def test_invalid_tenant_ids_are_refused_before_any_key(tenant: object) -> None:
    with pytest.raises(InvalidIdentifier, match="tenant id"):
        validate_tenant_id(tenant)


def test_meter_names() -> None:
    assert validate_meter("requests") == "requests"
    with pytest.raises(InvalidIdentifier, match="meter"):
        validate_meter("drop table;")
