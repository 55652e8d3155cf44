"""A real OpenID provider for tests: start ``tests/oidc/provider.mjs`` and drive it.

Needs Node and ``npm ci --prefix tests/oidc`` (``node_modules`` present);
``SKIP_REASON`` says why not when it is missing. Typical use::

    with start_provider(tmp_path, redirect_uris=[app_url + "/auth/callback"]) as idp:
        settings = idp.oidc_settings(allowed_groups=("family",))
        token = idp.user_tokens("alice")["access_token"]   # JWT, aud = idp.resource
        expired = idp.mint(exp=time.time() - 3600)          # signed with the real key
        response = browse(client, "GET", app_url + "/auth/login", login="alice")

The provider signs with keys the test made (``idp.keys``), so edge-case
tokens minted here verify exactly like the provider's own.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import html.parser
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import RSAKey

from gateway.settings import OIDCSettings, Secret

OIDC_DIR = Path(__file__).parent / "oidc"
NODE_MODULES = OIDC_DIR / "node_modules"
SKIP_REASON: str | None = (
    None
    if (NODE_MODULES / "oidc-provider").is_dir()
    else f"OIDC provider not installed: run `npm ci --prefix {OIDC_DIR.relative_to(OIDC_DIR.parent.parent)}`"
)

CLIENT_ID = "pvs-gateway"
CLIENT_SECRET = "gateway-secret-for-tests-only"
RESOURCE = "https://pvs-gateway.test"
OTHER_RESOURCE = "https://other-api.test"
ROBOT_ID, ROBOT_SECRET = "pvs-robot", "robot-secret"
#: Registered for the token helper only; never contacted (the walk stops before it).
HELPER_REDIRECT = "http://127.0.0.1:9/token-helper/callback"
#: Users the provider knows (its ``accounts`` table): id -> (email, groups).
ACCOUNTS = {
    "alice": ("alice@example.test", ("family", "admins")),
    "bob": ("bob@example.test", ("guests",)),
    "carol": ("carol@example.test", ("family",)),  # email_verified: false
}


def make_key(kid: str) -> RSAKey:
    """A fresh RS256 signing key (private) with ``kid``."""
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"}, private=True)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclasses.dataclass
class TestProvider:
    """A running provider process plus what a test needs to talk to it."""

    __test__ = False  # not a pytest class

    issuer: str
    keys: list[RSAKey]
    jwks_path: Path
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    output: list[str]
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    resource: str = RESOURCE

    @property
    def signing_key(self) -> RSAKey:
        return self.keys[0]

    def oidc_settings(self, **over: Any) -> OIDCSettings:
        """``OIDCSettings`` for this provider: our client, audience = the resource, groups scope."""
        values: dict[str, Any] = {
            "issuer": self.issuer,
            "client_id": self.client_id,
            "client_secret": Secret(self.client_secret),
            "audience": self.resource,
            "scopes": ("openid", "email", "profile", "groups"),
            "timeout": 5.0,
        }
        values.update(over)
        return OIDCSettings(**values)

    # ------------------------------------------------------------ tokens

    def mint(self, *, header: dict[str, Any] | None = None, key: RSAKey | None = None, drop: Sequence[str] = (), **claims: Any) -> str:
        """A JWT signed with the provider's key: alice's access-token claims unless overridden.

        ``drop`` removes claims; ``header`` overrides header fields (e.g. kid).
        """
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice",
            "aud": self.resource,
            "iat": now,
            "exp": now + 300,
            "jti": secrets.token_hex(8),
            "client_id": self.client_id,
            "email": ACCOUNTS["alice"][0],
            "groups": list(ACCOUNTS["alice"][1]),
        }
        body.update(claims)
        for name in drop:
            body.pop(name, None)
        signer = key or self.signing_key
        head = {"alg": "RS256", "typ": "at+jwt", "kid": signer.kid}
        head.update(header or {})
        return jwt.encode(head, body, signer, algorithms=[head["alg"]])

    def client_credentials(self, *, client_id: str = ROBOT_ID, client_secret: str = ROBOT_SECRET, resource: str | None = RESOURCE) -> dict[str, Any]:
        """A machine token from the token endpoint (JWT if ``resource`` is given)."""
        data = {"grant_type": "client_credentials", "scope": "api:read"}
        if resource:
            data["resource"] = resource
        resp = httpx.post(self.issuer + "/token", data=data, auth=(client_id, client_secret), timeout=10)
        resp.raise_for_status()
        return resp.json()

    def user_tokens(self, login: str, *, resource: str | None = RESOURCE, scope: str = "openid email profile groups api:read") -> dict[str, Any]:
        """Tokens for ``login`` via the real login and consent forms (code flow + PKCE).

        With ``resource`` the access token is a JWT for that audience; the
        response also has ``id_token`` and ``refresh_token``.
        """
        verifier = secrets.token_urlsafe(48)
        params = {
            "client_id": self.client_id,
            "redirect_uri": HELPER_REDIRECT,
            "response_type": "code",
            "scope": scope,
            "state": secrets.token_urlsafe(12),
            "nonce": secrets.token_urlsafe(12),
            "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
        if resource:
            params["resource"] = resource
        with httpx.Client(timeout=10) as client:
            url = self.issuer + "/auth?" + urllib.parse.urlencode(params)
            final = browse(client, "GET", url, login=login, stop=lambda u: u.startswith(HELPER_REDIRECT))
            location = final.headers.get("location", "")
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
            if "code" not in query:
                raise AssertionError(f"no code in the redirect: {location or final.text[:300]}")
            token_data = {
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "redirect_uri": HELPER_REDIRECT,
                "code_verifier": verifier,
            }
            if resource:
                token_data["resource"] = resource
            resp = client.post(self.issuer + "/token", data=token_data, auth=(self.client_id, self.client_secret))
            resp.raise_for_status()
            return resp.json()

    # ------------------------------------------------------------ control

    def set_groups(self, account: str, groups: Sequence[str]) -> None:
        """Change an account's groups at the provider (test-only endpoint)."""
        resp = httpx.post(f"{self.issuer}/__test/accounts/{account}", json={"groups": list(groups)}, timeout=5)
        resp.raise_for_status()

    def rotate(self, keys: list[RSAKey], timeout: float = 10.0) -> None:
        """Publish ``keys`` (the first signs) and make the provider reload them."""
        self.keys = keys
        _write_jwks(self.jwks_path, keys)
        self.process.send_signal(signal.SIGHUP)
        self._wait_for("reloaded", timeout)

    def _wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"OIDC provider: no {prefix!r} line within {timeout} s; output:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.process.poll() is not None:
                    raise RuntimeError(f"OIDC provider exited ({self.process.returncode}):\n" + "".join(self.output)) from None
                continue
            if line.startswith(prefix):
                return line.strip()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _write_jwks(path: Path, keys: Sequence[RSAKey]) -> None:
    path.write_text(json.dumps({"keys": [k.as_dict(private=True) for k in keys]}))
    path.chmod(0o600)


