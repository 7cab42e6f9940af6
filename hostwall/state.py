"""The state directory: generations on disk and the lock that serialises changes.

Layout (all written via temp + fsync + rename, so a crash leaves either the old or
the new file, never a torn one):

    lock                      flock'd by every mutating command; holds the holder's PID
    current.json              the generation the kernel was last seen to accept
    generations/00000042/     one directory per generation, renamed into place whole
        meta.json             number, time, user, message, hashes of the files below
        ruleset.json          the compiled ruleset's structure, naming each set's digest
        sets/NAME             each set's elements (IntervalSet.to_bytes)
        transaction.nft       the exact text submitted to the kernel, when it was a full load
        policy/...            the policy files that produced it
    blobs/SHA256              the content of sets/ and policy/ files, stored once
    cache/lists/SHA256        parsed file: lists by the sha256 of their bytes (ListCacheDir)
    cache/files/SHA256        validated policy files by the sha256 of their bytes (the same)

The files under sets/ and policy/ are hard links to blobs/, so that a generation that
changes one element of a 100k set, or one line of a policy, does not write the
unchanged megabytes again; every file is still verified against the generation's own
recorded hashes when read. A blob is written and fsynced before any generation links
it, and deleted once no generation links it any more (link count 1).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from msgspec import Struct
from msgspec.structs import asdict

from hostwall.cidr import IntervalSet
from hostwall.clock import now as wall_now
from hostwall.errors import HostwallError, LockBusy, PermissionDenied, StateError
from hostwall.policy import ParsedList
from hostwall.policyspec import FileSpec
from hostwall.ruleset import Ruleset

DEFAULT_STATE_DIR = Path("/var/lib/hostwall")
DEFAULT_KEEP = 50


class GenerationMeta(Struct, frozen=True):
    number: int
    created: float
    user: str
    message: str
    digest: str
    entries: int
    files: dict[str, str]  # relative path -> sha256 of its content
    # `hostwall disable`: loading this generation removes the table.
    disabled: bool = False


# How often the agent records that it is alive, for `hostwall status`.
HEARTBEAT_SECONDS = 5.0


class AgentState(Struct, frozen=True):
    """What the agent last said about itself; status compares heartbeat with the clock."""

    pid: int
    started: float
    heartbeat: float
    status: str
    running: bool  # False once it stopped cleanly
    drops_read: int = 0
    lost: int = 0


class Pending(Struct, frozen=True):
    """A generation applied with --confirm-within that reverts unless confirmed in time."""

    generation: int
    revert_to: int | None  # None: the table did not exist before; revert removes it
    deadline: float


class Current(Struct, frozen=True):
    generation: int
    digest: str
    structure: str
    applied: float
    # The label written by the last full load (the generation set's comment); element
    # deltas leave it as it is.
    comment: str | None = None
    loaded_by: str = "full"  # "full" or "delta"
    # When the last full load created the table, and with it every per-entry counter;
    # deltas keep it. None in records written before counters were read.
    counting_since: float | None = None
    # The generation is a `hostwall disable`: the kernel holds no hostwall table on purpose,
    # and nothing puts it back but an apply or a rollback.
    disabled: bool = False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path, strict: bool = False) -> None:
    """shutil.rmtree of path if it is there (strict: errors raised, not ignored). shutil
    is imported only then: with the archive formats it loads, it costs about 2 ms of
    every start, and an apply usually has nothing to remove."""
    if not os.path.lexists(path):
        return
    import shutil

    shutil.rmtree(path, ignore_errors=not strict)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_file(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_dir:
        _fsync_dir(path.parent)


class Generation(Struct, frozen=True):
    meta: GenerationMeta
    path: Path

    def ruleset(self) -> Ruleset:
        data = json.loads(self._verified("ruleset.json"))
        if "elements" in data:  # written before sets were stored apart (format 1)
            return Ruleset.from_data(data)
        try:
            sets = {name: IntervalSet.from_bytes(self._verified(f"sets/{name}")) for name in data["sets"]}
            return Ruleset.from_record(data, sets)
        except (ValueError, KeyError, TypeError) as exc:
            raise StateError(f"generation {self.meta.number}: ruleset does not match its sets: {exc}") from exc

    @property
    def has_transaction(self) -> bool:
        """False for a generation the kernel got as an element delta: no full text was sent."""
        return "transaction.nft" in self.meta.files

    def transaction(self) -> str:
        return self._verified("transaction.nft").decode()

    def _verified(self, name: str) -> bytes:
        try:
            data = (self.path / name).read_bytes()
        except OSError as exc:
            raise _read_failed(self.path / name, exc,
                               f"generation {self.meta.number}: cannot read {name}: {exc.strerror}") from exc
        if _sha256(data) != self.meta.files.get(name):
            raise StateError(
                f"generation {self.meta.number}: {name} does not match its recorded hash; "
                "the file is corrupt and will not be loaded"
            )
        return data


def _read_failed(path: Path, exc: BaseException, otherwise: str) -> HostwallError:
    """A read refused for want of rights is the caller's privileges (exit 5), not a damaged
    state directory (exit 6): the operator's fix is sudo, not repair."""
    if isinstance(exc, PermissionError):
        return PermissionDenied(f"cannot read {path}: permission denied; the state directory belongs to root: "
                                "run the command with sudo")
    return StateError(otherwise)


