// The dashboard: reads /api/v1/summary and redraws; live power comes from /api/v1/live
// (EventSource), today's curve from /api/v1/history. No framework, no build step.
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
  let stream = null; // the EventSource on api/v1/live
  let liveAt = 0; // when the last live event arrived (ms)
  let curveTimer = 0;
  const LIVE_FRESH_MS = 120000; // newer live numbers win over the polled summary's
  const CURVE_REFRESH_MS = 300000;
  const SVG = "http://www.w3.org/2000/svg";

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
    stopLive();
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
        startLive();
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
    startLive();
  }

  async function logout() {
    clearTimeout(timer);
    stopLive();
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
    if (Date.now() - liveAt > LIVE_FRESH_MS) renderPower(s);

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

  // The three cards and the flow picture, from a summary or a live event (same field names).
  function renderPower(p) {
    $("production").textContent = kw(p.production_kw);
    $("consumption").textContent = kw(p.consumption_kw);
    const net = p.net_kw;
    const card = $("net-card");
    card.classList.toggle("import", net !== null && net > 0);
    card.classList.toggle("export", net !== null && net < 0);
    $("net-label").textContent = net === null ? "Grid" : net < 0 ? "Exporting" : "Importing";
    $("net").textContent = net === null ? "–" : kw(Math.abs(net));
    renderFlow(p);
  }

  // Solar feeds the home first; the rest goes to the grid (or the battery); the grid covers what is missing.
  function renderFlow(p) {
    const num = (v) => (typeof v === "number" ? v : null);
    const pv = num(p.production_kw);
    const home = num(p.consumption_kw);
    const net = num(p.net_kw);
    const battery = num(p.battery_kw);
    const on = (id, active, reverse) => {
      const el = $(id);
      el.classList.toggle("on", Boolean(active));
      el.classList.toggle("reverse", Boolean(reverse));
    };
    on("flow-solar-home", pv !== null && home !== null && pv > 0.005 && home > 0.005);
    on("flow-solar-grid", net !== null && net < -0.005);
    on("flow-grid-home", net !== null && net > 0.005);
    on("flow-battery-home", battery !== null && Math.abs(battery) > 0.005, battery !== null && battery < 0);
    $("flow-solar").textContent = pv === null ? "–" : `${kw(pv)} kW`;
    $("flow-home").textContent = home === null ? "–" : `${kw(home)} kW`;
    $("flow-grid").textContent = net === null ? "–" : `${kw(Math.abs(net))} kW ${net < 0 ? "out" : "in"}`;
    $("flow-battery").textContent =
      battery === null ? "none" : `${kw(Math.abs(battery))} kW${p.soc_percent === null || p.soc_percent === undefined ? "" : ` · ${Math.round(p.soc_percent)}%`}`;
  }

  function startLive() {
    if (stream || typeof EventSource === "undefined") return;
    stream = new EventSource("api/v1/live");
    const pill = $("live");
    stream.addEventListener("open", () => {
      pill.dataset.state = "live";
      pill.textContent = "live";
    });
    stream.addEventListener("power", (e) => {
      let p;
      try {
        p = JSON.parse(e.data);
      } catch (err) {
        return;
      }
      liveAt = Date.now();
      pill.dataset.state = "live";
      pill.textContent = p.source === "telemetry" ? "live" : "live (polled)";
      renderPower(p);
    });
    // The browser reconnects by itself (the gateway ends streams now and then); a refused
    // stream (signed out) closes, and the summary's 401 brings the login back.
    stream.addEventListener("error", () => {
      pill.dataset.state = stream && stream.readyState === EventSource.CLOSED ? "unreachable" : "stale";
      pill.textContent = stream && stream.readyState === EventSource.CLOSED ? "live: off" : "live: reconnecting";
    });
    loadCurve();
  }

  function stopLive() {
    if (stream) stream.close();
    stream = null;
    clearTimeout(curveTimer);
    const pill = $("live");
    pill.dataset.state = "unknown";
    pill.textContent = "live: off";
  }

  // Today's production and consumption, local midnight to now.
  async function loadCurve() {
    clearTimeout(curveTimer);
    const midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    try {
      const r = await fetch(`api/v1/history?since=${encodeURIComponent(midnight.toISOString())}`, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "application/json" },
      });
      if (r.ok) drawCurve((await r.json()).samples, midnight.getTime());
    } catch (e) {
      /* the next attempt will tell */
    }
    if (stream) curveTimer = setTimeout(loadCurve, CURVE_REFRESH_MS);
  }

  function drawCurve(samples, start) {
    const W = 600, H = 180, TOP = 8, BOTTOM = 20;
    const day = 86400000;
    let max = 0;
    for (const s of samples) max = Math.max(max, s.production_kw || 0, s.consumption_kw || 0);
    max = max > 0 ? Math.ceil(max) : 1;
    const x = (t) => ((t - start) / day) * W;
    const y = (v) => TOP + (1 - v / max) * (H - TOP - BOTTOM);
    const path = (field) => {
      let d = "";
      let last = null;
      for (const s of samples) {
        const v = s[field];
        const t = Date.parse(s.time);
        if (typeof v !== "number" || Number.isNaN(t)) {
          last = null;
          continue;
        }
        // A gap of more than 15 minutes is shown as a gap, not a straight line.
        d += `${last === null || t - last > 900000 ? "M" : "L"}${x(t).toFixed(1)} ${y(v).toFixed(1)} `;
        last = t;
      }
      return d.trim();
    };
    $("curve-production").setAttribute("d", path("production_kw"));
    $("curve-consumption").setAttribute("d", path("consumption_kw"));
    const grid = $("curve-grid");
    grid.replaceChildren();
    for (let h = 0; h <= 24; h += 6) {
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("x1", x(start + h * 3600000));
      line.setAttribute("x2", x(start + h * 3600000));
      line.setAttribute("y1", TOP);
      line.setAttribute("y2", H - BOTTOM);
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", x(start + h * 3600000) + (h === 24 ? -2 : 2));
      if (h === 24) label.setAttribute("text-anchor", "end");
      label.setAttribute("y", H - 6);
      label.textContent = `${String(h).padStart(2, "0")}:00`;
      grid.append(line, label);
    }
    $("curve-max").textContent = `· scale 0–${max} kW`;
    $("today-note").textContent = samples.length ? `${samples.length} samples` : "no samples recorded yet";
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
