"""Container / service health probe: exit 0 when the gateway answers /healthz.

Reads the same configuration as ``pvs-gateway serve`` ($PVSGW_CONFIG, else
./pvs-gateway.toml, plus PVSGW_* variables) to find the port and TLS mode,
then asks http(s)://<loopback>:<port>/healthz. The certificate is
not verified: the probe talks to its own process over loopback and only looks
for "200 OK". Used by the Dockerfile's HEALTHCHECK; works as well by hand:
``python deploy/healthcheck.py``.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import sys
import urllib.request

from gateway.settings import find_config_path, load


def probe_url() -> str:
    settings, problems = load(find_config_path(None, os.environ))
    if problems:
        raise SystemExit("configuration problems: " + "; ".join(problems))
    server = settings.server
    host = server.host
    try:
        addr = ipaddress.ip_address(host)
        if addr.is_unspecified:
            host = "::1" if addr.version == 6 else "127.0.0.1"
    except ValueError:
        pass  # a name: ask it
    shown = f"[{host}]" if ":" in host else host
    scheme = "http" if server.tls == "off" else "https"
    return f"{scheme}://{shown}:{server.port}/healthz"


def main() -> int:
    url = probe_url()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            ok = response.status == 200
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'healthy' if ok else 'unhealthy'}: {url}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
