#!/bin/sh
# `ansible-test sanity` on the built collection (make collection-sanity), without containers:
# the collection is installed from dist/ into a temporary ansible_collections tree, where
# ansible-test needs it, outside this git checkout (inside it, ansible-test would list the
# files through git and find none), and the tests run there with this project's Python 3.11.
#
# ansible-test bootstraps pip into each test's virtual environment with a get-pip.py that
# it downloads from a site that may be unreachable (only package indexes are); a stand-in
# in a HOME of its own (which also caches the test environments between runs) installs
# the same pinned pip with ensurepip and the package index.
set -eu

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
CACHE=${HOSTWALL_ANSIBLE_TEST_HOME:-${HOME:-/root}/.cache/hostwall-ansible-test}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hostwall-ansible-test.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$CACHE/.ansible/test/cache"
"$VENV/bin/ansible-galaxy" collection install --force -p "$WORK" dist/hostwall-firewall-*.tar.gz
for version in 24_2 25_0 25_1; do
	cat > "$CACHE/.ansible/test/cache/get_pip_$version.py" <<'PY'
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"])
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", *args])
PY
done
cd "$WORK/ansible_collections/hostwall/firewall"
HOME=$CACHE PATH=$ROOT/$VENV/bin:$PATH "$ROOT/$VENV/bin/ansible-test" sanity --python 3.11 --color no "$@"
