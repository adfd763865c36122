"""Guards that keep a run from destroying work or starting work without end: outputs that are inputs, folders that
cannot be written, two runs writing the same files, headers that claim far more than their files hold, and whether
the process that left files behind has ended. Torch-free; the command line, the training loop and the dock use them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

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


#: A header (Zarr, TIFF) that claims more bytes than CLAIM_FREE_BYTES, or more chunks than CLAIM_FREE_CHUNKS, is
#: believed only when its file or store holds at least 1 / CLAIM_RATIO of them (:func:`check_claim`).
CLAIM_FREE_BYTES = 10**9
CLAIM_FREE_CHUNKS = 10**6
CLAIM_RATIO = 1000


@dataclass(frozen=True)
class Claim:
    """What an image's header claims: ``shape`` of ``dtype`` values in ``chunks`` stored chunks (Zarr chunk or shard
    files, TIFF strips or tiles; None when unknown)."""

    shape: tuple[int, ...]
    dtype: Any
    chunks: int | None = None

    @property
    def bytes(self) -> int:
        """``prod(shape) x itemsize`` in Python integers (no overflow at 2^63)."""
        return math.prod(int(n) for n in self.shape) * np.dtype(self.dtype).itemsize

    def needs(self) -> tuple[int, int]:
        """The bytes and chunks that must be present for the claim to be believed (0: believed whatever is
        present); counting what is present may stop once both are reached."""
        chunks = self.chunks or 0
        return (-(-self.bytes // CLAIM_RATIO) if self.bytes > CLAIM_FREE_BYTES else 0,
                -(-chunks // CLAIM_RATIO) if chunks > CLAIM_FREE_CHUNKS else 0)


def check_claim(name: str, claim: Claim, held: int, held_chunks: int, what: str) -> None:
    """Refuse an image whose header claims far more than its file or store holds, before any work is planned.

    The rule: a claim of at most ``CLAIM_FREE_BYTES`` (1 GB) in at most ``CLAIM_FREE_CHUNKS`` (10^6) chunks is
    believed; a larger one only when at least 1 / ``CLAIM_RATIO`` (1/1000) of its bytes and of its chunks are present
    (``held`` bytes in ``held_chunks`` chunks: a Zarr array's chunk files, the strips and tiles a TIFF's table lists
    inside the file). Images with content compress far less than 1000:1 (zlib cannot exceed 1032:1) and a Zarr chunk
    that is missing reads as the fill value, so a larger claim describes an image made up almost entirely by its
    header: forged or damaged (10^6 x 10^6 in a 200-byte ``.zarray``; 30000 x 30000 in 1 x 1 chunks, each missing
    one read at ~0.1 ms), or a store left nearly empty; either way hours of work on nothing. The work a file can ask
    for is thus at most the larger of 1 GB and 1000 times its size.

    Args:
        name: the file or store, as the user gave it; what: the data present in words ("holds 200 bytes of chunks
            (1 file)").

    Raises:
        ValueError: one line naming the file, the claimed shape, size and chunks, and the bytes present.
    """
    need_bytes, need_chunks = claim.needs()
    if held >= need_bytes and held_chunks >= need_chunks:
        return
    in_chunks = f" in {claim.chunks:,} chunks" if claim.chunks is not None else ""
    raise ValueError(f"{name}: the header claims {' x '.join(map(str, claim.shape))} {np.dtype(claim.dtype)} "
                     f"({byte_size(claim.bytes)}{in_chunks}) but {what}; an image over {byte_size(CLAIM_FREE_BYTES)} "
                     f"or {CLAIM_FREE_CHUNKS:,} chunks is believed only when at least 1/{CLAIM_RATIO} of it is "
                     "present: the header is damaged or forged, or almost all of the image is missing")


def check_numeric(name: str, dtype: Any) -> None:
    """Refuse an image whose values are not numbers (strings, objects, records) in one line naming it."""
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        kind = "?"
    if kind not in "biufc":
        raise ValueError(f"{name}: holds {dtype} values, not image intensities (numbers: bool, integer or float)")


def byte_size(n: int) -> str:
    """``1000000000000`` -> ``"1.0 TB"`` (powers of 1000)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} EB"


def process_record() -> dict[str, Any]:
    """This process as the owner of something it leaves on disk: ``pid``, ``host``, and where Linux tells them,
    ``pidns`` (its pid namespace: containers sharing a host name do not see each other's pids), ``boot`` (the boot
    id) and ``start`` (its start in clock ticks since boot: a later process given the same pid starts at another
    time). JSON-serialisable."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pidns": _pid_namespace(), "boot": _boot_id(),
            "start": _start_ticks(pid)}


def process_ended(record: Mapping[str, Any]) -> bool:
    """True only when the process of ``record`` (:func:`process_record`) has provably ended: it ran on this host,
    and this host has restarted since (another boot id), or, seen from its pid namespace, no process has its pid or
    the process that has it started at another time. False for another host or pid namespace (its processes cannot
    be seen from here), a process that runs, and a record that is missing or damaged."""
    pid = record.get("pid")
    if type(pid) is not int or pid <= 0 or record.get("host") != socket.gethostname():
        return False
    boot = _boot_id()
    if isinstance(record.get("boot"), str) and boot is not None and record["boot"] != boot:
        return True
    if record.get("pidns") != _pid_namespace():
        return False
    if not _alive(pid):
        return True
    start, now = record.get("start"), _start_ticks(pid)
    return type(start) is int and now is not None and start != now


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (the process's start, in clock ticks since boot), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


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
