"""Minimal HTTP/1.1 framing over asyncio streams.

Hand-written instead of uvicorn because the simulator must misbehave on the
wire (close without answering, lie in Content-Length, hang) and must see the
raw request target exactly as the client sent it.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 64 * 1024
MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class BadRequest(Exception):
    """The client sent something that is not a request we can read; answer 400 and close."""


@dataclass
class Request:
    method: str
    target: str  # raw, exactly as received
    version: str
    headers: list[tuple[str, str]]  # names lower-cased, order kept
    body: bytes = b""
    path: str = field(init=False)
    query: str = field(init=False)

    def __post_init__(self) -> None:
        target = self.target
        if target.startswith(("http://", "https://")):  # absolute form: keep path and query
            parts = urllib.parse.urlsplit(target)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        raw_path, _, self.query = target.partition("?")
        self.path = urllib.parse.unquote(raw_path, errors="replace")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def params(self) -> list[tuple[str, str]]:
        return urllib.parse.parse_qsl(self.query, keep_blank_values=True)

    def form(self) -> list[tuple[str, str]]:
        """The body read as a query string (what /vars accepts by POST)."""
        return urllib.parse.parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = "application/json"


def json_response(status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    body = json.dumps(value, indent=2).encode() + b"\n"
    return Response(status, body, list(headers or []))


def encode_head(response: Response, *, keep_alive: bool, content_length: int | None = None) -> bytes:
    """Status line and headers; ``content_length`` overrides the real length (to lie)."""
    try:
        phrase = http.HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {phrase}", f"Date: {email.utils.formatdate(usegmt=True)}"]
    if response.content_type and response.status not in (204, 304):
        lines.append(f"Content-Type: {response.content_type}")
    if response.status not in (204, 304):
        length = len(response.body) if content_length is None else content_length
        lines.append(f"Content-Length: {length}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


async def read_request(reader: asyncio.StreamReader, *, idle_timeout: float, read_timeout: float) -> Request | None:
    """Read one request; None when the client closed (or idled out) between requests."""
    try:
        async with asyncio.timeout(idle_timeout):
            first = await _read_line(reader)
            while first in (b"\r\n", b"\n"):  # tolerated: empty lines before a request
                first = await _read_line(reader)
    except (asyncio.IncompleteReadError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(read_timeout):
            return await _read_rest(reader, first)
    except asyncio.IncompleteReadError:
        return None
    except TimeoutError:
        raise BadRequest("request not completed in time") from None


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest("line too long") from None


async def _read_rest(reader: asyncio.StreamReader, first: bytes) -> Request:
    size = len(first)
    parts = first.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method) or version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest("malformed request line")
    if not target or not (target.startswith("/") or target.startswith(("http://", "https://"))):
        raise BadRequest("malformed request target")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        raise BadRequest("malformed request target")
    headers: list[tuple[str, str]] = []
    while True:
        line = await _read_line(reader)
        size += len(line)
        if size > MAX_HEAD or len(headers) > MAX_HEADERS:
            raise BadRequest("request head too large")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            break
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header line")
        headers.append((name.lower(), value.strip(" \t")))
    request = Request(method.upper(), target, version, headers)
    request.body = await _read_body(reader, request)
    return request


async def _read_body(reader: asyncio.StreamReader, request: Request) -> bytes:
    lengths = {v.strip() for k, v in request.headers if k == "content-length"}
    encoding = ",".join(v for k, v in request.headers if k == "transfer-encoding").strip().lower()
    if encoding:
        if lengths or encoding != "chunked":  # both framings at once: refuse, never guess
            raise BadRequest("unsupported transfer-encoding")
        return await _read_chunked(reader)
    if not lengths:
        return b""
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise BadRequest("malformed content-length")
    length = int(next(iter(lengths)))
    if length > MAX_BODY:
        raise BadRequest("body too large")
    return await reader.readexactly(length)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = (await _read_line(reader)).split(b";")[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise BadRequest("malformed chunk size") from None
        if size < 0 or len(body) + size > MAX_BODY:
            raise BadRequest("body too large")
        if size == 0:
            while (await _read_line(reader)).strip():  # trailers, ignored
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if (await reader.readexactly(2)) != b"\r\n":
            raise BadRequest("malformed chunk")
