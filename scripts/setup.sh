#!/usr/bin/env bash
# Installs everything hostwall needs on a Debian/Ubuntu host: system packages, then a
# virtual environment with the Python dependencies. Safe to run again.
# With --tests it also installs what the test suite runs against (nginx, PostgreSQL),
# which `make install` must never put on a production host.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
packages=(nftables libnftables1 iproute2 libsystemd-dev pkg-config gcc python3-venv python3-dev
          systemd make sudo ruby)
# The security battery runs real services in the lab namespaces and real clients against them.
if [ "${1:-}" = "--tests" ]; then
  packages+=(nginx postgresql curl openssl)
fi

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing system packages: ${missing[*]}; run as root (make ... as root, or sudo make ...)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  # Package scripts must not start nginx or PostgreSQL on the host: the tests start their own
  # copies inside namespaces. policy-rc.d is the Debian switch for that; put back as found.
  no_start=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && no_start=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$no_start" ] || rm -f /usr/sbin/policy-rc.d
fi

stamp="$VENV/.hostwall-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # setuptools advises on every editable install that a folder named like the package
  # shadows it; that is the point of one here. Deprecations and other warnings still show.
  PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
# An editable install leaves hostwall uncompiled, and under PYTHONDONTWRITEBYTECODE every
# start would compile each module again (about 50 ms); an installed package is compiled.
"$VENV/bin/python" -m compileall -q hostwall >/dev/null
