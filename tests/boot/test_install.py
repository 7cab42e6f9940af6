"""`make install` and `make uninstall` in the boot test's Debian rootfs: runtime only (no
development extras), PREFIX followed by the unit and the sudoers example, DESTDIR staging
nothing outside it, and uninstall leaving the files the rootfs had before.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from boot_support import (
    CACHE_DIR,
    INSTALL_TIMEOUT,
    TIMINGS,
    BaseRecipe,
    Rootfs,
    copy_checkout,
    ensure_base,
    file_list,
    remove_tree,
)
from ci_gate import skip_or_fail_in_ci

pytestmark = [pytest.mark.root, pytest.mark.slow]

SOURCE = "/usr/src/hostwall"
PREFIX = "/opt/site"
# make install brings the runtime's system packages when they are missing; they stay
# (other software may use them), so they are there before the file list is taken.
RUNTIME_PACKAGES = ("nftables", "libnftables1", "python3-venv", "python3-systemd")


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Rootfs]:
    if os.geteuid() != 0:
        skip_or_fail_in_ci("make install in a rootfs needs root (mounts, systemd-nspawn)", "the install tests")
    base = ensure_base(BaseRecipe.for_this_host(), TIMINGS.append)
    work = Path(tempfile.mkdtemp(prefix="hostwall-install-", dir=CACHE_DIR))
    try:
        fs = Rootfs(base, work)
        with fs.mounted() as root:
            copy_checkout(root / SOURCE.lstrip("/"))
            (root / SOURCE.lstrip("/") / "LICENSE").write_bytes(Path(__file__).resolve().parents[2].joinpath(
                "LICENSE").read_bytes())
            fs.run("apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq")
            fs.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *RUNTIME_PACKAGES)
        yield fs
    finally:
        remove_tree(work)


def test_install_then_uninstall_leaves_the_files_of_before(rootfs: Rootfs) -> None:
    with rootfs.mounted() as root:
        before = file_list(root)
        rootfs.run("make", "install", f"PREFIX={PREFIX}", chdir=SOURCE, timeout=INSTALL_TIMEOUT)
        after_install = file_list(root)
        added = after_install - before
        assert f"{PREFIX}/bin/hostwall" in added
        assert os.readlink(root / PREFIX.lstrip("/") / "bin/hostwall") == "/opt/hostwall/bin/hostwall"
        unit = (root / "etc/systemd/system/hostwall.service").read_text().splitlines()
        assert f"ExecStart={PREFIX}/bin/hostwall agent" in unit
        sudoers = (root / PREFIX.lstrip("/") / "share/doc/hostwall/sudoers.hostwall.example").read_text()
        assert f"{PREFIX}/bin/hostwall apply" in sudoers
        for page in ("hostwall.8", "hostwall-disable.8", "hostwall-agent.8"):
            assert f"{PREFIX}/share/man/man8/{page}" in added, page
        assert "/etc/default/hostwall" in added and "/etc/hostwall/policies/" in added
        # Runtime only: no test or lint tools, and the systemd binding is Debian's (no compiler).
        packages = {p.name.split("-")[0].lower() for p in
                    (root / "opt/hostwall/lib").glob("python3.*/site-packages/*.dist-info")}
        assert packages.isdisjoint({"pytest", "hypothesis", "ruff", "mypy", "ansible_core"}), packages
        assert not any(p.startswith("systemd_python") for p in packages), packages
        version = rootfs.run("/opt/site/bin/hostwall", "--version").stdout.strip()
        assert version == "hostwall, version 0.1.0"
        # The installed command validates the installed examples.
        result = rootfs.run("/opt/site/bin/hostwall", "validate", f"{PREFIX}/share/doc/hostwall/examples/partners.yaml")
        assert result.stdout.startswith("valid:"), result.stdout

        rootfs.run("make", "uninstall", f"PREFIX={PREFIX}", chdir=SOURCE)
        after = file_list(root)
    # The state directory is hostwall's data (validate above wrote its list cache there),
    # not something make install put down: it stays, as the README says.
    leftovers = {p for p in after - before if not p.startswith((f"{SOURCE}/", "/var/lib/hostwall/"))}
    assert sorted(leftovers) == []
    assert sorted(before - after) == []


def test_destdir_stages_everything_under_it(rootfs: Rootfs) -> None:
    with rootfs.mounted() as root:
        before = file_list(root)
        rootfs.run("make", "install", "DESTDIR=/srv/stage", "PREFIX=/usr", chdir=SOURCE, timeout=INSTALL_TIMEOUT)
        added = {p for p in file_list(root) - before if not p.startswith(f"{SOURCE}/")}
        staged = root / "srv/stage"
        unit = (staged / "etc/systemd/system/hostwall.service").read_text().splitlines()
        assert "ExecStart=/usr/bin/hostwall agent" in unit
        # Scripts name the interpreter where it will be, not where it was staged.
        shebang = (staged / "opt/hostwall/bin/hostwall").read_text().splitlines()[0]
        assert shebang == "#!/opt/hostwall/bin/python"
        assert "/srv/stage" not in (staged / "opt/hostwall/pyvenv.cfg").read_text()
    assert added and all(p.startswith("/srv/") for p in added), sorted(p for p in added if not p.startswith("/srv/"))