@contextlib.contextmanager
def start_provider(
    workdir: Path,
    *,
    redirect_uris: Sequence[str] = (),
    post_logout_redirect_uris: Sequence[str] = (),
    resources: Sequence[str] = (RESOURCE, OTHER_RESOURCE),
    access_token_ttl: int = 300,
    keys: list[RSAKey] | None = None,
    timeout: float = 20.0,
) -> Iterator[TestProvider]:
    """Run the provider on a free 127.0.0.1 port for the ``with`` block."""
    if SKIP_REASON:
        raise RuntimeError(SKIP_REASON)
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH (needed for the test OpenID provider)")
    keys = keys or [make_key("test-key-1")]
    jwks_path = workdir / "oidc-provider-jwks.json"
    _write_jwks(jwks_path, keys)
    cmd = [node, "provider.mjs", "--port", "0", "--jwks", str(jwks_path), "--access-token-ttl", str(access_token_ttl)]
    cmd += ["--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET]
    for uri in [*redirect_uris, HELPER_REDIRECT]:
        cmd += ["--redirect-uri", uri]
    for uri in post_logout_redirect_uris:
        cmd += ["--post-logout-redirect-uri", uri]
    for resource in resources:
        cmd += ["--resource", resource]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OIDC_TEST_")}
    env["NODE_ENV"] = "test"
    process = subprocess.Popen(
        cmd, cwd=OIDC_DIR, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, name="oidc-provider-output", daemon=True).start()
    idp = TestProvider(issuer="", keys=keys, jwks_path=jwks_path, process=process, lines=lines, output=output)
    try:
        ready = idp._wait_for("ready issuer=", timeout)
        idp.issuer = ready.split("=", 1)[1]
        yield idp
    finally:
        idp.stop()


# ---------------------------------------------------------------- a form-following "browser"


@dataclasses.dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str]
    id: str | None = None


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self._current: Form | None = None
        self._buttons: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self._current = Form(action=a.get("action") or "", method=(a.get("method") or "get").upper(), fields={}, id=a.get("id"))
            self.forms.append(self._current)
        elif tag == "input" and a.get("name"):
            form = self._owner(a)
            if form is not None and (a.get("type") or "text") not in ("submit", "button", "checkbox", "radio"):
                form.fields[a["name"] or ""] = a.get("value") or ""
        elif tag == "button":
            self._buttons.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None

    def _owner(self, attrs: dict[str, str | None]) -> Form | None:
        if attrs.get("form"):
            return next((f for f in self.forms if f.id == attrs["form"]), None)
        return self._current


def parse_forms(page: str) -> list[Form]:
    parser = _FormParser()
    parser.feed(page)
    return parser.forms


def browse(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    login: str | None = None,
    password: str = "any-password",
    stop: Callable[[str], bool] = lambda url: False,
    confirm_logout: bool = True,
    accept: str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    max_steps: int = 30,
) -> httpx.Response:
    """Follow redirects and fill the provider's HTML forms like a browser would.

    Login forms get ``login``/``password``; consent forms are accepted; the
    provider's logout confirmation is answered "yes" (``confirm_logout``).
    Stops before requesting a URL for which ``stop(url)`` is true (returning
    the redirect that pointed there) or at the first page that is neither a
    redirect nor a provider form. Sends a browser's ``Accept``; cookies persist in ``client``.
    """
    data: dict[str, str] | None = None
    for _ in range(max_steps):
        response = client.request(method, url, data=data, headers={"Accept": accept})
        if response.is_redirect:
            target = urllib.parse.urljoin(url, response.headers["location"])
            if stop(target):
                return response
            method, url, data = "GET", target, None
            continue
        forms = parse_forms(response.text) if "html" in response.headers.get("content-type", "") else []
        form = forms[0] if forms else None
        if form is None or form.method != "POST" or not _is_provider_form(form):
            return response
        fields = dict(form.fields)
        if fields.get("prompt") == "login":
            if login is None:
                return response  # the caller wants to see the login page
            fields.update(login=login, password=password)
        if form.id == "op.logoutForm":
            if not confirm_logout:
                return response
            fields["logout"] = "yes"
        method, url, data = "POST", urllib.parse.urljoin(url, form.action), fields
    raise AssertionError(f"browse: more than {max_steps} steps, last at {url}")


def _is_provider_form(form: Form) -> bool:
    return form.fields.get("prompt") in ("login", "consent") or form.id == "op.logoutForm"
