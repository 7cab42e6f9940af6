"""The state directory: generations on disk and the lock that serialises changes.

Layout (all written via temp + fsync + rename, so a crash leaves either the old or
the new file, never a torn one):

    lock                      flock'd by every mutating command; holds the holder's PID
    current.json              the generation the kernel was last seen to accept
    generations/00000042/     one directory per generation, renamed into place whole
        meta.json             number, time, user, message, hashes of the files below
        ruleset.json          the compiled ruleset as canonical data
        transaction.nft       the exact text submitted to the kernel
        policy/...            the policy files that produced it
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hostwall.errors import LockBusy, StateError
from hostwall.ruleset import Ruleset

DEFAULT_STATE_DIR = Path("/var/lib/hostwall")
DEFAULT_KEEP = 50


@dataclass(frozen=True)
class GenerationMeta:
    number: int
    created: float
    user: str
    message: str
    digest: str
    entries: int
    files: dict[str, str]  # relative path -> sha256 of its content


@dataclass(frozen=True)
class Pending:
    """A generation applied with --confirm-within that reverts unless confirmed in time."""

    generation: int
    revert_to: int | None  # None: the table did not exist before; revert removes it
    deadline: float


@dataclass(frozen=True)
class Current:
    generation: int
    digest: str
    structure: str
    applied: float
    # The table's comment, written by the last full load; element deltas leave it as it is.
    comment: str | None = None
    loaded_by: str = "full"  # "full" or "delta"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_file(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Generation:
    meta: GenerationMeta
    path: Path

    def ruleset(self) -> Ruleset:
        return Ruleset.from_data(json.loads(self._verified("ruleset.json")))

    def transaction(self) -> str:
        return self._verified("transaction.nft").decode()

    def _verified(self, name: str) -> bytes:
        try:
            data = (self.path / name).read_bytes()
        except OSError as exc:
            raise StateError(f"generation {self.meta.number}: cannot read {name}: {exc.strerror}") from exc
        if _sha256(data) != self.meta.files.get(name):
            raise StateError(
                f"generation {self.meta.number}: {name} does not match its recorded hash; "
                "the file is corrupt and will not be loaded"
            )
        return data


class StateDir:
    def __init__(self, path: Path, keep: int = DEFAULT_KEEP, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.keep = keep
        self._clock = clock

    @property
    def generations_dir(self) -> Path:
        return self.path / "generations"

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
            deadline = self._clock() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._clock() >= deadline:
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
            raise StateError(f"{path} is unreadable or corrupt: {exc}") from exc

    def set_current(self, current: Current) -> None:
        self._write_or_fail(self.path / "current.json", json.dumps(asdict(current), indent=1).encode())

    def clear_current(self) -> None:
        (self.path / "current.json").unlink(missing_ok=True)
        _fsync_dir(self.path)

    def pending(self) -> Pending | None:
        path = self.path / "pending.json"
        try:
            return Pending(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise StateError(f"{path} is unreadable or corrupt: {exc}") from exc

    def set_pending(self, pending: Pending) -> None:
        self._write_or_fail(self.path / "pending.json", json.dumps(asdict(pending), indent=1).encode())

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
        if not self.generations_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.generations_dir.iterdir() if p.name.isdigit())

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
            raise StateError(f"generation {number}: meta.json is corrupt: {exc}") from exc
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
        transaction: str,
        policy_files: dict[str, bytes],
        user: str,
        message: str,
    ) -> Generation:
        """Write a generation directory whole; it only becomes current after the kernel accepts it."""
        self.ensure()
        final = self.generations_dir / f"{number:08d}"
        staging = self.generations_dir / f".staging-{number:08d}-{os.getpid()}"
        contents: dict[str, bytes] = {
            "ruleset.json": json.dumps(ruleset.to_data(), sort_keys=True, separators=(",", ":")).encode(),
            "transaction.nft": transaction.encode(),
        }
        for name, data in policy_files.items():
            contents[f"policy/{name}"] = data
        meta = GenerationMeta(
            number=number,
            created=self._clock(),
            user=user,
            message=message,
            digest=ruleset.digest,
            entries=ruleset.entry_count(),
            files={name: _sha256(data) for name, data in contents.items()},
        )
        try:
            shutil.rmtree(staging, ignore_errors=True)
            (staging / "policy").mkdir(parents=True, mode=0o700)
            for name, data in contents.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_file(target, data)
            _write_file(staging / "meta.json", json.dumps(asdict(meta), indent=1).encode())
            for directory in sorted({p.parent for p in staging.rglob("*")} | {staging}, reverse=True):
                _fsync_dir(directory)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            _fsync_dir(self.generations_dir)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
            raise StateError(f"cannot record generation {number} in {self.path}: {exc.strerror}{hint}") from exc
        return Generation(meta, final)

    def discard(self, number: int) -> None:
        shutil.rmtree(self.generations_dir / f"{number:08d}", ignore_errors=True)

    def prune(self) -> list[int]:
        current = self.current()
        keep_numbers = set(self.numbers()[-self.keep:])
        if current:
            keep_numbers.add(current.generation)
        removed = [n for n in self.numbers() if n not in keep_numbers]
        for number in removed:
            self.discard(number)
        return removed


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())
