"""Policy files validated once: the cache of validated files (FileSpec by content) gives the
same policy as validating, misses whenever the bytes or the cache file differ, and lets
an unchanged policy load without pydantic or YAML."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from unit_support import damage as damage_file
from unit_support import refuse_validation

import hostwall.policyfile
import hostwall.yamlsource
from hostwall import __version__
from hostwall.errors import PolicyError, Problem
from hostwall.policy import Policy, load_policy
from hostwall.policyspec import SPEC_SEMANTICS, AllowSpec, FileSpec, ServiceSpec
from hostwall.state import ListCacheDir
from hostwall.yamlsource import LocatedData

WriteFiles = Callable[[dict[str, str | bytes]], Path]
NOW = datetime(2026, 6, 1, tzinfo=UTC)

POLICY = """\
settings:
  log_rate: 25
  strict_source: true
  owners: [partner-c, ops]
services:
  https:
    allow:
      - cidr: 203.0.113.45/32
        owner: partner-c
        reason: published ranges
        review_by: 2027-06-30
        expires: 2026-09-01T12:30:00+02:00
      - cidr: 2001:db8:10::/48
        owner: ops
        reason: office
        review_by: 2027-01-31
        broad_ok: true
        broad_reason: the office's own /48
      - file: partners.txt
        owner: partner-c
        reason: their list
        review_by: 2027-06-30
  admin:
    ports: [8443, "9000-9010"]
    protocols: [tcp, udp]
    action: reject
    widest: {ipv4: 28, ipv6: 56}
    entry_counters: true
    log: off
    allow:
      - cidr: 192.0.2.0/28
        owner: ops
        reason: jump hosts
        review_by: 2027-01-31
  postgres:
