"""``python -m gateway.simulator``: run a simulated PVS until interrupted."""

from __future__ import annotations

import argparse
import sys

from .cli import add_arguments, options_from_args
from .runner import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.simulator", description="Run a simulated SunPower PVS.")
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        options = options_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(options)
    except OSError as exc:  # e.g. the port is taken
        print(f"pvs-simulator: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
