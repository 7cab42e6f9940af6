"""file: lists parsed once: the cache of parsed lists, lazily read entries, and the compiler's
use of merged lists, each checked against the plain path without a cache."""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit_support import damage as damage_file
from unit_support import reaped, refuse_validation

import hostwall.forked
import hostwall.policy
import hostwall.policyfile
from hostwall.check import check_policy
from hostwall.cidr import Interval, merge_intervals
from hostwall.compile import compile_policy
from hostwall.errors import PolicyError
from hostwall.policy import Entries, ParsedList, load_policy, reparse_list
from hostwall.policyspec import FileSpec
from hostwall.state import ListCacheDir

WriteFiles = Callable[[dict[str, str | bytes]], Path]

NOW = datetime(2026, 6, 1, tzinfo=UTC)
META = "        owner: partner-c\n        reason: published ranges\n        review_by: 2027-06-30\n"


def policy_text(*inline: str, lists: tuple[str, ...] = ("big.txt",), expires: str | None = None) -> str:
    text = "services:\n  https:\n    allow:\n"
    for cidr in inline:
        text += f"      - cidr: {cidr}\n" + META
    for name in lists:
        text += f"      - file: {name}\n" + META
        if expires:
            text += f"        expires: {expires}\n"
    return text


def random_list(seed: int, count: int) -> str:
    rng = random.Random(seed)
    lines = ["# generated"]
    for _ in range(count):
        base = rng.randrange(11 << 24, 99 << 24) & ~0xFF
        length = rng.choice([24, 32, 32, 30])
        value = base | (rng.randrange(256) if length == 32 else 0) & ~((1 << (32 - length)) - 1)
        lines.append(f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}/{length}")
        if rng.random() < 0.1:
            lines.append(f"2001:db8:{rng.randrange(1 << 16):x}::/48  # v6")
    return "\n".join(lines) + "\n"


class MemoryCache:
    def __init__(self) -> None:
        self.entries: dict[str, ParsedList] = {}
        self.sources: dict[str, bytes] = {}
        self.files: dict[str, FileSpec] = {}
        self.gets = self.puts = 0

    def get(self, sha256: str) -> ParsedList | None:
        self.gets += 1
        return self.entries.get(sha256)

    def put(self, sha256: str, parsed: ParsedList, source: bytes, path: str) -> None:
        self.puts += 1
        self.entries[sha256] = parsed
        self.sources[path] = source

    def latest(self, path: str) -> tuple[bytes, ParsedList] | None:
        source = self.sources.get(path)
        return None if source is None else (source, self.entries[hashlib.sha256(source).hexdigest()])

    def knows(self, sha256: str, path: str) -> bool:
        return sha256 in self.entries or path in self.sources

    def validated(self, sha256: str) -> FileSpec | None:
        return self.files.get(sha256)

    def keep_validated(self, sha256: str, spec: FileSpec) -> None:
        self.files[sha256] = spec


def only_inline_parsing(monkeypatch: pytest.MonkeyPatch, inline: set[str]) -> None:
    parse = hostwall.policy.parse_interval

    def refuse_list_lines(text: str, expires: float = math.inf) -> Interval:
        assert text in inline, f"parsed {text!r} although its list was cached"
        return parse(text, expires)

    def refuse_whole_lists(lines: list[str], *args: object) -> list[tuple[int, str]]:
        raise AssertionError(f"parsed a whole list ({len(lines)} lines) although it was cached")

    monkeypatch.setattr(hostwall.policy, "parse_interval", refuse_list_lines)
    monkeypatch.setattr(hostwall.policy, "parse_list_lines", refuse_whole_lists)



