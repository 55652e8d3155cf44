"""Reading what the PVS sends: tolerant of its quirks, strict about the result.

The PVS sometimes puts HTTP headers inside the body, truncates answers under
load, or returns garbage while rebooting. A body is accepted only if it is a
JSON object (after skipping a leading header block); anything else is a bad
response. Secret variables are removed from every /vars answer here, so no
code path after this one can leak them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.allowlist import is_secret_var
from gateway.errors import UpstreamBadResponse

_HEADER_BLOCK = re.compile(rb"\A\s*HTTP/\d(?:\.\d)? \d{3}[^\n]*\n(?:[^\n]*\n)*?\r?\n")


def parse_json_object(body: bytes) -> tuple[bytes, Any]:
    """Return (clean body bytes, parsed object); raise UpstreamBadResponse."""
    match = _HEADER_BLOCK.match(body)
    if match:
        body = body[match.end() :]
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        snippet = body[:40].decode("utf-8", "replace")
        raise UpstreamBadResponse(f"the PVS sent a body that is not JSON (starts {snippet!r})") from None
    if not isinstance(value, dict):
        raise UpstreamBadResponse("the PVS sent JSON that is not an object")
    return body, value


def strip_secret_vars(value: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Remove secret variables from a /vars answer (list or obj format)."""
    removed = False
    values = value.get("values")
    if isinstance(values, list):
        kept = [v for v in values if not (isinstance(v, dict) and isinstance(v.get("name"), str) and is_secret_var(v["name"]))]
        if len(kept) != len(values):
            removed = True
            value = {**value, "values": kept}
            if isinstance(value.get("count"), int):
                value["count"] = len(kept)
    if any(isinstance(k, str) and is_secret_var(k) for k in value):
        removed = True
        value = {k: v for k, v in value.items() if not (isinstance(k, str) and is_secret_var(k))}
    return value, removed


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
