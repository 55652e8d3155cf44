"""pvs-gateway: a secure, caching, read-only gateway for the SunPower PVS local API."""

__version__ = "0.1.0"
