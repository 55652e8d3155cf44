"""Settings: sources and precedence, secrets, and `pvs-gateway check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gateway.settings import load

BROKEN = """
[server]
port = "eighty"
tls = "maybe"
prot = 8443
trusted_proxies = ["10.0.0.0/8", "not-a-network"]

[upstream]
url = "ftp://pvs"
max_concurrency = 0
password_file = "/nonexistent/secret"

[cache.ttl]
DeviceList = -5

[ratelimit]
per_caller = "lots"

[auth]
methods = ["api_key", "magic"]
"""


def _check(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "pvs-gateway.toml"
    cfg.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(cfg)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=tmp_path,
    )


def test_check_lists_every_bad_key_and_exits_2(tmp_path: Path) -> None:
    result = _check(tmp_path, BROKEN)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    for key in (
        "server.port", "server.tls", "server.prot", "server.trusted_proxies", "upstream.url",
        "upstream.max_concurrency", "upstream.password_file", "cache.ttl.DeviceList", "ratelimit.per_caller", "auth.methods",
    ):
        assert f"  - {key}:" in result.stderr, (key, result.stderr)
    assert "did you mean server.port?" in result.stderr


def test_check_accepts_a_good_config_and_invalid_toml_is_a_listed_problem(tmp_path: Path) -> None:
    assert _check(tmp_path, '[upstream]\nurl = "http://127.0.0.1:8080"\n').returncode == 0
    bad = _check(tmp_path, "[server\nport = 1\n")
    assert bad.returncode == 2 and "not valid TOML" in bad.stderr and "Traceback" not in bad.stderr


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9001\nhost = "127.0.0.1"\n[upstream]\nmin_interval = 3.5\ntimeout = 50\n')
    env = {"PVSGW_SERVER__PORT": "9002", "PVSGW_UPSTREAM__TIMEOUT": "40", "PVSGW_CACHE__TTL__DEVICELIST": "90"}
    settings, problems = load(cfg, environ=env, overrides={"server": {"port": 9003}})
    assert problems == []
    assert settings.server.port == 9003  # flag beats environment beats file
    assert settings.upstream.timeout == 40.0  # environment beats file
    assert settings.upstream.min_interval == 3.5  # file beats default
    assert settings.upstream.max_concurrency == 1  # default
    assert settings.cache.ttl["DeviceList"] == 90.0 and settings.cache.ttl["Get_Comm"] == 300.0


def test_secrets_come_from_files_and_never_show(tmp_path: Path) -> None:
    secret_file = tmp_path / "pvs-password"
    secret_file.write_text("s3cr3t-pvs-password\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[upstream]\npassword_file = "pvs-password"\n[auth.oidc]\nclient_secret = "oidc-client-secret-xyz"\n')
    settings, problems = load(cfg, environ={})
    assert problems == []
    assert settings.upstream.password.get() == "s3cr3t-pvs-password"
    text = repr(settings) + str(settings)
    assert "s3cr3t" not in text and "oidc-client-secret-xyz" not in text
    assert "**********" in text


def test_relative_paths_resolve_next_to_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "c.toml"
    cfg.parent.mkdir()
    cfg.write_text('[auth]\nkeys_file = "keys.json"\n')
    settings, _ = load(cfg, environ={})
    assert settings.path(settings.auth.keys_file) == tmp_path / "etc" / "keys.json"


def test_version_and_usage_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("pvs-gateway ")
    bad = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_front_proxy_headers_need_a_trusted_proxy(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nproxy_user_header = "Remote-User"\n')
    _, problems = load(cfg, environ={})
    assert any(p.startswith("server.proxy_user_header: the header is believed only from") for p in problems), problems
    cfg.write_text('[server]\nproxy_groups_header = "Remote Groups"\n')
    _, problems = load(cfg, environ={})
    assert any(p.startswith("server.proxy_groups_header: 'Remote Groups' is not a header field name") for p in problems)
    assert any(p.startswith("server.proxy_groups_header: needs server.proxy_user_header") for p in problems)
    cfg.write_text('[server]\nproxy_user_header = "Remote-User"\ntrusted_proxies = ["127.0.0.1/32"]\n')
    _, problems = load(cfg, environ={})
    assert problems == []
