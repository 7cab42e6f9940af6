"""The Debian package, installed with apt into the boot test's Debian rootfs: the command
runs, the shipped examples validate, the unit does nothing without a policy and runs the
agent with one (booted with systemd), `remove` keeps /etc/hostwall, and `purge` leaves
the rootfs with exactly the files it had before the install.

The package is built from a copy of this checkout with `make deb` (debhelper on this
host), or taken from HOSTWALL_DEB when that names a built one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from boot_support import (
    APT_TIMEOUT,
    CACHE_DIR,
    REPO,
    SOURCE_PATHS,
    TIMINGS,
    BaseRecipe,
    Booted,
    Installed,
    Machine,
    Rootfs,
    booted,
    ensure_base,
    file_list,
    nft_in,
    remove_tree,
    tail,
)
from ci_gate import skip_or_fail_in_ci

from hostwall.lab import Lab

pytestmark = [pytest.mark.root, pytest.mark.slow]

BUILD_TOOLS = ("debhelper", "dpkg-dev", "python3-venv", "python3-dev", "libsystemd-dev", "pkgconf", "lintian")
BUILD_TIMEOUT = 20 * 60
POLICY_FILE = "/etc/hostwall/policies/site.yaml"


def _missing_build_tools() -> list[str]:
    missing = []
    for package in BUILD_TOOLS:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True,
                                check=False).stdout
        if "install ok installed" not in status:
            missing.append(package)
    return missing


def _build(work: Path) -> Path:
    source = work / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    # A build in the checkout leaves debhelper's work in debian/: not part of the source.
    ignore_in_debian = shutil.ignore_patterns("hostwall", "files", ".debhelper", "*.substvars",
                                              "debhelper-build-stamp")
    for name in (*SOURCE_PATHS, "debian", "LICENSE"):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore_in_debian if name == "debian" else ignore)
        else:
            shutil.copy2(path, source / name)
    result = subprocess.run(["make", "deb"], cwd=source, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                            check=False)
    if result.returncode != 0:
        pytest.fail(f"make deb failed ({result.returncode}):\n{tail(result.stdout)}\n{tail(result.stderr)}",
                    pytrace=False)
    built = sorted((source / "dist").glob("hostwall_*.deb"))
    assert len(built) == 1, built
    return built[0]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        skip_or_fail_in_ci("the package test needs root (mounts, systemd-nspawn)", "the package tests")
    given = os.environ.get("HOSTWALL_DEB")
    if given:
        return Path(given)
    missing = _missing_build_tools()
    if missing:
        result = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq",
                                 "--no-install-recommends", *missing], capture_output=True, text=True,
                                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=APT_TIMEOUT,
                                check=False)
        skip_or_fail_in_ci(None if result.returncode == 0 else f"cannot install {missing}: {tail(result.stderr)}",
                           "the package tests")
    started = time.monotonic()
    built = _build(tmp_path_factory.mktemp("deb"))
    TIMINGS.append(f"make deb: {time.monotonic() - started:.1f} s")
    return built


@pytest.fixture(scope="module")
def rootfs(deb: Path) -> Iterator[Rootfs]:
    base = ensure_base(BaseRecipe.for_this_host(), TIMINGS.append)
    work = Path(tempfile.mkdtemp(prefix="hostwall-deb-", dir=CACHE_DIR))
    try:
        yield Rootfs(base, work)
    finally:
        remove_tree(work)


@pytest.fixture(scope="module")
def installed(rootfs: Rootfs, deb: Path) -> Iterator[tuple[set[str], Rootfs]]:
    """The package installed with apt; yields the file list from before the install."""
    with rootfs.mounted() as root:
        before = file_list(root)
        shutil.copy2(deb, root / "var/tmp" / deb.name)
        started = time.monotonic()
        rootfs.run("apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-qq")
        rootfs.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", f"/var/tmp/{deb.name}")
        (root / "var/tmp" / deb.name).unlink()
        TIMINGS.append(f"apt-get install of {deb.name}: {time.monotonic() - started:.1f} s")
    yield before, rootfs


def test_the_command_runs_and_the_examples_validate(installed: tuple[set[str], Rootfs]) -> None:
    _before, rootfs = installed
    with rootfs.mounted() as root:
        version = rootfs.run("hostwall", "--version").stdout
        assert version.strip() == "hostwall, version 0.1.0"
        assert os.readlink(root / "usr/bin/hostwall") == "/opt/hostwall/bin/hostwall"
        examples = sorted(p.name for p in (root / "usr/share/doc/hostwall/examples").iterdir())
        assert "partners.yaml" in examples and "b2b-partner.yaml" in examples, examples
        for name in examples:
            if name.endswith(".yaml"):
                result = rootfs.run("hostwall", "validate", f"/usr/share/doc/hostwall/examples/{name}", check=False)
                assert result.returncode == 0, (name, result.stdout, result.stderr)
                assert result.stdout.startswith("valid:"), result.stdout


def test_the_package_ships_what_an_operator_expects(installed: tuple[set[str], Rootfs]) -> None:
    _before, rootfs = installed
    with rootfs.mounted() as root:
        for path in ("usr/share/man/man8/hostwall.8.gz", "usr/share/man/man8/hostwall-apply.8.gz",
                     "usr/share/man/man8/hostwall-disable.8.gz",
                     "usr/share/bash-completion/completions/hostwall",
                     "usr/share/zsh/vendor-completions/_hostwall",
                     "usr/share/fish/vendor_completions.d/hostwall.fish",
                     "usr/lib/systemd/catalog/hostwall.catalog", "etc/default/hostwall",
                     "usr/share/doc/hostwall/sudoers.hostwall.example"):
            assert (root / path).is_file(), path
        assert not (root / "etc/sudoers.d/hostwall").exists(), "the sudoers drop-in is an example only"
        assert list((root / "etc/hostwall/policies").iterdir()) == []
        unit = (root / "lib/systemd/system/hostwall.service").read_text()
        assert "ExecStart=/usr/bin/hostwall agent" in unit.splitlines()
        assert "Documentation=man:hostwall(8) man:hostwall-agent(8) man:nft(8)" in unit.splitlines()
        assert (root / "etc/systemd/system/multi-user.target.wants/hostwall.service").is_symlink()
        conffiles = (root / "var/lib/dpkg/info/hostwall.conffiles").read_text().split()
        assert conffiles == ["/etc/default/hostwall"]
        assert "hostwall-operators:" in (root / "etc/group").read_text()
        sudoers = (root / "usr/share/doc/hostwall/sudoers.hostwall.example").read_text()
        assert "/usr/bin/hostwall apply" in sudoers and "/usr/local/bin" not in sudoers
        # Installing twice (postinst again) changes nothing and fails on nothing.
        rootfs.run("dpkg-reconfigure", "hostwall")
        assert (root / "etc/group").read_text().count("hostwall-operators:") == 1


def test_an_upgrade_keeps_the_operators_settings(installed: tuple[set[str], Rootfs], deb: Path) -> None:
    _before, rootfs = installed
    with rootfs.mounted() as root:
        settings = root / "etc/default/hostwall"
        edited = settings.read_text() + "HOSTWALL_FULL_CHECK_INTERVAL=30\n"
        settings.write_text(edited)
        shutil.copy2(deb, root / "var/tmp" / deb.name)
        # The same package again takes the upgrade path: prerm upgrade, unpack, postinst configure.
        rootfs.run("apt-get", "install", "-y", "-qq", "--reinstall", f"/var/tmp/{deb.name}")
        (root / "var/tmp" / deb.name).unlink()
        assert settings.read_text() == edited
        assert rootfs.run("hostwall", "--version").stdout.strip() == "hostwall, version 0.1.0"
        # Byte-compiled again by postinst (prerm removed the old bytecode).
        assert list((root / "opt/hostwall/lib").glob("python3.*/site-packages/hostwall/__pycache__/*.pyc"))


def test_lintian_reports_nothing_that_is_not_overridden_with_a_reason(deb: Path) -> None:
    result = subprocess.run(["lintian", "--pedantic", "--info", "--fail-on", "error,warning,info,pedantic",
                             str(deb)], capture_output=True, text=True, timeout=APT_TIMEOUT, check=False)
    findings = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:", "X:")]
    assert result.returncode == 0 and findings == [], result.stdout + result.stderr
    overrides = (REPO / "debian" / "hostwall.lintian-overrides").read_text().splitlines()
    for number, line in enumerate(overrides):
        if line.startswith("hostwall:"):
            assert number > 0 and overrides[number - 1].startswith(("#", "hostwall:")), line


def _files(policy_text: str | None) -> dict[str, str]:
    return {POLICY_FILE: policy_text} if policy_text is not None else {}


def _wait_for_table(machine: Machine, lab: Lab, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if nft_in(lab.server, "list", "table", "inet", "hostwall").returncode == 0:
            return True
        time.sleep(0.2)
    return False


def test_booted_without_a_policy_nothing_enforces_then_the_agent_runs_with_one(
    request: pytest.FixtureRequest, installed: tuple[set[str], Rootfs]
) -> None:
    _before, rootfs = installed
    state = Installed(rootfs.base, rootfs.layer, rootfs.work)
    with booted(state, lambda _lab: {}, (), lambda: request.session.testsfailed) as boot:
        machine, lab = boot.machine, boot.lab
        shown = machine.show("hostwall", "ActiveState", "ConditionResult", "UnitFileState")
        assert shown == {"ActiveState": "inactive", "ConditionResult": "no", "UnitFileState": "enabled"}, shown
        assert nft_in(lab.server, "list", "table", "inet", "hostwall").returncode != 0, \
            "the package enforced a firewall on a host without a policy"

        allow = [{"cidr": f"{lab.allowed.ipv4}/32", "owner": "deb-test", "reason": "lab client",
                  "review_by": "2099-01-01"}]
        machine.write(POLICY_FILE, yaml.safe_dump({"services": {"postgres": {"allow": allow, "log": "off"}}}))
        machine.run("systemctl", "start", "hostwall")
        assert _running(boot)
        status = machine.run("hostwall", "status", "--drops", "0", check=False)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "generation 1 loaded" in status.stdout and "agent: running" in status.stdout, status.stdout
        # The catalog postinst compiled explains the agent's records.
        assert "hostwall" in machine.run("journalctl", "--list-catalog", "--no-pager").stdout


def _running(boot: Booted) -> bool:
    machine = boot.machine
    assert _wait_for_table(machine, boot.lab), machine.journal("-u", "hostwall")
    shown = machine.show("hostwall", "ActiveState", "ExecMainStatus", "FragmentPath")
    assert shown["ActiveState"] == "active", (shown, machine.journal("-u", "hostwall"))
    assert shown["FragmentPath"] == "/lib/systemd/system/hostwall.service"
    return True


def test_remove_keeps_the_configuration_and_purge_leaves_nothing(installed: tuple[set[str], Rootfs]) -> None:
    before, rootfs = installed
    with rootfs.mounted() as root:
        (root / POLICY_FILE.lstrip("/")).write_text("services: {}\n")
        (root / "var/lib/hostwall/current.json").write_text("{}\n")
        rootfs.run("apt-get", "remove", "-y", "-qq", "hostwall")
        assert not (root / "usr/bin/hostwall").exists() and not (root / "opt/hostwall").exists()
        assert (root / "etc/default/hostwall").is_file()
        assert (root / POLICY_FILE.lstrip("/")).is_file()
        rootfs.run("apt-get", "purge", "-y", "-qq", "--autoremove", "hostwall")
        after = file_list(root)
        assert "hostwall-operators" not in (root / "etc/group").read_text()
    assert sorted(after - before) == []
    assert sorted(before - after) == []
