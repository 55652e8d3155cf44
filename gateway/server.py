"""Serving the app with uvicorn: TLS context, listener, ready line."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

import uvicorn
from starlette.types import Receive, Scope, Send

from gateway.app import GatewayApp, components, create_app
from gateway.httpproto import protocol_class
from gateway.settings import Settings

log = logging.getLogger("gateway")


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (uvicorn's ``loop`` setting applies only to uvicorn.run)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _uvicorn_config(app: object, host: str, port: int, settings: Settings) -> uvicorn.Config:
    hot = app.hot if isinstance(app, GatewayApp) else None
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        # Forwarded headers are handled by our own middleware, from configured proxies only;
        # uvicorn's default would trust 127.0.0.1 and with it anything a local proxy passes on.
        proxy_headers=False,
        server_header=False,
        access_log=False,
        log_config=None,
        lifespan="on",
        timeout_keep_alive=int(settings.server.keepalive_timeout),
        # Deadline and size cap on request heads (slow clients, huge headers): see gateway.httpproto.
        http=protocol_class(settings.server, hot),
        h11_max_incomplete_event_size=settings.server.max_header_bytes,
        timeout_graceful_shutdown=5,
    )


async def serve(
    settings: Settings,
    *,
    on_ready: Callable[[str], None] | None = None,
    access_stream: TextIO | None = None,
) -> None:
    """Run the gateway until cancelled or signalled; access lines go to ``access_stream`` if given."""
    app = create_app(settings, access_stream=access_stream)
    config = _uvicorn_config(app, settings.server.host, settings.server.port, settings)
    config.load()
    tls = None
    if settings.server.tls != "off":
        from gateway.tls import ReloadingServerTLS

        tls = ReloadingServerTLS.from_settings(settings)
        # uvicorn builds its own SSLContext from file names; ours swaps certificates without a restart.
        config.ssl = tls.context
        components(app).background.append(tls.watch)
    elif not _is_loopback(settings.server.host) and not settings.server.trusted_proxies:
        log.warning(
            "serving plain HTTP on %s without trusted_proxies: tls = \"off\" is meant only behind a "
            "TLS-terminating proxy; credentials will cross the network in clear text",
            settings.server.host,
        )
    server = uvicorn.Server(config)
    extra: list[asyncio.Task[None]] = []
    main = asyncio.create_task(server.serve())
    while not server.started:
        if main.done():
            await main
            return
        await asyncio.sleep(0.01)
    sock = server.servers[0].sockets[0].getsockname()
    scheme = "https" if tls else "http"
    host = settings.server.host
    shown = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{shown}:{sock[1]}{settings.server.root_path}"
    details = ""
    if tls:
        details = f" (certificate sha256 {tls.fingerprint}" + (f", CA {tls.ca_file}" if tls.ca_file else "") + ")"
    log.info("pvs-gateway listening on %s%s, upstream %s", url, details, settings.upstream.url)
    if settings.server.http_redirect_port and tls:
        extra.append(asyncio.create_task(_redirect_listener(settings, sock[1])))
    if on_ready is not None:
        on_ready(url)
    try:
        await main
    finally:
        for task in extra:
            task.cancel()


async def _redirect_listener(settings: Settings, https_port: int) -> None:
    """A plain-HTTP listener that only redirects to HTTPS (for browsers typing the bare name)."""

    async def redirect(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        host = "localhost"
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1").rsplit(":", 1)[0] if not value.startswith(b"[") else value.decode().split("]")[0] + "]"
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        location = f"https://{host}:{https_port}{path.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")
        await send({"type": "http.response.start", "status": 308, "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(redirect, host=settings.server.host, port=settings.server.http_redirect_port, proxy_headers=False, server_header=False, access_log=False, log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    await server.serve()