"""


def cache_at(root: Path) -> ListCacheDir:
    return ListCacheDir(root / "state" / "cache" / "lists")


def policy_dir(write_files: WriteFiles, text: str = POLICY) -> Path:
    return write_files({"p.yaml": text, "partners.txt": "198.51.100.0/24\n198.51.100.7/32\n"})


def same_policy(a: Policy, b: Policy) -> None:
    assert a == b
    assert [(s.name, s.ports, s.protocols, s.action, s.widest, s.entry_counters, s.log, s.defined_in, s.listed)
            for s in a.services] == [(s.name, s.ports, s.protocols, s.action, s.widest, s.entry_counters, s.log,
                                      s.defined_in, s.listed) for s in b.services]
    for mine, theirs in zip(a.services, b.services, strict=True):
        assert [(e.interval, e.owner, e.reason, e.review_by, e.expires, e.origin, e.broad_ok) for e in mine.entries] \
            == [(e.interval, e.owner, e.reason, e.review_by, e.expires, e.origin, e.broad_ok) for e in theirs.entries]


def test_a_cached_policy_file_is_not_validated_again_and_loads_the_same(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = policy_dir(write_files)
    uncached = load_policy(root, now=NOW)
    cache = cache_at(tmp_path)
    validated = load_policy(root, now=NOW, cache=cache)
    assert len(list(cache.files_path.iterdir())) == 1
    with monkeypatch.context() as patch:
        refuse_validation(patch)
        cached = load_policy(root, now=NOW, cache=cache)
    same_policy(cached, uncached)
    same_policy(validated, uncached)
    assert cached.warnings() == uncached.warnings()
    expires = cached.service("https").entries[0].expires  # type: ignore[union-attr]
    assert expires is not None and expires.utcoffset() is not None and expires.timestamp() == 1788258600.0


def test_an_expiry_is_decided_at_load_time_not_when_the_file_was_cached(write_files: WriteFiles,
                                                                         tmp_path: Path) -> None:
    root = policy_dir(write_files)
    cache = cache_at(tmp_path)
    before = load_policy(root, now=NOW, cache=cache)
    after = load_policy(root, now=datetime(2026, 10, 1, tzinfo=UTC), cache=cache)
    assert len(before.expired) == 0
    assert [str(e.interval) for e in after.expired] == ["203.0.113.45/32"]


def test_a_changed_file_is_validated_again(write_files: WriteFiles, tmp_path: Path) -> None:
    root = policy_dir(write_files)
    cache = cache_at(tmp_path)
    load_policy(root, now=NOW, cache=cache)
    (root / "p.yaml").write_text(POLICY.replace("log_rate: 25", "log_rate: 26"))
    assert load_policy(root, now=NOW, cache=cache).settings.log_rate == 26
    (root / "p.yaml").write_text(POLICY.replace("log: off", "log: [off]"))
    with pytest.raises(PolicyError) as caught:
        load_policy(root, now=NOW, cache=cache)
    assert caught.value.problems[0].file == str(root / "p.yaml")


def test_an_invalid_file_is_never_cached(write_files: WriteFiles, tmp_path: Path) -> None:
    root = policy_dir(write_files, POLICY.replace("review_by: 2027-01-31\n        broad_ok", "broad_ok"))
    cache = cache_at(tmp_path)
    for _ in range(2):
        with pytest.raises(PolicyError) as caught:
            load_policy(root, now=NOW, cache=cache)
        assert "review_by" in str(caught.value.problems[0])
    assert not cache.files_path.exists() or not any(cache.files_path.iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate", "other file", "other semantics", "other release"])
def test_a_damaged_or_misplaced_validated_file_is_a_miss(
    write_files: WriteFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, damage: str
) -> None:
    root = policy_dir(write_files)
    cache = cache_at(tmp_path)
    load_policy(root, now=NOW, cache=cache)
    key = hashlib.sha256((root / "p.yaml").read_bytes()).hexdigest()
    path = cache.files_path / key
    if damage in ("flip", "truncate"):
        damage_file(path, damage)
    elif damage == "other file":
        path.rename(cache.files_path / ("cd" * 32))
        assert cache.validated("cd" * 32) is None
    else:
        body = path.read_bytes()[:-32]
        if damage == "other semantics":
            body = body.replace(f'"semantics":{SPEC_SEMANTICS}'.encode(), b'"semantics":0')
        else:
            body = body.replace(f'"version":"{__version__}"'.encode(), b'"version":"0.0.1"')
        assert body != path.read_bytes()[:-32]
        path.write_bytes(body + hashlib.sha256(body).digest())
    assert cache.validated(key) is None
    validated: list[str] = []
    original = hostwall.yamlsource.document

    def counting(name: str, text: str) -> LocatedData | Problem:
        validated.append(name)  # a file is validated only once its YAML is loaded
        return original(name, text)

    uncached = load_policy(root, now=NOW)
    monkeypatch.setattr(hostwall.yamlsource, "document", counting)
    same_policy(load_policy(root, now=NOW, cache=cache), uncached)
    assert validated == [str(root / "p.yaml")]
    assert cache.validated(key) is not None  # the miss validated the file and cached it again


def test_a_validated_file_that_others_can_write_is_not_trusted(write_files: WriteFiles, tmp_path: Path) -> None:
    root = policy_dir(write_files)
    cache = cache_at(tmp_path)
    load_policy(root, now=NOW, cache=cache)
    key = hashlib.sha256((root / "p.yaml").read_bytes()).hexdigest()
    cache.files_path.chmod(0o777)
    assert cache.validated(key) is None
    cache.files_path.chmod(0o700)
    assert cache.validated(key) is not None


def test_a_read_only_cache_writes_nothing(write_files: WriteFiles, tmp_path: Path) -> None:
    root = policy_dir(write_files)
    load_policy(root, now=NOW, cache=ListCacheDir(tmp_path / "state" / "cache" / "lists", writable=False))
    assert not (tmp_path / "state").exists()


def test_the_cached_form_round_trips_every_field(write_files: WriteFiles) -> None:
    root = policy_dir(write_files)
    spec = hostwall.policyfile.validate_file(str(root / "p.yaml"), (root / "p.yaml").read_text())
    assert isinstance(spec, FileSpec)
    assert FileSpec.from_json(spec.to_json()) == spec
    document = json.loads(spec.to_json())
    assert [s["name"] for s in document["services"]] == ["https", "admin", "postgres"]
    with pytest.raises(ValueError):
        FileSpec.from_json(b'{"semantics": 1}')


def test_the_cached_form_keeps_each_expiry_as_written() -> None:
    written = ["2030-01-01T10:00:00+02:00", "2030-01-01T10:00:00.5-05:30", "2030-01-01T10:00:00Z"]
    allow = tuple(AllowSpec(4 + index, f"192.0.2.{index}/32", None, "ops", "r", date(2031, 1, 1),
                            datetime.fromisoformat(text), index == 1)
                  for index, text in enumerate(written))
    spec = FileSpec({"log_rate": 5, "owners": ["ops"]}, 1, (ServiceSpec("https", 2, allow=allow),))
    back = FileSpec.from_json(spec.to_json())
    assert back == spec
    assert [a.expires.isoformat() for a in back.services[0].allow if a.expires] == \
        [datetime.fromisoformat(text).isoformat() for text in written]


def test_an_unchanged_policy_loads_without_pydantic_or_yaml(write_files: WriteFiles, tmp_path: Path) -> None:
    root = policy_dir(write_files)
    state = tmp_path / "state"
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "from hostwall.policy import load_policy\n"
        "from hostwall.state import StateDir\n"
        f"policy = load_policy(Path({str(root)!r}), cache=StateDir(Path({str(state)!r})).list_cache())\n"
        "print(sorted(m for m in ('pydantic', 'yaml', 'hostwall.policyfile') if m in sys.modules))\n"
    )

    def loaded_modules() -> str:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                                timeout=60)
        return result.stdout.strip()

    # The first load validates: every value is plainly valid, so without the models.
    assert loaded_modules() == "['yaml']"
    assert loaded_modules() == "[]"
    (root / "p.yaml").write_text(POLICY.replace("log_rate: 25", "log_rate: 30"))
    assert loaded_modules() == "['yaml']"
    # A value the models would coerce (a quoted number) is theirs to decide.
    (root / "p.yaml").write_text(POLICY.replace("log_rate: 25", "log_rate: '30'"))
    assert loaded_modules() == "['hostwall.policyfile', 'pydantic', 'yaml']"
