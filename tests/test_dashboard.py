"""The dashboard page: strict CSP, no data without credentials, and a real browser rendering it."""

from __future__ import annotations

import base64
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Gateway, Simulator

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"
# Anything the page could load from elsewhere: attributes, CSS url(), script fetches or imports.
EXTERNAL = re.compile(r"""(?:src|href|action)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|(?:fetch|import)\s*\(\s*["'`](?:https?:)?//""")
needs_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason="no chromium binary at /usr/bin/chromium")


def test_page_and_assets_load_without_credentials_under_a_strict_csp(fresh_simulator: Simulator, make_gateway) -> None:
    gw: Gateway = make_gateway(fresh_simulator.url)
    with gw.client(None) as anon:
        page = anon.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
        html = page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
        assert " style=" not in html and "<style" not in html, "inline style"
        assert not EXTERNAL.search(html), "external resource"
        for asset in re.findall(r'(?:src|href)="(static/[^"]+)"', html):
            r = anon.get("/" + asset)
            assert r.status_code == 200, asset
            assert r.headers["etag"]
            assert anon.get("/" + asset, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
            assert not EXTERNAL.search(r.text), asset
        assert anon.get("/static/secrets.txt").status_code == 401  # not a page asset: the usual rules apply
        assert anon.head("/").status_code == 200
    assert fresh_simulator.stats()["total"] == 0


def test_page_offers_only_the_logins_the_gateway_accepts(fresh_simulator: Simulator, make_gateway) -> None:
    gw = make_gateway(fresh_simulator.url)
    with gw.client(None) as anon:
        assert 'data-oidc="off" data-keys="on"' in anon.get("/").text


# ---------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no chromium binary at /usr/bin/chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield instance
        instance.close()


def _session_cookie(gw: Gateway, key: str) -> dict[str, Any]:
    """What the page's own login obtains: the gateway's session cookie for an API key."""
    basic = base64.b64encode(f"dashboard:{gw.keys[key]}".encode()).decode()
    with gw.client(None, headers={"Authorization": f"Basic {basic}"}) as c:
        r = c.get("/auth?login")
    assert r.status_code == 200, r.text
    return {"name": "session", "value": r.cookies["session"], "url": gw.url}


def _console(page: Any) -> list[str]:
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    return problems


@needs_browser
def test_dashboard_renders_production_with_no_console_errors(
    browser: Any, fresh_simulator: Simulator, make_gateway, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    gw = make_gateway(fresh_simulator.url)
    with gw.client("viewer") as c:
        summary = c.get("/api/v1/summary").json()
    # A phone-sized window: the layout must work there.
    context = browser.new_context(viewport={"width": 390, "height": 844})
    context.add_cookies([_session_cookie(gw, "viewer")])
    page = context.new_page()
    problems = _console(page)
    page.goto(gw.url + "/")
    expect(page.locator("#production")).to_have_text(f"{summary['production_kw']:.2f}")
    expect(page.locator("#consumption")).to_have_text(f"{summary['consumption_kw']:.2f}")
    expect(page.locator("#health")).to_have_text("PVS OK")
    expect(page.locator("#inverters li")).to_have_count(summary["inverter_count"])
    expect(page.locator("#age")).to_contain_text("ago")
    assert page.locator("#login").is_hidden()
    page.wait_for_timeout(700)  # let the bars' transition finish before the picture
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    assert problems == []
    assert 10_000 < shot.stat().st_size < 200_000


@needs_browser
def test_dashboard_login_trades_the_key_for_an_httponly_cookie(browser: Any, fresh_simulator: Simulator, make_gateway) -> None:
    from playwright.sync_api import expect

    gw = make_gateway(fresh_simulator.url)
    context = browser.new_context()
    page = context.new_page()
    problems = _console(page)
    page.goto(gw.url + "/")
    expect(page.locator("#key")).to_be_visible()
    page.fill("#key", "pvsgw_not-a-real-key")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("not valid")

    page.fill("#key", gw.keys["viewer"])
    page.click("button[type=submit]")
    expect(page.locator("#production")).to_have_text(re.compile(r"^\d+\.\d\d$"))
    assert page.input_value("#key") == ""
    cookie = next(c for c in context.cookies() if c["name"] == "session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # The key itself is kept nowhere a script could read it.
    stored = page.evaluate("() => JSON.stringify([Object.entries(sessionStorage), Object.entries(localStorage)])")
    assert gw.keys["viewer"] not in stored

    page.click("#logout")
    expect(page.locator("#key")).to_be_visible()
    context.close()
    # Only the expected refusals: the first probe before login, and the wrong key.
    assert all("401" in p for p in problems), problems


def test_the_page_is_public_only_while_oidc_is_off() -> None:
    from gateway.dashboard import PUBLIC_ASSETS, public_paths
    from gateway.settings import AuthSettings, Settings

    assert "/" in public_paths(Settings(auth=AuthSettings(methods=("api_key",))))
    # With OIDC, a browser without a session is sent to the login instead (see test_oidc_gateway).
    assert public_paths(Settings(auth=AuthSettings(methods=("api_key", "oidc")))) == PUBLIC_ASSETS


@needs_browser
def test_dashboard_shows_live_power_flow_and_todays_curve(
    browser: Any, make_simulator, make_gateway, tmp_path: Path
) -> None:
    """LocalAPI telemetry through /api/v1/live: numbers change without a reload; the curve comes from history."""
    import asyncio
    import concurrent.futures
    import datetime as dt

    from playwright.sync_api import expect

    from gateway.history import History
    from gateway.simulator.model import daylight_fraction, household_kw

    sim = make_simulator("--firmware", "localapi", "--latency-scale", "0.02", "--clock", "12:00", "--seed", "7")
    # Today so far, as a gateway would have recorded it: a sample every 5 minutes since local midnight.
    seeded = tmp_path / "history.sqlite3"
    now = time.time()
    midnight = dt.datetime.now().replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    clock = [midnight]
    history = History(seeded, interval=60, retention_days=2, clock=lambda: clock[0])
    history.open()

    async def seed() -> None:
        t = midnight
        while t < now - 300:
            clock[0] = t
            hour = dt.datetime.fromtimestamp(t).hour + dt.datetime.fromtimestamp(t).minute / 60
            production = round(4.2 * daylight_fraction(hour), 4)
            consumption = round(household_kw(hour, 1.0), 4)
            await history.offer({"production_kw": production, "consumption_kw": consumption, "net_kw": round(consumption - production, 4)})
            t += 300

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # playwright's loop runs in this thread
        pool.submit(asyncio.run, seed()).result()
    history.close()
    seeded_rows = history.rows
    gw = make_gateway(
        sim.url,
        {
            "upstream": {"firmware": "localapi", "verify_tls": "off", "ws_port": sim.ws_port, "enable_telemetry": True},
            "history": {"path": str(seeded), "interval": 5.0},
        },
    )
    context = browser.new_context(viewport={"width": 390, "height": 844})
    context.add_cookies([_session_cookie(gw, "viewer")])
    page = context.new_page()
    problems = _console(page)
    page.goto(gw.url + "/")
    expect(page.locator("#live")).to_have_text("live", timeout=15_000)
    seen = set()
    deadline = time.monotonic() + 15
    while len(seen) < 3 and time.monotonic() < deadline:  # the device's frames, shown as they come
        seen.add(page.locator("#production").text_content())
        page.wait_for_timeout(200)
    assert len(seen) >= 3, seen
    url_before = page.url
    # Midday in the simulator: the sun feeds the home, the surplus goes out to the grid.
    expect(page.locator("#flow-solar-home")).to_have_class(re.compile(r"\bon\b"))
    expect(page.locator("#flow-solar")).to_contain_text("kW")
    expect(page.locator("#flow-battery")).to_have_text("none")  # the simulated site has no battery
    if seeded_rows >= 2:
        expect(page.locator("#curve-production")).to_have_attribute("d", re.compile(r"^M[\d.]+ [\d.]+ L"))
        expect(page.locator("#today-note")).to_contain_text("samples")
    assert page.url == url_before  # no reload
    page.wait_for_timeout(700)
    shot = tmp_path / "dashboard-live.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    assert problems == []
    assert 10_000 < shot.stat().st_size < 400_000
    assert sim.stats()["ws_connections"] == 1  # the page's stream came from the gateway's one socket
    # The docs keep one picture; refresh it on purpose, not as a side effect of every run.
    if not SCREENSHOT.exists() or os.environ.get("PVSGW_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
