// The dashboard: reads /api/v1/summary and redraws. No framework, no build step.
// Data is only ever written with textContent (never as HTML), and the page's CSP
// allows no inline script, so values from the PVS cannot run as code.
"use strict";

(() => {
  const MIN_REFRESH_S = 15;
  const $ = (id) => document.getElementById(id);
  let timer = 0;
  let received = 0; // when the last summary arrived (ms)
  let ageAtReceipt = 0; // its age then (s)
  let maxInverterKw = 0;

  const kw = (v) => (v === null || v === undefined ? "–" : v.toFixed(2));
  const kwh = (v) => (v === null || v === undefined ? "–" : `${Math.round(v).toLocaleString()} kWh`);

  function duration(s) {
    s = Math.max(0, Math.round(s));
    if (s < 90) return `${s} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
    return `${Math.round(s / 86400)} days`;
  }

  function show(view) {
    $("login").hidden = view !== "login";
    $("data").hidden = view !== "data";
  }

  function showLogin(message) {
    clearTimeout(timer);
    const keys = document.body.dataset.keys === "on";
    const oidc = document.body.dataset.oidc === "on";
    if (oidc && !keys && !message) {
      window.location.assign("auth/login?next=/"); // the only way in: go straight there
      return;
    }
    $("login-error").textContent = message || "";
    $("login-form").hidden = !keys;
    $("key-hint").hidden = !keys;
    $("oidc").hidden = !oidc;
    setHealth("unknown", "signed out");
    show("login");
    if (keys) $("key").focus();
  }

  function setHealth(state, text) {
    const pill = $("health");
    pill.dataset.state = state;
    pill.textContent = text;
  }

  async function start() {
    // /auth/verify answers 401 without a Basic challenge, so probing never pops up a browser login box.
    try {
      const r = await fetch("auth/verify", { credentials: "same-origin", cache: "no-store" });
      if (r.ok) {
        show("data");
        await refresh();
        return;
      }
      showLogin(r.status === 429 ? "Too many attempts from this address; wait a few minutes." : "");
    } catch (e) {
      showLogin("The gateway cannot be reached.");
    }
  }

  async function login(event) {
    event.preventDefault();
    const input = $("key");
    const key = input.value.trim();
    if (!key) return;
    $("login-error").textContent = "";
    try {
      // Check the key as a Bearer token first (no cookies, no browser prompt on 401),
      // then trade it for the gateway's HttpOnly session cookie: the key is not kept.
      const check = await fetch("auth/verify", {
        headers: { Authorization: `Bearer ${key}` },
        credentials: "omit",
        cache: "no-store",
      });
      if (!check.ok) {
        $("login-error").textContent =
          check.status === 429 ? "Too many attempts; wait a few minutes." : "That key is not valid (or expired, or revoked).";
        return;
      }
      const r = await fetch("auth?login", {
        headers: { Authorization: `Basic ${btoa(`dashboard:${key}`)}` },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!r.ok) {
        $("login-error").textContent = `Login failed (HTTP ${r.status}).`;
        return;
      }
    } catch (e) {
      $("login-error").textContent = "The gateway cannot be reached.";
      return;
    }
    input.value = "";
    show("data");
    await refresh();
  }

  async function logout() {
    clearTimeout(timer);
    try {
      await fetch("auth?logout", { credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      /* signed out locally either way */
    }
    if (document.body.dataset.oidc === "on") {
      window.location.assign("auth/logout");
      return;
    }
    showLogin("");
  }

  async function refresh() {
    clearTimeout(timer);
    let wait = MIN_REFRESH_S;
    try {
      const r = await fetch("api/v1/summary", {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
      });
      if (r.status === 401) {
        showLogin("Your session ended; open the dashboard again.");
        return;
      }
      const body = await r.json();
      if (r.ok) {
        render(body);
        wait = Math.max(MIN_REFRESH_S, body.cache.refresh_after_s);
      } else {
        problem(body.detail || `HTTP ${r.status}`);
        wait = Math.max(MIN_REFRESH_S, Number(r.headers.get("Retry-After")) || 30);
      }
    } catch (e) {
      problem("The gateway cannot be reached.");
      wait = 30;
    }
    if (!document.hidden) timer = setTimeout(refresh, wait * 1000);
  }

  function problem(text) {
    const p = $("problem");
    p.textContent = text;
    p.hidden = false;
    if (!received) setHealth("unreachable", "no data");
  }

  function render(s) {
    $("problem").hidden = true;
    $("production").textContent = kw(s.production_kw);
    $("consumption").textContent = kw(s.consumption_kw);
    const net = s.net_kw;
    const card = $("net-card");
    card.classList.toggle("import", net !== null && net > 0);
    card.classList.toggle("export", net !== null && net < 0);
    $("net-label").textContent = net === null ? "Grid" : net < 0 ? "Exporting" : "Importing";
    $("net").textContent = net === null ? "–" : kw(Math.abs(net));

    $("lt-production").textContent = kwh(s.lifetime_production_kwh);
    $("lt-consumption").textContent = kwh(s.lifetime_consumption_kwh);
    $("lt-import").textContent = kwh(s.lifetime_import_kwh);
    $("lt-export").textContent = kwh(s.lifetime_export_kwh);

    renderInverters(s.inverters);
    $("inverter-count").textContent = `${s.inverters_working} of ${s.inverter_count} working`;

    received = Date.now();
    ageAtReceipt = s.age_s;
    $("measured").textContent = s.measured_at ? `· measured ${new Date(s.measured_at).toLocaleTimeString()}` : "";
    tick();

    const h = s.health;
    const parts = [s.pvs.model || "PVS", `firmware ${s.firmware}`];
    if (s.pvs.uptime_s !== null) parts.push(`up ${duration(s.pvs.uptime_s)}`);
    if (h.consecutive_failures) parts.push(`${h.consecutive_failures} failed requests: ${h.last_error || "no answer"}`);
    $("pvs").textContent = parts.join(" · ");
    if (s.cache.status === "stale") setHealth("stale", "PVS not answering: saved data");
    else if (h.state === "ok") setHealth("ok", "PVS OK");
    else if (h.state === "unreachable") setHealth("unreachable", "PVS unreachable");
    else if (h.state === "failing") setHealth("failing", "PVS failing");
    else setHealth("unknown", "PVS status unknown");
  }

  function renderInverters(inverters) {
    const list = $("inverters");
    for (const inv of inverters) maxInverterKw = Math.max(maxInverterKw, inv.power_kw || 0);
    while (list.children.length > inverters.length) list.lastElementChild.remove();
    inverters.forEach((inv, i) => {
      let li = list.children[i];
      if (!li) {
        li = document.createElement("li");
        const name = document.createElement("span");
        const track = document.createElement("span");
        const fill = document.createElement("span");
        const value = document.createElement("span");
        track.className = "track";
        fill.className = "fill";
        value.className = "kw";
        track.append(fill);
        li.append(name, track, value);
        list.append(li);
      }
      const [name, track, value] = li.children;
      name.textContent = `…${inv.serial.slice(-6)}`;
      name.title = inv.serial;
      li.className = inv.state;
      const share = maxInverterKw > 0 && inv.power_kw ? inv.power_kw / maxInverterKw : 0;
      track.firstElementChild.style.width = `${Math.round(share * 100)}%`; // CSSOM: allowed by style-src 'self'
      value.textContent = inv.state === "working" ? `${kw(inv.power_kw)} kW` : inv.state;
    });
  }

  function tick() {
    if (!received) return;
    const age = ageAtReceipt + (Date.now() - received) / 1000;
    $("age").textContent = `fetched from the PVS ${duration(age)} ago`;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    // Phones: stop polling in the background, catch up when the page is seen again.
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !$("data").hidden) refresh();
      else clearTimeout(timer);
    });
    setInterval(tick, 1000);
    start();
  });
})();
