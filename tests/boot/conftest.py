"""Fixtures for the boot test: hostwall installed with `make install` into a Debian rootfs,
and systemd booted from it as PID 1 of a container whose network is a lab namespace.

Without root the test skips, except in CI, where a skip would hide that the unit was
never booted, so it fails instead. debootstrap and systemd-nspawn are installed with
apt-get when missing (they are test tools, not something `make install` should put on
a host).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from boot_support import (
    CACHE_DIR,
    COMMAND_TIMEOUT,
    TIMINGS,
    BaseRecipe,
    Boot,
    Booted,
    Files,
    Installed,
    booted,
    ensure_base,
    make_install,
    mount_overlay,
    mounts_under,
    remove_tree,
    tail,
    unmount_under,
)
from ci_gate import skip_or_fail_in_ci

TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux",
         "ip": "iproute2", "nft": "nftables", "chroot": "coreutils", "mount": "mount",
         "ssh": "openssh-client", "ssh-keygen": "openssh-client"}  # the last two: the lab (twin.py)


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (f"{d}/{tool}" for d in ("/usr/sbin", "/sbin") if Path(f"{d}/{tool}").exists()), None)


def _missing_tools() -> list[str]:
    return sorted({package for tool, package in TOOLS.items() if _which(tool) is None})


def _missing_privileges() -> str | None:
    if os.geteuid() != 0:
        return "the boot test needs root (debootstrap, mounts, systemd-nspawn): run it with sudo"
    missing = _missing_tools()
    if missing and shutil.which("apt-get"):
        environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=15 * 60,
                                    check=False)
            if result.returncode != 0:
                return f"{' '.join(command)} failed: {tail(result.stderr, 10)}"
        missing = _missing_tools()
    if missing:
        return f"the boot test needs the packages {', '.join(missing)}"
    return None


@pytest.fixture(scope="session")
def privileges() -> None:
    skip_or_fail_in_ci(_missing_privileges(), "the boot tests")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("boot test timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)


def _root_tables() -> str:
    # Reading only: the boot test never changes the root namespace's firewall.
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True,
                          timeout=COMMAND_TIMEOUT).stdout


def _namespaces(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True,
                             timeout=COMMAND_TIMEOUT).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="session")
def installed(privileges: None) -> Iterator[Installed]:
    """The cached base rootfs (built when missing) and this session's `make install` layer.
    Afterwards: no hostwall table in the root namespace, no lab namespace, no mount and
    no file of this session left."""
    started = time.monotonic()
    recipe = BaseRecipe.for_this_host()
    cached = recipe.path().exists()
    base = ensure_base(recipe, TIMINGS.append)
    TIMINGS.append(f"base rootfs {base}: {'cached' if cached else 'built'} "
                   f"({time.monotonic() - started:.1f} s; {recipe.source.suite} from {recipe.source.uri})")
    work = Path(tempfile.mkdtemp(prefix="hostwall-boot-", dir=CACHE_DIR))
    try:
        layer, root = work / "install" / "upper", work / "install" / "root"
        started = time.monotonic()
        mount_overlay([base], layer, work / "install" / "work", root)
        try:
            result = make_install(root, f"hwinst{os.getpid()}")
        finally:
            unmount_under(root)
        if result.returncode != 0:
            pytest.fail(f"`make install` in the rootfs failed ({result.returncode}):\n"
                        f"{tail(result.stdout)}\n{tail(result.stderr)}", pytrace=False)
        TIMINGS.append(f"make install into the rootfs: {time.monotonic() - started:.1f} s")
        yield Installed(base, layer, work)
    finally:
        remove_tree(work)
    assert "table inet hostwall" not in _root_tables(), "a hostwall table appeared in the root namespace"
    assert _namespaces(f"hwboot{os.getpid()}x") == [], "lab namespaces of this session were left behind"
    assert not mounts_under(work) and not work.exists(), f"{work} was not removed"


@pytest.fixture(scope="session")
def boot(request: pytest.FixtureRequest, installed: Installed) -> Boot:
    """boot(files, units to enable): a context manager around one booted container."""

    def start(files: Files, enable: tuple[str, ...]) -> contextlib.AbstractContextManager[Booted]:
        return booted(installed, files, enable, lambda: request.session.testsfailed)

    return start
