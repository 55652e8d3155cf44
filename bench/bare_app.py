"""The ceiling of this stack: a bare Starlette app returning the DeviceList bytes, over TLS.

Served by uvicorn with the gateway's own uvicorn settings and TLS profile
(``gateway.server._uvicorn_config`` and ``gateway.tls.server_ssl_context``),
so the only difference from the gateway is the gateway's own work: no auth,
no rate limit, no middleware, no cache lookup.

    python -m bench.bare_app --port P --cert leaf.pem --key leaf.key --body devicelist.json \
        [--loop uvloop] [--protocol uvicorn|gateway]

``--protocol uvicorn`` (the default) is uvicorn's own httptools connection
protocol: the bare stack, the ceiling. ``--protocol gateway`` is the
gateway's subclass of it (``gateway.httpproto``: head deadline, one write
per answer), kept as a reference: what that protocol is worth on its own.

``--loop uvloop`` (the gateway's own loop, ``gateway.server.run_async``) is
the stack's ceiling; ``--loop asyncio`` (``asyncio.run``, the standard
library's loop) is kept as a reference: what uvloop is worth, and how the
standard library's TLS transport behaves.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(body: bytes) -> Starlette:
    async def device_list(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(routes=[Route("/cgi-bin/dl_cgi", device_list), Route("/healthz", healthz)])


def config(app: Starlette, port: int, cert: str, key: str, protocol: str = "uvicorn") -> uvicorn.Config:
    from gateway.settings import Settings
    from gateway.tls import server_ssl_context

    try:
        from gateway.server import _uvicorn_config

        cfg = _uvicorn_config(app, "127.0.0.1", port, Settings())
    except ImportError:  # the gateway's helper moved: the same settings, spelled out
        cfg = uvicorn.Config(
            app, host="127.0.0.1", port=port, proxy_headers=False, server_header=False,
            access_log=False, log_config=None, lifespan="on", timeout_keep_alive=15,
        )
    if protocol == "uvicorn":
        cfg.http = "httptools"  # uvicorn's own protocol, not the gateway's subclass
    cfg.load()
    cfg.ssl = server_ssl_context(cert, key)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--body", required=True)
    ap.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="uvloop: uvloop's loop (as gateway.server.run_async); asyncio: asyncio.run, the standard library's loop",
    )
    ap.add_argument("--protocol", choices=("uvicorn", "gateway"), default="uvicorn")
    args = ap.parse_args()
    app = make_app(Path(args.body).read_bytes())
    server = uvicorn.Server(config(app, args.port, args.cert, args.key, args.protocol))
    print(f"bare ready url=https://127.0.0.1:{args.port} loop={args.loop} protocol={args.protocol}", flush=True)
    if args.loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve())
    else:
        asyncio.run(server.serve())


if __name__ == "__main__":
    main()
