"""Zarr stores written block by block: the outputs of block-wise prediction, and their OME-Zarr metadata.

An output store is written into a temporary folder next to its final name (``.<name>.<random>.tmp``, holding
``OWNER_FILE``: the writing process's pid and host) and renamed at the end: an interrupted run leaves no half output
under the final name, and the next run for that name removes the temporaries whose writer has provably ended.
Needs the optional ``large`` extra (zarr >= 3); inputs are read by :mod:`.zarr_stores`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .safety import process_ended, process_record
from .zarr_stores import OME_AXES, OWNER_FILE, LazyImage, is_zarr_path, require_large

def check_outputs(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, a Zarr output that is not named ``*.zarr`` or that exists (never overwritten)."""
    from ..errors import ConfigError

    for option, path in outputs.items():
        if path is None:
            continue
        if not is_zarr_path(path):
            raise ConfigError(f"{option} {path}: blockwise prediction writes Zarr stores; name it <name>.zarr")
        if Path(path).exists():
            raise ConfigError(f"{option} {path} exists; a Zarr output is never overwritten: remove it or choose "
                              "another name")


def ome_axes_for(image: LazyImage, ndim: int) -> list[dict[str, Any]]:
    """OME axes of an output with ``ndim`` axes: the image's own (its channel axis dropped), or default names
    (``yx``, ``zyx``, ``tzyx``) of type space / time."""
    if image.ome and image.ome["axes"]:
        axes = [a for a in image.ome["axes"] if a.get("name") != "c"]
        if len(axes) == ndim:
            return axes
    names = [n for n in (image.axes or "") if n != "c"] if image.axes else []
    if len(names) != ndim or not set(names) <= set(OME_AXES):
        names = list("tzyx"[4 - ndim:]) if ndim <= 4 else [f"dim_{i}" for i in range(ndim - 2)] + ["y", "x"]
    return [{"name": n, "type": "time" if n == "t" else "space"} for n in names]


def ome_scale_for(image: LazyImage, ndim: int) -> list[float]:
    scale = (image.ome or {}).get("scale")
    if scale and image.ome["axes"] and len(scale) == len(image.ome["axes"]):
        kept = [s for s, a in zip(scale, image.ome["axes"]) if a.get("name") != "c"]
        if len(kept) == ndim:
            return [float(s) for s in kept]
    return [1.0] * ndim


@dataclass
class ZarrOutput:
    """One output store, written under a temporary name and renamed to ``final`` by :meth:`commit`.

    ``target`` is what workers write to: ``(store folder, array path inside it)``.
    """

    final: Path
    tmp: Path
    dataset: str
    shape: tuple[int, ...]
    dtype: str
    committed: bool = field(default=False)
    kept: bool = field(default=False)  # finished but left under ``tmp`` (its final name was taken): not discarded

    @property
    def target(self) -> tuple[str, str]:
        return str(self.tmp), self.dataset

    def commit(self) -> Path:
        """Rename the finished store to its final name (refused if something appeared there meanwhile)."""
        from .atomic import _umask

        (self.tmp / OWNER_FILE).unlink(missing_ok=True)  # first: a result left in tmp is never taken for litter
        if self.final.exists():
            self.kept = True
            raise FileExistsError(f"{self.final}: appeared while predicting; the result is left in {self.tmp}")
        for folder in [self.tmp, *(p for p in self.tmp.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o777 & ~_umask())  # mkdtemp made it private
        os.replace(self.tmp, self.final)
        self.committed = True
        return self.final

    def discard(self) -> None:
        """Remove the temporary store of an unfinished output (one :meth:`commit` could not rename is kept)."""
        if not (self.committed or self.kept):
            shutil.rmtree(self.tmp, ignore_errors=True)


def create_output(
    final: str | os.PathLike,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype | str,
    ome: dict[str, Any] | None = None,
    zarr_format: int = 2,
) -> ZarrOutput:
    """An empty (all 0) Zarr array under a temporary name next to ``final``, owned by this process (``OWNER_FILE``);
    the temporaries of ``final`` whose writer has ended are removed first (:func:`remove_stale_temporaries`).

    ome: None for a bare array; else OME-Zarr metadata of a one-level image (``axes``, ``scale``, ``name``,
        ``labels``: True to mark it as a label image), written as OME-Zarr 0.4 (Zarr 2) or 0.5 (Zarr 3).
    """
    zarr = require_large("zarr", "Zarr outputs")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        (tmp / OWNER_FILE).write_text(json.dumps(process_record()))
        options = dict(shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0, zarr_format=zarr_format)
        if ome is None:  # not overwrite=True: that would empty the folder, the owner file too
            zarr.create_array(str(tmp), **options)
            dataset = ""
        else:
            group = zarr.create_group(str(tmp), zarr_format=zarr_format)
            group.create_array("0", **{k: v for k, v in options.items() if k != "zarr_format"})
            group.attrs.update(_ome_attrs(ome, zarr_format))
            dataset = "0"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ZarrOutput(final, tmp, dataset, tuple(shape), str(np.dtype(dtype)))


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary stores of ``final`` (``.<name>.<8 characters>.tmp`` beside it) whose writer has provably
    ended (:func:`io.safety.process_ended` of their ``OWNER_FILE``: this host, and its pid not running or reused since);
    the ones removed. Those of a live run, of another host, or without a readable owner file are left."""
    final = Path(final)
    name = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.tmp")
    try:
        entries = [e for e in os.scandir(final.parent) if name.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        try:
            owner = json.loads(Path(entry.path, OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and process_ended(owner):
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                removed.append(Path(entry.path))
    return sorted(removed)


def clear_interrupted(outputs: Mapping[str, str | os.PathLike | None]) -> str:
    """:func:`remove_stale_temporaries` of every output given (option -> path; None skipped), before a run writes them:
    one line saying what was removed ("removed 2 temporaries of an interrupted run next to out.zarr"), or ""."""
    removed = {str(path): len(remove_stale_temporaries(path)) for path in outputs.values() if path}
    count = sum(removed.values())
    if not count:
        return ""
    return (f"removed {count} {'temporary' if count == 1 else 'temporaries'} of an interrupted run next to "
            + ", ".join(path for path, n in removed.items() if n))


def _ome_attrs(ome: dict[str, Any], zarr_format: int) -> dict[str, Any]:
    version = "0.5" if zarr_format == 3 else "0.4"
    multiscale = {"axes": ome["axes"], "name": ome.get("name") or "labels",
                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": ome["scale"]}]}]}
    extra = {"image-label": {"version": version}} if ome.get("labels") else {}
    if zarr_format == 3:
        return {"ome": {"version": version, "multiscales": [multiscale], **extra}}
    return {"multiscales": [{"version": version, **multiscale}], **extra}


def write_region(target: tuple[str, str], key: tuple[slice | int, ...], values: np.ndarray) -> None:
    """Write ``values`` at ``key`` into the array ``target`` (:attr:`ZarrOutput.target`); called by workers,
    each writing only whole chunks of its own."""
    zarr = require_large("zarr", "Zarr outputs")
    store, dataset = target
    node = zarr.open(store, mode="r+")
    (node[dataset] if dataset else node)[key] = values


def read_region(target: tuple[str, str], key: tuple[slice | int, ...]) -> np.ndarray:
    zarr = require_large("zarr", "Zarr outputs")
    store, dataset = target
    node = zarr.open(store, mode="r")
    return np.asarray((node[dataset] if dataset else node)[key])
