"""Settings: one frozen dataclass per concern, loaded and validated in one place.

Precedence: built-in defaults < TOML file < ``PVSGW_<SECTION>__<KEY>`` environment
< command-line overrides. Secrets may also come from ``<key>_file``. ``load()``
never raises on bad input: it returns every problem, each naming its key, so
``pvs-gateway check`` can list them all at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import ipaddress
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "PVSGW_"


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


def _rate(value: str) -> str | None:
    """Return a problem with a rate-limit string, or None (``limits`` syntax)."""
    from limits import parse_many

    if value in ("", "0", "off"):
        return None
    try:
        parse_many(value)
    except ValueError:
        return f"must look like '60/minute' or '10/10minutes' (got {value!r})"
    return None


def _cidrs(values: tuple[str, ...]) -> str | None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"{value!r} is not an IP address or CIDR"
    return None


def _one_of(*choices: str) -> typing.Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            return f"must be one of {', '.join(repr(c) for c in choices)} (got {value!r})"
        return None

    return check


def _at_least(low: float) -> typing.Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value >= low else f"must be >= {low} (got {value!r})"

    return check


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"must be a port number 0-65535 (got {value!r})"


def _check(fn: typing.Callable[[Any], str | None]) -> dict[str, Any]:
    return {"check": fn}


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = field(default=8443, metadata=_check(_port))
    tls: str = field(default="self-signed", metadata=_check(_one_of("self-signed", "files", "off")))
    cert_dir: str = "certs"
    cert_file: str = ""
    key_file: str = ""
    hostnames: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=_check(_cidrs))
    root_path: str = ""
    # Plain-HTTP LAN listener (0 = none): the PVS paths for allow_anonymous_from, else 308 to HTTPS.
    http_port: int = field(default=0, metadata=_check(_port))
    hsts_max_age: int = field(default=31536000, metadata=_check(_at_least(0)))
    # Leaf certificates are renewed when fewer than this many days remain.
    cert_renew_days: int = field(default=30, metadata=_check(_at_least(1)))
    access_log: str = field(default="text", metadata=_check(_one_of("text", "json", "off")))
    log_level: str = field(default="info", metadata=_check(_one_of("debug", "info", "warning", "error")))
    # Request-size limits: each excess gets a clear 4xx before any other work.
    max_url_length: int = field(default=2048, metadata=_check(_at_least(64)))
    max_query_params: int = field(default=16, metadata=_check(_at_least(1)))
    max_header_count: int = field(default=64, metadata=_check(_at_least(8)))
    max_header_bytes: int = field(default=16384, metadata=_check(_at_least(1024)))
    # Seconds an idle connection is held, a request head may take from its first byte, and a
    # client may leave its answer unread.
    keepalive_timeout: float = field(default=15.0, metadata=_check(_at_least(1)))
    # Open client connections at once: all together, and from one address (more are refused at once).
    max_connections: int = field(default=1024, metadata=_check(_at_least(1)))
    max_connections_per_ip: int = field(default=64, metadata=_check(_at_least(1)))
    tls_handshake_timeout: float = field(default=10.0, metadata=_check(_at_least(0.5)))
    # Opt-in: a header set by a trusted front auth proxy (e.g. "Remote-User").
    proxy_user_header: str = ""
    proxy_groups_header: str = ""


@dataclass(frozen=True)
class UpstreamSettings:
    url: str = "http://172.27.153.1"
    firmware: str = field(default="auto", metadata=_check(_one_of("auto", "legacy", "localapi")))
    serial: str = ""
    password: Secret = field(default_factory=Secret)
    timeout: float = field(default=120.0, metadata=_check(_at_least(0.1)))
    connect_timeout: float = field(default=10.0, metadata=_check(_at_least(0.1)))
    max_concurrency: int = field(default=1, metadata=_check(_at_least(1)))
    min_interval: float = field(default=2.0, metadata=_check(_at_least(0)))
    # A caller waits at most this long for an upstream slot; a full queue answers 503 at once.
    queue_timeout: float = field(default=30.0, metadata=_check(_at_least(0.1)))
    max_queue: int = field(default=32, metadata=_check(_at_least(1)))
    verify_tls: str = field(default="pin", metadata=_check(_one_of("pin", "ca", "off")))
    ca_file: str = ""
    # Consecutive failures before the gateway stops calling the PVS for a while.
    failure_threshold: int = field(default=3, metadata=_check(_at_least(1)))
    backoff_initial: float = field(default=5.0, metadata=_check(_at_least(0.1)))
    backoff_max: float = field(default=300.0, metadata=_check(_at_least(0.1)))
    # Resources kept fresh in the background, e.g. ["DeviceList", "/vars?match=/sys/livedata/&fmt=obj"].
    poll: tuple[str, ...] = ()
    # Seconds of upstream silence after which a cheap request keeps the PVS awake (0 = off).
    keepalive_interval: float = field(default=0.0, metadata=_check(_at_least(0)))
    # LocalAPI: re-login after this many seconds even if the session still works.
    session_max_age: float = field(default=600.0, metadata=_check(_at_least(10)))
    # LocalAPI: the PVS's telemetry WebSocket (plain ws://, host from url), 0 = none (gateway.telemetry).
    ws_port: int = field(default=9002, metadata=_check(_port))
    # Turn the PVS's telemetry on at start if it is off: the only write the gateway ever makes.
    enable_telemetry: bool = False
    # After a request times out, the PVS may still be working on it: its slot stays held until
    # the PVS answers or this many more seconds pass (the answer still fills the cache).
    busy_hold: float = field(default=60.0, metadata=_check(_at_least(0)))


DEFAULT_TTLS: Mapping[str, float] = types.MappingProxyType(
    {
        # DeviceList costs the PVS ~10 s; its values move every few minutes at best.
        "DeviceList": 60.0,
        "Get_Comm": 300.0,
        "GridProfileGet": 3600.0,
        "CheckFW": 86400.0,
        "supervisor/info": 3600.0,
        "communication/interfaces": 300.0,
        "network/interfaces": 300.0,
        "devices/list": 60.0,
        "energy-storage-system/status": 60.0,
        "vars": 15.0,
    }
)


@dataclass(frozen=True)
class CacheSettings:
    default_ttl: float = field(default=30.0, metadata=_check(_at_least(0)))
    max_stale: float = field(default=600.0, metadata=_check(_at_least(0)))
    # A stale entry younger than ttl + this is served at once while one refresh runs.
    stale_while_revalidate: float = field(default=300.0, metadata=_check(_at_least(0)))
    # 4xx answers from the PVS are remembered this long (re-asking will not change them).
    error_ttl: float = field(default=10.0, metadata=_check(_at_least(0)))
    max_entries: int = field(default=256, metadata=_check(_at_least(1)))
    max_bytes: int = field(default=32 * 1024 * 1024, metadata=_check(_at_least(1024)))
    ttl: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TTLS))


@dataclass(frozen=True)
class OIDCSettings:
    issuer: str = ""
    client_id: str = ""
    client_secret: Secret = field(default_factory=Secret)
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    audience: str = ""
    allowed_emails: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    groups_claim: str = "groups"
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    leeway: float = field(default=30.0, metadata=_check(_at_least(0)))
    # Never fetch the JWKS more often than this, even for unknown key ids.
    jwks_min_refresh: float = field(default=60.0, metadata=_check(_at_least(0)))
    jwks_max_age: float = field(default=3600.0, metadata=_check(_at_least(1)))
    session_lifetime: float = field(default=8 * 3600.0, metadata=_check(_at_least(60)))
    timeout: float = field(default=10.0, metadata=_check(_at_least(0.1)))
    # A browser login's groups are asked again at most this long after the last answer (role changes, removals).
    recheck_interval: float = field(default=300.0, metadata=_check(_at_least(10)))


@dataclass(frozen=True)
class AuthSettings:
    methods: tuple[str, ...] = ("api_key",)
    keys_file: str = "keys.json"
    allow_anonymous_from: tuple[str, ...] = field(default=(), metadata=_check(_cidrs))
    # Signs gateway session cookies; generated into cert_dir when empty.
    session_secret: Secret = field(default_factory=Secret)
    session_lifetime: float = field(default=24 * 3600.0, metadata=_check(_at_least(60)))
    # Methods /auth/verify (Traefik ForwardAuth) admits for the service behind it, from
    # X-Forwarded-Method; empty = any (it checks identity, not method).
    forward_auth_methods: tuple[str, ...] = ()
    # Who may read /metrics: "admin" (default), "viewer" or "anonymous".
    metrics_role: str = field(default="admin", metadata=_check(_one_of("admin", "viewer", "anonymous")))
    oidc: OIDCSettings = field(default_factory=OIDCSettings)


@dataclass(frozen=True)
class RateLimitSettings:
    per_caller: str = field(default="60/minute", metadata=_check(_rate))
    per_ip: str = field(default="30/minute", metadata=_check(_rate))
    auth_failures: str = field(default="10/10minutes", metadata=_check(_rate))
    # Per-role overrides, e.g. {admin = "600/minute"}.
    roles: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterSettings:
    # "redis://host:6379/0": every gateway on the same Redis shares cache, budget, limits, sessions.
    redis_url: Secret = field(default_factory=Secret)


@dataclass(frozen=True)
class HistorySettings:
    # Recorded site data (SQLite, WAL); "" = none. Shared through Redis when cluster.redis_url is set.
    path: str = "history.sqlite3"
    # At most one sample per interval (the newest data then), none while there is no new data.
    interval: float = field(default=60.0, metadata=_check(_at_least(1)))
    retention_days: float = field(default=400.0, metadata=_check(_at_least(1)))


@dataclass(frozen=True)
class LiveSettings:
    # /api/v1/live listeners at once: all together, and per identity (more get 429).
    max_listeners: int = field(default=200, metadata=_check(_at_least(1)))
    max_listeners_per_identity: int = field(default=4, metadata=_check(_at_least(1)))
    # Events held for a listener that is behind; one more and it is disconnected.
    queue_size: int = field(default=16, metadata=_check(_at_least(1)))
    # A listener whose connection takes no data for this long is disconnected.
    write_timeout: float = field(default=30.0, metadata=_check(_at_least(0.1)))
    # Seconds between comment lines on a quiet stream (SPEC: at most 30).
    heartbeat: float = field(default=10.0, metadata=_check(_at_least(0.1)))
    # A stream ends after this long (the browser reconnects), so revoked credentials stop streaming.
    max_duration: float = field(default=600.0, metadata=_check(_at_least(1)))


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    history: HistorySettings = field(default_factory=HistorySettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    # Where relative paths (cert_dir, keys_file) are resolved: the config file's folder.
    base_dir: str = field(default=".", metadata={"internal": True})

    def path(self, value: str) -> Path:
        """Resolve a configured path relative to the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def ttl_for(self, resource: str) -> float:
        return self.cache.ttl.get(resource, self.cache.default_ttl)


