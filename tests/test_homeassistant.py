"""deploy/homeassistant/pvs_gateway.yaml against real /api/v1/summary answers.

The package uses Home Assistant's RESTful integration; its templates are kept to the
plain ``{{ value_json.a.b }}`` / ``{{ value_json['x'] }}`` forms and its attribute
paths to ``$.a.b``, which the small evaluator below reads exactly as Home Assistant
would. Anything else in the file fails here, as does a path the gateway's answer lacks
(on either firmware kind) or a value the sensor's class cannot hold.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import FAST
from tests.harness import Gateway, Simulator, start_simulator

PACKAGE = Path(__file__).resolve().parent.parent / "deploy" / "homeassistant" / "pvs_gateway.yaml"
SERIAL = "ZT000085000549A0001"

_TEMPLATE = re.compile(r"\{\{\s*value_json((?:\.[A-Za-z_]\w*|\['[^'\]]+'\]|\[\"[^\"\]]+\"\])+)\s*\}\}")
_STEP = re.compile(r"\.([A-Za-z_]\w*)|\['([^'\]]+)'\]|\[\"([^\"\]]+)\"\]")
_JSONPATH = re.compile(r"\$((?:\.[A-Za-z_]\w*)+)")


class Secret(str):
    """A ``!secret name`` reference, as Home Assistant resolves it from secrets.yaml."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!secret", lambda loader, node: Secret(loader.construct_scalar(node)))  # type: ignore[arg-type]


def load_package() -> dict[str, Any]:
    package: dict[str, Any] = yaml.load(PACKAGE.read_text(), Loader=_Loader)  # a SafeLoader subclass
    return package


def render(template: str, value_json: Any) -> Any:
    """``{{ value_json.a['b'] }}`` -> value_json["a"]["b"]; KeyError if absent, ValueError if not this form."""
    match = _TEMPLATE.fullmatch(template.strip())
    if match is None:
        raise ValueError(f"template {template!r} is not of the plain value_json.a.b form")
    value = value_json
    for step in _STEP.finditer(match.group(1)):
        value = value[next(g for g in step.groups() if g is not None)]
    return value


def json_path(path: str, value_json: Any) -> Any:
    match = _JSONPATH.fullmatch(path)
    if match is None:
        raise ValueError(f"json_attributes_path {path!r} is not of the $.a.b form")
    value = value_json
    for key in match.group(1).split(".")[1:]:
        value = value[key]
    return value


def sensors() -> list[dict[str, Any]]:
    return [s for entry in load_package()["rest"] for s in entry["sensor"]]


def test_evaluator_can_fail() -> None:
    answer = {"a": {"b": 1.5}, "x y": 2}
    assert render("{{ value_json.a.b }}", answer) == 1.5
    assert render("{{ value_json['x y'] }}", answer) == 2
    with pytest.raises(KeyError):
        render("{{ value_json.a.c }}", answer)
    with pytest.raises(ValueError):
        render("{{ value_json.a.b | float(0) }}", answer)
    with pytest.raises(KeyError):
        json_path("$.a.c", answer)


def test_package_shape() -> None:
    package = load_package()
    assert set(package) == {"rest"}
    (entry,) = package["rest"]
    assert entry["resource"].startswith("https://") and entry["resource"].endswith("/api/v1/summary")
    assert isinstance(entry["headers"]["Authorization"], Secret)  # the key lives in secrets.yaml
    assert entry["verify_ssl"] is True  # closed by default; the README says when to change it
    assert entry["timeout"] >= 15 and entry["scan_interval"] >= 30
    ids = [s["unique_id"] for s in sensors()]
    assert len(ids) == len(set(ids))
    by_id = {s["unique_id"]: s for s in sensors()}
    # What the Energy dashboard accepts: energy, total_increasing, kWh.
    for name in ("production", "import", "export", "consumption"):
        s = by_id[f"pvs_gateway_lifetime_{name}"]
        assert (s["device_class"], s["state_class"], s["unit_of_measurement"]) == ("energy", "total_increasing", "kWh")
    for name in ("production", "consumption", "net"):
        s = by_id[f"pvs_gateway_{name}_power"]
        assert (s["device_class"], s["state_class"], s["unit_of_measurement"]) == ("power", "measurement", "kW")


@pytest.fixture(scope="module")
def localapi_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path_factory.mktemp("sim-localapi"), *FAST, "--firmware", "localapi", "--serial", SERIAL)
    yield sim
    sim.stop()


def summary_as_home_assistant_reads_it(gw: Gateway, timeout: float) -> dict[str, Any]:
    """The rest integration's request: GET with the configured headers, the CA checked."""
    secrets = {"pvs_gateway_authorization": f"Bearer {gw.keys['viewer']}"}
    (entry,) = load_package()["rest"]
    headers = {k: secrets[v] if isinstance(v, Secret) else v for k, v in entry["headers"].items()}
    r = requests.get(f"{gw.url}/api/v1/summary", headers=headers, timeout=timeout, verify=str(gw.ca))
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


@pytest.mark.parametrize("firmware", ["legacy", "localapi"])
def test_every_value_path_resolves_against_a_real_summary(
    firmware: str, simulator: Simulator, localapi_sim: Simulator, make_gateway: Callable[..., Gateway]
) -> None:
    sim = simulator if firmware == "legacy" else localapi_sim
    gw = make_gateway(sim.url, {"server": {"tls": "self-signed"}, "upstream": {"firmware": firmware, "serial": SERIAL}})
    (entry,) = load_package()["rest"]
    answer = summary_as_home_assistant_reads_it(gw, entry["timeout"])
    assert answer["firmware"] == firmware
    for sensor in entry["sensor"]:
        value = render(sensor["value_template"], answer)
        cls = sensor.get("device_class")
        if cls in ("power", "energy") or sensor.get("state_class"):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), (sensor["name"], value)
        if cls == "energy":
            assert value > 0, sensor["name"]  # total_increasing: a 0 would read as a meter reset
        if cls == "timestamp":
            assert dt.datetime.fromisoformat(value).tzinfo is not None, value
        if "json_attributes_path" in sensor:
            attributes = json_path(sensor["json_attributes_path"], answer)
            assert isinstance(attributes, dict)
            missing = [a for a in sensor["json_attributes"] if a not in attributes]
            assert missing == [], (sensor["name"], missing)
    assert render("{{ value_json.pvs.serial }}", answer) == SERIAL
