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


def test_a_token_the_api_would_refuse_for_its_algorithm_is_not_signed() -> None:
    """The operators audit: with JWT_ALGORITHMS=RS256,ES256 `metering token` still signed an
    HS256 token, which the API then refused with a 401."""
    from metering.cli import CommandError

    with pytest.raises(CommandError, match="JWT_ALGORITHMS='RS256,ES256' does not accept HS256"):
        sign_token(load_settings(jwt_secret=SECRET, jwt_algorithms="RS256,ES256"), "acme")
    assert sign_token(load_settings(jwt_secret=SECRET, jwt_algorithms=" hs256 ,RS256"), "acme")
