"""The command line: output, exit codes and the refusal to run unprivileged."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import hostwall
from hostwall.cli import main
from hostwall.cli.common import has_net_admin
from hostwall.compile import compile_policy
from hostwall.policy import load_policy

META = "        owner: {owner}\n        reason: {reason}\n        review_by: 2099-01-01\n"
POLICY = (
    "services:\n"
    "  https:\n"
    "    allow:\n"
    "      - cidr: 203.0.113.45/32\n" + META.format(owner="partner-b", reason="inventory sync")
    + "      - file: partner.txt\n" + META.format(owner="partner-c", reason="published ranges")
    + "  postgres:\n"
    "    allow:\n"
    "      - cidr: 10.0.1.0/24\n" + META.format(owner="platform", reason="app servers")
)
PARTNER = "# partner-c\n198.51.100.0/25\n198.51.100.128/25\n"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    root = tmp_path / "policy"
    root.mkdir()
    (root / "policy.yaml").write_text(POLICY)
    (root / "partner.txt").write_text(PARTNER)
    return root


def invoke(policy: Path, *args: str) -> Result:
    # click < 8.2 mixes stderr into output unless told not to; 8.2+ always separates it.
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    else:
        runner = CliRunner()
    env = {"HOSTWALL_NETNS": None, "HOSTWALL_POLICY_DIR": None, "HOSTWALL_STATE_DIR": None}
    return runner.invoke(
        main, ["--policy-dir", str(policy), "--state-dir", str(policy.parent / "state"), *args],
        env=env,
    )


# --- validate --------------------------------------------------------------------------------


def test_validate_reports_a_summary(policy_dir: Path) -> None:
    result = invoke(policy_dir, "validate")

    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "valid: 1 file(s), 2 services, 4 entries (3 kernel elements after merging)\n"
    )
    assert result.stderr == ""


def test_validate_takes_a_path_argument(policy_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("services: {}\n")
    result = invoke(policy_dir, "validate", str(other))

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("valid: 1 file(s), 2 services, 0 entries")


def test_validate_warns_about_expired_entries_on_stderr(policy_dir: Path) -> None:
    (policy_dir / "old.yaml").write_text(
        "services:\n  postgres:\n    allow:\n      - cidr: 10.0.2.0/24\n"
        + META.format(owner="platform", reason="retired") + "        expires: 2020-01-01T00:00:00Z\n"
    )
    result = invoke(policy_dir, "validate")

    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"warning: {policy_dir / 'old.yaml'}:4: services.postgres.allow[0]: 10.0.2.0/24 expired "
        "at 2020-01-01T00:00:00Z; not loaded (remove it from the file)\n"
    )
    assert result.stdout.startswith("valid: 2 file(s), 2 services, 4 entries")


def test_validate_json(policy_dir: Path) -> None:
    result = invoke(policy_dir, "validate", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == {
        "valid": True,
        "files": [str(policy_dir / "policy.yaml")],
        "services": {
            "https": {"ports": ["443"], "protocols": ["tcp", "udp"], "action": "drop", "entries": 3},
            "postgres": {"ports": ["5432"], "protocols": ["tcp"], "action": "drop", "entries": 1},
        },
        "entries": 4,
        "kernel_elements": 3,
        "digest": compile_policy(load_policy(policy_dir)).digest,
        "warnings": [],
    }


def test_invalid_policy_exits_3_with_file_and_line_on_stderr(policy_dir: Path) -> None:
    (policy_dir / "policy.yaml").write_text(POLICY.replace("203.0.113.45/32", "203.0.113.45/24"))
    result = invoke(policy_dir, "validate")

    assert result.exit_code == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        f"hostwall: {policy_dir / 'policy.yaml'}:4: services.https.allow[0].cidr "
        "(cidr 203.0.113.45/24): "
    )
    assert "203.0.113.45/32" in lines[0] and "203.0.113.0/24" in lines[0]


def test_several_problems_are_one_line_each_and_a_summary(policy_dir: Path) -> None:
    (policy_dir / "policy.yaml").write_text(
        POLICY.replace("203.0.113.45/32", "300.1.2.3").replace("10.0.1.0/24", "0.0.0.0/0")
    )
    result = invoke(policy_dir, "validate")

    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert [line.split(": ")[1] for line in lines[:2]] == [
        f"{policy_dir / 'policy.yaml'}:4", f"{policy_dir / 'policy.yaml'}:14",
    ]
    assert lines[2] == "hostwall: policy invalid (2 problems); nothing was applied"


def test_invalid_policy_json_reports_the_error_on_stdout(policy_dir: Path) -> None:
    (policy_dir / "policy.yaml").write_text(POLICY.replace("owner: platform", "ower: platform"))
    result = invoke(policy_dir, "validate", "--json")

    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert (report["kind"], report["exit_code"]) == ("PolicyError", 3)
    file = policy_dir / "policy.yaml"
    assert sorted(report["problems"]) == [
        f"{file}:14: services.postgres.allow[0].owner (cidr 10.0.1.0/24): "
        "required key 'owner' is missing",
        f"{file}:15: services.postgres.allow[0].ower (cidr 10.0.1.0/24): unknown key 'ower'; "
        "did you mean 'owner'? valid keys here: cidr, file, owner, reason, review_by, expires, "
        "broad_ok, broad_reason",
    ]
    assert report["error"].endswith("(and 1 more)")


def test_missing_policy_directory_exits_3(tmp_path: Path) -> None:
    result = invoke(tmp_path / "absent", "validate")
    assert result.exit_code == 3
    assert result.stderr == f"hostwall: {tmp_path / 'absent'}: no such file or directory\n"


# --- check -----------------------------------------------------------------------------------


def test_check_allowed_names_file_owner_and_reason(policy_dir: Path) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", "203.0.113.45", "443/tcp")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "allowed: allowed by service https",
        "  203.0.113.45/32 owner=partner-b reason='inventory sync' review_by=2099-01-01 "
        f"({policy_dir / 'policy.yaml'}:4)",
    ]


def test_check_names_the_line_of_a_list_file(policy_dir: Path) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", "198.51.100.200", "443/udp")

    assert result.exit_code == 0, result.output
    assert "owner=partner-c reason='published ranges'" in result.stdout
    assert f"({policy_dir / 'partner.txt'}:3)" in result.stdout


def test_check_default_protocol_is_tcp(policy_dir: Path) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", "10.0.1.9", "5432")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("allowed: allowed by service postgres\n")


@pytest.mark.parametrize(
    ("address", "port"),
    [("198.18.0.1", "443"), ("203.0.113.46", "443/udp"), ("2001:db8::1", "5432/tcp"),
     ("10.0.1.9", "443"), ("::ffff:203.0.113.45", "443")],
)
def test_check_denied_exits_10(policy_dir: Path, address: str, port: str) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", address, port)

    assert result.exit_code == 10, result.output
    assert result.stdout.startswith("denied: ")


def test_check_denied_says_which_service(policy_dir: Path) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", "198.18.0.1", "443")
    assert result.stdout == "denied: no allow entry of service https covers 198.18.0.1\n"


@pytest.mark.parametrize("port", ["8080", "8080/tcp", "5432/udp"])
def test_check_unprotected_port_is_allowed(policy_dir: Path, port: str) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", "198.18.0.1", port)

    assert result.exit_code == 0, result.output
    assert "is not a protected port" in result.stdout


@pytest.mark.parametrize("address", ["127.0.0.1", "127.9.9.9", "::1"])
def test_check_loopback_is_allowed(policy_dir: Path, address: str) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", address, "5432")

    assert result.exit_code == 0, result.output
    assert result.stdout == "allowed: loopback traffic is always allowed\n"


@pytest.mark.parametrize(
    ("address", "port", "message"),
    [
        ("300.1.2.3", "443", "is not an IPv4 or IPv6 address"),
        ("example.com", "443", "is not an IPv4 or IPv6 address"),
        ("fe80::1%eth0", "443", "drop the %zone"),
        ("203.0.113.45", "443/sctp", "use tcp or udp"),
        ("203.0.113.45", "0", "use a number from 1 to 65535"),
        ("203.0.113.45", "65536", "use a number from 1 to 65535"),
        ("203.0.113.45", "https", "use a number from 1 to 65535"),
    ],
)
def test_check_bad_target_is_a_usage_error(
    policy_dir: Path, address: str, port: str, message: str
) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", address, port)

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""


def test_check_json(policy_dir: Path) -> None:
    result = invoke(policy_dir, "check", "--no-kernel", "--json", "203.0.113.45", "443")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "allowed": True,
        "policy_allowed": True,
        "kernel_allowed": None,
        "service": "https",
        "reason": "allowed by service https",
        "entries": [{
            "cidr": "203.0.113.45/32", "file": str(policy_dir / "policy.yaml"), "line": 4,
            "owner": "partner-b", "reason": "inventory sync", "review_by": "2099-01-01",
        }],
    }


def test_check_with_an_invalid_policy_exits_3(policy_dir: Path) -> None:
    (policy_dir / "policy.yaml").write_text("services:\n  https:\n    allow: 3\n")
    result = invoke(policy_dir, "check", "--no-kernel", "203.0.113.45", "443")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"hostwall: {policy_dir / 'policy.yaml'}:3: services.https.allow")


# --- commands that need CAP_NET_ADMIN, run unprivileged for real ------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def world_readable_policy() -> Iterator[Path]:
    """A policy the unprivileged user can read (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="hostwall-cli-", dir="/tmp"))
    try:
        base.chmod(0o755)
        policy = base / "policy"
        policy.mkdir(mode=0o755)
        policy.chmod(0o755)
        for name, text in (("policy.yaml", POLICY), ("partner.txt", PARTNER)):
            (policy / name).write_text(text)
            (policy / name).chmod(0o644)
        # validate needs no privileges: if it fails, the fault is the set-up, not hostwall.
        probe = run_unprivileged(["validate", str(policy)], base)
        assert probe.returncode == 0, f"the unprivileged user cannot run hostwall: {probe.stderr}"
        yield policy
    finally:
        shutil.rmtree(base)


