"""API keys over real sockets: credential forms, roles, revocation, brute force, LocalAPI login."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx

from tests.harness import Gateway, Simulator

SUPERVISOR = "/cgi-bin/dl_cgi/supervisor/info"


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_each_credential_form_works(simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(simulator.url)
    key = gw.keys["viewer"]
    with httpx.Client(base_url=gw.url) as c:
        for headers in (
            {"Authorization": f"Bearer {key}"},
            {"Authorization": f"bearer {key}"},
            {"X-API-Key": key},
            {"Authorization": _basic("homeassistant", key)},
            {"Authorization": _basic("", key)},
        ):
            r = c.get(SUPERVISOR, headers=headers)
            assert r.status_code == 200, (headers, r.text)
        # user:pass@host URLs, as home-automation integrations send them
        r = httpx.get(gw.url.replace("http://", f"http://ha:{key}@") + SUPERVISOR)
        assert r.status_code == 200


def test_missing_and_wrong_credentials_get_401_with_a_challenge(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url)
    key = gw.keys["viewer"]
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    with httpx.Client(base_url=gw.url) as c:
        for headers in (
            {},
            {"Authorization": f"Bearer {wrong}"},
            {"Authorization": "Bearer pvsgw_nope"},
            {"X-API-Key": "x"},
            {"Authorization": _basic("u", wrong)},
            {"Authorization": "Basic !!!notbase64"},
            {"Authorization": f"Digest {key}"},
            {"Cookie": "session=forged.token"},
        ):
            r = c.get(SUPERVISOR, headers=headers)
            assert r.status_code == 401, (headers, r.status_code)
            assert r.headers["content-type"] == "application/problem+json"
            assert any(v.startswith(("Bearer", "Basic")) for v in r.headers.get_list("www-authenticate"))


def test_viewer_gets_403_on_admin_views(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url)
    with gw.client("viewer") as viewer, gw.client("admin") as admin:
        assert viewer.get(SUPERVISOR).status_code == 200
        r = viewer.get("/stats")
        assert r.status_code == 403
        assert "admin" in r.json()["detail"]
        assert admin.get("/stats").status_code == 200


def test_expired_and_revoked_keys_fail_like_bad_ones(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url)
    short = gw.add_key("short-lived", expires_days=1 / 86400)  # one second
    gw.add_key("to-revoke")
    with gw.client("to-revoke") as c:
        deadline = time.monotonic() + 5
        while c.get(SUPERVISOR).status_code != 200:  # the running gateway picks up new keys
            assert time.monotonic() < deadline
            time.sleep(0.2)
        subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "revoke", "to-revoke", "--config", str(gw.config_path)],
            check=True,
            capture_output=True,
        )
        revoked_at = time.monotonic()
        while c.get(SUPERVISOR).status_code == 200:
            assert time.monotonic() - revoked_at < 5, "revocation must take effect within seconds"
            time.sleep(0.2)
        assert c.get(SUPERVISOR).status_code == 401
    time.sleep(1.2)
    r = httpx.get(gw.url + SUPERVISOR, headers={"Authorization": f"Bearer {short}"})
    assert r.status_code == 401


def test_keys_file_and_list_hold_no_secret(simulator: Simulator, make_gateway, tmp_path) -> None:
    gw = make_gateway(simulator.url)
    text = (gw.workdir / "keys.json").read_text()
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "list", "--config", str(gw.config_path)], capture_output=True, text=True, check=True
    ).stdout
    for key in gw.keys.values():
        # pvsgw_<kid>_<secret>; the secret itself may contain "_", so split from the left.
        secret = key.split("_", 2)[2]
        for needle in (key, secret, secret[:12], secret[-12:]):
            assert needle not in text and needle not in listed
    assert "admin" in listed and "viewer" in listed
    assert oct((gw.workdir / "keys.json").stat().st_mode & 0o777) == "0o600"


def test_cli_add_prints_the_secret_alone_on_the_last_line(tmp_path) -> None:
    cfg = tmp_path / "pvs-gateway.toml"
    cfg.write_text('[auth]\nkeys_file = "k.json"\n')
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "add", "phone", "--role", "viewer", "--expires-days", "30", "--config", str(cfg)],
        capture_output=True, text=True, check=True,
    ).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("pvsgw_") and " " not in last
    assert last not in (tmp_path / "k.json").read_text()
    dup = subprocess.run([sys.executable, "-m", "gateway", "keys", "add", "phone", "--config", str(cfg)], check=False, capture_output=True, text=True)
    assert dup.returncode == 2 and "Traceback" not in dup.stderr


def test_brute_force_locks_out_the_ip_but_a_valid_key_still_gets_in(simulator: Simulator, make_gateway) -> None:
    """SPEC §2 ratelimit.auth_failures: past it further failures get 429; a valid key is still admitted."""
    gw = make_gateway(simulator.url, {"ratelimit": {"auth_failures": "5/3seconds"}, "server": {"trusted_proxies": ["127.0.0.1/32"]}})
    key = gw.keys["viewer"]
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    neighbour = {"X-Forwarded-For": "198.51.100.7"}
    with httpx.Client(base_url=gw.url) as c:
        for _ in range(5):
            assert c.get(SUPERVISOR, headers={**attacker, "Authorization": "Bearer pvsgw_wrong"}).status_code == 401
        r = c.get(SUPERVISOR, headers={**attacker, "Authorization": "Bearer pvsgw_wrong"})
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert c.get(SUPERVISOR, headers={**attacker, "Authorization": f"Bearer {key}"}).status_code == 200
        # Another address is unaffected.
        assert c.get(SUPERVISOR, headers={**neighbour, "Authorization": "Bearer pvsgw_wrong"}).status_code == 401
        time.sleep(3.2)
        assert c.get(SUPERVISOR, headers={**attacker, "Authorization": "Bearer pvsgw_wrong"}).status_code == 401
    # Logged once for the burst, not per request.
    gw.wait_for_log("too many failed credentials from 203.0.113.9")
    assert gw.logs().count("too many failed credentials from 203.0.113.9") == 1


def test_localapi_login_flow_with_an_api_key_as_password(make_simulator, make_gateway) -> None:
    sim = make_simulator("--firmware", "localapi", "--latency-scale", "0.05")
    gw = make_gateway(sim.url, {"upstream": {"firmware": "localapi"}})
    key = gw.keys["viewer"]
    with httpx.Client(base_url=gw.url) as c:
        login = c.get("/auth?login", headers={"Authorization": _basic("ssm_owner", key)})
        assert login.status_code == 200, login.text
        session = login.json()["session"]
        assert login.cookies.get("session") == session
        # Homebridge-style: match + cache id, then re-read by cache id, with only the cookie.
        r = c.get("/vars", params={"match": "/sys/livedata/", "fmt": "obj", "cache": "ldata"})
        assert r.status_code == 200, r.text
        assert any(k.startswith("/sys/livedata/") for k in r.json())
        again = c.get("/vars?cache=ldata&fmt=obj")
        assert again.status_code == 200 and again.json().keys() == r.json().keys()
        bad = c.get("/auth?login", headers={"Authorization": _basic("ssm_owner", "A0001")})
        assert bad.status_code == 401  # the PVS's own password means nothing here
        c.get("/auth?logout")
        c.cookies.clear()
        assert c.get("/vars?match=/sys/livedata/&fmt=obj").status_code == 401
    assert sim.stats()["by_request"].get("vars.set", 0) == 0
    assert key not in sim.log_path.read_text()


def test_anonymous_lan_access_is_opt_in(simulator: Simulator, make_gateway) -> None:
    closed = make_gateway(simulator.url)
    assert httpx.get(closed.url + SUPERVISOR).status_code == 401
    opened = make_gateway(simulator.url, {"auth": {"allow_anonymous_from": ["127.0.0.0/8"]}})
    assert httpx.get(opened.url + SUPERVISOR).status_code == 200
    assert httpx.get(opened.url + "/stats").status_code == 403  # anonymous is a viewer


def test_access_log_names_the_key_never_the_secret(simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(simulator.url, {"server": {"access_log": "json"}})
    with gw.client("viewer") as c:
        c.get(SUPERVISOR)
    logs = gw.wait_for_log('"name":"viewer"')
    lines = [json.loads(line.split("gateway.access: ", 1)[1]) for line in logs.splitlines() if "gateway.access: " in line]
    assert any(line["identity"].startswith("key:") and line["name"] == "viewer" for line in lines)
    for secret in gw.keys.values():
        assert secret not in gw.logs()
