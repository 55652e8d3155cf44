"""Starting what the benchmarks measure: gateway, bare reference app, Caddy, nginx, upstreams.

Each function returns a ``Proc`` whose ``url`` answers; all on 127.0.0.1.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import (
    HOST,
    LOAD_CPUS,
    SUT_CPUS,
    Proc,
    free_port,
    python,
    spawn,
    wait_for_log,
    wait_http,
)

# The same small TOML writer the tests use to write gateway configs.
from tests.harness import toml_dumps

DEVICE_LIST = "/cgi-bin/dl_cgi?Command=DeviceList"


# ------------------------------------------------------------------ config files


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------ simulator


def simulator(workdir: Path, name: str, *args: str) -> Proc:
    """The PVS simulator (another device: it runs on the load generator's core)."""
    p = spawn(name, [python(), "-m", "gateway", "simulate", "--port", "0", *args], workdir, cpus=LOAD_CPUS)
    p.url = wait_for_log(p, r"pvs-simulator ready url=(\S+)").group(1)
    return p


# ------------------------------------------------------------------ the gateway

# What the benchmarks change from the gateway's defaults. Everything else
# (access log, TLS profile, middleware, limits storage) is as a user gets it.
GATEWAY_BASE: dict[str, Any] = {
    # max_connections_per_ip is raised from its default (64): every bench client comes from
    # 127.0.0.1, and the footprint section holds 500 connections open at once.
    "server": {"host": HOST, "port": 0, "tls": "self-signed", "log_level": "info", "max_connections_per_ip": 1000},
    "upstream": {"firmware": "legacy"},
    # Raised so a benchmark's request rate never trips them; they are still checked on every request.
    "ratelimit": {"per_caller": "100000000/minute", "per_ip": "100000000/minute"},
}


def gateway_config(upstream_url: str, overrides: dict[str, Any] | None = None, port: int = 0) -> dict[str, Any]:
    cfg = merge(GATEWAY_BASE, {"upstream": {"url": upstream_url}, "server": {"port": port}})
    return merge(cfg, overrides or {})


def write_gateway_files(workdir: Path, cfg: dict[str, Any], key_name: str = "bench") -> tuple[Path, str]:
    """Config file and one viewer API key in ``workdir``; returns (config path, secret)."""
    from gateway.auth import keys as keystore

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "pvs-gateway.toml"
    config_path.write_text(toml_dumps(cfg))
    keys_path = workdir / "keys.json"
    existing = {row["name"] for row in keystore.list_keys(keys_path)}
    if key_name in existing:
        _, secret = keystore.rotate_key(keys_path, key_name)
    else:
        _, secret = keystore.add_key(keys_path, key_name, "viewer")
    return config_path, secret


def gateway(workdir: Path, upstream_url: str, overrides: dict[str, Any] | None = None, *, name: str = "gateway", cpus: str = SUT_CPUS) -> Proc:
    workdir = workdir.resolve()
    cfg = gateway_config(upstream_url, overrides)
    config_path, secret = write_gateway_files(workdir, cfg)
    p = spawn(name, [python(), "-m", "gateway", "serve", "--config", str(config_path)], workdir, cpus=cpus)
    p.url = wait_for_log(p, r"pvs-gateway listening on (\S+)").group(1).rstrip(",")
    p.extra.update(key=secret, cert=workdir / "certs" / "leaf.pem", keyfile=workdir / "certs" / "leaf.key", workdir=workdir)
    return p


def auth_headers(p: Proc) -> dict[str, str]:
    return {"Authorization": f"Bearer {p.extra['key']}"}


# ------------------------------------------------------------------ the bare reference


def bare(workdir: Path, body_file: Path, cert: Path, key: Path, *, cpus: str = SUT_CPUS, keepalive: float = 0,
         tls_read_buffer: int = 0, headers_file: Path | None = None, name: str = "bare") -> Proc:
    """bench/bare_app.py: uvicorn (h11, asyncio) + Starlette, the same bytes, the gateway's TLS profile."""
    port = free_port()
    argv = [python(), "-m", "bench.bare_app", "--port", str(port), "--cert", str(cert), "--key", str(key), "--body", str(body_file),
            "--keepalive", str(keepalive), "--tls-read-buffer", str(tls_read_buffer)]
    if headers_file is not None:
        argv += ["--headers", str(headers_file)]
    p = spawn(name, argv, workdir, cpus=cpus, env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    p.url = f"https://{HOST}:{port}"
    wait_http(p.url + "/healthz", proc=p)
    return p


# ------------------------------------------------------------------ nginx


def _nginx_common(workdir: Path) -> str:
    tmp = workdir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return (
        f"client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;\n"
        f"  uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;\n"
    )


def _nginx(name: str, workdir: Path, http_block: str, cpus: str) -> Proc:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(
        "worker_processes 1;\n"
        "daemon off;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "  default_type application/octet-stream;\n"
        f"  {_nginx_common(workdir)}"
        f"{http_block}"
        "}\n"
    )
    return spawn(name, ["nginx", "-e", str(workdir / "error.log"), "-p", str(workdir), "-c", str(conf)], workdir, cpus=cpus)


def static_upstream(workdir: Path, body_file: Path) -> Proc:
    """A fast, trivial upstream: nginx answering the DeviceList bytes from memory/page cache, plain HTTP.

    Runs on the load generator's core: it stands for the PVS, not for the server under test.
    """
    workdir = workdir.resolve()
    port = free_port()
    block = (
        "  access_log off;\n"
        "  keepalive_requests 1000000;\n"
        f"  server {{\n    listen {HOST}:{port};\n"
        f"    location = /cgi-bin/dl_cgi {{ default_type application/json; alias {body_file}; }}\n"
        "    location = /healthz { return 200 '{\"status\":\"ok\"}'; }\n"
        "  }\n"
    )
    p = _nginx("upstream", workdir, block, LOAD_CPUS)
    p.url = f"http://{HOST}:{port}"
    wait_http(p.url + "/healthz", proc=p)
    return p


def _nginx_tls_proxy(name: str, workdir: Path, upstream: str, cert: Path, key: Path, cpus: str, *,
                     http_extra: str = "", location_extra: str = "") -> Proc:
    """nginx terminating TLS (the gateway's self-signed leaf) and proxying to ``upstream`` over kept-alive HTTP/1.1."""
    workdir = workdir.resolve()
    port = free_port()
    up = upstream.split("://", 1)[1]
    block = (
        f"  access_log {workdir}/access.log;\n"
        f"{http_extra}"
        f"  upstream pvs {{ server {up}; keepalive 8; }}\n"
        "  keepalive_requests 1000000;\n"
        f"  server {{\n    listen {HOST}:{port} ssl;\n"
        f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
        "    location / {\n"
        "      proxy_pass http://pvs;\n"
        "      proxy_http_version 1.1;\n"
        "      proxy_set_header Connection \"\";\n"
        f"{location_extra}"
        "    }\n"
        "  }\n"
    )
    p = _nginx(name, workdir, block, cpus)
    p.url = f"https://{HOST}:{port}"
    wait_http(p.url + DEVICE_LIST, proc=p)
    return p


def nginx_proxy(workdir: Path, upstream: str, cert: Path, key: Path, *, cpus: str = SUT_CPUS) -> Proc:
    """nginx as a plain TLS reverse proxy in front of ``upstream``: every request goes through (no cache)."""
    return _nginx_tls_proxy("nginx-proxy", workdir, upstream, cert, key, cpus)


def nginx_cache(workdir: Path, upstream: str, cert: Path, key: Path, *, cpus: str = SUT_CPUS) -> Proc:
    """nginx with proxy_cache in front of ``upstream`` over TLS (the gateway's self-signed leaf)."""
    cache = workdir.resolve() / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    return _nginx_tls_proxy(
        "nginx", workdir, upstream, cert, key, cpus,
        http_extra=f"  proxy_cache_path {cache} levels=1:2 keys_zone=pvs:1m max_size=16m inactive=10m use_temp_path=off;\n",
        location_extra=(
            "      proxy_cache pvs;\n"
            "      proxy_cache_valid 200 1h;\n"
            "      proxy_cache_lock on;\n"
            "      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;\n"
            "      proxy_cache_background_update on;\n"
            "      add_header Cache-Status $upstream_cache_status;\n"
        ),
    )


# ------------------------------------------------------------------ Caddy


def caddy(workdir: Path, upstream: str, *, cpus: str = SUT_CPUS, name: str = "caddy") -> Proc:
    """The seed guide's bridge: ``reverse_proxy`` with ``tls internal``, nothing else.

    GOMAXPROCS is the number of cores it is pinned to (Go would otherwise size
    its scheduler for the whole machine).
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    up = upstream.split("://", 1)[1]
    data = workdir / "data"
    caddyfile = workdir / "Caddyfile"
    caddyfile.write_text(
        "{\n"
        "  admin off\n"
        "  skip_install_trust\n"
        "  auto_https disable_redirects\n"
        f"  storage file_system {{\n    root {data}\n  }}\n"
        "}\n"
        f"https://{HOST}:{port} {{\n"
        "  tls internal\n"
        f"  reverse_proxy {up}\n"
        "}\n"
    )
    procs = str(len(cpus.split(","))) if cpus else str(os.cpu_count() or 1)
    env = {"HOME": str(workdir), "XDG_DATA_HOME": str(data), "XDG_CONFIG_HOME": str(workdir / "config"), "GOMAXPROCS": procs}
    p = spawn(name, ["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"], workdir, cpus=cpus, env=env)
    p.url = f"https://{HOST}:{port}"
    wait_http(p.url + DEVICE_LIST, proc=p, timeout=60)
    return p
