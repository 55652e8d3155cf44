"""``pvs-gateway``: serve, simulate, demo, keys, certs, check.

The only place that parses arguments, configures logging and exits. Exit
codes: 0 ok, 1 runtime failure, 2 bad usage or configuration (a list of
problems, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.settings import Settings, find_config_path, load

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _setup_logging(level: str = "info") -> None:
    # One access line per request: skip what our format never shows (caller frame,
    # thread, process), the logging HOWTO's own optimisations for hot paths.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every upstream URL at INFO; our own access and upstream logs say it better.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _load_settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings | None:
    path = find_config_path(getattr(args, "config", None), os.environ)
    settings, problems = load(path, overrides=overrides)
    if problems:
        print(f"pvs-gateway: configuration has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return None
    return settings


# ------------------------------------------------------------------ commands


def cmd_serve(args: argparse.Namespace) -> int:
    server: dict[str, Any] = {}
    if args.host:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    settings = _load_settings(args, {"server": server} if server else None)
    if settings is None:
        return EXIT_CONFIG
    _setup_logging(settings.server.log_level)
    from gateway.server import run_async, serve

    try:
        # Access lines bypass logging's per-record cost but share its stream and format.
        run_async(serve(settings, access_stream=sys.stderr))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        logging.getLogger("gateway").error("cannot serve: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    if settings is None:
        return EXIT_CONFIG
    path = find_config_path(getattr(args, "config", None), os.environ)
    print(f"configuration ok ({path or 'built-in defaults'})")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.simulator import run
    from gateway.simulator.cli import options_from_args

    _setup_logging("info")
    try:
        run(options_from_args(args))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.auth import keys

    settings = _load_settings(args)
    if settings is None:
        return EXIT_CONFIG
    path = settings.path(settings.auth.keys_file)
    try:
        if args.keys_command == "add":
            record, secret = keys.add_key(path, args.name, args.role, args.expires_days, args.rate_limit)
            _print_key(record, path)
            print(secret)
        elif args.keys_command == "rotate":
            record, secret = keys.rotate_key(path, args.name)
            _print_key(record, path)
            print(secret)
        elif args.keys_command == "revoke":
            record = keys.revoke_key(path, args.name)
            print(f"revoked {record.name} ({record.id}); a running gateway stops accepting it within seconds")
        else:
            rows = keys.list_keys(path)
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print(f"no keys in {path}")
            else:
                print(f"{'ID':9} {'NAME':20} {'ROLE':7} {'STATUS':8} {'EXPIRES':21} LAST USED")
                for r in rows:
                    print(f"{r['id']:9} {r['name'][:20]:20} {r['role']:7} {r['status']:8} {r['expires'] or '-':21} {r['last_used'] or '-'}")
    except keys.KeyStoreError as exc:
        print(f"pvs-gateway keys: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def _print_key(record: Any, path: Path) -> None:
    expires = record.expires.isoformat() if record.expires else "never"
    print(f"key {record.name!r} id={record.id} role={record.role} expires={expires} (stored hashed in {path})")
    print("the secret is shown once, on the next line; store it now:")


def cmd_certs(args: argparse.Namespace) -> int:
    from gateway import tls

    settings = _load_settings(args)
    if settings is None:
        return EXIT_CONFIG
    cert_dir = settings.path(settings.server.cert_dir)
    try:
        if args.certs_command in ("show", "export-ca") and not (cert_dir / tls.CA_CERT).exists():
            # Before the first start there is nothing to show or export yet: make it now, as serve would.
            tls.ensure_certificates(cert_dir, tls.leaf_hostnames(settings.server), renew_days=settings.server.cert_renew_days)
        if args.certs_command == "show":
            print(json.dumps(tls.describe(cert_dir), indent=2))
        elif args.certs_command == "renew":
            tls.renew_leaf(cert_dir, tls.leaf_hostnames(settings.server))
            print(f"new leaf sha256 {tls.leaf_fingerprint(cert_dir)}; a running gateway serves it to new connections within seconds")
        elif args.certs_command == "export-ca":
            sys.stdout.write(tls.export_ca(cert_dir))
        elif args.certs_command == "trust-pvs":
            from gateway import pinning

            fp = pinning.accept_current(settings.upstream.url, cert_dir / pinning.PIN_FILE)
            print(f"now trusting the PVS certificate sha256 {fp}")
    except (OSError, tls.TLSSetupError) as exc:
        print(f"pvs-gateway certs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _setup_logging("info")
    return run_demo(port=args.port, state_dir=Path(args.state_dir), clock=args.clock)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvs-gateway", description="Secure, caching, read-only gateway for the SunPower PVS local API.")
    parser.add_argument("--version", action="version", version=f"pvs-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="TOML file (default: $PVSGW_CONFIG, else ./pvs-gateway.toml)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the gateway"))
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    check = with_config(sub.add_parser("check", help="validate the configuration"))
    check.set_defaults(func=cmd_check)

    simulate = sub.add_parser("simulate", help="run the PVS simulator")
    from gateway.simulator.cli import add_arguments

    add_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="simulator + gateway with TLS and a demo key")
    demo.add_argument("--port", type=int, default=8443)
    demo.add_argument("--state-dir", default="demo-state", help="where the demo keeps its CA and keys")
    demo.add_argument("--clock", default="12:00", help="simulated time of day at start (HH:MM), or 'real'")
    demo.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    add = with_config(ksub.add_parser("add", help="create a key; its secret is printed once, on the last line"))
    add.add_argument("name")
    add.add_argument("--role", choices=["viewer", "admin"], default="viewer")
    add.add_argument("--expires-days", type=float)
    add.add_argument("--rate-limit", help="override ratelimit.per_caller for this key, e.g. 600/minute")
    lst = with_config(ksub.add_parser("list", help="list keys (never secrets)"))
    lst.add_argument("--json", action="store_true")
    for name, text in (("revoke", "revoke a key"), ("rotate", "replace a key's secret (new id)")):
        p = with_config(ksub.add_parser(name, help=text))
        p.add_argument("name")
    keys.set_defaults(func=cmd_keys)

    certs = sub.add_parser("certs", help="TLS certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    for name, text in (
        ("show", "fingerprints, SANs and expiry of the CA and the leaf"),
        ("renew", "issue a new leaf now (the CA stays)"),
        ("export-ca", "print the CA certificate (PEM) to trust on each device"),
        ("trust-pvs", "pin the PVS's current certificate after a legitimate change"),
    ):
        with_config(csub.add_parser(name, help=text))
    certs.set_defaults(func=cmd_certs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_OK
