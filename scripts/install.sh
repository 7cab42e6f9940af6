#!/usr/bin/env bash
# Installs hostwall's runtime: a private virtual environment with the Python dependencies
# (no development extras), the command, the systemd unit (ExecStart follows PREFIX), the
# journald catalog, man pages and shell completions generated from the commands, the
# agent's settings file, an empty policy directory, and the examples.
#
#   scripts/install.sh install      (make install; debian/rules with DESTDIR)
#   scripts/install.sh uninstall    (make uninstall)
#
# Settings from the environment (the Makefile passes its variables): DESTDIR, PREFIX,
# INSTALL_VENV, UNITDIR, CATALOGDIR, SYSCONFDIR, DOCDIR, MANDIR, PYTHON, and
# SYSTEM_SYSTEMD=1 to take the systemd binding from Debian's python3-systemd (no C
# compiler needed) instead of building it from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
INSTALL_VENV=${INSTALL_VENV:-/opt/hostwall}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CATALOGDIR=${CATALOGDIR:-/usr/lib/systemd/catalog}
SYSCONFDIR=${SYSCONFDIR:-/etc}
DOCDIR=${DOCDIR:-$PREFIX/share/doc/hostwall}
MANDIR=${MANDIR:-$PREFIX/share/man}
PYTHON=${PYTHON:-/usr/bin/python3}  # Debian's, whatever else is first on PATH
SYSTEM_SYSTEMD=${SYSTEM_SYSTEMD:-0}
# What make uninstall removes: every file written here, by its final path.
MANIFEST=$INSTALL_VENV/installed-files
RUNTIME_PACKAGES=(nftables libnftables1 python3-venv)
[ "$SYSTEM_SYSTEMD" = 1 ] && RUNTIME_PACKAGES+=(python3-systemd)

installed=()  # files, and directories (with a trailing /) that did not exist before

make_dir() {  # make_dir DIR: create it and its missing parents, remembered for uninstall
  local directory=$1 missing=()
  while [ ! -d "$DESTDIR$directory" ]; do
    missing+=("$directory/")
    directory=$(dirname "$directory")
  done
  install -d -m 0755 "$DESTDIR$1"
  [ ${#missing[@]} -eq 0 ] || installed+=("${missing[@]}")
}

put() {  # put MODE SOURCE TARGET: install one file, remembered for uninstall
  make_dir "$(dirname "$3")"
  install -m "$1" "$2" "$DESTDIR$3"
  installed+=("$3")
}

install_packages() {
  local missing=() package
  for package in "${RUNTIME_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" -ne 0 ]; then
    echo "install: missing system packages: ${missing[*]}; run as root (sudo make install)" >&2
    exit 1
  fi
  echo "install: installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

do_install() {
  [ -z "$DESTDIR" ] && command -v dpkg-query >/dev/null && install_packages
  local venv=$DESTDIR$INSTALL_VENV flags=(--clear)
  [ "$SYSTEM_SYSTEMD" = 1 ] && flags+=(--system-site-packages)
  "$PYTHON" -m venv "${flags[@]}" "$venv"
  "$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check .
  if [ -n "$DESTDIR" ]; then
    # Scripts name the interpreter by the path they were built at; they run from INSTALL_VENV.
    grep -rlI --null -F "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s|$venv|$INSTALL_VENV|g"
  fi

  make_dir "$PREFIX/bin"
  ln -sfn "$INSTALL_VENV/bin/hostwall" "$DESTDIR$PREFIX/bin/hostwall"
  installed+=("$PREFIX/bin/hostwall")

  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  sed "s|/usr/local/bin/hostwall|$PREFIX/bin/hostwall|g" units/hostwall.service >"$work/hostwall.service"
  put 0644 "$work/hostwall.service" "$UNITDIR/hostwall.service"
  put 0644 units/hostwall.catalog "$CATALOGDIR/hostwall.catalog"

  "$venv/bin/python" scripts/gendocs.py --man "$work/man" --completions "$work/completions"
  local page
  for page in "$work"/man/*.8; do
    put 0644 "$page" "$MANDIR/man8/$(basename "$page")"
  done
  local zsh_dir=$PREFIX/share/zsh/site-functions
  [ "$PREFIX" = /usr ] && zsh_dir=/usr/share/zsh/vendor-completions
  put 0644 "$work/completions/hostwall" "$PREFIX/share/bash-completion/completions/hostwall"
  put 0644 "$work/completions/_hostwall" "$zsh_dir/_hostwall"
  put 0644 "$work/completions/hostwall.fish" "$PREFIX/share/fish/vendor_completions.d/hostwall.fish"

  make_dir "$SYSCONFDIR/hostwall/policies"
  # An operator's settings survive a reinstall (the package manages it as a conffile).
  if [ ! -e "$DESTDIR$SYSCONFDIR/default/hostwall" ]; then
    put 0644 units/hostwall.default "$SYSCONFDIR/default/hostwall"
  fi
  local example
  for example in policies/*.yaml policies/*.txt policies/examples/*.yaml; do
    put 0644 "$example" "$DOCDIR/examples/$(basename "$example")"
  done
  sed "s|/usr/local/bin/hostwall|$PREFIX/bin/hostwall|g" units/sudoers.hostwall >"$work/sudoers.hostwall"
  put 0644 "$work/sudoers.hostwall" "$DOCDIR/sudoers.hostwall.example"

  if [ -z "$DESTDIR" ]; then
    printf '%s\n' "${installed[@]}" >"$MANIFEST"
    journalctl --update-catalog 2>/dev/null || true
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
    echo "installed: write a policy to $SYSCONFDIR/hostwall/policies (examples: $DOCDIR/examples), then:"
    echo "  hostwall validate && systemctl enable --now hostwall"
  fi
}

do_uninstall() {
  if [ ! -f "$MANIFEST" ]; then
    echo "uninstall: $MANIFEST is missing: nothing was installed with make install here" >&2
    exit 1
  fi
  if [ -d /run/systemd/system ] && systemctl is-enabled --quiet hostwall 2>/dev/null; then
    systemctl disable --now hostwall
  fi
  local path
  while IFS= read -r path; do
    case "$path" in
      */) ;;
      "$SYSCONFDIR/default/hostwall")
        # Edited settings are the operator's: kept, like a package's conffile on remove.
        if cmp -s "$path" units/hostwall.default; then rm -f "$path"; else echo "uninstall: kept $path (edited)"; fi ;;
      *) rm -f "$path" ;;
    esac
  done <"$MANIFEST"
  # The directories it created, deepest first; one still holding something (the
  # operator's policies) stays.
  grep '/$' "$MANIFEST" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2- | while IFS= read -r path; do
    rmdir "$path" 2>/dev/null || echo "uninstall: kept $path (not empty)"
  done
  rm -rf "$INSTALL_VENV"
  journalctl --update-catalog 2>/dev/null || true
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
  echo "uninstalled; the state directory /var/lib/hostwall and a loaded hostwall table stay" \
       "(nft delete table inet hostwall removes the table)"
}

case "${1:-}" in
  install) do_install ;;
  uninstall) do_uninstall ;;
  *) echo "usage: $0 install|uninstall" >&2; exit 2 ;;
esac
