"""OpenID Connect: bearer JWT validation (joserfc) and claim mapping.

``OIDCVerifier`` owns everything that talks to the identity provider (IdP)
outside the browser redirect dance:

* discovery (``<issuer>/.well-known/openid-configuration``), fetched lazily;
  the document's ``issuer`` must equal the configured one exactly;
* the JWKS, cached for ``jwks_max_age`` and re-fetched early when a token
  names an unknown ``kid``, but never more often than ``jwks_min_refresh``
  (a flood of made-up key ids costs the IdP at most one request per period);
* a bounded wait: one fetch (discovery + JWKS) takes at most ``timeout``
  seconds in total, concurrent callers share it, and after a failure callers
  fail at once (``ProviderUnavailable``, 503) until the next attempt is due.
  Keys already fetched keep working while the IdP is down;
* ``verify_bearer``: signature with an explicit asymmetric algorithm
  allow-list (never ``none``, never HMAC), ``iss``, ``aud``, ``exp``, ``nbf``,
  ``iat`` with ``leeway``; then ``principal_from_claims``;
* ``verify_id_token``, ``userinfo`` and ``refresh`` used by the browser login
  (``gateway.auth.oidc_login``).

Errors (all ``GatewayError``, so they render as problem+json with their
status): ``OIDCError`` > ``AuthFailed`` (401, with ``WWW-Authenticate``),
``Forbidden`` (403: a valid identity the allow-lists do not admit) and
``ProviderUnavailable`` (503 + ``Retry-After``: the token could not be checked
because the IdP is unreachable; it says nothing about the credentials).
Nothing here is global: API-key authentication never waits on the IdP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import JWKRegistry, Key
from joserfc.jws import JWSRegistry

from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.settings import OIDCSettings

log = logging.getLogger("gateway.auth.oidc")

#: A JWT larger than this is refused before any parsing.
MAX_TOKEN_BYTES = 16 * 1024
#: Discovery documents and JWKS larger than this are refused.
MAX_DOCUMENT_BYTES = 512 * 1024
#: After a failed fetch with no keys at all, retry no sooner than this (capped by jwks_min_refresh).
INITIAL_RETRY = 5.0
#: Token types accepted in the JOSE ``typ`` header (absent is accepted too).
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})


class OIDCError(GatewayError):
    """Base of every OIDC failure; ``status`` says how to answer."""

    status = 401

    def __init__(self, reason: str, **kw: Any) -> None:
        super().__init__(reason, **kw)
        self.reason = reason


class AuthFailed(OIDCError):
    """No usable identity: bad, expired or foreign token; failed login (401)."""

    status = 401

    def __init__(self, reason: str) -> None:
        challenge = f'Bearer realm="pvs-gateway", error="invalid_token", error_description="{_quote(reason)}"'
        super().__init__(reason, headers=[("WWW-Authenticate", challenge)])


class Forbidden(OIDCError):
    """A valid identity that the allow-lists do not admit (403)."""

    status = 403


class ProviderUnavailable(OIDCError):
    """The IdP could not be reached or answered badly; credentials were not judged (503)."""

    status = 503

    def __init__(self, reason: str, *, retry_after: float = INITIAL_RETRY) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(reason, headers=[("Retry-After", str(seconds))])
        self.retry_after = seconds


def _quote(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise AuthFailed(f"malformed token: {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise AuthFailed(f"malformed token: {what} is not a JSON object")
    return value


def looks_like_jwt(token: str) -> bool:
    """True if ``token`` has the shape of a compact JWS (three base64url parts)."""
    parts = token.split(".")
    return len(parts) == 3 and all(parts[:2]) and all(_is_b64url(p) for p in parts)


def _is_b64url(part: str) -> bool:
    return all(c.isascii() and (c.isalnum() or c in "-_") for c in part)


def claim_groups(claims: Mapping[str, Any], claim: str) -> list[str]:
    """Groups from ``claim``: a list of strings, or one string separated by spaces or commas.

    A dotted name (``realm_access.roles``) walks nested objects when no
    top-level claim has that exact name.
    """
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for part in claim.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return [g for g in value.replace(",", " ").split() if g]
    if isinstance(value, (list, tuple)):
        return [g for g in value if isinstance(g, str) and g]
    return []


class OIDCVerifier:
    """Validates bearer JWTs and ID tokens for one issuer; maps claims to a ``Principal``.

    ``client`` is an ``httpx.AsyncClient`` owned by the caller (the app's
    lifespan); ``clock`` is a monotonic clock for cache ages and ``now`` the
    wall clock for token times, both injectable for tests.
    """

    def __init__(
        self,
        settings: OIDCSettings,
        *,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not settings.issuer:
            raise ValueError("auth.oidc.issuer is required")
        self.settings = settings
        self.issuer = settings.issuer
        self.audience = settings.audience or settings.client_id
        # Defence in depth: settings.validate() already refuses these.
        self.algorithms = tuple(a for a in settings.algorithms if a != "none" and not a.upper().startswith("HS"))
        if not self.algorithms:
            raise ValueError("auth.oidc.algorithms: no asymmetric algorithm left to accept")
        self._client = client
        self._clock = clock
        self._now = now
        self._registry = JWSRegistry(algorithms=list(self.algorithms), strict_check_header=False)
        self._lock = asyncio.Lock()
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = -math.inf
        self._keys: dict[str, Key] = {}
        self._keyless: list[Key] = []
        self._jwks_raw: dict[str, Any] | None = None
        self._jwks_at = -math.inf  # last successful JWKS fetch (monotonic)
        self._attempt_at = -math.inf  # last fetch attempt, successful or not
        self._failure: ProviderUnavailable | None = None
        self.fetches = 0  # number of fetch attempts (observability, tests)

    # ------------------------------------------------------------ policy

    @property
    def policy_fingerprint(self) -> str:
        """Changes whenever the issuer, client or any allow-list changes (sessions compare it)."""
        s = self.settings
        material = json.dumps(
            [s.issuer, s.client_id, self.audience, sorted(s.allowed_emails), sorted(s.allowed_groups), sorted(s.admin_groups), s.groups_claim]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    def principal_from_claims(self, claims: Mapping[str, Any], *, method: str = "jwt") -> Principal:
        """Map verified claims to a ``Principal``; raise ``Forbidden`` if the user is not admitted.

        Identity: ``id`` is ``oidc:<sub>``; ``name`` is ``email``, else
        ``preferred_username``, else ``sub``; ``method`` is "jwt" for bearer
        tokens and "oidc" for browser sessions.

        Admission (the two allow-lists are alternatives, OR-ed):

        * both ``allowed_emails`` and ``allowed_groups`` empty: every identity
          this issuer vouches for (with our audience) is admitted;
        * otherwise the caller is admitted if its ``email`` is in
          ``allowed_emails`` (case-insensitive; an ``email_verified`` claim of
          ``false`` makes the address count for nothing) **or** any of its
          groups (``groups_claim``) is in ``allowed_groups``. Being listed in
          one list is enough; an empty list simply admits nobody by itself.

        Role: "admin" if any group is in ``admin_groups``, else "viewer".
        ``admin_groups`` never admits on its own: an admin must also pass the
        allow-lists when they are set.
        """
        s = self.settings
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthFailed("token has no subject (sub)")
        email = claims.get("email") if isinstance(claims.get("email"), str) else None
        username = claims.get("preferred_username") if isinstance(claims.get("preferred_username"), str) else None
        groups = set(claim_groups(claims, s.groups_claim))
        if s.allowed_emails or s.allowed_groups:
            verified_email = email if email and claims.get("email_verified") is not False else None
            allowed_emails = {e.lower() for e in s.allowed_emails}
            by_email = verified_email is not None and verified_email.lower() in allowed_emails
            by_group = bool(groups.intersection(s.allowed_groups))
            if not (by_email or by_group):
                who = email or username or sub
                raise Forbidden(f"{who} is signed in but not allowed here (not in allowed_emails or allowed_groups)")
        role = "admin" if groups.intersection(s.admin_groups) else "viewer"
        return Principal(id=f"oidc:{sub}", name=email or username or sub, role=role, method=method)

    # ------------------------------------------------------------ tokens

    async def verify_bearer(self, token: str) -> Principal:
        """Validate a bearer JWT (access or ID token for our audience) and map it."""
        claims = await self.verify_jwt(token, audience=self.audience)
        return self.principal_from_claims(claims, method="jwt")

    async def verify_id_token(self, token: str, *, nonce: str | None = None) -> dict[str, Any]:
        """Validate an ID token issued to our client (``aud`` has client_id; ``azp`` if several)."""
        claims = await self.verify_jwt(token, audience=self.settings.client_id)
        aud = claims.get("aud")
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.settings.client_id:
            raise AuthFailed("ID token has several audiences and azp is not this client")
        if nonce is not None and claims.get("nonce") != nonce:
            raise AuthFailed("ID token nonce does not match the login request")
        return claims

    async def verify_jwt(self, token: str, *, audience: str) -> dict[str, Any]:
        """Signature, algorithm, issuer, audience and times; returns the claims."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthFailed("token too large")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthFailed("malformed token: not a compact JWS (expected three dot-separated parts)")
        header = _b64json(parts[0], "header")
        unverified = _b64json(parts[1], "payload")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthFailed(f"token algorithm {alg!r} is not allowed (allowed: {', '.join(self.algorithms)})")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise AuthFailed(f"token type {typ!r} is not an access or ID token")
        if "crit" in header:
            raise AuthFailed("token has critical header parameters this gateway does not understand")
        # Cheap check before any key lookup, so foreign tokens never make us call the IdP.
        if unverified.get("iss") != self.issuer:
            raise AuthFailed("token is from another issuer")

        key = await self._key_for(header)
        try:
            verified = jwt.decode(token, key, algorithms=[alg], registry=self._registry)
        except BadSignatureError:
            raise AuthFailed("token signature is invalid") from None
        except JoseError as exc:
            raise AuthFailed(f"token rejected: {exc.description or exc.error}") from None
        claims = verified.claims
        self._check_claims(claims, audience)
        return claims

    def _check_claims(self, claims: dict[str, Any], audience: str) -> None:
        leeway = int(self.settings.leeway)
        registry = jwt.JWTClaimsRegistry(
            now=int(self._now()),
            leeway=leeway,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise AuthFailed("token expired") from None
        except MissingClaimError as exc:
            raise AuthFailed(f"token lacks required claim(s): {exc.claim}") from None
        except InvalidClaimError as exc:
            reason = {
                "iss": "token is from another issuer",
                "aud": f"token is not for this gateway (aud must include {audience!r})",
                "nbf": "token is not yet valid (nbf in the future)",
                "iat": "token was issued in the future (iat)",
            }.get(exc.claim, f"token claim {exc.claim!r} is invalid")
            raise AuthFailed(reason) from None

    # ------------------------------------------------------------ keys

    async def _key_for(self, header: Mapping[str, Any]) -> Key:
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthFailed("malformed token: kid is not a string")
        await self._ensure()
        key = self._find_key(kid, header["alg"])
        if key is None:
            # Unknown key: the IdP may have rotated. Refresh, floor permitting.
            await self._ensure(force=True)
            key = self._find_key(kid, header["alg"])
        if key is None:
            raise AuthFailed("token signed with an unknown key" + (f" (kid {kid!r})" if kid else " (no kid)"))
        return key

    def _find_key(self, kid: str | None, alg: str) -> Key | None:
        if kid is not None:
            candidates = [self._keys[kid]] if kid in self._keys else []
        else:
            candidates = list(self._keys.values()) + self._keyless
        fitting = [k for k in candidates if _key_fits(k, alg)]
        if kid is None and len(fitting) != 1:
            return None  # without a kid we only accept an unambiguous key
        return fitting[0] if fitting else None

    async def jwks(self) -> dict[str, Any]:
        """The IdP's JWKS as fetched (public keys), loading it if needed."""
        await self._ensure()
        assert self._jwks_raw is not None
        return self._jwks_raw

    async def discovery(self) -> dict[str, Any]:
        """The validated discovery document, loading it if needed."""
        await self._ensure()
        assert self._metadata is not None
        return self._metadata

    def _fresh(self, now: float) -> bool:
        return self._metadata is not None and self._jwks_raw is not None and now - self._jwks_at < self.settings.jwks_max_age

    def _floor(self) -> float:
        if self._jwks_raw is None:
            return min(self.settings.jwks_min_refresh, INITIAL_RETRY)
        return self.settings.jwks_min_refresh

    async def _ensure(self, *, force: bool = False) -> None:
        """Load or refresh discovery + JWKS when missing, stale, or forced; at most once per floor."""
        if not force and self._fresh(self._clock()):
            return
        attempt_before = self._attempt_at
        async with self._lock:
            now = self._clock()
            if self._attempt_at != attempt_before and self._jwks_raw is not None:
                return  # someone else fetched while we waited: use their result
            if not force and self._fresh(now):
                return
            wait = self._attempt_at + self._floor() - now
            if wait > 0:
                if self._jwks_raw is not None:
                    return  # too soon to ask again: keep using what we have
                raise ProviderUnavailable(
                    self._failure.reason if self._failure else "identity provider not reachable yet", retry_after=wait
                )
            self._attempt_at = now
            self.fetches += 1
            try:
                async with asyncio.timeout(self.settings.timeout):
                    await self._fetch(now)
                self._failure = None
            except (ProviderUnavailable, TimeoutError, httpx.HTTPError) as exc:
                self._failure = self._unavailable(exc)
                if self._jwks_raw is not None:
                    log.warning("OIDC: %s; keeping the keys fetched before", self._failure.reason)
                    return
                raise self._failure from None

    def _unavailable(self, exc: BaseException) -> ProviderUnavailable:
        if isinstance(exc, ProviderUnavailable):
            return exc
        if isinstance(exc, TimeoutError | httpx.TimeoutException):
            what = f"identity provider {self.issuer} did not answer within {self.settings.timeout:g} s"
        else:
            what = f"identity provider {self.issuer} unreachable: {type(exc).__name__}: {exc}"
        return ProviderUnavailable(what, retry_after=self._floor())

    async def _get_json(self, url: str, what: str) -> dict[str, Any]:
        try:
            resp = await self._client.get(url, headers={"Accept": "application/json"}, timeout=self.settings.timeout)
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        if resp.status_code != 200:
            raise ProviderUnavailable(f"{what} at {url} answered HTTP {resp.status_code}", retry_after=self._floor())
        if len(resp.content) > MAX_DOCUMENT_BYTES:
            raise ProviderUnavailable(f"{what} at {url} is too large", retry_after=self._floor())
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ProviderUnavailable(f"{what} at {url} is not a JSON object", retry_after=self._floor())
        return data

    async def _fetch(self, now: float) -> None:
        metadata = self._metadata
        if metadata is None or now - self._metadata_at >= self.settings.jwks_max_age:
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            metadata = await self._get_json(url, "OpenID discovery document")
            if metadata.get("issuer") != self.issuer:
                raise ProviderUnavailable(
                    f"discovery document names issuer {metadata.get('issuer')!r}, not the configured "
                    f"{self.issuer!r}; set auth.oidc.issuer to the provider's exact issuer",
                    retry_after=self._floor(),
                )
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                raise ProviderUnavailable("discovery document has no usable jwks_uri", retry_after=self._floor())
            self._metadata, self._metadata_at = metadata, now
        jwks = await self._get_json(metadata["jwks_uri"], "JWKS")
        keys, keyless = _import_keys(jwks.get("keys"))
        if not keys and not keyless:
            raise ProviderUnavailable("JWKS has no usable signing keys", retry_after=self._floor())
        public = {"keys": [k.as_dict(private=False) for k in [*keys.values(), *keyless]]}
        self._keys, self._keyless, self._jwks_raw, self._jwks_at = keys, keyless, public, now

    # ------------------------------------------------------------ login helpers

    async def userinfo(self, access_token: str) -> dict[str, Any]:
        """Claims from the ``userinfo_endpoint`` (empty dict if the IdP has none)."""
        metadata = await self.discovery()
        url = metadata.get("userinfo_endpoint")
        if not isinstance(url, str):
            return {}
        try:
            resp = await self._client.get(
                url, headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"}, timeout=self.settings.timeout
            )
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        if resp.status_code in (401, 403):
            raise AuthFailed("the identity provider refused the access token at userinfo")
        if resp.status_code != 200 or "json" not in resp.headers.get("content-type", ""):
            # Signed/encrypted userinfo (application/jwt) is not supported; rely on the ID token.
            raise ProviderUnavailable(f"userinfo answered HTTP {resp.status_code}", retry_after=self._floor())
        try:
            data = resp.json()
        except ValueError:
            raise ProviderUnavailable("userinfo answered with invalid JSON", retry_after=self._floor()) from None
        return data if isinstance(data, dict) else {}

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        """Exchange a refresh token at the token endpoint (client_secret_basic)."""
        metadata = await self.discovery()
        url = metadata.get("token_endpoint")
        if not isinstance(url, str):
            raise ProviderUnavailable("discovery document has no token_endpoint")
        auth = httpx.BasicAuth(self.settings.client_id, self.settings.client_secret.get())
        try:
            resp = await self._client.post(
                url,
                data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                auth=auth,
                headers={"Accept": "application/json"},
                timeout=self.settings.timeout,
            )
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from None
        if resp.status_code in (400, 401):
            error = _json_field(resp, "error") or f"HTTP {resp.status_code}"
            raise AuthFailed(f"the identity provider refused the refresh token ({error})")
        if resp.status_code != 200:
            raise ProviderUnavailable(f"token endpoint answered HTTP {resp.status_code}", retry_after=self._floor())
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            raise ProviderUnavailable("token endpoint answered without an access_token")
        return data


def _json_field(resp: httpx.Response, name: str) -> str | None:
    try:
        value = resp.json().get(name)
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _key_fits(key: Key, alg: str) -> bool:
    """The key type matches the algorithm, and the key's own ``alg`` (if any) agrees."""
    if key.get("alg") not in (None, alg):
        return False
    kty = key.key_type
    if alg.startswith(("RS", "PS")):
        return kty == "RSA"
    if alg.startswith("ES"):
        return kty == "EC"
    if alg in ("EdDSA", "Ed25519", "Ed448"):
        return kty == "OKP"
    return False


def _import_keys(raw: Any) -> tuple[dict[str, Key], list[Key]]:
    """Public signature keys from a JWKS ``keys`` array; symmetric, encryption and broken keys are skipped."""
    keys: dict[str, Key] = {}
    keyless: list[Key] = []
    if not isinstance(raw, list):
        return keys, keyless
    for item in raw:
        if not isinstance(item, dict) or item.get("kty") not in ("RSA", "EC", "OKP"):
            continue  # never accept "oct" (HMAC) keys from a JWKS
        if item.get("use") not in (None, "sig"):
            continue
        public = {k: v for k, v in item.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
        try:
            key = JWKRegistry.import_key(public)
        except (JoseError, ValueError, TypeError):
            log.warning("OIDC: skipping a JWKS key that does not import (kid %r)", item.get("kid"))
            continue
        kid = item.get("kid")
        if isinstance(kid, str) and kid:
            keys[kid] = key
        else:
            keyless.append(key)
    return keys, keyless

