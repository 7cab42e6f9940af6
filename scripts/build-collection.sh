#!/bin/sh
# Builds the hostwall.firewall Ansible collection (make collection):
#   scripts/build-collection.sh [OUTPUT_DIR]    (default: dist)
#
# The collection's source is ansible/hostwall/firewall. Its role installs files that live
# elsewhere in this repository (the systemd unit, the journald catalog, the sudoers
# example) and hostwall itself, so the build copies the source to a temporary directory,
# adds those files and a hostwall wheel to roles/hostwall/files/, and runs
# `ansible-galaxy collection build` there. The tarball needs nothing from this repository.
set -eu

OUTPUT=$(realpath -m "${1:-dist}")
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/hostwall-collection.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
FILES=$STAGE/firewall/roles/hostwall/files

cp -a ansible/hostwall/firewall "$STAGE/firewall"
rm -rf "$FILES" "$STAGE/firewall/tests/output"
mkdir -p "$FILES/dist" "$OUTPUT"
cp units/hostwall.service units/hostwall.catalog units/sudoers.hostwall "$FILES/"
cp LICENSE "$STAGE/firewall/LICENSE"
"$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$FILES/dist" .
"$VENV/bin/ansible-galaxy" collection build "$STAGE/firewall" --output-path "$OUTPUT" --force
