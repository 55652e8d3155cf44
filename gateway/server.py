"""Serving the app: listeners, TLS, signals, on stock uvicorn (h11) behind ``gateway.edge``."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, TextIO, cast

import uvicorn

from gateway.app import Drain, components, create_app
from gateway.edge import protocol_factory
from gateway.settings import Settings

log = logging.getLogger("gateway")

# uvicorn cancels what is still running this long after SIGTERM; requests still waiting on
# the PVS are answered 503 a little before that (gateway.app, DrainMiddleware).
GRACEFUL_SHUTDOWN = 5.0


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run on the standard library's event loop: the edge runs TLS itself (gateway.tlsconn), so
    nothing here needs another loop, and one event loop fewer is one dependency fewer to trust."""
    asyncio.run(main)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, made before anything else so a port in use fails first (OSError)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


async def serve(
    settings: Settings,
    *,
    on_ready: Callable[[str], None] | None = None,
    access_stream: TextIO | None = None,
) -> None:
    """Run the gateway until signalled; access lines go to ``access_stream`` if given.

    Raises OSError, before any certificate is made, when a port cannot be bound.
    """
    server_settings = settings.server
    main_sock = bind(server_settings.host, server_settings.port)
    sockets = [main_sock]
    if server_settings.http_port:
        try:
            sockets.append(bind(server_settings.host, server_settings.http_port))
        except OSError:
            main_sock.close()
            raise
    port = main_sock.getsockname()[1]
    http_port = sockets[1].getsockname()[1] if len(sockets) > 1 else 0

    app = create_app(settings, access_stream=access_stream, listener_ports=(port, http_port))
    parts = components(app)
    tls = None
    tls_ports: dict[int, ssl.SSLContext] = {}
    if server_settings.tls != "off":
        from gateway.tls import ReloadingServerTLS

        try:
            tls = await asyncio.to_thread(ReloadingServerTLS.from_settings, settings)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        tls_ports[port] = tls.context
        parts.background.append(tls.watch)
        parts.reloaders.append(tls.reload)
    elif not _is_loopback(server_settings.host) and not server_settings.trusted_proxies:
        log.warning(
            "serving plain HTTP on %s without trusted_proxies: tls = \"off\" is meant only behind a "
            "TLS-terminating proxy; credentials will cross the network in clear text",
            server_settings.host,
        )
    limits = parts.connections.limits
    config = uvicorn.Config(
        app,
        # A protocol factory where uvicorn's annotation says a class: Config.load() takes any callable.
        http=cast(Any, protocol_factory(parts.connections, tls_ports)),
        ws="none",
        lifespan="on",
        # Forwarded headers are handled by our own middleware, from configured proxies only;
        # uvicorn's default would trust 127.0.0.1 and with it anything a local proxy passes on.
        proxy_headers=False,
        server_header=False,
        date_header=False,  # GuardMiddleware dates each answer when it starts
        access_log=False,
        log_config=None,
        timeout_keep_alive=int(server_settings.keepalive_timeout),
        # The edge refuses a stream of head bytes with 431 one read after its cap; h11's own
        # cap, above that, is the backstop (400).
        h11_max_incomplete_event_size=limits.head_bytes + 1024 * 1024,
        timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN),
    )
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(parts.reloaders)))
    main = asyncio.create_task(server.serve(sockets=sockets))
    watcher = asyncio.create_task(_drain_on_exit(server, parts.drain))
    try:
        while not server.started:
            if main.done():
                await main
                return
            await asyncio.sleep(0.01)
        scheme = "https" if tls else "http"
        host = server_settings.host
        shown = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{shown}:{port}{server_settings.root_path}"
        details = ""
        if tls:
            details = f" (certificate sha256 {tls.fingerprint}" + (f", CA {tls.ca_file}" if tls.ca_file else "") + ")"
        log.info("pvs-gateway listening on %s%s, upstream %s", url, details, settings.upstream.url)
        if http_port:
            log.info("plain-HTTP LAN listener on http://%s:%d", shown, http_port)
        if on_ready is not None:
            on_ready(url)
        await main
    finally:
        watcher.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)


async def _reload(reloaders: list[Callable[[], object]]) -> None:
    """SIGHUP: keys, certificates and the PVS pin, read again; connections and the log untouched."""
    log.info("SIGHUP: reloading keys, certificates and the PVS pin")
    for reload in reloaders:
        try:
            await asyncio.to_thread(reload)
        except Exception as exc:  # each reloader logs its own file problems; this is the backstop
            log.error("reload step %s failed: %s", getattr(reload, "__qualname__", reload), exc)


async def _drain_on_exit(server: uvicorn.Server, drain: Drain) -> None:
    """Once uvicorn is told to exit, give requests in flight most of the grace period, then
    have the app answer what still waits 503 (uvicorn would cancel them into 500s)."""
    while not server.should_exit:
        await asyncio.sleep(0.1)
    await asyncio.sleep(GRACEFUL_SHUTDOWN - 1.5)
    drain.start()
