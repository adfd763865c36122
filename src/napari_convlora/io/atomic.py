"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

A reader (or a crash, or a Stop pressed mid-save) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left as it was.
    The new file gets the permissions of the file it replaces, or those a new file gets from the umask
    (the temporary file alone would be private to its owner: a lab could not share the models it writes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... enforce fail ...")
            kept = "the previous file is kept" if path.exists() else "nothing was written"
            raise WriteError(f"{path}: could not be written, {kept} ({_why(e)})") from e
        os.chmod(tmp_path, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _why(error: BaseException) -> str:
    """Why a write failed, in the user's words where the library's are cryptic (a full disk)."""
    text = " ".join(str(error).split())
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in text \
        or "StorageFull" in text or "enforce fail" in text or "failed writing file" in text
    return f"the disk is full or failed: {text}" if full else text


class WriteError(OSError):
    """A file could not be written (full disk, lost permission, ...); the message names it. Nothing was replaced."""


def temporary_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files that :func:`atomic_path` would use for ``path``: left behind only by a process
    killed while writing (call while no one writes ``path``)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.*.tmp")) if path.parent.is_dir() else []


def glob_escape(name: str) -> str:
    """``name`` with the characters ``glob`` treats specially made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def copy_file(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy ``source`` to ``destination`` atomically (a reader never sees half a file)."""
    with atomic_path(destination) as tmp:
        shutil.copyfile(source, tmp)
    return Path(destination)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
