#!/usr/bin/env bash
# What `python -m bench` drives: wrk, Caddy and nginx (Debian packages), taskset
# (util-linux) and py-spy (PyPI, into the interpreter running the bench).
# Idempotent; needs root (or sudo) only when a Debian package is missing.
# Usage: bench/deps.sh [PYTHON]
set -euo pipefail
PYTHON="${1:-python3}"

apt_packages=()
command -v wrk >/dev/null || apt_packages+=(wrk)
command -v caddy >/dev/null || apt_packages+=(caddy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_packages+=(nginx)
command -v taskset >/dev/null || apt_packages+=(util-linux)
if ((${#apt_packages[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "bench: installing Debian packages: ${apt_packages[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # --no-install-recommends; policy-rc.d keeps the packaged nginx/caddy services from starting.
  tmp_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ] && [ "$(id -u)" -eq 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && tmp_policy=1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
  [ -z "$tmp_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

if ! "$PYTHON" -c "import shutil, sys, os; d=os.path.dirname(sys.executable); sys.exit(0 if shutil.which('py-spy', path=d) or shutil.which('py-spy') else 1)"; then
  echo "bench: installing py-spy"
  "$PYTHON" -m pip install --quiet "py-spy>=0.4"
fi