# --- lists parsed side by side (hostwall.forked) ----------------------------------------------


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The children forked while loading (counted at the real fork), with a spare core
    whatever this machine has, so that lists are parsed ahead in every run."""
    started: list[int] = []
    real_fork = os.fork

    def counted_fork() -> int:
        pid = real_fork()
        if pid:
            started.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counted_fork)
    monkeypatch.setattr(hostwall.forked, "spare_cores", lambda: 2)
    return started


def serial_load(root: Path, monkeypatch: pytest.MonkeyPatch, **options: object) -> object:
    with monkeypatch.context() as patch:
        patch.setattr(hostwall.forked, "spare_cores", lambda: 0)
        try:
            return compile_policy(load_policy(root, now=NOW, **options))  # type: ignore[arg-type]
        except PolicyError as error:
            return [(p.file, p.line, p.entry, p.message) for p in error.problems]


def load_ahead(root: Path, **options: object) -> object:
    try:
        return compile_policy(load_policy(root, now=NOW, **options))  # type: ignore[arg-type]
    except PolicyError as error:
        return [(p.file, p.line, p.entry, p.message) for p in error.problems]


def two_files_of_lists(write_files: WriteFiles, lists: dict[str, str], for_the_models: bool = False) -> Path:
    """for_the_models: b.yaml holds a value only the models decide on (1 for true)."""
    names = sorted(lists)
    second = policy_text(lists=tuple(names[2:])).replace("https", "postgres")
    if for_the_models:
        second = second.replace("    allow:\n", "    entry_counters: 1\n    allow:\n")
    return write_files({"a.yaml": policy_text("203.0.113.45/32", lists=tuple(names[:2])), "b.yaml": second, **lists})


def three_lists(write_files: WriteFiles, first_seed: int) -> tuple[Path, dict[str, str]]:
    """p.txt and q.txt named by a.yaml, r.txt by b.yaml, 400 random lines each."""
    lists = {f"{name}.txt": random_list(seed, 400) for seed, name in enumerate("pqr", start=first_seed)}
    return two_files_of_lists(write_files, lists), lists


@pytest.mark.parametrize("for_the_models", [False, True])
def test_lists_parsed_side_by_side_compile_as_parsed_one_by_one(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, forks: list[int], for_the_models: bool
) -> None:
    lists = {f"{name}.txt": random_list(seed, 300 * seed) for seed, name in enumerate("pqrs", start=1)}
    root = two_files_of_lists(write_files, lists, for_the_models)
    serial = serial_load(root, monkeypatch)
    assert forks == []
    ahead = load_ahead(root)
    # While this process validates a file with the models, every list goes to a child:
    # one child more than the two spare cores. Otherwise this process parses the first
    # list itself and the other three go to two children.
    assert len(forks) == (3 if for_the_models else 2)
    assert ahead == serial
    assert ahead.digest == serial.digest  # type: ignore[attr-defined]
    assert all(reaped(pid) for pid in forks)


def test_bad_lines_in_lists_parsed_ahead_are_reported_as_one_by_one(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, forks: list[int]
) -> None:
    root = two_files_of_lists(write_files, {
        "p.txt": "10.0.0.0/8\n300.1.2.3\n", "q.txt": random_list(2, 500),
        "r.txt": "192.0.2.5/24\n# c\n2001:db8::/32\n", "s.txt": "1.2.3.4/33\n"})
    serial = serial_load(root, monkeypatch)
    assert isinstance(serial, list) and len(serial) == 3
    assert load_ahead(root) == serial
    assert forks


def test_a_child_that_dies_only_costs_time(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, forks: list[int]
) -> None:
    root, _ = three_lists(write_files, 7)
    serial = serial_load(root, monkeypatch)

    def dies(parses: object) -> Iterator[bytes]:
        os.kill(os.getpid(), signal.SIGKILL)
        yield b""

    monkeypatch.setattr(hostwall.policy, "_encoded_parses", dies)
    assert load_ahead(root) == serial
    assert forks and all(reaped(pid) for pid in forks)


def test_lists_the_cache_knows_are_not_parsed_ahead(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, forks: list[int]
) -> None:
    root, lists = three_lists(write_files, 3)
    cache = MemoryCache()
    first = load_ahead(root, cache=cache)
    assert len(forks) == 2  # this process parses the first list
    del forks[:]
    # One list changed: the cache knows its path (parsed where it changed), the others
    # by their content; nothing is left to parse ahead.
    (root / "q.txt").write_text(lists["q.txt"] + "198.51.100.0/24\n")
    second = load_ahead(root, cache=cache)
    assert forks == []
    assert second != first
    assert second == serial_load(root, monkeypatch)


def test_with_nothing_to_validate_this_process_parses_the_first_list(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, forks: list[int]
) -> None:
    root, _ = three_lists(write_files, 5)
    warm = MemoryCache()
    load_ahead(root, cache=warm)
    validated_only = MemoryCache()
    validated_only.files = warm.files  # the policy files are validated, no list is known
    serial = serial_load(root, monkeypatch)
    del forks[:]

    refuse_validation(monkeypatch)
    assert load_ahead(root, cache=validated_only) == serial
    assert len(forks) == 2  # the other two lists, one child each
    assert validated_only.puts == 3


def test_lists_named_by_a_file_that_fails_validation_are_parsed_for_nothing(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, forks: list[int]
) -> None:
    root, _ = three_lists(write_files, 9)
    (root / "b.yaml").write_text((root / "b.yaml").read_text().replace("owner: partner-c", "owner: ''"))
    serial = serial_load(root, monkeypatch)
    assert isinstance(serial, list) and serial  # the empty owner
    assert load_ahead(root) == serial
    assert forks and all(reaped(pid) for pid in forks)


# --- the cache ------------------------------------------------------------------------------


def test_a_cached_list_is_not_parsed_again_and_compiles_the_same(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_files({"p.yaml": policy_text("203.0.113.45/32"), "big.txt": random_list(1, 2000)})
    cache = MemoryCache()
    uncached = compile_policy(load_policy(root, now=NOW))
    first = compile_policy(load_policy(root, now=NOW, cache=cache))
    assert (cache.gets, cache.puts) == (1, 1)

    with monkeypatch.context() as patch:
        only_inline_parsing(patch, {"203.0.113.45/32"})
        cached_policy = load_policy(root, now=NOW, cache=cache)
        second = compile_policy(cached_policy)
    assert (cache.gets, cache.puts) == (2, 1)
    assert first == second == uncached
    assert first.digest == second.digest == uncached.digest


def test_bad_lines_are_reported_exactly_with_a_cache_and_nothing_is_cached(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": policy_text(), "big.txt": "10.0.0.0/8\n# c\n192.0.2.5/24\n300.1.2.3\n"})
    cache = MemoryCache()
    with pytest.raises(PolicyError) as caught:
        load_policy(root, now=NOW, cache=cache)
    assert [(p.file, p.line) for p in caught.value.problems] == [
        (str(root / "big.txt"), 3), (str(root / "big.txt"), 4)]
    assert cache.entries == {}


def test_a_changed_list_misses_the_cache(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": policy_text(), "big.txt": "10.0.0.0/8\n"})
    cache = MemoryCache()
    load_policy(root, now=NOW, cache=cache)
    (root / "big.txt").write_text("10.0.0.0/8\n192.0.2.0/24\n")
    policy = load_policy(root, now=NOW, cache=cache)
    assert cache.puts == 2
    https = policy.service("https")
    assert https is not None
    assert [str(i) for i in compile_policy(policy).service("https").v4] == ["10.0.0.0/8", "192.0.2.0/24"]  # type: ignore[union-attr]


def test_cached_lines_keep_their_file_and_line_for_check(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": policy_text("203.0.113.45/32"),
                        "big.txt": "# partner\n198.51.100.0/25\n\n192.0.2.0/24  # office\n"})
    cache = MemoryCache()
    eager = load_policy(root, now=NOW)
    load_policy(root, now=NOW, cache=cache)
    lazy = load_policy(root, now=NOW, cache=cache)

    https = lazy.service("https")
    assert https is not None and isinstance(https.entries, Entries)
    assert len(https.entries) == 3
    assert https.entries == eager.service("https").entries  # type: ignore[union-attr]
    decision = check_policy(lazy, "192.0.2.77", "443")
    assert decision.allowed
    assert [(e.origin.file, e.origin.line, str(e.network)) for e in decision.entries] == [
        (str(root / "big.txt"), 4, "192.0.2.0/24")]


def test_an_expired_cached_list_warns_for_every_line(write_files: WriteFiles) -> None:
    root = write_files({"p.yaml": policy_text(expires="2026-01-01T00:00:00Z"),
                        "big.txt": "10.0.0.0/8\n192.0.2.0/24\n"})
    cache = MemoryCache()
    load_policy(root, now=NOW, cache=cache)
    policy = load_policy(root, now=NOW, cache=cache)
    https = policy.service("https")
    assert https is not None and https.entries == ()
    assert [str(e.network) for e in policy.expired] == ["10.0.0.0/8", "192.0.2.0/24"]


@pytest.mark.parametrize("seed", range(6))
def test_compiling_merged_lists_equals_merging_every_entry(write_files: WriteFiles, seed: int) -> None:
    """Lists and inline entries that overlap, touch and expire, against merge_intervals."""
    rng = random.Random(seed)
    inline = [f"{rng.randrange(11, 99)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24" for _ in range(5)]
    lists = {"a.txt": random_list(seed, 300), "b.txt": random_list(seed + 100, 40), "c.txt": random_list(seed, 30)}
    text = policy_text(*inline, lists=tuple(lists))
    text += f"      - cidr: 2001:db8:{seed}::/48\n{META}        expires: 2026-07-01T00:00:00Z\n"
    text += f"      - cidr: {inline[0]}\n{META}        expires: 2026-07-01T00:00:00Z\n"
    root = write_files({"p.yaml": text, **lists})
    cache = MemoryCache()
    load_policy(root, now=NOW, cache=cache)
    policy = load_policy(root, now=NOW, cache=cache)

    https = policy.service("https")
    assert https is not None
    expected = merge_intervals(e.interval for e in https.entries)
    rules = compile_policy(policy).service("https")
    assert rules is not None
    assert list(rules.v4) + list(rules.v6) == expected


# --- the cache on disk ---------------------------------------------------------------------------

KEY = "ab" * 32


def parsed() -> ParsedList:
    return ParsedList(3, bytes(range(16)), bytes(32))


def test_disk_cache_round_trip(tmp_path: Path) -> None:
    cache = ListCacheDir(tmp_path / "state" / "cache" / "lists")
    source = b"10.0.0.0/8\n"
    key = hashlib.sha256(source).hexdigest()
    assert cache.get(key) is None and cache.latest("/p/l.txt") is None
    cache.put(key, parsed(), source, "/p/l.txt")
    assert cache.get(key) == parsed()
    assert cache.latest("/p/l.txt") == (source, parsed())
    assert cache.latest("/p/other.txt") is None
    assert (tmp_path / "state" / "cache" / "lists").stat().st_mode & 0o777 == 0o700


def test_a_latest_version_whose_bytes_were_damaged_is_a_miss(tmp_path: Path) -> None:
    cache = ListCacheDir(tmp_path / "lists")
    source = b"10.0.0.0/8\n"
    key = hashlib.sha256(source).hexdigest()
    cache.put(key, parsed(), source, "/p/l.txt")
    (tmp_path / "lists" / f"{key}.txt").write_bytes(b"10.0.0.0/9\n")
    assert cache.latest("/p/l.txt") is None
    assert cache.get(key) == parsed()


@pytest.mark.parametrize("damage", ["flip", "truncate", "renamed"])
def test_a_damaged_or_misplaced_cache_file_is_a_miss(tmp_path: Path, damage: str) -> None:
    cache = ListCacheDir(tmp_path / "lists")
    cache.put(KEY, parsed(), b"", "/p/l.txt")
    path = tmp_path / "lists" / KEY
    if damage in ("flip", "truncate"):
        damage_file(path, damage)
    else:
        path.rename(tmp_path / "lists" / ("cd" * 32))
        assert cache.get("cd" * 32) is None
        return
    assert cache.get(KEY) is None
    cache.put(KEY, parsed(), b"", "/p/l.txt")  # a miss parses again and repairs the entry
    assert cache.get(KEY) == parsed()


def test_a_cache_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    cache = ListCacheDir(tmp_path / "lists")
    cache.put(KEY, parsed(), b"", "/p/l.txt")
    (tmp_path / "lists").chmod(0o777)
    assert cache.get(KEY) is None
    (tmp_path / "lists").chmod(0o700)
    assert cache.get(KEY) == parsed()


def test_an_unusable_cache_only_costs_time(tmp_path: Path, write_files: WriteFiles) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = ListCacheDir(blocker / "lists")
    cache.put(KEY, parsed(), b"", "/p/l.txt")
    assert cache.get(KEY) is None
    assert cache.get("not a sha256") is None
    root = write_files({"p.yaml": policy_text(), "big.txt": "10.0.0.0/8\n"})
    assert load_policy(root, now=NOW, cache=cache).service("https") is not None


def test_the_cache_keeps_the_most_recently_used_entries(tmp_path: Path) -> None:
    cache = ListCacheDir(tmp_path / "lists", keep=3)
    keys = [f"{n:064x}" for n in range(5)]
    for age, key in enumerate(keys[:3]):
        cache.put(key, parsed(), b"", f"/p/{key}")
        os.utime(tmp_path / "lists" / key, (1000 + age, 1000 + age))
    assert cache.get(keys[0]) == parsed()  # used: now the newest
    cache.put(keys[3], parsed(), b"", "/p/3")
    cache.put(keys[4], parsed(), b"", "/p/4")
    kept = sorted(p.name for p in (tmp_path / "lists").iterdir() if len(p.name) == 64)
    assert kept == sorted([keys[0], keys[3], keys[4]])
    assert sorted(p.name for p in (tmp_path / "lists").iterdir() if p.name.endswith(".txt")) == sorted(
        f"{k}.txt" for k in kept)


# --- a changed list, parsed where it changed ------------------------------------------------

# Few enough to collide: duplicates, overlaps (a /24 and its /26s, /32s), touching ranges,
# and the last addresses of both families.
POOL = ["10.1.0.0/24", "10.1.0.0/26", "10.1.0.64/26", "10.1.1.0/24", "10.1.0.7/32", "10.1.2.0/23",
        "255.255.255.255/32", "255.255.255.254/31", "2001:db8::/48", "2001:db8:0:1::/64", "2001:db8:1::/48",
        "ffff::/16", "192.0.2.1"]
DECOR = ["", "   ", "# comment", "{} # trailing", "  {}  ", "{}\t"]


def full_parse(data: bytes) -> ParsedList | None:
    return hostwall.policy._parse_list(data, [], hostwall.policy.Origin("p.yaml", 1, "e"), Path("l.txt"), "l.txt")


@st.composite
def list_text(draw: st.DrawFn, max_lines: int = 30) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(0, max_lines))):
        decor = draw(st.sampled_from(DECOR))
        lines.append(decor.format(draw(st.sampled_from(POOL))) if "{}" in decor else decor)
    return lines


@st.composite
def edited(draw: st.DrawFn) -> tuple[bytes, bytes]:
    old = draw(list_text())
    new = list(old)
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(new)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        line = draw(st.sampled_from([*POOL, "300.1.2.3", "10.1.0.5/24", "", "# new"]))
        if action == "insert":
            new.insert(position, line)
        elif new and position < len(new):
            if action == "delete":
                del new[position]
            else:
                new[position] = line
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    final = draw(st.sampled_from(["", ending]))
    return (ending.join(old) + final).encode(), (ending.join(new) + final).encode()


@given(edited())
@settings(max_examples=250, deadline=None)
def test_a_changed_list_reparsed_where_it_changed_equals_a_full_parse(case: tuple[bytes, bytes]) -> None:
    old, new = case
    previous = full_parse(old)
    if previous is None:
        return  # only valid lists are ever cached
    expected = full_parse(new)
    result = reparse_list(old, previous, new)
    if expected is None:
        assert result is None  # a bad line: the full parse reports it
    else:
        assert result == expected


@pytest.mark.parametrize("old", [
    b"\xef\xbb\xbf10.1.0.0/24\n",  # a byte-order mark
    b"10.1.0.0/24\r10.1.1.0/24\n",  # a lone CR ends a line for splitlines()
    b"10.1.0.0/24\x0c\n",  # so does a form feed
    "10.1.0.0/24 # caf\u2028\n".encode(),  # and LINE SEPARATOR
])
def test_lists_with_other_line_boundaries_are_parsed_whole(old: bytes) -> None:
    previous = full_parse(old)
    assert previous is not None
    assert reparse_list(old, previous, old + b"10.9.0.0/24\n") is None


@st.composite
def line_edits(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    """A window of lines before and after edits: in place (the same number of lines), with
    lines inserted or deleted, with or without repeated lines."""
    repeats = draw(st.booleans())
    count = draw(st.integers(0, 80))
    old = [f"10.{i // 250}.{i % 250}.0/24".encode() for i in range(count)]
    if repeats and old:
        old += draw(st.lists(st.sampled_from(old), max_size=5))
    new = list(old)
    for _ in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(["replace", "swap", "insert", "delete"] if not repeats else
                                      ["replace", "swap", "insert", "delete", "duplicate"]))
        position = draw(st.integers(0, max(0, len(new) - 1)))
        fresh = f"198.18.{draw(st.integers(0, 3))}.{draw(st.integers(0, 255))}/32".encode()
        if action == "insert" or not new:
            new.insert(position, fresh)
        elif action == "replace":
            new[position] = fresh
        elif action == "swap":
            other = draw(st.integers(0, len(new) - 1))
            new[position], new[other] = new[other], new[position]
        elif action == "delete":
            del new[position]
        else:
            new.insert(draw(st.integers(0, len(new))), new[position])
    return old, new


@given(line_edits())
@settings(max_examples=300, deadline=None)
def test_the_lines_taken_out_and_put_in_turn_the_old_window_into_the_new(case: tuple[list[bytes], list[bytes]]
                                                                         ) -> None:
    old, new = case
    gone, came = hostwall.policy._line_changes(list(old), list(new))
    left = Counter(old)
    left.subtract(gone)
    assert min(left.values(), default=0) >= 0  # only lines old holds are taken out
    assert +left + Counter(came) == Counter(new)


def test_a_few_edits_are_found_in_step_and_a_reordered_list_by_its_sets_of_lines() -> None:
    old = [f"10.0.{i // 250}.{i % 250}/32".encode() for i in range(1000)]
    changes = hostwall.policy._line_changes
    in_place = list(old)
    in_place[10], in_place[900] = b"198.18.0.1/32", b"198.18.0.2/32"
    assert changes(old, in_place) == ([old[10], old[900]], [b"198.18.0.1/32", b"198.18.0.2/32"])
    shifted = [b"198.18.0.3/32", *old[:500], *old[501:]]
    assert changes(old, shifted) == ([old[500]], [b"198.18.0.3/32"])
    block = [*old[:300], *(f"198.18.1.{i}/32".encode() for i in range(5)), *old[300:700], *old[703:]]
    assert changes(old, block) == (old[700:703], [f"198.18.1.{i}/32".encode() for i in range(5)])
    assert changes(old, old[:-4]) == (old[-4:], [])
    reordered = list(reversed(old))  # no shift brings the two in step: the sets are compared
    assert changes(old, reordered) == ([], [])


def test_a_duplicated_line_removed_once_keeps_its_twin() -> None:
    old = b"10.1.0.0/24\n10.1.0.0/24\n10.1.0.0/26\n"
    new = b"10.1.0.0/24\n10.1.0.0/26\n"
    previous = full_parse(old)
    assert previous is not None and previous.lines4 is not None
    result = reparse_list(old, previous, new)
    assert result == full_parse(new) and result is not None and result.entries == 2


def test_a_changed_list_is_reparsed_where_it_changed_through_load_policy(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = random_list(3, 3000).splitlines()
    root = write_files({"p.yaml": policy_text(), "big.txt": "\n".join(lines) + "\n"})
    cache = MemoryCache()
    load_policy(root, now=NOW, cache=cache)
    replaced, lines[1500] = lines[1500], "198.18.0.1/32"
    (root / "big.txt").write_text("\n".join(lines) + "\n")
    with monkeypatch.context() as patch:
        only_inline_parsing(patch, {replaced.split("#")[0].strip(), "198.18.0.1/32"})  # that line only
        policy = load_policy(root, now=NOW, cache=cache)
    assert compile_policy(policy) == compile_policy(load_policy(root, now=NOW))
    assert cache.puts == 2


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_scattered_edits_and_moved_lines_of_a_long_list(data: st.DataObject) -> None:
    lines = random_list(data.draw(st.integers(0, 5)), 400).splitlines()
    old = ("\n".join(lines) + "\n").encode()
    for _ in range(data.draw(st.integers(1, 5))):
        first, second = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["swap", "replace", "delete", "duplicate"]))
        if action == "swap":
            lines[first], lines[second] = lines[second], lines[first]
        elif action == "replace":
            lines[first] = data.draw(st.sampled_from(POOL))
        elif action == "delete":
            del lines[first]
        else:
            lines.insert(second, lines[first])
    new = ("\n".join(lines) + "\n").encode()
    previous = full_parse(old)
    assert previous is not None
    assert reparse_list(old, previous, new) == full_parse(new)