class StateDir:
    def __init__(self, path: Path, keep: int = DEFAULT_KEEP, clock: Callable[[], float] = wall_now,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.keep = keep
        self._clock = clock
        self._monotonic = monotonic

    @property
    def generations_dir(self) -> Path:
        return self.path / "generations"

    @property
    def blobs_dir(self) -> Path:
        return self.path / "blobs"

    def list_cache(self, *, writable: bool = True) -> ListCacheDir:
        """The cache of parsed file: lists kept in this state directory (for load_policy);
        read-only commands read it and write nothing, not even its access times."""
        return ListCacheDir(self.path / "cache" / "lists", writable=writable)

    def ensure(self) -> None:
        try:
            self.generations_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.path}: {exc.strerror}") from exc

    @contextmanager
    def locked(self, wait: float = 0.0, sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
        self.ensure()
        lock_path = self.path / "lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {lock_path}: {exc.strerror}") from exc
        try:
            # An interval: the monotonic clock, which no clock change moves.
            deadline = self._monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._monotonic() >= deadline:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                        raise LockBusy(
                            f"another hostwall process (PID {holder}) holds {lock_path}; "
                            "wait for it or pass --wait SECONDS"
                        ) from None
                    sleep(0.05)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def current(self) -> Current | None:
        path = self.path / "current.json"
        try:
            data = json.loads(path.read_bytes())
            return Current(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise _read_failed(path, exc, f"{path} is unreadable or corrupt: {exc}") from exc

    def set_current(self, current: Current) -> None:
        self._write_or_fail(self.path / "current.json", json.dumps(asdict(current), indent=1).encode())

    def clear_current(self) -> None:
        (self.path / "current.json").unlink(missing_ok=True)
        _fsync_dir(self.path)

    def pending(self) -> Pending | None:
        path = self.path / "pending.json"
        try:
            pending = Pending(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise _read_failed(path, exc, f"{path} is unreadable or corrupt: {exc}; run `hostwall confirm` to "
                               "keep the loaded firewall, or `hostwall rollback`") from exc
        # json reads NaN and Infinity; a deadline must be a moment that comes.
        if (not isinstance(pending.generation, int) or isinstance(pending.generation, bool)
                or not (pending.revert_to is None or isinstance(pending.revert_to, int))
                or not _finite_number(pending.deadline)):
            raise StateError(f"{path} is corrupt (generation {pending.generation!r}, revert_to "
                             f"{pending.revert_to!r}, deadline {pending.deadline!r}); run `hostwall confirm` "
                             "to keep the loaded firewall, or `hostwall rollback`")
        return pending

    def set_pending(self, pending: Pending) -> None:
        self._write_or_fail(self.path / "pending.json", json.dumps(asdict(pending), indent=1).encode())

    def agent(self) -> AgentState | None:
        path = self.path / "agent.json"
        try:
            return AgentState(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise _read_failed(path, exc, f"{path} is unreadable or corrupt: {exc}") from exc

    def set_agent(self, agent: AgentState) -> None:
        try:
            # A heartbeat every few seconds: losing the last one in a crash costs nothing.
            atomic_write(self.path / "agent.json", json.dumps(asdict(agent)).encode(), sync_dir=False)
        except OSError as exc:
            raise StateError(f"cannot write {self.path / 'agent.json'}: {exc.strerror}") from exc

    def pending_since(self) -> float:
        """When the pending confirmation was recorded (wall clock), or inf when none is."""
        try:
            return (self.path / "pending.json").stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def clear_pending(self) -> None:
        (self.path / "pending.json").unlink(missing_ok=True)
        _fsync_dir(self.path)

    def _write_or_fail(self, path: Path, data: bytes) -> None:
        try:
            atomic_write(path, data)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror}") from exc

    def numbers(self) -> list[int]:
        try:
            return sorted(int(p.name) for p in self.generations_dir.iterdir() if p.name.isdigit())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _read_failed(self.generations_dir, exc, f"cannot list {self.generations_dir}: {exc.strerror}") \
                from exc

    def next_number(self) -> int:
        numbers = self.numbers()
        current = self.current()
        highest = max([*numbers, current.generation if current else 0, 0])
        return highest + 1

    def generation(self, number: int) -> Generation:
        path = self.generations_dir / f"{number:08d}"
        try:
            meta = GenerationMeta(**json.loads((path / "meta.json").read_bytes()))
        except FileNotFoundError:
            raise StateError(f"generation {number} does not exist (see `hostwall generations`)") from None
        except (OSError, ValueError, TypeError) as exc:
            raise _read_failed(path, exc, f"generation {number}: meta.json is corrupt: {exc}") from exc
        return Generation(meta, path)

    def generations(self) -> list[Generation]:
        result = []
        for number in self.numbers():
            try:
                result.append(self.generation(number))
            except StateError:
                continue
        return result

    def stage(
        self,
        number: int,
        *,
        ruleset: Ruleset,
        transaction: str | None,
        policy_files: dict[str, bytes],
        user: str,
        message: str,
        known_hashes: dict[str, str] | None = None,
        disabled: bool = False,
    ) -> Generation:
        """Write a generation directory whole; it only becomes current after the kernel accepts it.

        transaction is the full-load text, or None when the kernel gets the generation as
        an element delta (rollback renders it from the recorded ruleset then).
        known_hashes: sha256 of some policy files, already computed while loading them.
        """
        self.ensure()
        final = self.generations_dir / f"{number:08d}"
        staging = self.generations_dir / f".staging-{number:08d}-{os.getpid()}"
        record, sets = ruleset.to_record()
        own: dict[str, bytes] = {
            "ruleset.json": json.dumps(record, sort_keys=True, separators=(",", ":")).encode(),
        }
        if transaction is not None:
            own["transaction.nft"] = transaction.encode()
        shared = {f"sets/{name}": intervals.to_bytes() for name, intervals in sets.items()}
        shared.update({f"policy/{name}": data for name, data in policy_files.items()})
        known = {f"policy/{name}": digest for name, digest in (known_hashes or {}).items()}
        files = {name: known.get(name) or _sha256(data) for name, data in (own | shared).items()}
        meta = GenerationMeta(
            number=number,
            created=self._clock(),
            user=user,
            message=message,
            digest=ruleset.digest,
            entries=ruleset.entry_count(),
            files=files,
            disabled=disabled,
        )
        try:
            # The blob files are fsynced; their entries in blobs/ need not be: the
            # generation's own links (fsynced below) keep the content, and a blob entry
            # lost in a crash is written again when next needed.
            for name, data in shared.items():
                self._store_blob(files[name], data)
            _remove_tree(staging)
            (staging / "policy").mkdir(parents=True, mode=0o700)
            (staging / "sets").mkdir(mode=0o700)
            for name, data in own.items():
                _write_file(staging / name, data)
            for name, data in shared.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self._link_blob(files[name], target, data)
            _write_file(staging / "meta.json", json.dumps(asdict(meta), indent=1).encode())
            for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}, reverse=True):
                _fsync_dir(directory)
            if final.exists():
                _remove_tree(final, strict=True)
            os.rename(staging, final)
            _fsync_dir(self.generations_dir)
        except OSError as exc:
            _remove_tree(staging)
            # Blobs written for this generation alone would stay until the next prune.
            with contextlib.suppress(OSError):
                self._sweep()
            hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise StateError(f"cannot record generation {number} in {self.path}: {exc.strerror}{hint}") from exc
        return Generation(meta, final)

    def _store_blob(self, digest: str, data: bytes) -> None:
        """Make blobs/digest hold data (written and fsynced when it does not yet)."""
        path = self.blobs_dir / digest
        with contextlib.suppress(FileNotFoundError):
            if _same_content(path, data):
                return
        # Missing, or damaged: a new file (a new inode) replaces it; generations that
        # link the damaged one keep it, and their hash check reports it.
        self.blobs_dir.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, data, sync_dir=False)

    def _link_blob(self, digest: str, target: Path, data: bytes) -> None:
        try:
            os.link(self.blobs_dir / digest, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                raise
            _write_file(target, data)  # no hard links here: a copy of its own

    def discard(self, number: int) -> None:
        _remove_tree(self.generations_dir / f"{number:08d}")

    def prune(self) -> list[int]:
        """Remove generations beyond the last `keep` (never the current one) and blobs no
        generation links any more. Call it holding the lock."""
        current = self.current()
        keep_numbers = set(self.numbers()[-self.keep:])
        if current:
            keep_numbers.add(current.generation)
        removed = [n for n in self.numbers() if n not in keep_numbers]
        for number in removed:
            self.discard(number)
        self._sweep()
        return removed

    def _sweep(self) -> None:
        # Under the lock nobody else is staging: a staging directory is a crash's leftover.
        if self.generations_dir.is_dir():
            for leftover in self.generations_dir.iterdir():
                if leftover.name.startswith(".staging-"):
                    _remove_tree(leftover)
        if not self.blobs_dir.is_dir():
            return
        for blob in os.scandir(self.blobs_dir):
            with contextlib.suppress(FileNotFoundError):
                if blob.stat(follow_symlinks=False).st_nlink <= 1:
                    os.unlink(blob.path)


def _same_content(path: Path, data: bytes, chunk: int = 1 << 16) -> bool:
    """Whether the file holds exactly data. Read in chunks small enough for the allocator
    to reuse: a fresh multi-megabyte buffer costs a page fault per page."""
    offset = 0
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size != len(data):
            return False
        for _ in range(len(data) // chunk + 2):
            block = handle.read(chunk)
            if not block:
                break
            if data[offset:offset + len(block)] != block:
                return False
            offset += len(block)
    return offset == len(data)


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ListCacheDir:
    """policy.ListCache in a directory: for each list content, by its sha256, the parsed
    form (SHA256) and the bytes (SHA256.txt); for each list path the sha256 of the
    content last put for it (paths/SHA256-OF-PATH); beside it (../files/SHA256), each
    validated policy file.

    A cached entry skips the validation of every line, so it is trusted only in a
    directory that no one but this user can write; each parsed file carries its own
    sha256 and the list's, and a content file is checked against its name, so a damaged
    or misplaced file is a miss, never a wrong allowlist. For the same reason the files
    are not fsynced: after a crash a torn one is a miss. Any I/O failure is a miss too
    (for example `validate` run by a user who cannot read the state directory). The
    `keep` most recently used contents are kept.
    """

    MAGIC = b"HWLISTS2\n"
    SPEC_MAGIC = b"HWSPEC1\n"

    def __init__(self, path: Path, keep: int = 16, *, writable: bool = True) -> None:
        self.path = path
        self.keep = keep
        self.writable = writable

    @property
    def files_path(self) -> Path:
        return self.path.parent / "files"

    def _trusted(self, path: Path | None = None) -> bool:
        path = path or self.path
        try:
            for directory in (path, path.parent):
                info = os.stat(directory)
                if info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    return False
        except OSError:
            return False
        return True

    def get(self, sha256: str) -> ParsedList | None:
        if not _SHA256_HEX.fullmatch(sha256) or not self._trusted():
            return None
        body = self._unsealed(self.path / sha256, self.MAGIC, sha256)
        try:
            return None if body is None else ParsedList.decode(body)
        except ValueError:
            return None

    def _unsealed(self, path: Path, magic: bytes, sha256: str) -> memoryview | None:
        """What _sealed wrapped for sha256 in the file at path, or None when the file is
        missing, damaged or someone else's; a hit marks it recently used (kept by eviction)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        head = magic + bytes.fromhex(sha256)
        view = memoryview(data)  # no copies of the megabytes: each costs page faults
        if not data.startswith(head) or len(data) < len(head) + 32 or hashlib.sha256(view[:-32]).digest() != data[-32:]:
            return None
        if self.writable:
            with contextlib.suppress(OSError):
                os.utime(path)
        return view[len(head):-32]

    def latest(self, path: str) -> tuple[bytes, ParsedList] | None:
        if not self._trusted():
            return None
        try:
            sha256 = (self.path / "paths" / _sha256(path.encode())).read_text().strip()
            source = (self.path / f"{sha256}.txt").read_bytes() if _SHA256_HEX.fullmatch(sha256) else b""
        except OSError:
            return None
        if _sha256(source) != sha256:
            return None
        parsed = self.get(sha256)
        return None if parsed is None else (source, parsed)

    def knows(self, sha256: str, path: str) -> bool:
        return _SHA256_HEX.fullmatch(sha256) is not None and self._trusted() and (
            (self.path / sha256).exists() or (self.path / "paths" / _sha256(path.encode())).exists())

    def put(self, sha256: str, parsed: ParsedList, source: bytes, path: str) -> None:
        if not self.writable or not _SHA256_HEX.fullmatch(sha256):
            return
        try:
            for directory in (self.path.parent, self.path, self.path / "paths"):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._trusted():
                return
            _replace(self.path / sha256, *_sealed(self.MAGIC, sha256, parsed.encoded()))
            _replace(self.path / f"{sha256}.txt", source)
            _replace(self.path / "paths" / _sha256(path.encode()), sha256.encode())
            self._evict()
        except OSError:
            return  # a cache that cannot be written only costs time

    def validated(self, sha256: str) -> FileSpec | None:
        if not _SHA256_HEX.fullmatch(sha256) or not self._trusted(self.files_path):
            return None
        body = self._unsealed(self.files_path / sha256, self.SPEC_MAGIC, sha256)
        try:
            return None if body is None else FileSpec.from_json(bytes(body))
        except ValueError:
            return None

    def keep_validated(self, sha256: str, spec: FileSpec) -> None:
        if not self.writable or not _SHA256_HEX.fullmatch(sha256):
            return
        try:
            self.files_path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._trusted(self.files_path):
                return
            _replace(self.files_path / sha256, *_sealed(self.SPEC_MAGIC, sha256, (spec.to_json(),)))
            _evict_oldest(self.files_path, self.keep)
        except OSError:
            return

    def _evict(self) -> None:
        _evict_oldest(self.path, self.keep)
        for pointer in os.scandir(self.path / "paths"):
            with contextlib.suppress(OSError):
                if not (self.path / Path(pointer.path).read_text().strip()).exists():
                    os.unlink(pointer.path)


def _evict_oldest(directory: Path, keep: int) -> None:
    """Delete all but the keep most recently used SHA256 entries (and their .txt)."""
    used = []
    for entry in os.scandir(directory):
        if _SHA256_HEX.fullmatch(entry.name):
            with contextlib.suppress(FileNotFoundError):
                used.append((entry.stat().st_mtime, entry.name))
    for _, name in sorted(used, reverse=True)[keep:]:
        for stale in (name, f"{name}.txt"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(directory / stale)


def _sealed(magic: bytes, sha256: str, payload: Sequence[bytes]) -> list[bytes]:
    """magic, the key's digest, the payload's pieces and the sha256 of all of them, to be
    written one after the other: a torn, damaged or misplaced cache file is a miss, never
    a wrong entry."""
    head = magic + bytes.fromhex(sha256)
    digest = hashlib.sha256(head)
    for piece in payload:
        digest.update(piece)
    return [head, *payload, digest.digest()]


def _replace(path: Path, *pieces: bytes) -> None:
    """Write-then-rename without fsync: readers see the old or the new file, never a torn one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# A generation rolled back for want of confirmation (the agent's marker; an apply clears it).
REVERTED_MARKER = "reverted.json"


class Reverted(Struct, frozen=True):
    """An unconfirmed change that was rolled back, for `status` and the agent."""

    generation: int
    digest: str
    revert_to: int | None = None  # None: the table was removed
    reverted_at: float | None = None  # None in markers written before it was recorded
    reason: str = ""
    by: str = ""  # "reverter" or "agent"


def note_reverted(state: StateDir, pending: Pending, *, at: float, reason: str, by: str) -> None:
    """Remember a generation that was rolled back for want of confirmation: its digest,
    so that an automatic start does not load the same policy again from disk, and
    when, to what and why, for `status`."""
    try:
        digest = state.generation(pending.generation).meta.digest
    except StateError:
        digest = ""
    record = Reverted(pending.generation, digest, pending.revert_to, at, reason, by)
    try:
        atomic_write(state.path / REVERTED_MARKER, json.dumps(asdict(record)).encode())
    except OSError as exc:
        raise StateError(f"cannot write {state.path / REVERTED_MARKER}: {exc.strerror}") from exc


def reverted(state: StateDir) -> Reverted | None:
    """The last rollback of an unconfirmed change since the last apply, if any.
    A damaged marker is an error (StateError), never a guess."""
    path = state.path / REVERTED_MARKER
    try:
        data = json.loads(path.read_bytes())
        record = Reverted(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise StateError(f"{path} is unreadable or corrupt: {exc}") from exc
    if not (isinstance(record.generation, int) and isinstance(record.digest, str)
            and (record.revert_to is None or isinstance(record.revert_to, int))
            and (record.reverted_at is None or _finite_number(record.reverted_at))
            and isinstance(record.reason, str) and isinstance(record.by, str)):
        raise StateError(f"{path} is corrupt: unexpected values")
    return record


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def reverted_digest(state: StateDir) -> str | None:
    try:
        return str(json.loads((state.path / REVERTED_MARKER).read_bytes())["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_reverted(state: StateDir) -> None:
    (state.path / REVERTED_MARKER).unlink(missing_ok=True)
