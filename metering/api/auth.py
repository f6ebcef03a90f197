"""Bearer-JWT authentication: who is calling, and for which tenant.

:class:`JWTAuthMiddleware` (pure ASGI) verifies ``Authorization: Bearer <JWT>`` with PyJWT and
puts the caller into ``scope["state"]`` (so ``request.state``): ``tenant_id`` (claim
``tenant_id``, else ``sub``), ``scopes`` (the space-separated claim ``scope``), ``token_payload``
and ``principal``. Invariants:

- the tenant comes from the verified token only; no request header can set or override it;
- HS256 tokens are checked with ``JWT_SECRET``, RS256/ES256 with ``JWT_PUBLIC_KEY``; a token is
  verified with the key of its own algorithm family only (no HS256-with-the-public-key confusion);
- ``exp`` is required; ``exp``, ``nbf`` and ``aud`` (when ``JWT_AUDIENCE`` is set) are checked
  with ``JWT_LEEWAY`` seconds of leeway;
- ``metering:admin`` in ``scope`` makes an admin.

A verified token is remembered (bounded, until its ``exp``) so a client reusing its token does not
pay for signature verification on every request; time claims are re-checked on every use.

A refusal's ``WWW-Authenticate`` challenge carries a fixed description per kind of failure, never
text from the token (an ``alg``, a ``crit`` entry, a tenant), which could hold CR/LF, quotes or
characters a header cannot carry; the problem body's ``detail`` says more, bounded and with
control characters escaped. Tests: ``tests/unit/test_api_auth.py`` (the challenge tests).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from metering.api.problems import Problem, send_problem
from metering.ids import InvalidIdentifier, printable, tenant_claim, validate_tenant_id
from metering.settings import Settings, SettingsError

ADMIN_SCOPE = "metering:admin"
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
)
_SECRET_ALGS = {"HS256", "HS384", "HS512"}
_PUBLIC_ALGS = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}

# Documents the scheme in OpenAPI; the middleware does the checking.
bearer_scheme = HTTPBearer(auto_error=False, description="JWT with tenant_id/sub and scope")


class AuthError(Exception):
    """A credential was missing or did not verify; the message says why (safe to show, for the
    problem body). ``description`` is the fixed text for the ``WWW-Authenticate`` challenge; it
    defaults to the message, so a message quoting the token must pass one."""

    def __init__(self, detail: str, *, description: str | None = None) -> None:
        super().__init__(detail)
        self.description = detail if description is None else description


#: The challenge's description for a token that is not a valid JWT.
_INVALID = "token is invalid"
#: How much of a text taken from a token a message quotes.
_QUOTED_MAX = 160
#: RFC 6750 section 3: an ``error_description`` is %x20-21 / %x23-5B / %x5D-7E (visible ASCII
#: and space, no ``"`` or ``\``), which is also an RFC 9110 quoted-string needing no escapes.
_DESCRIPTION_MAX = 200


def _shown(text: str, limit: int = _QUOTED_MAX, *, quoted: bool = False) -> str:
    """``text`` from a token, bounded and with control characters escaped, for a message
    (``quoted``: as its ``repr``)."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if quoted:
        return repr(text)
    return printable(text)


def challenge_description(text: str) -> str:
    """``text`` as a Bearer ``error_description`` value (RFC 6750): ``"`` becomes ``'``, any
    other character outside the allowed set ``?``, at most 200 characters."""
    text = text[:_DESCRIPTION_MAX].replace('"', "'")
    return "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in text)