def run_unprivileged(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "hostwall", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop root")
        command = [*NOBODY, *command]
    elif has_net_admin():
        pytest.skip("this unprivileged process has CAP_NET_ADMIN, so it is not unprivileged")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTWALL_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # The child must run the hostwall under test, not whatever else the interpreter finds.
    env["PYTHONPATH"] = str(Path(hostwall.__file__).resolve().parent.parent)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "name"),
    [(["apply"], "apply"), (["apply", "--json"], "apply"), (["plan"], "plan"),
     (["status"], "status"), (["check", "--kernel", "203.0.113.45", "443"], "check --kernel")],
)
def test_kernel_commands_refuse_to_run_unprivileged(
    world_readable_policy: Path, args: list[str], name: str
) -> None:
    state = world_readable_policy.parent / "state"
    result = run_unprivileged(
        ["--policy-dir", str(world_readable_policy), "--state-dir", str(state), *args],
        world_readable_policy.parent,
    )

    assert result.returncode == 5, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hostwall: hostwall {name} ")
    assert "needs root (CAP_NET_ADMIN)" in lines[0]
    assert not state.exists()  # refused before touching anything
    if "--json" in args:
        assert json.loads(result.stdout)["kind"] == "PermissionDenied"
    else:
        assert result.stdout == ""


@pytest.mark.parametrize("args", [["generations"], ["generations", "--json"], ["diff", "1", "1"]])
def test_reading_a_private_state_directory_unprivileged_is_exit_5_in_one_line(
    world_readable_policy: Path, tmp_path: Path, args: list[str]
) -> None:
    state = world_readable_policy.parent / "private-state"
    state.mkdir(mode=0o700, exist_ok=True)
    (state / "generations" / "00000001").mkdir(parents=True, exist_ok=True)
    (state / "generations" / "00000001" / "meta.json").write_text("{}")
    (state / "current.json").write_text("{}")
    state.chmod(0o700)

    result = run_unprivileged(["--state-dir", str(state), *args], world_readable_policy.parent)

    assert result.returncode == 5, result.stderr
    [line] = result.stderr.splitlines()
    assert "permission denied" in line and "sudo" in line
