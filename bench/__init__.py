"""Benchmarks of pvs-gateway against the anchors (Caddy, nginx, bare uvicorn + Starlette): `python -m bench`."""
