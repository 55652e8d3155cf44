"""Architecture rules, enforced: imports flow one way, no import-time side effects."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"

# Lower layers never import higher ones. A module may import its own layer or below.
LAYERS: list[set[str]] = [
    {"gateway", "gateway.errors", "gateway.settings", "gateway.files", "gateway.scopes", "gateway.auth"},
    {
        "gateway.allowlist", "gateway.budget", "gateway.health", "gateway.tls", "gateway.pinning",
        "gateway.responses", "gateway.auth.keys", "gateway.auth.sessions", "gateway.edge", "gateway.tlsconn", "gateway.logbuffer", "gateway.routetable",
        "gateway.shared",
    },
    {"gateway.pvsbody", "gateway.upstream", "gateway.ratelimit", "gateway.auth.oidc"},
    {"gateway.telemetry", "gateway.history"},
    {"gateway.cache"},
    {"gateway.proxy", "gateway.auth.oidc_login", "gateway.auth.middleware", "gateway.auth.frontproxy"},
    {
        "gateway.live",
        "gateway.local", "gateway.poller", "gateway.site", "gateway.routes", "gateway.normalize", "gateway.metrics", "gateway.dashboard",
    },
    {"gateway.app"},
    {"gateway.server", "gateway.demo"},
    {"gateway.cli", "gateway.__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name == "gateway" or name.startswith("gateway.")}


def _layer_of(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    return None


def _modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "simulator" not in p.parts and "middleware" not in p.parts]


def test_imports_flow_one_way() -> None:
    problems = []
    for path in _modules():
        name = _module_name(path)
        own = _layer_of(name)
        if own is None:
            problems.append(f"{name}: not placed in a layer (add it to LAYERS)")
            continue
        for imported in _imports(path):
            layer = _layer_of(imported)
            if layer is not None and layer > own:
                problems.append(f"{name} (layer {own}) imports {imported} (layer {layer})")
    assert problems == []


def test_middleware_sits_below_the_app() -> None:
    for path in (PACKAGE / "middleware").glob("*.py"):
        for imported in _imports(path):
            layer = _layer_of(imported)
            assert layer is None or layer <= _layer_of("gateway.auth.middleware"), (path.name, imported)


def test_the_simulator_stands_alone() -> None:
    for path in (PACKAGE / "simulator").rglob("*.py"):
        outside = {i for i in _imports(path) if not i.startswith("gateway.simulator")}
        assert outside == set(), (path.name, outside)


def test_only_settings_and_the_cli_read_the_environment() -> None:
    readers = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text:
            readers.add(_module_name(path))
    assert readers <= {"gateway.settings", "gateway.cli"}, readers


def test_importing_every_module_has_no_side_effects(tmp_path: Path) -> None:
    names = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")
    script = (
        "import importlib, logging, os, sys, threading\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ok", out.stderr
