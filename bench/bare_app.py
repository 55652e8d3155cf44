"""The reference for throughput: a bare Starlette app returning the DeviceList bytes, over TLS.

Served by stock uvicorn on the same protocol implementation and loop as the
gateway (uvicorn's h11 protocol, the standard library's asyncio loop, see
``gateway/server.py``), with the same uvicorn options that matter per
request (no server or date header, no access log, keep-alive timeout) and
the same TLS profile (``gateway.tls.server_ssl_context``, the gateway's
certificate). What it lacks is only the gateway's own work: the edge's
caps and deadlines, middleware, authentication, rate limits, cache lookup.

One difference is by design: here asyncio's SSL transport runs TLS
(uvicorn's ``create_server(ssl=...)``), while the gateway's edge pumps TLS
itself through ``ssl.SSLObject`` and memory BIOs (``gateway/tlsconn.py``), so
that a connection is capped before its handshake and the handshake has its
own deadline. Both are OpenSSL driven from Python with the same context.

    python -m bench.bare_app --port P --cert leaf.pem --key leaf.key --body devicelist.json [--keepalive S]
        [--tls-read-buffer BYTES] [--headers FILE]

``--headers`` (a JSON object) adds those response headers to every DeviceList
answer: with the headers a gateway answer carries, the bare app does the same
HTTP work per answer (h11 validates and writes every header) and what is left
of the difference is the gateway's own Python.

``--tls-read-buffer`` is a diagnostic for the footprint section only, never
used for throughput: asyncio's TLS transport (``asyncio.sslproto.SSLProtocol``)
gives every connection a read buffer of ``SSLProtocol.max_size`` (256 KiB),
zero-filled, so resident; this sets that class attribute, to show how much of
the memory per open connection is that buffer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(body: bytes, headers: dict[str, str] | None = None) -> Starlette:
    async def device_list(request: Request) -> Response:
        return Response(body, media_type="application/json", headers=headers)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/cgi-bin/dl_cgi", device_list), Route("/healthz", healthz)])


def config(app: Starlette, port: int, cert: str, key: str, keepalive: float = 0) -> uvicorn.Config:
    from gateway.settings import Settings
    from gateway.tls import server_ssl_context

    server = Settings().server
    cfg = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http="h11",
        loop="asyncio",
        ws="none",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=int(keepalive or server.keepalive_timeout),
    )
    cfg.load()
    # uvicorn would build its own context from ssl_* options; the gateway's profile instead.
    cfg.ssl = server_ssl_context(cert, key)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--body", required=True)
    ap.add_argument("--keepalive", type=float, default=0, help="keep-alive timeout, s (default: the gateway's default)")
    ap.add_argument("--headers", help="JSON object of extra response headers for DeviceList")
    ap.add_argument("--tls-read-buffer", type=int, default=0, help="diagnostic: asyncio's per-connection TLS read buffer, bytes")
    args = ap.parse_args()
    if args.tls_read_buffer:
        from asyncio import sslproto

        sslproto.SSLProtocol.max_size = args.tls_read_buffer
    extra = json.loads(Path(args.headers).read_text()) if args.headers else None
    app = make_app(Path(args.body).read_bytes(), extra)
    server = uvicorn.Server(config(app, args.port, args.cert, args.key, args.keepalive))
    print(f"bare ready url=https://127.0.0.1:{args.port} http=h11 loop=asyncio", flush=True)
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()
