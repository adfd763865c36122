"""Guards that keep a run from destroying work: outputs that are inputs, folders that cannot be written,
and two runs writing the same files. Torch-free; the command line, the training loop and the dock use them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping

from ..config.choices import MODEL_SUFFIX, TRAINING_STATE_SUFFIX
from ..errors import ConfigError


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file: the same path after resolving links, or (both existing) the same
    inode, which also catches hard links."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs_are_not_inputs(
    outputs: Mapping[str, str | os.PathLike | None], inputs: Mapping[str, str | os.PathLike | None]
) -> None:
    """Refuse, before any work, an output that is one of the inputs (also through a symbolic or hard link).

    Args:
        outputs, inputs: option name (as the user knows it, ``"--out"``) -> path (None entries are skipped).

    Raises:
        ConfigError: naming both options and the file.
    """
    for out_name, out in outputs.items():
        if out is None:
            continue
        for in_name, source in inputs.items():
            if source is not None and _same_file(Path(out), Path(source)):
                raise ConfigError(
                    f"{out_name} {out} is the same file as {in_name} {source}: writing it would destroy the input; "
                    f"choose another {out_name.removeprefix('the ')}"
                )


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written: a folder, or a location where this user
    may not create files.

    Raises:
        ConfigError: naming the option and the path.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{option} {path}: {existing or folder} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{option} {path}: no permission to write there")


#: An unreadable lock file older than this is taken over (its writer died before writing it).
UNREADABLE_LOCK_S = 10.0


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("no such file", "is a folder", "no permission to read it",
    "the file is empty"), or None when it can."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    if not path.exists():
        return "no such file"
    if not os.access(path, os.R_OK):
        return "no permission to read it"
    if path.stat().st_size == 0:
        return "the file is empty"
    return None


def lock_path(model_path: str | os.PathLike) -> Path:
    """``run/model.safetensors`` -> ``run/model.safetensors.lock``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


@contextlib.contextmanager
def run_lock(model_path: str | os.PathLike) -> Iterator[str]:
    """Hold ``model_path.lock`` while a run writes ``model_path`` and the files beside it.

    Yields a message ("" or why a stale lock was taken over). A lock held by a live process on this machine,
    or by any process on another machine (a shared folder), is refused; a lock left by a process of this machine
    that has ended is taken over.

    Raises:
        ConfigError: another run holds the lock; the message names it and the lock file.
    """
    lock = lock_path(model_path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    message = ""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            same_host = holder.get("host") == me["host"]
            pid = holder.get("pid")
            if isinstance(pid, int) and same_host and not _alive(pid):
                message = (f"took over {lock.name}: the run that held it (pid {pid}, started {holder.get('started')}) "
                           "has ended without releasing it")
                lock.unlink(missing_ok=True)
                continue
            if not holder and _age_s(lock) > UNREADABLE_LOCK_S:  # a process died between creating and writing it
                message = f"took over {lock.name}: it was empty or damaged"
                lock.unlink(missing_ok=True)
                continue
            where = "" if same_host else f" on {holder.get('host')}"
            raise ConfigError(
                f"{model_path} is being written by another run (pid {pid}{where}, started {holder.get('started')}); "
                f"wait for it, stop it, or choose another output. If that run is gone, delete {lock}"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield message
    finally:
        if _read_lock(lock).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def new_run_path(folder: Path) -> str:
    """A new model file in ``folder`` named by the time, never one that exists (two runs in one second), nor one
    whose training state (``MODEL.training.pt``) exists."""
    stem = f"convlora-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = folder / f"{stem}{MODEL_SUFFIX}", 1
    while path.exists() or path.with_suffix(TRAINING_STATE_SUFFIX).exists():
        n += 1
        path = folder / f"{stem}-{n}{MODEL_SUFFIX}"
    return str(path)
