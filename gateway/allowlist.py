"""What may reach the PVS: a strict, canonical reading of every proxied request.

The PVS uses GET even for actions (``Command=Start``, ``dhcp/eth`` renews a
lease, ``/vars?set=`` writes), so the method filter alone protects nothing.
Each request is parsed once from its raw bytes; anything ambiguous
(duplicated or case-varied parameters, encoded path characters, traversal)
is refused rather than normalised, and the upstream target is rebuilt from
the parsed values, never copied from the client.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from dataclasses import dataclass

from gateway.errors import RequestRejected

LEGACY_PATH = "/cgi-bin/dl_cgi"
VARS_PATH = "/vars"
AUTH_PATH = "/auth"

# Read-only legacy commands and the parameters each may carry.
COMMANDS: dict[str, frozenset[str]] = {
    "DeviceList": frozenset(),
    "Get_Comm": frozenset({"SerialNumber"}),
    "GridProfileGet": frozenset(),
    "CheckFW": frozenset({"type"}),
    "DeviceDetails": frozenset({"SerialNumber"}),
    "GetDiscoveryProgress": frozenset(),
}
# Session control: real clients (the Prometheus exporter) call these around
# every scrape, so the gateway answers them itself instead of refusing.
LOCAL_COMMANDS = frozenset({"Start", "Stop"})

# Read-only path-style reads under /cgi-bin/dl_cgi/ and their parameters.
PATHS: dict[str, frozenset[str]] = {
    "supervisor/info": frozenset(),
    "communication/interfaces": frozenset(),
    "network/interfaces": frozenset(),
    "network/powerProduction": frozenset(),
    "devices/list": frozenset({"detailed"}),
    "energy-storage-system/status": frozenset(),
}

VARS_PARAMS = frozenset({"name", "match", "fmt", "cache"})
# Variables that never leave the gateway: the hotspot's Wi-Fi password.
SECRET_VARS = frozenset({"/sys/info/wpa_key"})


def is_secret_var(name: str) -> bool:
    """``name`` is a secret variable however it is spelled (case, doubled or trailing
    slashes): how the PVS reads such variants is unknown, so none of them is sent."""
    return re.sub(r"/+", "/", name.lower()).rstrip("/") in SECRET_VARS


MAX_VAR_NAMES = 32
_VALUE_RULES = {
    "SerialNumber": re.compile(r"[A-Za-z0-9_-]{1,64}"),
    "type": re.compile(r"residential|commercial"),
    "detailed": re.compile(r"true|false"),
}
_VAR_NAME = re.compile(r"/[A-Za-z0-9_./-]{1,127}")
_MATCH = re.compile(r"[A-Za-z0-9_./-]{1,128}")
_CACHE_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
# A raw path is accepted only in this alphabet: no '%', ';', '\\', '.' segments.
_RAW_PATH = re.compile(rb"/[A-Za-z0-9_/-]*")


@dataclass(frozen=True, slots=True)
class Resource:
    """A request the gateway understands.

    ``kind`` is "command", "path" or "vars" (forwarded, cached by ``target``),
    or "local" (answered by the gateway). ``name`` picks the cache TTL and
    labels metrics. For vars, ``cache_id`` is the client's stored-query id:
    the gateway keeps those aliases itself and never forwards ``cache=``.
    """

    kind: str
    name: str
    target: str = ""
    cache_id: str | None = None
    fmt: str = "list"
    selector: str = ""

    @property
    def key(self) -> str:
        return self.target


def reject(detail: str, status: int = 403) -> RequestRejected:
    return RequestRejected(detail, status=status)


def parse_query(raw: bytes, max_params: int = 16) -> dict[str, str]:
    """Parse a raw query string strictly: unique, exactly-named, UTF-8 parameters."""
    params: dict[str, str] = {}
    seen: set[str] = set()
    if not raw:
        return params
    parts = [p for p in raw.split(b"&") if p]
    if len(parts) > max_params:
        raise reject(f"too many query parameters (at most {max_params})", 400)
    for part in parts:
        key_b, _, value_b = part.partition(b"=")
        try:
            key = urllib.parse.unquote_to_bytes(key_b).decode("utf-8")
            value = urllib.parse.unquote_to_bytes(value_b).decode("utf-8")
        except UnicodeDecodeError:
            raise reject("query is not valid UTF-8", 400) from None
        if key.lower() in seen:
            raise reject(f"parameter {key!r} is given more than once; send it once", 400)
        seen.add(key.lower())
        params[key] = value
    return params


def _check_params(params: dict[str, str], allowed: frozenset[str], where: str) -> None:
    for key, value in params.items():
        if key not in allowed:
            exact = next((a for a in allowed if a.lower() == key.lower()), None)
            if exact:
                raise reject(f"parameter names are case-sensitive: use {exact!r}, not {key!r}")
            raise reject(f"parameter {key!r} is not allowed for {where}")
        rule = _VALUE_RULES.get(key)
        if rule is not None and not rule.fullmatch(value):
            raise reject(f"value of {key!r} is not allowed", 400)


def classify(raw_path: bytes, raw_query: bytes, *, max_params: int = 16) -> Resource:
    """Map a GET to a Resource, or raise RequestRejected (never forwarded).

    Pollers repeat a handful of URLs, so accepted ones are remembered (a bounded
    LRU of immutable Resources); rejections are never cached and always re-parsed.
    """
    return _classify_cached(raw_path, raw_query, max_params)


@functools.lru_cache(maxsize=512)
def _classify_cached(raw_path: bytes, raw_query: bytes, max_params: int) -> Resource:
    if not _RAW_PATH.fullmatch(raw_path) or b"//" in raw_path:
        raise reject("path contains characters or segments the gateway does not pass on", 400)
    path = raw_path.decode("ascii")
    params = parse_query(raw_query, max_params)

    if path == LEGACY_PATH:
        return _classify_command(params)
    if path.startswith(LEGACY_PATH + "/"):
        return _classify_path(path[len(LEGACY_PATH) + 1 :], params)
    if path == VARS_PATH:
        return _classify_vars(params)
    if path == AUTH_PATH:
        if set(params) == {"login"} and not params["login"]:
            return Resource("local", "auth.login")
        if set(params) == {"logout"} and not params["logout"]:
            return Resource("local", "auth.logout")
        raise reject("only /auth?login and /auth?logout are served", 400)
    raise reject("not a PVS read the gateway serves", 404)


def _classify_command(params: dict[str, str]) -> Resource:
    if "Command" not in params:
        if any(k.lower() == "command" for k in params):
            raise reject("parameter names are case-sensitive: use 'Command'")
        raise reject("dl_cgi needs a Command parameter", 400)
    command = params.pop("Command")
    # sungazer sends "Get_Comm&SerialNumber=" when it has no serial: an empty value
    # means the same as none, so it is dropped (and shares the cache entry of the plain read).
    if params.get("SerialNumber") == "":
        del params["SerialNumber"]
    if command in LOCAL_COMMANDS:
        if params:
            raise reject(f"Command={command} takes no parameters", 400)
        return Resource("local", command)
    allowed = COMMANDS.get(command)
    if allowed is None:
        raise reject(f"Command={command} is not on the read-only allowlist")
    _check_params(params, allowed, f"Command={command}")
    query = urllib.parse.urlencode([("Command", command), *sorted(params.items())])
    return Resource("command", command, f"{LEGACY_PATH}?{query}")


def _classify_path(sub: str, params: dict[str, str]) -> Resource:
    allowed = PATHS.get(sub)
    if allowed is None:
        raise reject(f"dl_cgi/{sub} is not on the read-only allowlist")
    _check_params(params, allowed, f"dl_cgi/{sub}")
    target = f"{LEGACY_PATH}/{sub}"
    if params:
        target += "?" + urllib.parse.urlencode(sorted(params.items()))
    return Resource("path", sub, target)


def _classify_vars(params: dict[str, str]) -> Resource:
    for key in params:
        if key not in VARS_PARAMS:
            if key.lower() in ("set", "clearcache"):
                raise reject(f"/vars?{key}= changes the PVS and is never forwarded")
            _check_params({key: ""}, VARS_PARAMS, "/vars")
    fmt = params.get("fmt", "list")
    # The PVS reads only the first letter (o = obj, l = list); accept those two words.
    if fmt not in ("obj", "list", "o", "l"):
        raise reject("fmt must be 'obj' or 'list'", 400)
    fmt = "obj" if fmt.startswith("o") else "list"
    cache_id = params.get("cache")
    if cache_id is not None and not _CACHE_ID.fullmatch(cache_id):
        raise reject("cache id must be 1-32 letters, digits, '_' or '-'", 400)
    if "name" in params and "match" in params:
        raise reject("give either name= or match=, not both", 400)
    if "name" in params:
        names = [n for n in params["name"].split(",") if n]
        if not names or len(names) > MAX_VAR_NAMES:
            raise reject(f"name= takes 1 to {MAX_VAR_NAMES} variable names", 400)
        for name in names:
            if not _VAR_NAME.fullmatch(name) or "/../" in name + "/" or "/./" in name + "/":
                raise reject(f"{name!r} is not a variable name", 400)
            if is_secret_var(name):
                raise reject(f"{name} is a secret and never leaves the gateway")
        selector = urllib.parse.urlencode([("name", ",".join(names))], safe="/,")
        return vars_resource(selector, fmt, cache_id)
    if "match" in params:
        if not _MATCH.fullmatch(params["match"]):
            raise reject("match= must be a variable-name fragment", 400)
        selector = urllib.parse.urlencode([("match", params["match"])], safe="/")
        return vars_resource(selector, fmt, cache_id)
    if cache_id is not None:
        # Re-read of a stored query: the proxy resolves the alias (no target yet).
        return Resource("vars", "vars", "", cache_id, fmt)
    raise reject("/vars needs name=, match= or cache=", 400)


def vars_resource(selector: str, fmt: str, cache_id: str | None = None) -> Resource:
    """A /vars read of ``selector`` ("name=..." or "match=...") in ``fmt``."""
    return Resource("vars", "vars", f"{VARS_PATH}?{selector}&fmt={fmt}", cache_id, fmt, selector)
