"""Operator conventions (ufw, firewalld): per-service drop logging, disable, exit codes of
apply --check and diff, drops --json, check of a CIDR."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner, Result

from hostwall.cli import main
from hostwall.compile import compile_policy
from hostwall.drops import typed_fields
from hostwall.engine import Engine
from hostwall.errors import PolicyError
from hostwall.fake import FakeBackend
from hostwall.policy import load_policy
from hostwall.ruleset import Ruleset, render_full_load
from hostwall.state import StateDir

FIXED = datetime(2026, 6, 1, tzinfo=UTC)
META = "        owner: platform\n        reason: test\n        review_by: 2027-06-30\n"


def service(name: str, extra: str = "", cidr: str = "10.0.1.0/24") -> str:
    return f"  {name}:\n{extra}    allow:\n      - cidr: {cidr}\n{META}"


def compiled(tmp_path: Path, text: str) -> Ruleset:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return compile_policy(load_policy(path, now=FIXED))


def chain(text: str, name: str) -> str:
    start = text.index(f"\tchain svc_{name} {{")
    return text[start:text.index("\t}\n", start)]


# --- drop logging per service -------------------------------------------------------------


def test_log_off_leaves_no_log_rule_in_that_service_only(tmp_path: Path) -> None:
    ruleset = compiled(tmp_path, "services:\n" + service("https", "    log: off\n") + service("postgres"))
    text = render_full_load(ruleset, 1, FIXED.timestamp())
    assert " log " not in chain(text, "https")
    assert "drop" in chain(text, "https")
    assert 'limit rate 10/second burst 20 packets log prefix "hostwall:postgres" group 100' in chain(text, "postgres")


def test_log_rate_per_service_overrides_the_setting(tmp_path: Path) -> None:
    ruleset = compiled(tmp_path, "services:\n" + service("https", "    log: 250\n") + service("postgres")
                       + "settings:\n  log_rate: 3\n  log_burst: 7\n")
    text = render_full_load(ruleset, 1, FIXED.timestamp())
    assert "limit rate 250/second burst 7 packets" in chain(text, "https")
    assert "limit rate 3/second burst 7 packets" in chain(text, "postgres")


def test_log_setting_changes_the_digest_and_survives_the_record(tmp_path: Path) -> None:
    plain = compiled(tmp_path, "services:\n" + service("https"))
    quiet = compiled(tmp_path, "services:\n" + service("https", "    log: 'off'\n"))
    assert plain.digest != quiet.digest
    # A policy without `log` keeps the digest it had before the key existed.
    assert "log" not in plain.service("https").structure()  # type: ignore[union-attr]
    record, sets = quiet.to_record()
    assert Ruleset.from_record(record, sets).digest == quiet.digest
    assert Ruleset.from_data(quiet.to_data()).digest == quiet.digest


@pytest.mark.parametrize("value", ["on", "true", "0", "100001", "loud"])
def test_log_rejects_anything_but_off_or_a_rate(tmp_path: Path, value: str) -> None:
    with pytest.raises(PolicyError) as caught:
        compiled(tmp_path, "services:\n" + service("https", f"    log: {value}\n"))
    assert "services.https" in str(caught.value.problems[0])


# --- disable ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = FIXED.timestamp()

    def __call__(self) -> float:
        return self.now


class EngineSetup(NamedTuple):
    engine: Engine
    backend: FakeBackend
    state: StateDir
    policy: Path
    clock: Clock


@pytest.fixture
def engine_setup(tmp_path: Path) -> EngineSetup:
    clock = Clock()
    backend = FakeBackend()
    state = StateDir(tmp_path / "state", clock=clock)
    policy = tmp_path / "policy.yaml"
    policy.write_text("services:\n" + service("https", cidr="203.0.113.0/24"))
    return EngineSetup(Engine(backend, state, clock=clock), backend, state, policy, clock)


def test_disable_removes_the_table_as_a_generation_that_rollback_undoes(
    engine_setup: EngineSetup,
) -> None:
    engine, backend, state, path, _clock = engine_setup
    engine.apply(load_policy(path, now=FIXED), user="alice", message="first")

    result = engine.disable(user="alice", message="OPS-9")

    assert (result.generation, result.previous, result.changed) == (2, 1, True)
    assert backend.read_table(elements=False) is None
    assert state.generation(2).meta.disabled and state.generation(2).meta.message == "OPS-9"
    current = state.current()
    assert current is not None and (current.generation, current.disabled) == (2, True)
    status = engine.status()
    assert (status.loaded, status.disabled, bool(status.drift)) == (False, True, False)

    rolled = engine.rollback(None)
    # Full loads keep no text since they are built as netlink messages: a rollback renders again.
    assert (rolled.generation, rolled.previous, rolled.replayed) == (1, 2, False)
    table = backend.read_table(elements=True)
    assert table is not None and table.generation == 1
    assert not engine.status().drift and not engine.status().disabled

    # Rolling forward to the disable generation removes the table again.
    engine.rollback(2)
    assert backend.read_table(elements=False) is None
    assert engine.status().disabled


def test_disable_twice_records_one_generation(engine_setup: EngineSetup) -> None:
    engine, _backend, state, path, _clock = engine_setup
    engine.apply(load_policy(path, now=FIXED), user="alice", message="first")
    engine.disable(user="alice", message="")
    again = engine.disable(user="alice", message="")
    assert (again.generation, again.changed) == (2, False)
    assert state.numbers() == [1, 2]


def test_apply_after_disable_loads_the_policy_again(engine_setup: EngineSetup) -> None:
    engine, backend, state, path, _clock = engine_setup
    policy = load_policy(path, now=FIXED)
    engine.apply(policy, user="alice", message="first")
    engine.disable(user="alice", message="")

    assert engine.apply(policy, user="alice", message="", dry_run=True).plan.changed
    result = engine.apply(policy, user="alice", message="back")

    assert (result.applied, result.generation, result.plan.table_present) == (True, 3, False)
    table = backend.read_table(elements=False)
    assert table is not None and table.generation == 3
    current = state.current()
    assert current is not None and not current.disabled


def test_a_table_loaded_behind_a_disable_is_drift(engine_setup: EngineSetup) -> None:
    engine, backend, state, path, _clock = engine_setup
    engine.apply(load_policy(path, now=FIXED), user="alice", message="first")
    engine.disable(user="alice", message="")
    # Another tool (or a hand) loads hostwall's generation 1 again behind the disable.
    backend.submit(render_full_load(state.generation(1).ruleset(), 1, FIXED.timestamp()))

    drift = engine.status().drift
    assert drift and "disabled" in drift.reasons[0]


def test_disable_supersedes_a_pending_confirmation(engine_setup: EngineSetup) -> None:
    engine, backend, state, path, _clock = engine_setup
    engine.apply(load_policy(path, now=FIXED), user="alice", message="first", confirm_within=60)
    assert state.pending() is not None
    engine.disable(user="alice", message="")
    assert state.pending() is None
    assert not engine.revert_if_unconfirmed(1)
    assert backend.read_table(elements=False) is None


def test_an_unconfirmed_change_after_a_disable_reverts_to_disabled(
    engine_setup: EngineSetup,
) -> None:
    engine, backend, state, path, _clock = engine_setup
    policy = load_policy(path, now=FIXED)
    engine.apply(policy, user="alice", message="first")
    engine.disable(user="alice", message="")
    result = engine.apply(policy, user="alice", message="try", confirm_within=60)
    assert result.pending is not None and result.pending.revert_to == 2
    assert backend.read_table(elements=False) is not None

    engine_setup.clock.now += 61
    assert engine.revert_if_unconfirmed(3)

    assert backend.read_table(elements=False) is None
    current = state.current()
    assert current is not None and (current.generation, current.disabled) == (2, True)
    assert not engine.status().drift


def test_disable_with_nothing_loaded_records_it(engine_setup: EngineSetup) -> None:
    engine, backend, state, _path, _clock = engine_setup
    result = engine.disable(user="alice", message="")
    assert (result.generation, result.previous, result.changed) == (1, None, True)
    assert engine.status().disabled and not engine.status().drift
    assert backend.read_table(elements=False) is None and state.numbers() == [1]


# --- diff of a generation that does not exist, drops --json, check of a CIDR ---------------


def invoke(policy: Path, state: Path, *args: str) -> Result:
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    else:
        runner = CliRunner()
    env = {"HOSTWALL_NETNS": None, "HOSTWALL_POLICY_DIR": None, "HOSTWALL_STATE_DIR": None}
    return runner.invoke(main, ["--policy-dir", str(policy), "--state-dir", str(state), *args], env=env)


def test_diff_of_a_missing_generation_is_a_usage_error(
    engine_setup: EngineSetup,
) -> None:
    engine, _backend, state, path, _clock = engine_setup
    engine.apply(load_policy(path, now=FIXED), user="alice", message="first")
    engine.disable(user="alice", message="")

    assert invoke(path, state.path, "diff", "1", "2").exit_code == 0
    result = invoke(path, state.path, "diff", "1", "7")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "hostwall: generation 7 does not exist (kept: 1-2; see `hostwall generations`)"
    as_json = invoke(path, state.path, "diff", "9", "1", "--json")
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["exit_code"] == 2


def test_drop_fields_in_json_are_numbers_where_they_count() -> None:
    fields = {"HOSTWALL_SRC": "10.0.0.1", "HOSTWALL_DPORT": "443", "HOSTWALL_SRC_PORT": "5100",
              "HOSTWALL_COUNT": "12", "HOSTWALL_GENERATION": "3", "HOSTWALL_SERVICE": "https",
              "HOSTWALL_LOST": "not-a-number"}
    assert typed_fields(fields) == {"HOSTWALL_SRC": "10.0.0.1", "HOSTWALL_DPORT": 443, "HOSTWALL_SRC_PORT": 5100,
                                    "HOSTWALL_COUNT": 12, "HOSTWALL_GENERATION": 3, "HOSTWALL_SERVICE": "https",
                                    "HOSTWALL_LOST": "not-a-number"}


CIDR_POLICY = ("services:\n  https:\n    allow:\n"
               "      - cidr: 192.0.2.0/25\n" + META.replace("platform", "a")
               + "      - cidr: 192.0.2.128/26\n" + META.replace("platform", "b")
               + "      - cidr: 2001:db8::/48\n" + META.replace("platform", "c"))


@pytest.mark.parametrize(("cidr", "exit_code", "owners", "reason"), [
    ("192.0.2.0/25", 0, ["a"], "every address of 192.0.2.0/25 is allowed by service https"),
    ("192.0.2.0/26", 0, ["a"], "every address of 192.0.2.0/26 is allowed by service https"),
    ("192.0.2.64/26", 0, ["a"], "every address of 192.0.2.64/26 is allowed by service https"),
    ("192.0.2.96/27", 0, ["a"], "every address of 192.0.2.96/27 is allowed by service https"),
    ("192.0.2.0/24", 10, ["a", "b"], "192.0.2.0/24 is only partly allowed by service https: 192.0.2.192 is "
     "covered by no entry (the entries below cover the rest of it, in part)"),
    ("198.51.100.0/24", 10, [], "no allow entry of service https covers 198.51.100.0/24"),
    ("2001:db8::/64", 0, ["c"], "every address of 2001:db8::/64 is allowed by service https"),
    ("2001:db8::/47", 10, ["c"], "2001:db8::/47 is only partly allowed by service https: 2001:db8:1:: is "
     "covered by no entry (the entries below cover the rest of it, in part)"),
    ("192.0.2.5/32", 0, ["a"], "allowed by service https"),
])
def test_check_of_a_cidr_asks_about_every_address(
    tmp_path: Path, cidr: str, exit_code: int, owners: list[str], reason: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CIDR_POLICY)
    result = invoke(path, tmp_path / "state", "check", "--no-kernel", "--json", cidr, "443")
    assert result.exit_code == exit_code, result.output
    answer = json.loads(result.stdout)
    assert answer["reason"] == reason
    assert [e["owner"] for e in answer["entries"]] == owners


def test_check_of_a_cidr_spanning_two_entries_names_both(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CIDR_POLICY)
    result = invoke(path, tmp_path / "state", "check", "--no-kernel", "--json", "192.0.2.0/24", "443")
    answer = json.loads(result.stdout)
    assert [e["cidr"] for e in answer["entries"]] == ["192.0.2.0/25", "192.0.2.128/26"]
    half = invoke(path, tmp_path / "state", "check", "--no-kernel", "--json", "192.0.2.64/25", "443")
    assert half.exit_code == 2  # host bits set
    assert "write 192.0.2.0/25" in half.stderr


@pytest.mark.parametrize("cidr", ["::ffff:0:0/96", "::ffff:192.0.2.0/120"])
def test_check_of_a_mapped_range_is_denied(tmp_path: Path, cidr: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CIDR_POLICY)
    result = invoke(path, tmp_path / "state", "check", "--no-kernel", cidr, "443")
    assert result.exit_code == 10, result.output


def test_check_why_of_a_range_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(CIDR_POLICY)
    result = invoke(path, tmp_path / "state", "check", "--no-kernel", "--why", "192.0.2.0/25", "443")
    assert result.exit_code == 2
    assert "one address" in result.stderr
