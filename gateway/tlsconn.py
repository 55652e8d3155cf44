"""Server-side TLS for one connection: OpenSSL through ``ssl.SSLObject`` and two memory BIOs.

The edge (``gateway.edge``) receives the client's bytes on a plain TCP
transport and feeds them here; what comes out decrypted goes to uvicorn's
protocol, which writes its answers through ``TLSTransport``, the decrypted
side of the connection. The TLS itself (handshake, records, alerts, session
tickets) is OpenSSL's, configured by ``gateway.tls.server_ssl_context``.

Why not the event loop's own TLS (``create_server(ssl=...)`` or
``loop.start_tls``): with it, a connection could not be counted and capped by
address before its handshake, nor given a handshake deadline of its own
(uvicorn passes neither); asyncio's keeps a 256 KiB read buffer resident per
open connection (500 idle TLS clients: ~150 MB); and uvloop's ``start_tls``
stalled or reset half the handshakes of a client connecting in a loop.
Here a connection costs what OpenSSL keeps for it, and the bytes the
transport has just read.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any


class TLSTransport(asyncio.Transport):
    """The decrypted side of one TLS connection over a raw transport (the client's socket)."""

    def __init__(self, raw: asyncio.Transport, context: ssl.SSLContext) -> None:
        super().__init__()
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._context = context
        self.handshaken = False
        self.peer_closed = False  # the client sent close_notify
        self._closing = False

    def feed(self, data: bytes) -> bytes:
        """Take ciphertext from the client; return the plaintext it completes (maybe b"").

        Raises ``ssl.SSLError`` when the client breaks the protocol (the caller aborts).
        """
        self._incoming.write(data)
        if not self.handshaken:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return b""
            self.handshaken = True
        chunks = []
        while True:
            try:
                chunk = self._ssl.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        self._flush()  # the handshake's last flight, session tickets, alerts
        return b"".join(chunks)

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data and not self._raw.is_closing():
            self._raw.write(data)

    # -- the transport uvicorn's protocol writes to

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[self._ssl.write(view) :]
        except ssl.SSLError:  # e.g. a renegotiation in the middle of an answer: not served
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.handshaken and not self._raw.is_closing():
            try:
                self._ssl.unwrap()  # close_notify; the client's answer to it is not awaited
            except (ssl.SSLError, OSError):
                pass
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self._context
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        return self._raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()
