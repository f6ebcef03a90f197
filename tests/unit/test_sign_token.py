"""``metering token``'s signer: a token the API accepts, and a lifetime it can represent."""

from __future__ import annotations

import pytest

from metering.api.auth import TokenVerifier
from metering.commands.up import MAX_TOKEN_TTL, sign_token
from metering.settings import load_settings

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def test_a_signed_token_verifies_with_its_tenant_and_scope() -> None:
    settings = load_settings(jwt_secret=SECRET, jwt_audience="metering-api")
    token = sign_token(settings, "acme", admin=True, ttl=60)
    principal = TokenVerifier.from_settings(settings).verify(token)
    assert principal.tenant_id == "acme" and principal.is_admin


@pytest.mark.parametrize("ttl", [0, -5, MAX_TOKEN_TTL + 1, 400_000_000_000, 10**23])
def test_a_lifetime_out_of_range_is_refused_naming_the_bounds(ttl: int) -> None:
    """A huge --ttl used to end in OverflowError (a date past year 9999) or a C int overflow."""
    with pytest.raises(ValueError, match=rf"ttl must be 1-{MAX_TOKEN_TTL} seconds"):
        sign_token(load_settings(jwt_secret=SECRET), "acme", ttl=ttl)
