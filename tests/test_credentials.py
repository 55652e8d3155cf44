"""Credential fields that proxies and servers could read differently are refused, and ForwardAuth's method setting."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import pytest

from tests.harness import Gateway, Simulator

SUPERVISOR = "/cgi-bin/dl_cgi/supervisor/info"


@pytest.mark.parametrize(
    "fields",
    [
        [("Authorization", "Bearer {viewer}"), ("Authorization", "Bearer {admin}")],
        [("Authorization", "Bearer {admin}"), ("Authorization", "Bearer {viewer}")],
        [("X-API-Key", "{viewer}"), ("X-API-Key", "{admin}")],
        [("Authorization", "Basic {basic_viewer}"), ("Authorization", "Bearer {admin}")],
    ],
    ids=["viewer-then-admin", "admin-then-viewer", "two-x-api-keys", "basic-then-bearer"],
)
def test_two_credential_fields_are_refused_whichever_comes_first(
    fresh_simulator: Simulator, make_gateway: Callable[..., Gateway], fields: list[tuple[str, str]]
) -> None:
    gw = make_gateway(fresh_simulator.url)
    values = {
        "viewer": gw.keys["viewer"],
        "admin": gw.keys["admin"],
        "basic_viewer": base64.b64encode(f"x:{gw.keys['viewer']}".encode()).decode(),
    }
    headers = [(name, value.format(**values)) for name, value in fields]
    with httpx.Client(base_url=gw.url) as c:
        for path in ("/stats", SUPERVISOR, "/auth/verify"):
            r = c.get(path, headers=headers)
            assert r.status_code == 400, (path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert "exactly one" in r.json()["detail"]
        # One of each is fine: the key's own role decides.
        assert c.get("/stats", headers=[headers[0]]).status_code in (200, 403)
    assert fresh_simulator.stats()["total"] == 0


def test_forward_auth_admits_any_method_by_default_and_only_the_configured_ones_when_set(
    fresh_simulator: Simulator, make_gateway: Callable[..., Gateway]
) -> None:
    open_gw = make_gateway(fresh_simulator.url)
    read_only = make_gateway(fresh_simulator.url, {"auth": {"forward_auth_methods": ["GET", "HEAD"]}})
    for gw, post_status in ((open_gw, 200), (read_only, 403)):
        with gw.client("viewer") as c:
            assert c.get("/auth/verify", headers={"X-Forwarded-Method": "GET"}).status_code == 200
            assert c.get("/auth/verify", headers={"X-Forwarded-Method": "HEAD"}).status_code == 200
            denied = c.get("/auth/verify", headers={"X-Forwarded-Method": "POST"})
            assert denied.status_code == post_status
            if post_status == 403:
                assert "GET, HEAD only" in denied.json()["detail"]
        # Credentials are still checked first.
        with gw.client(None) as anon:
            assert anon.get("/auth/verify", headers={"X-Forwarded-Method": "GET"}).status_code == 401
