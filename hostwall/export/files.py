"""The deployed copy of an export: written whole or not at all, and compared for drift."""

from __future__ import annotations

import contextlib
import difflib
import os
import tempfile
from pathlib import Path

from hostwall.errors import ExportFileError
from hostwall.export.text import printable


def write(path: Path, text: str) -> None:
    """Replace path with text through a temporary file in the same directory and a rename,
    so that nginx or PostgreSQL reloading at that moment reads the old file or the new
    one, never half of one. An existing file keeps its permissions."""
    data = text.encode("utf-8")
    directory = path.parent
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    except OSError as exc:
        raise ExportFileError(f"cannot write {path}: {exc.strerror}") from exc
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        temporary = None
    except OSError as exc:
        raise ExportFileError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def drift(path: Path, text: str) -> list[str]:
    """The unified diff from the deployed file at path to text, one printable line per
    diff line; empty when they are the same bytes. A missing file differs from any text."""
    try:
        deployed = path.read_bytes()
    except FileNotFoundError:
        deployed = None
    except OSError as exc:
        raise ExportFileError(f"cannot read {path}: {exc.strerror}") from exc
    if deployed == text.encode("utf-8"):
        return []
    old = [] if deployed is None else deployed.decode("utf-8", errors="replace").splitlines()
    label = f"{path} (deployed)" if deployed is not None else f"{path} (missing)"
    diff = difflib.unified_diff(old, text.splitlines(), fromfile=label, tofile=f"{path} (policy now)", lineterm="")
    lines = [printable(line) for line in diff]
    # Same lines, different bytes (line endings, a missing last newline): still drift.
    return lines or [f"--- {printable(label)}", f"+++ {printable(str(path))} (policy now)",
                     "@@ the lines are equal; line endings or the final newline differ @@"]