class SettingsError(Exception):
    """Raised by ``load_or_raise``; carries every problem found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# ---------------------------------------------------------------- coercion


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Turn a TOML or environment value into ``hint``; record a problem on failure."""
    origin = typing.get_origin(hint)
    if hint is Secret:
        if isinstance(value, str):
            return Secret(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{key}: must be a list of strings (got {value!r})")
        return None
    elif origin in (Mapping, dict) or hint is Mapping:
        (_, vtype) = typing.get_args(hint)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                out[k] = _coerce(v, vtype, f"{key}.{k}", problems)
            return out
        problems.append(f"{key}: must be a table (got {value!r})")
        return None
    name = getattr(hint, "__name__", str(hint))
    problems.append(f"{key}: must be {_type_words(name)} (got {value!r})")
    return None


def _type_words(name: str) -> str:
    return {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true or false",
        "Secret": "a string",
    }.get(name, name)


def _build(cls: type, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``data``, recursing into nested sections."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}{raw_key}"
        if raw_key not in fields:
            close = difflib.get_close_matches(str(raw_key).lower(), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            problems.append(f"{key}: unknown setting{hint}")
            continue
        hint = hints[raw_key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{key}: must be a table")
                continue
            kwargs[raw_key] = _build(hint, value, f"{key}.", problems)
            continue
        before = len(problems)
        coerced = _coerce(value, hint, key, problems)
        if len(problems) > before:
            continue
        factory = fields[raw_key].default_factory
        if isinstance(coerced, dict) and callable(factory):
            # A table such as [cache.ttl] adds to the defaults rather than replacing them.
            coerced = {**factory(), **coerced}
        check = fields[raw_key].metadata.get("check")
        if check is not None:
            problem = check(coerced)
            if problem:
                problems.append(f"{key}: {problem}")
                continue
        kwargs[raw_key] = coerced
    return cls(**kwargs)


# ---------------------------------------------------------------- sources


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """``PVSGW_AUTH__OIDC__ISSUER=x`` -> {"auth": {"oidc": {"issuer": "x"}}}.

    Environment names are upper case; keys are matched to the schema
    case-insensitively so that ``PVSGW_CACHE__TTL__DEVICELIST`` finds ``DeviceList``.
    """
    layer: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "PVSGW_CONFIG":
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) < 2 or not all(parts):
            continue
        node = layer
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _env_value(value)
    return _restore_case(layer, Settings)


def _env_value(value: str) -> Any:
    """Read an environment value as a TOML literal when it is one, else as text."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _restore_case(layer: dict[str, Any], cls: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        known = DEFAULT_TTLS if cls is Mapping else {}
        return {next((k for k in known if k.lower() == key), key): v for key, v in layer.items()}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in layer.items():
        real = next((n for n in hints if n.lower() == key), key)
        sub = hints.get(real)
        if isinstance(value, dict) and sub is not None:
            target = sub if dataclasses.is_dataclass(sub) else Mapping
            value = _restore_case(value, target)
        out[real] = value
    return out


def _read_secret_files(data: dict[str, Any], cls: Any, prefix: str, base: Path, problems: list[str]) -> None:
    """Replace ``<secret>_file`` keys by the file's contents (whitespace stripped)."""
    hints = typing.get_type_hints(cls)
    for name, hint in hints.items():
        section = data.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(section, dict):
            _read_secret_files(section, hint, f"{prefix}{name}.", base, problems)
        if hint is not Secret:
            continue
        file_key = f"{name}_file"
        if file_key not in data:
            continue
        path_value = data.pop(file_key)
        if not isinstance(path_value, str) or not path_value:
            problems.append(f"{prefix}{file_key}: must be a file path")
            continue
        path = Path(path_value).expanduser()
        path = path if path.is_absolute() else base / path
        try:
            data[name] = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            problems.append(f"{prefix}{file_key}: cannot read {path}: {exc.strerror or exc}")


def find_config_path(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """``--config``, else ``$PVSGW_CONFIG``, else ./pvs-gateway.toml if present."""
    if explicit:
        return Path(explicit)
    if environ.get("PVSGW_CONFIG"):
        return Path(environ["PVSGW_CONFIG"])
    default = Path("pvs-gateway.toml")
    return default if default.is_file() else None


def load(
    config_path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, list[str]]:
    """Load settings from every source; return them with every problem found.

    ``overrides`` holds command-line values as nested tables, e.g.
    ``{"server": {"port": 9000}}``. This function reads files and the
    environment it is given, nothing else.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    data: dict[str, Any] = {}
    base_dir = Path(".")
    if config_path is not None:
        path = Path(config_path)
        base_dir = path.parent
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            problems.append(f"config: file not found: {path}")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"config: {path} is not valid TOML: {exc}")
        except OSError as exc:
            problems.append(f"config: cannot read {path}: {exc.strerror or exc}")
    data = _merge(data, _env_layer(environ))
    if overrides:
        data = _merge(data, overrides)
    _read_secret_files(data, Settings, "", base_dir, problems)
    settings = _build(Settings, data, "", problems)
    settings = dataclasses.replace(settings, base_dir=str(base_dir))
    problems.extend(validate(settings))
    return settings, problems


def load_or_raise(config_path: str | Path | None = None, **kwargs: Any) -> Settings:
    settings, problems = load(config_path, **kwargs)
    if problems:
        raise SettingsError(problems)
    return settings


# ---------------------------------------------------------------- cross-field checks


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 token)


def validate(s: Settings) -> list[str]:
    """Problems that involve more than one field."""
    problems: list[str] = []
    url = urllib.parse.urlsplit(s.upstream.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        problems.append(f"upstream.url: must be an http:// or https:// URL (got {s.upstream.url!r})")
    elif url.path not in ("", "/") or url.query:
        problems.append("upstream.url: must be the PVS's address only, without a path or query")
    if s.server.tls == "files" and not (s.server.cert_file and s.server.key_file):
        problems.append("server.cert_file: tls = \"files\" needs server.cert_file and server.key_file")
    if s.upstream.verify_tls == "ca" and not s.upstream.ca_file:
        problems.append("upstream.ca_file: verify_tls = \"ca\" needs a CA file")
    if s.upstream.backoff_max < s.upstream.backoff_initial:
        problems.append("upstream.backoff_max: must be >= upstream.backoff_initial")
    if s.upstream.serial and len(s.upstream.serial) < 5:
        problems.append("upstream.serial: must have at least 5 characters")
    if s.server.root_path and (not s.server.root_path.startswith("/") or s.server.root_path.endswith("/")):
        problems.append("server.root_path: must start with '/' and not end with one (e.g. \"/pvs\")")
    for name in ("proxy_user_header", "proxy_groups_header"):
        value = getattr(s.server, name)
        if value and not _TOKEN.fullmatch(value.strip()):
            problems.append(f"server.{name}: {value!r} is not a header field name")
    if s.server.proxy_user_header and not s.server.trusted_proxies:
        # Fail-closed already (the header is believed from trusted proxies only), but silently so.
        problems.append(
            "server.proxy_user_header: the header is believed only from server.trusted_proxies, which is empty; "
            "add your auth proxy's address there, or leave proxy_user_header empty"
        )
    if s.server.proxy_groups_header and not s.server.proxy_user_header:
        problems.append("server.proxy_groups_header: needs server.proxy_user_header (groups come with a user)")
    for method in s.auth.methods:
        if method not in ("api_key", "oidc"):
            problems.append(f"auth.methods: unknown method {method!r} (use \"api_key\" and/or \"oidc\")")
    if not s.auth.methods:
        problems.append("auth.methods: must name at least one method")
    if "oidc" in s.auth.methods:
        o = s.auth.oidc
        if not o.issuer.startswith(("https://", "http://")):
            problems.append("auth.oidc.issuer: required when auth.methods has \"oidc\" (an https:// URL)")
        if not o.client_id:
            problems.append("auth.oidc.client_id: required when auth.methods has \"oidc\"")
        bad = [a for a in o.algorithms if a == "none" or a.startswith("HS")]
        if bad:
            problems.append(f"auth.oidc.algorithms: {', '.join(bad)} not allowed (asymmetric algorithms only)")
    for role, rate in s.ratelimit.roles.items():
        if role not in ("viewer", "admin"):
            problems.append(f"ratelimit.roles.{role}: unknown role (use viewer or admin)")
        problem = _rate(rate)
        if problem:
            problems.append(f"ratelimit.roles.{role}: {problem}")
    redis_url = s.cluster.redis_url.get()
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        problems.append("cluster.redis_url: must be a redis://, rediss:// or unix:// URL")
    elif redis_url and importlib.util.find_spec("redis") is None:
        problems.append("cluster.redis_url: Redis needs the redis client: pip install 'pvs-gateway[redis]'")
    secret = s.auth.session_secret.get()
    if secret and len(secret.encode()) < 16:
        problems.append("auth.session_secret: must be at least 16 bytes (or leave it empty to generate one)")
    if s.live.heartbeat > 30:
        problems.append("live.heartbeat: must be <= 30 (proxies close quiet streams)")
    for key, ttl in s.cache.ttl.items():
        if isinstance(ttl, (int, float)) and ttl < 0:
            problems.append(f"cache.ttl.{key}: must be >= 0")
    return problems
