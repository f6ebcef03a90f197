"""JWT verification: which tokens pass, and the reason given for each one that does not."""

from __future__ import annotations

import json
import re
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from metering.api.auth import (
    ADMIN_SCOPE,
    AuthError,
    JWTAuthMiddleware,
    TokenVerifier,
)
from metering.settings import SettingsError, load_settings

SECRET = "s3cret-for-tests-only-0123456789abcdef"
AUD = "metering-api"


def token(claims: dict, key: object = SECRET, alg: str = "HS256") -> str:
    base = {"exp": int(time.time()) + 300, "aud": AUD}
    return jwt.encode({**base, **claims}, key, algorithm=alg)  # type: ignore[arg-type]


def pem_public(private_key: object) -> str:
    return (
        private_key.public_key()  # type: ignore[attr-defined]
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(secret=SECRET, audience=AUD, leeway=5)


def test_tenant_comes_from_tenant_id_claim_before_sub(verifier: TokenVerifier) -> None:
    p = verifier.verify(token({"tenant_id": "acme", "sub": "user-7", "scope": "read write"}))
    assert p.tenant_id == "acme"
    assert p.scopes == frozenset({"read", "write"})
    assert not p.is_admin


def test_sub_is_the_tenant_when_there_is_no_tenant_id(verifier: TokenVerifier) -> None:
    assert verifier.verify(token({"sub": "globex"})).tenant_id == "globex"


def test_admin_is_a_scope(verifier: TokenVerifier) -> None:
    assert verifier.verify(token({"sub": "ops", "scope": f"read {ADMIN_SCOPE}"})).is_admin


# Times are offsets from the moment the test runs (not from collection: in a full suite run
# the unit tests may start minutes after collection).
@pytest.mark.parametrize(
    ("claims", "key", "reason"),
    [
        ({"sub": "a", "exp": -60}, SECRET, "expired"),
        ({"sub": "a"}, "another-secret-of-sufficient-length-123", "signature"),
        ({"sub": "a", "aud": "someone-else"}, SECRET, "audience"),
        ({"sub": "a", "nbf": 120}, SECRET, "not valid yet"),
        ({"exp": 60}, SECRET, "neither"),
        ({"sub": "bad tenant {x}"}, SECRET, "invalid tenant id"),
        ({"sub": "a", "scope": 42}, SECRET, "scope"),
    ],
)
def test_bad_tokens_are_refused_with_the_reason(
    verifier: TokenVerifier, claims: dict, key: str, reason: str
) -> None:
    now = int(time.time())
    claims = {k: now + v if k in {"exp", "nbf"} else v for k, v in claims.items()}
    with pytest.raises(AuthError, match=reason):
        verifier.verify(token(claims, key))


def test_a_future_iat_is_refused_naming_iat_not_nbf(verifier: TokenVerifier) -> None:
    """PyJWT raises the same error for a future ``iat`` as for a future ``nbf``."""
    issued_later = int(time.time()) + 600
    with pytest.raises(AuthError, match=r"^token is not valid yet \(iat: issued in the future\)$"):
        verifier.verify(token({"sub": "a", "iat": issued_later}))
    with pytest.raises(AuthError, match=r"^token is not valid yet \(nbf\)$"):
        verifier.verify(token({"sub": "a", "nbf": issued_later}))


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", 10**400), ("exp", int("9" * 400)), ("nbf", -(10**400))],
    ids=["exp=10**400", "exp=400 nines", "nbf=-10**400"],
)
def test_a_time_claim_beyond_a_float_is_refused_naming_it(
    verifier: TokenVerifier, claim: str, value: int
) -> None:
    """PyJWT compares time claims as integers of any size, so such a token passes its checks;
    turning the claim into seconds must refuse it, not raise OverflowError (a 500)."""
    with pytest.raises(AuthError, match=f"^token is invalid: claim '{claim}' is not a time"):
        verifier.verify(token({"sub": "a", claim: value}))