@dataclass(frozen=True)
class Principal:
    """The verified caller."""

    tenant_id: str
    scopes: frozenset[str]
    claims: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Tenant and scopes from verified claims; raise :class:`AuthError` when unusable."""
    claim, raw_tenant = tenant_claim(claims)
    if raw_tenant is None and claim == "sub":
        raise AuthError("token has neither a 'tenant_id' nor a 'sub' claim")
    try:
        tenant = validate_tenant_id(raw_tenant)
    except InvalidIdentifier as exc:
        raise AuthError(
            f"token tenant: {exc} (claim {claim!r})", description="token tenant is invalid"
        ) from None
    raw_scope = claims.get("scope", "")
    if isinstance(raw_scope, str):
        scopes = frozenset(raw_scope.split())
    elif isinstance(raw_scope, list) and all(isinstance(s, str) for s in raw_scope):
        scopes = frozenset(raw_scope)
    else:
        raise AuthError("token claim 'scope' must be a space-separated string")
    return Principal(tenant, scopes, dict(claims))


def algorithm_names(names: Iterable[str]) -> frozenset[str]:
    """``JWT_ALGORITHMS``' entries as the names PyJWT knows (trimmed, upper case, empty ones
    dropped): what the verifier accepts, and what ``metering token`` checks it signs with."""
    return frozenset(a.strip().upper() for a in names if a.strip())


def _key_serves(alg: str, key: Any) -> bool:
    """Whether PyJWT accepts ``key`` for ``alg`` (RSA keys for RS/PS, an EC key for the ES
    algorithm of its curve)."""
    try:
        jwt.get_algorithm_by_name(alg).prepare_key(key)
    except (TypeError, ValueError, jwt.PyJWTError):
        return False
    return True


def _time_claim(claims: Mapping[str, Any], name: str) -> float:
    """A time claim PyJWT accepted, as seconds (0 when absent); PyJWT compares it as an integer
    of any size, so one beyond a float's range is refused here."""
    try:
        return float(claims.get(name, 0) or 0)
    except (OverflowError, TypeError, ValueError):
        raise AuthError(
            f"token is invalid: claim {name!r} is not a time in range", description=_INVALID
        ) from None


class TokenVerifier:
    """Verifies JWTs with PyJWT; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        algorithms: Iterable[str] = ("HS256", "RS256", "ES256"),
        leeway: float = 10.0,
        cache_size: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret or None
        self._public_key = load_pem_public_key(public_key.encode()) if public_key else None
        allowed = algorithm_names(algorithms)
        usable = set()
        if self._secret:
            usable |= _SECRET_ALGS
        if self._public_key is not None:
            # Only the algorithms this key's type (and curve) serves: PyJWT raises TypeError,
            # not a token error, when a token names an RSA algorithm and the key is an EC one.
            usable |= {a for a in _PUBLIC_ALGS if _key_serves(a, self._public_key)}
        self.algorithms = frozenset(allowed & usable)
        if not self.algorithms:
            served = f" (this key serves {', '.join(sorted(usable))})" if usable else ""
            raise ValueError(
                "no JWT algorithm is usable: set JWT_SECRET (HS256) or JWT_PUBLIC_KEY "
                f"(RS256/ES256) and list its algorithm in JWT_ALGORITHMS{served}"
            )
        self.audience = audience or None
        self.leeway = leeway
        self._cache: OrderedDict[str, tuple[Principal, float, float]] = OrderedDict()
        self._cache_size = cache_size
        # Judges a cached token's exp/nbf; PyJWT judges an uncached one by its own wall clock.
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        public_key = settings.jwt_public_key
        if public_key and not public_key.lstrip().startswith("-----BEGIN"):
            path = Path(public_key)
            if not path.is_file():
                raise SettingsError(
                    "JWT_PUBLIC_KEY: neither a PEM public key nor the path of a file holding one"
                )
            public_key = path.read_text()
        try:
            return cls(
                secret=settings.jwt_secret,
                public_key=public_key,
                audience=settings.jwt_audience,
                algorithms=settings.jwt_algorithms.split(","),
                leeway=settings.jwt_leeway,
            )
        except ValueError as exc:
            raise SettingsError(f"JWT_SECRET / JWT_PUBLIC_KEY / JWT_ALGORITHMS: {exc}") from None

    def _key_for(self, alg: str) -> Any:
        if alg not in self.algorithms:
            raise AuthError(
                f"token algorithm {_shown(alg, 40, quoted=True)} is not accepted",
                description="token algorithm is not accepted",
            )
        return self._secret if alg in _SECRET_ALGS else self._public_key

    def verify(self, token: str) -> Principal:
        """The caller a token names; raise :class:`AuthError` saying what is wrong."""
        cached = self._cache.get(token)
        if cached is not None:
            now = self._clock()
            principal, exp, nbf = cached
            if nbf - self.leeway <= now < exp + self.leeway:
                return principal
            self._cache.pop(token, None)
            if now >= exp + self.leeway:  # verified once, so only its time can be wrong now
                raise AuthError("token has expired")
        try:
            alg = str(jwt.get_unverified_header(token).get("alg", ""))
            claims = jwt.decode(
                token,
                self._key_for(alg),
                algorithms=[alg],
                audience=self.audience,
                leeway=self.leeway,
                # Always verified: with no JWT_AUDIENCE, a token that names an audience is
                # for some other service and is refused (RFC 7519, 4.1.3).
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token has expired") from None
        except jwt.ImmatureSignatureError as exc:
            # PyJWT raises this for a future "iat" too; its message names the claim.
            if "(iat)" in str(exc):
                raise AuthError("token is not valid yet (iat: issued in the future)") from None
            raise AuthError("token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            if self.audience is None:
                raise AuthError(
                    "token names an audience ('aud') and this API has none (JWT_AUDIENCE): a "
                    "token for another service is not accepted",
                    description="token audience is wrong",
                ) from None
            raise AuthError(
                f"token audience is not {self.audience!r}", description="token audience is wrong"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"token is invalid: {_shown(str(exc))}", description=_INVALID) from None
        except (TypeError, ValueError) as exc:  # a token PyJWT could not even read as one
            raise AuthError(f"token is invalid: {_shown(str(exc))}", description=_INVALID) from None
        principal = principal_from_claims(claims)
        exp = _time_claim(claims, "exp")
        nbf = _time_claim(claims, "nbf")
        self._cache[token] = (principal, exp, nbf)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return token.strip()
    return None


def _unauthorized(detail: str, *, description: str | None) -> Problem:
    """A 401 with a Bearer challenge; with ``description``, an ``invalid_token`` one."""
    challenge = 'Bearer realm="metering"'
    if description is not None:
        challenge += (
            f', error="invalid_token", error_description="{challenge_description(description)}"'
        )
    return Problem(401, detail, slug="unauthorized", headers={"WWW-Authenticate": challenge})


class JWTAuthMiddleware:
    """Pure ASGI: every HTTP request outside ``public_paths`` needs a valid bearer token."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        *,
        public_paths: Iterable[str] = PUBLIC_PATHS,
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is None:
            detail = "missing credentials: send 'Authorization: Bearer <JWT>'"
            await send_problem(send, _unauthorized(detail, description=None))
            return
        try:
            principal = self.verifier.verify(token)
        except AuthError as exc:
            await send_problem(send, _unauthorized(str(exc), description=exc.description))
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["tenant_id"] = principal.tenant_id
        state["scopes"] = principal.scopes
        state["token_payload"] = principal.claims
        await self.app(scope, receive, send)


