"""Sample responses shipped in ``data/`` (copied from public sources, see data/README.md)."""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from typing import Any

DEVICE_LIST = "legacy_DeviceList_pvs6_2025-09_build61839_minimal.json"
GET_COMM = "legacy_Get_Comm_pvs6_2021-10.json"
GRID_PROFILE_GET = "legacy_GridProfileGet_pvs6.json"
GRID_PROFILE_REFRESH = "legacy_GridProfileRefresh_pvs6_2020-09.json"
CHECK_FW = "legacy_CheckFW_pvs6.json"
START = "legacy_Start_pvs6_2025-06_build61839.json"
STOP = "legacy_Stop_pvs6_2025.json"
VARS_ROOT = "localapi_vars_match_root_obj_fmt_pvs6_2025-09_build61845.json"
WS_POWER = "websocket_9002_power_notification.json"


@functools.cache
def _load(name: str) -> Any:
    text = resources.files(__package__).joinpath("data", name).read_text(encoding="utf-8")
    return json.loads(text)


def sample(name: str) -> Any:
    """A private copy of a sample; callers may change it."""
    return copy.deepcopy(_load(name))
