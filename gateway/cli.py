"""``pvs-gateway``: serve, simulate, demo, keys, certs, check.

The only place that parses arguments, configures logging and exits. Exit
codes: 0 ok, 1 runtime failure, 2 bad usage or configuration (a list of
problems, never a traceback). A file problem is one line naming the file;
a closed stdout (``keys list | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import GatewayError
from gateway.settings import Settings, find_config_path, load

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _setup_logging(level: str = "info") -> None:
    # Skip what our format never shows (thread, process), as the logging HOWTO suggests;
    # access lines bypass logging's per-record work anyway (gateway.logbuffer).
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


def _print_problems(problems: list[str]) -> None:
    print(f"pvs-gateway: configuration has {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def _load_settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings | None:
    path = find_config_path(getattr(args, "config", None), os.environ)
    settings, problems = load(path, overrides=overrides)
    if problems:
        _print_problems(problems)
        return None
    return settings


# ------------------------------------------------------------------ files and ports


def _keys_file_problems(settings: Settings) -> list[str]:
    """What ``serve`` refuses to start on: a key file that is corrupt, unreadable or writable by others."""
    if "api_key" not in settings.auth.methods:
        return []
    from gateway.auth import keys

    return [f"auth.keys_file: {p}" for p in keys.file_problems(settings.path(settings.auth.keys_file))]


def _dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be written (or created), else None; changes nothing."""
    if directory.exists():
        if not directory.is_dir():
            return f"{directory} is not a directory"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"{directory} is not writable by this user (uid {os.geteuid()})"
        return None
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{directory} cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{directory} cannot be created: {parent} is not writable by this user (uid {os.geteuid()})"
    return None


def _file_problems(settings: Settings) -> list[str]:
    """What ``check`` adds to the configuration's own problems: the files ``serve`` will need."""
    from gateway import pinning, tls

    problems = _keys_file_problems(settings)
    server = settings.server
    cert_dir = settings.path(server.cert_dir)
    # cert_dir also holds the session key and the PVS pin, so it matters even without TLS.
    problem = _dir_problem(cert_dir)
    if problem:
        problems.append(f"server.cert_dir: {problem}")
    if server.tls == "self-signed":
        problems += [f"server.cert_dir: {p}" for p in tls.check_cert_dir(cert_dir)]
    elif server.tls == "files" and server.cert_file and server.key_file:
        try:
            tls.server_ssl_context(settings.path(server.cert_file), settings.path(server.key_file))
        except tls.TLSSetupError as exc:
            problems.append(f"server.cert_file: {exc}")
    if settings.upstream.verify_tls == "ca" and settings.upstream.ca_file:
        try:
            pinning.ca_context(settings.path(settings.upstream.ca_file))
        except GatewayError as exc:
            problems.append(exc.detail)
    if settings.upstream.verify_tls == "pin" and settings.upstream.url.startswith("https://"):
        try:
            pinning.read_pin(cert_dir / pinning.PIN_FILE)
        except pinning.PinFileError as exc:
            problems.append(f"server.cert_dir: {exc}; fix it or run `{pinning.TRUST_COMMAND}`")
    return problems


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on right now, else None.

    For ``demo``, which starts the simulator, makes its state and rotates its
    key before ``serve`` binds: a second demo started by mistake changes nothing.
    (``serve`` itself binds before anything else: ``gateway.server.bind``.)
    """
    if not port:
        return None
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {shown}: {exc.strerror}"
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                # As uvicorn does: a TIME_WAIT left by the previous run is no conflict.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {shown}: {exc.strerror or exc}"
    return None


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
    problems = _keys_file_problems(settings)
    if problems:
        for problem in problems:
            print(f"pvs-gateway serve: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(settings.server.log_level)
    from gateway.server import run_async, serve
    from gateway.tls import TLSSetupError

    try:
        # Access lines bypass logging's per-record cost but share its stream and format.
        run_async(serve(settings, access_stream=sys.stderr))
    except KeyboardInterrupt:
        pass
    except TLSSetupError as exc:
        print(f"pvs-gateway serve: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except GatewayError as exc:  # e.g. upstream.ca_file cannot be loaded
        print(f"pvs-gateway serve: {exc.detail}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # gateway.server.serve binds its sockets first: a port in use lands here
        print(f"pvs-gateway serve: {_os_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _os_error(exc: OSError) -> str:
    """One line for an OSError out of ``serve``: a file names itself; the others (a port in use:
    ``gateway.server.bind``'s "cannot listen on HOST:PORT: ...") already say what they are about."""
    if exc.filename:
        return f"cannot use {exc.filename}: {exc.strerror or exc}"
    return exc.strerror or str(exc)


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load_settings(args)
    if settings is None:
        return EXIT_CONFIG
    problems = _file_problems(settings)
    if problems:
        _print_problems(problems)
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
            record, secret = keys.rotate_key(path, args.name, args.expires_days)
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
    except tls.TLSSetupError as exc:
        print(f"pvs-gateway certs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        raise  # stdout's reader left: main ends quietly
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pvs-gateway certs: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except (ValueError, GatewayError) as exc:  # trust-pvs: not an https:// PVS, no certificate presented
        print(f"pvs-gateway certs: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    busy = _port_problem("127.0.0.1", args.port)
    if busy:  # before the simulator starts, the state is made or the demo key rotated
        print(f"pvs-gateway demo: {busy}", file=sys.stderr)
        return EXIT_FAILURE
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
    revoke = with_config(ksub.add_parser("revoke", help="revoke a key"))
    revoke.add_argument("name")
    rotate = with_config(ksub.add_parser("rotate", help="replace a key's secret (new id); the expiry stays"))
    rotate.add_argument("name")
    rotate.add_argument("--expires-days", type=float, help="give it a new expiry, counted from now")
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
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        # `pvs-gateway keys list | head`: the reader left. Say nothing, and keep the
        # interpreter's final flush from failing too (the Python docs' recipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