# --- FastAPI dependencies --------------------------------------------------------------------
def current_principal(request: Request) -> Principal:
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Problem(401, "missing credentials", slug="unauthorized")
    return principal


#: A route parameter ``principal: CurrentPrincipal`` receives the verified caller.
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Problem(403, f"this needs the {ADMIN_SCOPE!r} scope", slug="forbidden")


def admin_principal(principal: CurrentPrincipal) -> Principal:
    """The verified caller, if an admin (else 403). As a dependency it is solved before the
    route's query and body are validated: a caller without the scope learns it needs the scope,
    not what its request got wrong (a non-admin's quota change with a bad field got a 422)."""
    require_admin(principal)
    return principal


#: A route parameter ``principal: AdminPrincipal`` receives the verified caller, an admin.
AdminPrincipal = Annotated[Principal, Depends(admin_principal)]


def authorize_tenant(principal: Principal, tenant: str) -> str:
    """``tenant`` if the caller may act on it (itself, or any tenant for an admin); the tenant
    id is validated first, so a bad id is a 422, never a key built from unchecked input."""
    try:
        tenant = validate_tenant_id(tenant)
    except InvalidIdentifier as exc:
        raise Problem(422, str(exc), slug="invalid-tenant") from None
    if tenant != principal.tenant_id and not principal.is_admin:
        raise Problem(
            403,
            f"tenant {principal.tenant_id!r} may not access tenant {tenant!r}",
            slug="forbidden-tenant",
        )
    return tenant
