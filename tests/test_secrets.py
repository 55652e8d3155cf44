"""Secrets: a broad scenario, then every gateway log line and every answer is searched for them.

The scenario runs against a LocalAPI simulator (login with the serial's last
five characters, ``/vars?match=/`` whose raw answer holds the Wi-Fi
password), with the gateway at log level *debug* (httpx, httpcore and our own
debug lines included): API keys in every credential form (Bearer, X-API-Key,
Basic, the ``/auth?login`` session cookie), wrong and tampered credentials,
admin views, PVS faults (500, garbage, session expiry and re-login, reboot),
revocation through the CLI, and a second gateway whose PVS password is wrong.

Searched for, with zero hits allowed:
- every API key, presented or merely issued, and its secret part (whole, and
  its first and last 12 characters), and every Basic encoding sent;
- the PVS password as a standalone token (the serial itself, which contains
  it as a suffix, is public and legitimately in DeviceList), its
  ``ssm_owner:`` Basic encoding, and the wrong password of the second gateway;
- gateway session cookies (outside the login answer that issues them) and
  anything shaped like a PVS LocalAPI session id (64 letters and digits);
- the simulator's ``/sys/info/wpa_key`` value.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.settings import DEFAULT_TTLS
from tests.harness import Gateway, start_gateway, start_simulator

SERIAL = "ZT0000850005XK7QP"
PASSWORD = SERIAL[-5:]  # "XK7QP"
WRONG_PASSWORD = "Zq9WrongPw"
PVS_SESSION_SHAPE = re.compile(r"(?<![A-Za-z0-9])(?=[A-Za-z0-9]*[a-z])(?=[A-Za-z0-9]*[A-Z])[A-Za-z0-9]{64}(?![A-Za-z0-9])")
FIGURES: dict[str, int] = {}


class Recorder:
    """Every answer the scenario receives, as text: status line, headers, body."""

    def __init__(self) -> None:
        self.answers: list[tuple[str, str]] = []  # (what, text)

    def hook(self, response: httpx.Response) -> None:
        response.read()
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        text = f"{response.status_code} {response.request.method} {response.request.url}\n{head}\n\n{response.text}"
        self.answers.append((f"{response.request.method} {response.request.url.raw_path.decode()}", text))

    def client(self, gw: Gateway, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=gw.url, verify=gw.verify, headers=headers or {}, timeout=15, event_hooks={"response": [self.hook]})


def _basic(user: str, secret: str) -> str:
    return base64.b64encode(f"{user}:{secret}".encode()).decode()


def _cli(gw: Gateway, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(gw.config_path)],
        cwd=gw.workdir, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_no_secret_in_any_log_line_or_answer(tmp_path: Path) -> None:
    sim = start_simulator(tmp_path / "sim", "--firmware", "localapi", "--serial", SERIAL, "--latency-scale", "0.005", "--clock", "12:00")
    no_cache = {"default_ttl": 0, "stale_while_revalidate": 0, "ttl": {n: 0 for n in DEFAULT_TTLS}}
    config = {
        "server": {"log_level": "debug", "tls": "self-signed"},
        "upstream": {"firmware": "auto", "verify_tls": "pin", "failure_threshold": 100},
        "cache": no_cache,
    }
    roles = {"admin": "admin", "viewer": "viewer", "ha": "viewer", "phone": "viewer"}
    gw = start_gateway(tmp_path / "gw", sim.url, config, key_roles=roles)
    bad_gw = start_gateway(tmp_path / "bad", sim.url, {**config, "upstream": {**config["upstream"], "password": WRONG_PASSWORD}})
    rec = Recorder()
    presented: set[str] = set(gw.keys.values()) | set(bad_gw.keys.values())
    basics: set[str] = set()
    sessions: set[str] = set()
    login_answers: set[int] = set()
    try:
        with httpx.Client(base_url=sim.url, verify=False) as direct:
            wpa_key = direct.get("/__sim/vars", params={"name": "/sys/info/wpa_key"}).json()["value"]
        assert len(wpa_key) >= 8
        paths = [
            "/cgi-bin/dl_cgi?Command=DeviceList", "/cgi-bin/dl_cgi/supervisor/info", "/cgi-bin/dl_cgi/devices/list",
            "/vars?match=/&fmt=obj", "/vars?match=/", "/vars?match=wpa", "/vars?match=info&fmt=obj",
            "/vars?name=/sys/info/wpa_key", "/vars?name=/sys/info/WPA_KEY,/sys/info/sw_rev", "/vars?match=/&cache=all",
            "/vars?cache=all", "/cgi-bin/dl_cgi?Command=Start", "/api/v1/summary", "/api/v1/devices", "/", "/stats",
            "/metrics", "/auth/verify", "/readyz", "/healthz", "/vars?set=/sys/info/wpa_key=x",
        ]
        # 1. Every credential form, every role.
        for name, key in gw.keys.items():
            for headers in (
                {"Authorization": f"Bearer {key}"},
                {"X-API-Key": key},
                {"Authorization": f"Basic {_basic(name, key)}"},
            ):
                basics.add(_basic(name, key))
                with rec.client(gw, headers) as c:
                    for path in paths if name in ("admin", "viewer") else paths[:3]:
                        c.get(path)
        # 2. The LocalAPI-style login: a gateway session cookie, used, then logged out.
        with rec.client(gw) as c:
            r = c.get("/auth?login", headers={"Authorization": f"Basic {_basic('ssm_owner', gw.keys['phone'])}"})
            assert r.status_code == 200, r.text
            login_answers.add(len(rec.answers) - 1)
            sessions.add(r.json()["session"])
            for path in paths[:6]:
                assert c.get(path, headers={"Cookie": f"session={r.json()['session']}"}).status_code in (200, 400, 403)
            c.get("/auth?logout", headers={"Cookie": f"session={r.json()['session']}"})
        # 3. Wrong, tampered and malformed credentials.
        admin = gw.keys["admin"]
        wrong = [admin[:-6] + "AAAAAA", admin.replace("pvsgw_", "pvsgw-"), "pvsgw_zzzzzzzz_" + admin[-43:], admin + "x"]
        presented |= set(wrong)
        with rec.client(gw) as c:
            for w in wrong:
                basics.add(_basic("me", w))
                for headers in ({"Authorization": f"Bearer {w}"}, {"X-API-Key": w}, {"Authorization": f"Basic {_basic('me', w)}"}):
                    assert c.get(paths[0], headers=headers).status_code == 401
            forged = next(iter(sessions))
            assert c.get(paths[0], headers={"Cookie": f"session={forged[:-4]}AAAA"}).status_code == 401
            assert c.get("/auth?login", headers={"Authorization": f"Basic {_basic('ssm_owner', PASSWORD)}"}).status_code == 401
            assert c.get("/auth?login", headers={"Authorization": f"Basic {_basic('ssm_owner', wrong[0])}"}).status_code == 401
        # 4. PVS failures, session expiry (re-login with the password), reboot (sessions gone).
        with rec.client(gw, {"Authorization": f"Bearer {gw.keys['viewer']}"}) as c, sim.client() as s:
            for fault in ({"mode": "error"}, {"mode": "garbage"}, {"mode": "truncated"}, {"mode": "headers-in-body"}, {"mode": "expire-sessions"}):
                s.post("/__sim/fault", json=fault).raise_for_status()
                for path in paths[:5]:
                    c.get(path)
                s.post("/__sim/fault", json={"mode": "ok"}).raise_for_status()
            s.post("/__sim/fault", json={"mode": "reboot", "seconds": 0.5}).raise_for_status()
            c.get(paths[3])
            time.sleep(0.7)
            deadline = time.monotonic() + 5
            while c.get(paths[3]).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        # 5. Revocation from the CLI: the key and its session stop working, without a restart.
        with rec.client(gw) as c:
            ha = gw.keys["ha"]
            r = c.get("/auth?login", headers={"Authorization": f"Basic {_basic('x', ha)}"})
            login_answers.add(len(rec.answers) - 1)
            ha_session = r.json()["session"]
            sessions.add(ha_session)
            cli_out = _cli(gw, "keys", "revoke", "ha")
            deadline = time.monotonic() + 10
            while c.get(paths[1], headers={"Authorization": f"Bearer {ha}"}).status_code != 401:
                assert time.monotonic() < deadline, "revocation not picked up"
                time.sleep(0.2)
            assert c.get(paths[1], headers={"Cookie": f"session={ha_session}"}).status_code == 401
            cli_out += _cli(gw, "keys", "list")
        # 6. A gateway whose PVS password is wrong: clear errors, no password in them.
        with rec.client(bad_gw, {"Authorization": f"Bearer {bad_gw.keys['admin']}"}) as c:
            for path in ("/vars?match=info", "/cgi-bin/dl_cgi/devices/list", "/stats"):
                c.get(path)
            assert c.get("/vars?match=livedata").status_code in (502, 503)
    finally:
        gw.stop()
        bad_gw.stop()
        sim.stop()

    # ------------------------------------------------------------------ the search
    texts: list[tuple[str, str]] = []
    for g in (gw, bad_gw):
        texts += [(f"{g.log_path.name}:{i + 1}", line) for i, line in enumerate(g.logs().splitlines())]
    log_lines = len(texts)
    texts += [(f"CLI output {i}", line) for i, line in enumerate(cli_out.splitlines())]
    texts += [(f"answer {i} {what}", text) for i, (what, text) in enumerate(rec.answers) if i not in login_answers]
    # The login answers carry the session they issue, by design; nothing else.
    login_texts = [(f"login answer {i}", rec.answers[i][1]) for i in sorted(login_answers)]

    needles: dict[str, str] = {}
    for key in presented:
        secret = key.split("_", 2)[2] if key.count("_") >= 2 else key  # pvsgw_<kid>_<secret, may hold "_">
        needles[key] = "API key"
        for part in (secret, secret[:12], secret[-12:]):
            if len(part) >= 12:
                needles[part] = "API key secret"
    for b in basics:
        needles[b] = "Basic credentials"
    needles[_basic("ssm_owner", PASSWORD)] = "PVS login (Basic)"
    needles[WRONG_PASSWORD] = "PVS password (configured)"
    needles[wpa_key] = "wpa_key value"
    for s in sessions:
        needles[s] = "gateway session cookie"
    password_token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(PASSWORD)}(?![A-Za-z0-9])")

    hits: list[str] = []
    for where, text in texts:
        for needle, kind in needles.items():
            if needle in text:
                hits.append(f"{kind} in {where}: {text[:300]!r}")
        if password_token.search(text):
            hits.append(f"PVS password token in {where}: {text[:300]!r}")
        if PVS_SESSION_SHAPE.search(text):
            hits.append(f"PVS-session-shaped token in {where}: {PVS_SESSION_SHAPE.search(text).group(0)} in {text[:200]!r}")  # type: ignore[union-attr]
    for where, text in login_texts:
        for needle, kind in needles.items():
            if kind != "gateway session cookie" and needle in text:
                hits.append(f"{kind} in {where}")
    FIGURES.update(log_lines=log_lines, answers=len(rec.answers), needles=len(needles) + 2, leaks=len(hits))
    print(f"\nsecrets figures: {FIGURES}")
    assert not hits, "\n".join(hits[:20])
    # Not vacuous: the scenario did log in to the PVS, strip wpa_key, and answer many requests.
    assert log_lines > 150 and len(rec.answers) > 150
    assert "logged in to the PVS LocalAPI" in gw.logs()
    assert SERIAL in "".join(t for _, t in rec.answers), "the (public) serial is served: the token check is precise"