def test_a_token_without_exp_is_refused(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError, match="lacks the 'exp' claim"):
        verifier.verify(jwt.encode({"sub": "a", "aud": AUD}, SECRET, algorithm="HS256"))


def test_leeway_accepts_a_token_expired_a_moment_ago(verifier: TokenVerifier) -> None:
    assert verifier.verify(token({"sub": "a", "exp": int(time.time()) - 2})).tenant_id == "a"


def test_garbage_and_unsigned_tokens_are_refused(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError, match="invalid"):
        verifier.verify("not-a-jwt")
    unsigned = jwt.encode({"sub": "a", "aud": AUD, "exp": time.time() + 60}, None, algorithm="none")
    with pytest.raises(AuthError, match="'none' is not accepted"):
        verifier.verify(unsigned)


def test_a_cached_token_still_expires() -> None:
    """A token verified once is served from the cache, and refused by the verifier's clock
    once its exp (plus the leeway) has passed, without being decoded again."""
    clock = [time.time()]
    v = TokenVerifier(secret=SECRET, audience=AUD, leeway=5, clock=lambda: clock[0])
    exp = int(clock[0]) + 300
    raw = token({"sub": "a", "exp": exp})
    assert v.verify(raw).tenant_id == "a"
    assert raw in v._cache
    clock[0] = exp + 4.9  # inside the leeway: still served from the cache
    assert v.verify(raw).tenant_id == "a"
    clock[0] = exp + 5.0
    with pytest.raises(AuthError, match=r"^token has expired$"):
        v.verify(raw)
    assert raw not in v._cache


