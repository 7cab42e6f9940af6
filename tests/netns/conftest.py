"""Fixtures for the namespace tests: a real kernel, a throw-away lab, the real CLI.

Every kernel call goes into a network namespace the test created (``--netns`` or
``ip netns exec``); the root namespace's firewall is only ever read, to prove it was
left alone. Without root the tests skip, except in CI, where a skip would hide that
the kernel path was never exercised, so they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ci_gate import skip_or_fail_in_ci
from netns_support import (
    COMMAND_TIMEOUT,
    Cli,
    CliJson,
    Journald,
    Nft,
    PolicyWriter,
    RejectingBackend,
    output,
    run_nft,
)

from hostwall.engine import Engine
from hostwall.lab import Lab, running_lab
from hostwall.nft import NftBackend
from hostwall.state import StateDir


def _missing_privileges() -> str | None:
    if os.geteuid() != 0:
        return "the namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN): run them with sudo"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"the namespace tests need {' and '.join(missing)} (iproute2, nftables)"
    return None


@pytest.fixture(scope="session")
def privileges() -> None:
    skip_or_fail_in_ci(_missing_privileges(), "the namespace tests")


def _root_tables() -> list[str]:
    # Reading only: nothing in these tests changes the root namespace's firewall.
    listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                             check=True, timeout=COMMAND_TIMEOUT)
    return listing.stdout.splitlines()


def _session_namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             check=True, timeout=COMMAND_TIMEOUT)
    prefix = f"hw{os.getpid()}x"  # running_lab()'s default prefix for this process
    return [line.split()[0] for line in listing.stdout.splitlines() if line.startswith(prefix)]


def _thread_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.fixture(scope="session", autouse=True)
def root_namespace_untouched(privileges: None) -> Iterator[None]:
    """After the session: no hostwall table in the root namespace, no lab left behind."""
    namespace = _thread_netns()
    yield
    assert _thread_netns() == namespace, "the test process did not return to its own namespace"
    assert "table inet hostwall" not in _root_tables(), "a hostwall table leaked into the root namespace"
    assert _session_namespaces() == [], "namespaces of this test session were left behind"


@pytest.fixture
def lab(privileges: None) -> Iterator[Lab]:
    with running_lab() as created:
        yield created


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    path = tmp_path / "policies"
    path.mkdir()
    return path


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def write_policy(policy_dir: Path) -> PolicyWriter:
    """write_policy({"https": ["10.77.1.2/32"]}, action={"postgres": "reject"}, ports={...}).

    Replaces every file in the policy directory: the policy is exactly what is given.
    """

    def write(
        services: dict[str, list[str]],
        *,
        action: dict[str, str] | None = None,
        ports: dict[str, list[int | str]] | None = None,
        protocols: dict[str, list[str]] | None = None,
    ) -> Path:
        for old in policy_dir.iterdir():
            old.unlink()
        document: dict[str, Any] = {"services": {}}
        for name, cidrs in services.items():
            service: dict[str, Any] = {}
            if ports and name in ports:
                service["ports"] = ports[name]
            if protocols and name in protocols:
                service["protocols"] = protocols[name]
            if action and name in action:
                service["action"] = action[name]
            service["allow"] = [
                {"cidr": cidr, "owner": "netns-tests", "reason": f"test entry for {name}",
                 "review_by": "2099-01-01"}
                for cidr in cidrs
            ]
            document["services"][name] = service
        path = policy_dir / "policy.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    return write


@pytest.fixture
def hostwall(lab: Lab, policy_dir: Path, state_dir: Path) -> Cli:
    """Run the real CLI as a subprocess, pointed at the lab's server namespace."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "hostwall", "--netns", lab.server,
                   "--policy-dir", str(policy_dir), "--state-dir", str(state_dir), *args]
        return subprocess.run(command, capture_output=True, text=True, env=environment,
                              timeout=COMMAND_TIMEOUT, check=False)

    return run


@pytest.fixture
def cli_json(hostwall: Cli) -> CliJson:
    """hostwall ... --json: (exit code, parsed document)."""

    def run(*args: str) -> tuple[int, Any]:
        result = hostwall(*args, "--json")
        return result.returncode, output(result)

    return run


@pytest.fixture
def nft(lab: Lab) -> Nft:
    """nft inside the lab's server namespace."""

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_nft(lab.server, *args, stdin=stdin, check=check)

    return run


@pytest.fixture
def backend(lab: Lab) -> Iterator[NftBackend]:
    """The real backend in-process, pointed at the lab's server namespace."""
    created = NftBackend(lab.server)
    yield created
    created.close()


@pytest.fixture
def rejecting_engine(lab: Lab, state_dir: Path) -> Iterator[Engine]:
    """An in-process engine whose every full-load transaction the kernel refuses."""
    rejecting = RejectingBackend(lab.server)
    yield Engine(rejecting, StateDir(state_dir))
    rejecting.close()


@pytest.fixture(scope="session")
def journald(privileges: None) -> Iterator[Journald]:
    """A listening journald for the session (started here on machines without systemd)."""
    controller = Journald()
    controller.start()
    yield controller
    controller.stop()
