"""`make mutants`: small deliberate bugs in the critical paths, each put into a copy of
the tree one at a time, with the tests that must catch it run against the copy.

A mutant is killed when its tests fail, and survives when they pass; a survivor is a
bug the suite would let through. The list is written by hand: each entry is one line
of code changed the way a plausible slip would change it, and names the tests that
claim to guard it. Exit status: 0 when every mutant was killed, 1 when any survived,
2 when a mutant no longer applies (the code moved: update the entry) or the unmutated
tests fail. Kernel mutants need root (their tests run in network namespaces).

    python tests/mutants.py              # every mutant
    python tests/mutants.py -k rollback  # the mutants whose name or area contains "rollback"
    python tests/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 1800  # seconds for one mutant's tests; a mutant that hangs them counts as killed
VERDICTS = {None: "killed (timeout)", 1: "killed", 0: "SURVIVED"}  # by pytest's exit status


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    environment: dict[str, str] = field(default_factory=dict)
    # More (original, mutated) lines of the same file, for a bug that takes two slips
    # because the code guards it twice (each guard alone is then an equivalent mutant).
    also: tuple[tuple[str, str], ...] = ()

    @property
    def needs_root(self) -> bool:
        return any(not test.startswith("tests/unit") for test in self.tests)


NFTNL_MESSAGES = "tests/unit/test_nftnl_messages.py"
GUARD = "tests/netns/test_rollback_and_guard.py"
LIFECYCLE = "tests/netns/test_lifecycle.py"
DROP_LOGS = "tests/netns/test_drop_logs.py"
SUDO_GUARDS = "tests/unit/test_sudo_guards.py"

MUTANTS = (
    # --- transaction building ------------------------------------------------------------
    Mutant("address-byte-order", "transaction building", "hostwall/nftnl.py",
           'value.to_bytes(4 if family == 4 else 16, "big")',
           'value.to_bytes(4 if family == 4 else 16, "little")',
           (NFTNL_MESSAGES,)),
    Mutant("element-add-not-exclusive", "transaction building", "hostwall/nftnl.py",
           "            flags |= NLM_F_CREATE | NLM_F_EXCL\n        names",
           "            flags |= NLM_F_CREATE\n        names",
           (NFTNL_MESSAGES,)),
    Mutant("open-interval-end-missed", "transaction building", "hostwall/nftnl.py",
           "    if interval.last == family_max(interval.family):",
           "    if interval.last == family_max(interval.family) - 1:",
           (NFTNL_MESSAGES,)),
    Mutant("full-load-keeps-old-rules", "transaction building", "hostwall/ruleset.py",
           'lines = [f"table {table} {{ {_base_chain_declaration()}; }}\\n", f"flush table {table}\\n"]',
           'lines = [f"table {table} {{ {_base_chain_declaration()}; }}\\n"]',
           # The text is the fallback and the reference the netlink batch is compared with.
           ("tests/netns/test_netns_fast_load.py::test_the_batch_is_the_one_nft_sends_for_the_rendered_text",)),
    Mutant("netlink-full-load-keeps-old-rules", "transaction building", "hostwall/nftload.py",
           "                _base_chain(), Message(NFT_MSG_DELRULE, 0, table)]",
           "                _base_chain()]",
           (f"{GUARD}::test_a_full_load_replaces_the_contents_in_place",)),
    # --- the element delta's guard -------------------------------------------------------
    Mutant("delta-without-marker-guard", "delta guard", "hostwall/nftnl.py",
           "        messages += self._element_messages(NFT_MSG_DELSETELEM, GENERATION_SET,\n"
           "                                           [_marker_element(delta.from_generation)])\n",
           "",
           (GUARD,)),
    Mutant("fake-delta-without-marker-guard", "delta guard", "hostwall/fake.py",
           "        if self.table is None or self.table.marker != delta.from_generation:",
           "        if self.table is None:",
           ("tests/unit/test_engine_fake.py::test_the_fakes_delta_guard_refuses_a_batch_over_another_marker",)),
    Mutant("refused-delta-not-repaired", "delta guard", "hostwall/engine.py",
           "                self._state.discard(number)\n            else:",
           "                raise\n            else:",
           (f"{GUARD}::test_the_kernel_refuses_a_delta_when_the_marker_changed_after_the_label_check",)),
    # --- rollback's choice ---------------------------------------------------------------
    Mutant("rollback-to-oldest", "rollback choice", "hostwall/engine.py",
           "        return earlier[-1]", "        return earlier[0]",
           (f"{GUARD}::test_default_rollback_goes_to_the_generation_before_the_loaded_one",)),
    Mutant("rollback-to-loaded", "rollback choice", "hostwall/engine.py",
           "if n < current.generation]", "if n <= current.generation]",
           (f"{GUARD}::test_default_rollback_goes_to_the_generation_before_the_loaded_one",)),
    # --- expiry --------------------------------------------------------------------------
    # Timeouts computed as at the generation's first load: what replaying its text did.
    Mutant("rollback-replays-old-timeouts", "expiry", "hostwall/engine.py",
           "            self._backend.load(ruleset, number, self._clock())",
           "            self._backend.load(ruleset, number, generation.meta.created)",
           (f"{GUARD}::test_rollback_of_an_expiring_generation_keeps_its_expiry",)),
    Mutant("timeout-rounded-down", "expiry", "hostwall/ruleset.py",
           "max(1, math.ceil(interval.expires - now))", "max(1, int(interval.expires - now))",
           (NFTNL_MESSAGES,)),
    Mutant("host-element-without-timeout", "expiry", "hostwall/nftnl.py",
           "_element(_address_bytes(interval.family, interval.first), _timeout(interval, now, with_timeout))",
           "_element(_address_bytes(interval.family, interval.first), _timeout(interval, now, False))",
           (NFTNL_MESSAGES,)),
    # --- journal fields ------------------------------------------------------------------
    Mutant("generation-read-once-at-start", "journal fields", "hostwall/cli/journal.py",
           "    def generation() -> int | None:\n        try:",
           "    first = state.current()\n\n    def generation() -> int | None:\n"
           "        if first is not None:\n            return first.generation\n        try:",
           (f"{DROP_LOGS}::test_drop_records_carry_the_generation_loaded_by_a_reload",)),
    Mutant("generation-cached-by-the-streamer", "journal fields", "hostwall/agent.py",
           "            if not asked:\n                generation, asked = self._generation(), True",
           "            if not asked:\n                if not hasattr(self, '_cached'):\n"
           "                    self._cached = self._generation()\n"
           "                generation, asked = self._cached, True",
           (f"{DROP_LOGS}::test_drop_records_carry_the_generation_loaded_by_a_reload",)),
    Mutant("destination-port-field-missing", "journal fields", "hostwall/drops.py",
           'fields["HOSTWALL_DPORT"] = str(packet.dst_port)', 'fields["HOSTWALL_PORT"] = str(packet.dst_port)',
           (f"{DROP_LOGS}::test_denied_connections_become_journal_records_with_every_field",)),
    # --- the sudo boundary: the reverter that a sudo apply --confirm-within leaves behind -----
    Mutant("reverter-dies-with-the-session", "sudo boundary", "hostwall/cli/common.py",
           'command, cwd="/", env=dict(ROOT_CHILD_ENVIRONMENT), start_new_session=True,',
           'command, cwd="/", env=dict(ROOT_CHILD_ENVIRONMENT), start_new_session=False,',
           (f"{LIFECYCLE}::test_unconfirmed_apply_reverts_after_the_cli_session_is_killed",)),
    Mutant("reverter-loses-the-state-dir", "sudo boundary", "hostwall/cli/common.py",
           'command = [sys.executable, "-I", "-m", "hostwall", "--state-dir", str(state_dir.absolute())]',
           'command = [sys.executable, "-I", "-m", "hostwall"]',
           (f"{LIFECYCLE}::test_unconfirmed_apply_reverts_after_the_cli_session_is_killed",)),
    Mutant("reverter-runs-the-callers-code", "sudo boundary", "hostwall/cli/common.py",
           'command = [sys.executable, "-I", "-m", "hostwall", "--state-dir", str(state_dir.absolute())]',
           'command = [sys.executable, "-m", "hostwall", "--state-dir", str(state_dir.absolute())]',
           (f"{SUDO_GUARDS}::test_code_planted_in_the_working_directory_does_not_run",),
           also=(('command, cwd="/", env=dict(ROOT_CHILD_ENVIRONMENT), start_new_session=True,',
                  "command, start_new_session=True,"),)),
    Mutant("lockout-guard-never-refuses", "sudo boundary", "hostwall/lockout.py",
           "    if session is None:\n        return\n    service = blocking_service(",
           "    if True:\n        return\n    service = blocking_service(",
           (f"{SUDO_GUARDS}::test_a_session_outside_the_allowlist_of_its_port_is_blocked",
            f"{SUDO_GUARDS}::test_the_engine_loads_nothing_the_guard_refuses")),
    Mutant("journal-trusts-any-writer", "sudo boundary", "hostwall/journal.py",
           "return all(str(raw.get(key)) == value for key, value in TRUSTED_WRITER.items())",
           "return True",
           (f"{SUDO_GUARDS}::test_only_records_root_sent_natively_are_trusted",)),
)


def _tree_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def _copy_tree(files: list[str], destination: Path) -> None:
    for name in files:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def _pytest(tree: Path, tests: tuple[str, ...], environment: dict[str, str]) -> tuple[int | None, str]:
    """pytest's exit status (None on timeout) and its last lines, run against tree's hostwall."""
    env = {**os.environ, **environment, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                                check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT} s"
    return result.returncode, "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])


def _mutate(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.path
    text = path.read_text()
    for original, mutated in ((mutant.original, mutant.mutated), *mutant.also):
        if text.count(original) != 1:
            raise LookupError(f"{mutant.name}: {mutant.path} holds the original line "
                              f"{text.count(original)} times, not once: update the mutant")
        text = text.replace(original, mutated)
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", help="only mutants whose name or area contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the unmutated tests first")
    options = parser.parse_args()
    chosen = [m for m in MUTANTS if not options.select or options.select in m.name or options.select in m.area]
    if options.list:
        for mutant in chosen:
            print(f"{mutant.area:22} {mutant.name:34} {' '.join(mutant.tests)}")
        return 0
    if not chosen:
        print("mutants: none selected", file=sys.stderr)
        return 2
    if os.geteuid() != 0 and any(m.needs_root for m in chosen):
        print("mutants: the kernel mutants' tests need root (network namespaces): sudo make mutants",
              file=sys.stderr)
        return 5

    files = _tree_files()
    with tempfile.TemporaryDirectory(prefix="hostwall-mutants-") as scratch:
        for mutant in chosen:  # every entry must still apply before anything runs
            probe = Path(scratch) / "probe"
            probe.mkdir(exist_ok=True)
            (probe / mutant.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / mutant.path, probe / mutant.path)
            try:
                _mutate(probe, mutant)
            except LookupError as stale:
                print(f"mutants: {stale}", file=sys.stderr)
                return 2
        if not options.no_baseline:
            baseline = Path(scratch) / "baseline"
            _copy_tree(files, baseline)
            tests = tuple(dict.fromkeys(test for m in chosen for test in m.tests))
            environment = {k: v for m in chosen for k, v in m.environment.items()}
            print(f"baseline: {len(tests)} test selections against the unmutated tree ...", flush=True)
            status, tail = _pytest(baseline, tests, environment)
            if status != 0:
                print(f"mutants: the unmutated tests do not pass (exit {status}):\n{tail}", file=sys.stderr)
                return 2

        results: list[tuple[Mutant, str, float]] = []
        for number, mutant in enumerate(chosen):
            tree = Path(scratch) / f"mutant-{number}"
            _copy_tree(files, tree)
            _mutate(tree, mutant)
            started = time.monotonic()
            status, tail = _pytest(tree, mutant.tests, mutant.environment)
            verdict = VERDICTS.get(status, f"error (pytest exit {status})")
            results.append((mutant, verdict, time.monotonic() - started))
            print(f"{verdict:18} {mutant.area:22} {mutant.name}  ({time.monotonic() - started:.0f} s)", flush=True)
            if status not in (None, 1):
                print(f"    {tail.replace(chr(10), chr(10) + '    ')}", flush=True)
            shutil.rmtree(tree)

    survived = [m for m, verdict, _ in results if verdict == "SURVIVED"]
    errors = [m for m, verdict, _ in results if verdict.startswith("error")]
    killed = len(results) - len(survived) - len(errors)
    print(f"\n{killed} of {len(results)} mutants killed, {len(survived)} survived, {len(errors)} errors")
    for mutant in survived:
        print(f"  survived: {mutant.name} ({mutant.area}, {mutant.path}): {' '.join(mutant.tests)}")
    return 1 if survived else 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