@pytest.mark.parametrize(
    ("alg", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_public_key_algorithms_verify(alg: str, make_key) -> None:  # type: ignore[no-untyped-def]
    private = make_key()
    v = TokenVerifier(public_key=pem_public(private), audience=AUD)
    assert v.verify(token({"sub": "acme"}, private, alg)).tenant_id == "acme"
    other = make_key()
    with pytest.raises(AuthError, match="signature"):
        v.verify(token({"sub": "acme"}, other, alg))


def _forged(alg: str) -> str:
    """A token whose header names ``alg``, with a signature nobody made."""
    header = jwt.utils.base64url_encode(b'{"alg":"%s","typ":"JWT"}' % alg.encode()).decode()
    claims = jwt.utils.base64url_encode(b'{"sub":"x","exp":9999999999}').decode()
    return f"{header}.{claims}.AAAA"


@pytest.mark.parametrize(
    ("make_key", "alg", "accepted"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "ES256", "RS256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "RS256", "ES256"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "PS256", "ES256"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "ES256", "ES384"),
    ],
)
async def test_an_algorithm_the_key_cannot_serve_is_401_not_500(  # type: ignore[no-untyped-def]
    make_key, alg: str, accepted: str
) -> None:
    """A token naming an algorithm of another key type (an RSA one against an EC key, or the
    wrong curve) is refused as a token, not raised from inside PyJWT as a TypeError."""
    private = make_key()
    v = TokenVerifier(public_key=pem_public(private), audience=AUD, algorithms=(alg, accepted))
    assert v.algorithms == {accepted}
    with pytest.raises(AuthError, match=f"{alg!r} is not accepted"):
        v.verify(_forged(alg))
    async with client(v) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {_forged(alg)}"})
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert v.verify(token({"sub": "acme"}, private, accepted)).tenant_id == "acme"


def test_a_key_serving_none_of_the_listed_algorithms_fails_at_start() -> None:
    public = pem_public(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError, match=r"this key serves ES384\)"):
        TokenVerifier(public_key=public, algorithms=("RS256", "ES256"))


def test_hs256_is_refused_when_only_a_public_key_is_configured() -> None:
    """No algorithm confusion: the public key is never used as an HMAC secret."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = pem_public(private)
    v = TokenVerifier(public_key=public, audience=AUD)
    with pytest.raises(AuthError, match="'HS256' is not accepted"):
        v.verify(token({"sub": "acme"}, "x" * 40))


def test_settings_without_any_key_fail_at_start() -> None:
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        TokenVerifier.from_settings(load_settings(jwt_secret=None, jwt_public_key=None))


def test_public_key_may_be_a_file_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    private = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwt.pem"
    path.write_text(pem_public(private))
    v = TokenVerifier.from_settings(load_settings(jwt_public_key=str(path), jwt_audience=AUD))
    assert v.verify(token({"sub": "acme"}, private, "ES256")).tenant_id == "acme"


# --- the middleware -----------------------------------------------------------------------------
async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"tenant": request.state.tenant_id, "scopes": sorted(request.state.scopes)})


def client(verifier: TokenVerifier) -> httpx.AsyncClient:
    app = JWTAuthMiddleware(Starlette(routes=[Route("/whoami", whoami)]), verifier)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_missing_token_is_401_problem_with_a_bearer_challenge(
    verifier: TokenVerifier,
) -> None:
    async with client(verifier) as c:
        r = await c.get("/whoami")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "missing credentials" in r.json()["detail"]


async def test_expired_token_is_401_naming_the_reason(verifier: TokenVerifier) -> None:
    async with client(verifier) as c:
        r = await c.get(
            "/whoami",
            headers={"Authorization": f"Bearer {token({'sub': 'a', 'exp': 1})}"},
        )
    assert r.status_code == 401
    assert r.json()["detail"] == "token has expired"
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_a_tenant_header_never_overrides_the_token(verifier: TokenVerifier) -> None:
    async with client(verifier) as c:
        r = await c.get(
            "/whoami",
            headers={
                "Authorization": f"Bearer {token({'tenant_id': 'acme', 'scope': 'a b'})}",
                "X-Tenant-Id": "victim",
                "Tenant-Id": "victim",
            },
        )
    assert r.status_code == 200
    assert r.json() == {"tenant": "acme", "scopes": ["a", "b"]}


# --- the challenge: never text from the token ---------------------------------------------------
#: RFC 6750 section 3 and RFC 9110 quoted-string: visible ASCII and space, no '"' or '\\'.
CHALLENGE = re.compile(
    rb'Bearer realm="metering", error="invalid_token", '
    rb'error_description="[\x20\x21\x23-\x5b\x5d-\x7e]{1,200}"'
)


def _unsigned(header: dict, claims: dict) -> str:
    """A token with any header, and a signature nobody made."""
    parts = (json.dumps(header).encode(), json.dumps(claims).encode())
    return ".".join(jwt.utils.base64url_encode(p).decode() for p in parts) + ".c2ln"


async def _refusal(verifier: TokenVerifier, raw: str) -> httpx.Response:
    async with client(verifier) as c:
        r = await c.get("/whoami", headers={"Authorization": f"Bearer {raw}"})
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    (challenge,) = [v for k, v in r.headers.raw if k.lower() == b"www-authenticate"]
    assert CHALLENGE.fullmatch(challenge), challenge
    return r


@pytest.mark.parametrize(
    ("header", "description", "detail"),
    [
        ({"alg": "\u0410"}, "token algorithm is not accepted", "token algorithm '\u0410' is"),
        ({"alg": "x\r\nX-Injected: yes"}, "token algorithm is not accepted", "'x\\r\\nX-Inj"),
        ({"alg": 'x"y\\'}, "token algorithm is not accepted", "token algorithm"),
        ({"alg": "A" * 5000}, "token algorithm is not accepted", "A" * 37 + "..."),
        ({"alg": "HS256", "crit": ["\u0410"]}, "token is invalid", "extension: \u0410"),
        (
            {"alg": "HS256", "crit": ["a\r\nX-Injected: yes"]},
            "token is invalid",
            "extension: a\\r\\nX-Injected: yes",
        ),
        ({"alg": "HS256", "crit": ["a\\"]}, "token is invalid", "extension: a\\"),
        ({"alg": "HS256", "crit": ["c" * 5000]}, "token is invalid", "c" * 100),
    ],
    ids=[
        "alg-cyrillic",
        "alg-crlf",
        "alg-quote-backslash",
        "alg-5000-chars",
        "crit-cyrillic",
        "crit-crlf",
        "crit-backslash",
        "crit-5000-chars",
    ],
)
async def test_the_challenge_carries_a_fixed_description_never_the_tokens_text(
    verifier: TokenVerifier, header: dict, description: str, detail: str
) -> None:
    """An ``alg`` or a ``crit`` entry could hold CR/LF (the server drops the connection), a
    character latin-1 cannot encode (a 500) or a quote/backslash (a broken quoted-string): the
    challenge names the kind of failure, the body says more, bounded and escaped."""
    r = await _refusal(verifier, _unsigned(header, {"sub": "a", "exp": 9999999999}))
    assert r.headers["www-authenticate"].endswith(f'error_description="{description}"')
    assert "x-injected" not in r.headers
    assert detail in r.json()["detail"]
    assert len(r.json()["detail"]) <= 200


async def test_a_signed_token_with_a_non_ascii_tenant_is_401_invalid_tenant(
    verifier: TokenVerifier,
) -> None:
    r = await _refusal(verifier, token({"sub": "\u0430bc"}))
    assert r.headers["www-authenticate"].endswith('error_description="token tenant is invalid"')
    assert r.json()["detail"].startswith("token tenant: invalid tenant id '\u0430bc'")


async def test_a_huge_exp_is_401_token_is_invalid(verifier: TokenVerifier) -> None:
    r = await _refusal(verifier, token({"sub": "a", "exp": 10**400}))
    assert r.json()["detail"] == "token is invalid: claim 'exp' is not a time in range"
    assert r.headers["www-authenticate"].endswith('error_description="token is invalid"')


async def test_a_future_iat_is_401_naming_iat(verifier: TokenVerifier) -> None:
    r = await _refusal(verifier, token({"sub": "a", "iat": int(time.time()) + 600}))
    assert r.json()["detail"] == "token is not valid yet (iat: issued in the future)"


@pytest.mark.parametrize("present", ["", None, False, 0, 42, ["acme"]])
def test_a_tenant_id_claim_present_but_empty_or_not_a_string_is_refused_not_replaced_by_sub(
    verifier: TokenVerifier, present: object
) -> None:
    """The security audit: ``tenant_id: ""`` (or null, false, 0) fell back to ``sub``, so a user
    bound to no tenant was admitted as a tenant named by the user's id. Only a token with no
    ``tenant_id`` at all is the tenant its ``sub`` names."""
    with pytest.raises(AuthError) as err:
        verifier.verify(token({"tenant_id": present, "sub": "user-42"}))
    assert str(err.value).startswith("token tenant: ")
    assert "(claim 'tenant_id')" in str(err.value)
    assert verifier.verify(token({"sub": "user-42"})).tenant_id == "user-42"


def test_with_no_audience_set_a_token_for_another_audience_is_refused() -> None:
    """The security audit: with JWT_AUDIENCE unset, a token minted for "billing-ui" by the same
    identity provider was accepted as a metering token. RFC 7519 4.1.3: a token whose ``aud``
    does not name the processor MUST be rejected; one without ``aud`` is still accepted."""
    no_audience = TokenVerifier(secret=SECRET, audience=None, leeway=5)
    for aud in ("billing-ui", ["billing-ui", "reports"]):
        raw = jwt.encode(
            {"sub": "acme", "aud": aud, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256"
        )
        with pytest.raises(AuthError, match=r"^token names an audience \('aud'\)"):
            no_audience.verify(raw)
    raw = jwt.encode({"sub": "acme", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    assert no_audience.verify(raw).tenant_id == "acme"
