"""How generations are stored: shared blobs, delta generations without text, pruning,
damage, and generations written by earlier versions. Against the in-memory kernel."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from test_engine_fake import POLICY_V1, Setup, allow

from hostwall import state as state_module
from hostwall.compile import compile_policy
from hostwall.errors import StateError
from hostwall.fake import _parse_full_load
from hostwall.ruleset import render_full_load

# POLICY_V1 with one more https entry, or one fewer: element changes only.
GROWN = POLICY_V1.replace(allow("203.0.113.45/32", "192.0.2.0/24"),
                          allow("203.0.113.45/32", "192.0.2.0/24", "198.51.100.7/32"))
SHRUNK = POLICY_V1.replace(allow("203.0.113.45/32", "192.0.2.0/24"), allow("203.0.113.45/32"))


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def generation_dir(setup: Setup, number: int) -> Path:
    return setup.state.generations_dir / f"{number:08d}"


def test_a_delta_generation_keeps_no_text_and_its_rollback_renders_it(setup: Setup) -> None:
    assert setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1").method == "full"
    grown = setup.policy(GROWN)
    assert setup.engine.apply(grown, user="a", message="2").method == "delta"
    assert setup.engine.apply(setup.policy(SHRUNK), user="a", message="3").method == "delta"

    second = setup.state.generation(2)
    assert not second.has_transaction and "transaction.nft" not in second.meta.files
    assert not (generation_dir(setup, 2) / "transaction.nft").exists()

    result = setup.engine.rollback(2)

    assert (result.generation, result.replayed, result.rendered_because) == (2, False, "recorded without text")
    expected = _parse_full_load(render_full_load(compile_policy(grown), 2, setup.clock.now))
    assert setup.backend.table == expected
    assert not setup.engine.status().drift


def test_rollback_to_a_generation_recorded_with_its_text_replays_it(setup: Setup) -> None:
    first = compile_policy(setup.policy(POLICY_V1))
    # As full loads were recorded before they were built from the ruleset.
    setup.state.stage(1, ruleset=first, transaction=render_full_load(first, 1, setup.clock.now),
                      policy_files={}, user="a", message="1")
    setup.engine.apply(setup.policy(GROWN), user="a", message="2")
    result = setup.engine.rollback(1)
    assert (result.replayed, result.rendered_because) == (True, None)
    assert setup.backend.table == _parse_full_load(render_full_load(first, 1, setup.clock.now))


def test_a_refused_delta_is_replaced_by_a_full_load_of_the_same_generation(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    setup.backend.reject_next = "No such file or directory"  # the element batch is refused

    result = setup.engine.apply(setup.policy(GROWN), user="a", message="2")

    assert (result.applied, result.method) == (True, "full")
    assert setup.backend.table == _parse_full_load(render_full_load(
        compile_policy(setup.policy(GROWN)), 2, setup.clock.now))
    assert setup.state.generation(2).ruleset() == compile_policy(setup.policy(GROWN))


def test_unchanged_files_are_shared_between_generations(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    setup.engine.apply(setup.policy(GROWN), user="a", message="2")
    first, second = generation_dir(setup, 1), generation_dir(setup, 2)

    for shared in ("policy/lists/partner.txt", "sets/postgres_v4", "sets/https_v6"):
        assert (first / shared).stat().st_ino == (second / shared).stat().st_ino, shared
    for changed in ("policy/policy.yaml", "sets/https_v4"):
        assert (first / changed).stat().st_ino != (second / changed).stat().st_ino, changed
    # Every shared file is a blob named by its content's hash, as meta.json records it.
    for number in (1, 2):
        generation = setup.state.generation(number)
        for name, digest in generation.meta.files.items():
            if name.startswith(("sets/", "policy/")):
                assert (generation.path / name).stat().st_ino == (setup.state.blobs_dir / digest).stat().st_ino
                assert hashlib.sha256((setup.state.blobs_dir / digest).read_bytes()).hexdigest() == digest


def test_pruning_deletes_blobs_that_no_generation_links(setup: Setup) -> None:
    setup.state.keep = 1
    for cidr in ("10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"):
        setup.engine.apply(setup.policy("services:\n  postgres:\n" + allow(cidr)), user="a", message=cidr)
    leftover = setup.state.generations_dir / ".staging-00000009-4242"  # a crashed process's
    (leftover / "sets").mkdir(parents=True)
    setup.engine.apply(setup.policy("services:\n  postgres:\n" + allow("10.0.4.0/24")), user="a", message="4")

    assert setup.generation_dirs() == ["00000004"]
    linked = set(setup.state.generation(4).meta.files.values())
    assert {p.name for p in setup.state.blobs_dir.iterdir()} == linked - {
        setup.state.generation(4).meta.files[n] for n in ("meta.json", "ruleset.json", "transaction.nft")
        if n in setup.state.generation(4).meta.files}
    assert setup.state.generation(4).ruleset() == compile_policy(
        setup.policy("services:\n  postgres:\n" + allow("10.0.4.0/24")))


@pytest.mark.parametrize("name", ["sets/https_v4", "policy/lists/partner.txt"])
def test_a_damaged_shared_file_is_detected_and_not_reused(setup: Setup, name: str) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    path = generation_dir(setup, 1) / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # the blob itself: every generation linking it sees the damage
    path.write_bytes(bytes(data))

    if name.startswith("sets/"):
        with pytest.raises(StateError, match=re.escape(f"{name} does not match its recorded hash")):
            setup.state.generation(1).ruleset()

    # The next generation that needs the same content writes a fresh copy.
    setup.engine.apply(setup.policy(SHRUNK if name.startswith("policy/") else GROWN.replace(
        "10.0.9.5/32", "10.0.9.6/32")), user="a", message="2")
    second = setup.state.generation(2)
    if name in second.meta.files and second.meta.files[name] == setup.state.generation(1).meta.files[name]:
        fresh = generation_dir(setup, 2) / name
        assert hashlib.sha256(fresh.read_bytes()).hexdigest() == second.meta.files[name]
        assert fresh.stat().st_ino != path.stat().st_ino
    second.ruleset()


def test_a_set_that_does_not_match_the_ruleset_is_a_state_error(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    directory = generation_dir(setup, 1)
    meta = json.loads((directory / "meta.json").read_text())
    # Swap two sets, with hashes that match: the ruleset's own digests catch it.
    v4, v6 = directory / "sets" / "https_v4", directory / "sets" / "https_v6"
    data4, data6 = v4.read_bytes(), v6.read_bytes()
    v4.unlink()
    v6.unlink()
    v4.write_bytes(data6)
    v6.write_bytes(data4)
    meta["files"]["sets/https_v4"], meta["files"]["sets/https_v6"] = (
        meta["files"]["sets/https_v6"], meta["files"]["sets/https_v4"])
    (directory / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(StateError, match="ruleset does not match its sets"):
        setup.state.generation(1).ruleset()


def test_generations_written_before_sets_were_stored_apart_still_load(setup: Setup) -> None:
    """Format 1: the whole ruleset, elements included, in ruleset.json."""
    policy = setup.policy(POLICY_V1)
    ruleset = compile_policy(policy)
    directory = generation_dir(setup, 1)
    (directory / "policy").mkdir(parents=True)
    files = {
        "ruleset.json": json.dumps(ruleset.to_data(), sort_keys=True, separators=(",", ":")).encode(),
        "transaction.nft": render_full_load(ruleset, 1, setup.clock.now).encode(),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    meta = {"number": 1, "created": setup.clock.now, "user": "old", "message": "", "digest": "0" * 64,
            "entries": ruleset.entry_count(),
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    (directory / "meta.json").write_text(json.dumps(meta))

    assert setup.state.generation(1).ruleset() == ruleset
    result = setup.engine.rollback(1)
    assert result.replayed
    assert setup.backend.read_table(elements=False) is not None
    # The next change takes the recorded ruleset as the base of a delta.
    assert setup.engine.apply(setup.policy(GROWN), user="a", message="2").method == "delta"


def test_a_delta_generation_records_the_list_bytes_that_were_compiled(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    policy = setup.policy(GROWN)
    (setup.policy_dir / "lists" / "partner.txt").write_text("# changed after loading\n")
    setup.engine.apply(policy, user="a", message="2")
    recorded = generation_dir(setup, 2) / "policy" / "lists" / "partner.txt"
    assert recorded.read_text() == "# partner ranges\n172.16.5.0/24\n"


def test_meta_entries_and_digest_describe_the_ruleset(setup: Setup) -> None:
    policy = setup.policy(GROWN + "  dns:\n    ports: [53]\n    protocols: [udp]\n" + allow("2001:db8:53::/64"))
    result = setup.engine.apply(policy, user="a", message="1")
    desired = compile_policy(policy)
    generation = setup.state.generation(result.generation or 0)
    assert (generation.meta.digest, generation.meta.entries) == (desired.digest, desired.entry_count())
    assert generation.ruleset() == desired and generation.ruleset().digest == desired.digest


def test_sets_swapped_between_services_of_one_family_are_detected(setup: Setup) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    directory = generation_dir(setup, 1)
    meta = json.loads((directory / "meta.json").read_text())
    first, second = directory / "sets" / "https_v4", directory / "sets" / "postgres_v4"
    data_first, data_second = first.read_bytes(), second.read_bytes()
    first.unlink()
    second.unlink()
    first.write_bytes(data_second)
    second.write_bytes(data_first)
    meta["files"]["sets/https_v4"], meta["files"]["sets/postgres_v4"] = (
        meta["files"]["sets/postgres_v4"], meta["files"]["sets/https_v4"])
    (directory / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(StateError, match="ruleset does not match its sets"):
        setup.state.generation(1).ruleset()


def test_a_generation_that_cannot_be_written_leaves_no_blobs_behind(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup.engine.apply(setup.policy(POLICY_V1), user="a", message="1")
    blobs = sorted(p.name for p in setup.state.blobs_dir.iterdir())
    real_write = state_module._write_file

    def disk_full_at_meta(path: Path, data: bytes) -> None:
        if path.name == "meta.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(state_module, "_write_file", disk_full_at_meta)
    with pytest.raises(StateError, match="disk full"):
        setup.engine.apply(setup.policy(GROWN.replace("198.51.100.7/32", "198.51.100.9/32")), user="a", message="2")
    assert sorted(p.name for p in setup.state.blobs_dir.iterdir()) == blobs
    assert setup.generation_dirs() == ["00000001"]
