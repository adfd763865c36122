"""Images larger than memory, read lazily: Zarr and OME-Zarr stores, and TIFF through tifffile's
Zarr interface (``tifffile.imread(path, aszarr=True)``).

Needs the optional ``large`` extra (dask, zarr >= 3: tifffile's Zarr interface requires zarr 3). Nothing is read
when a source is opened; a region is read when asked for. A source is described by a :class:`ArrayReader`
that holds only paths, so that it travels to dask workers as a few bytes: each worker thread opens the store
once and keeps it. An image is opened only when its header is believable (:func:`io.safety.check_claim`: over
1 GB or 10^6 chunks, at least 1/1000 of it is on disk), numeric, and its OME-Zarr dataset lies inside the store.

Outputs (Zarr stores written block by block) are in :mod:`.zarr_outputs`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Iterator, Sequence

import numpy as np

from .safety import Claim, check_claim, check_numeric

#: The optional packages of the ``large`` extra: module -> PyPI package.
LARGE_PACKAGES = {"dask": "dask[array,distributed]", "distributed": "dask[array,distributed]", "zarr": "zarr>=3"}
LARGE_HINT = "pip install 'napari-convlora[large]'"
#: Axis names OME-Zarr images use in this order; the default names for images without them.
OME_AXES = "tczyx"
#: The file in a temporary output store naming the process that writes it (:func:`io.safety.process_record`;
#: written by :mod:`.zarr_outputs`, never counted as a chunk here).
OWNER_FILE = ".convlora-owner.json"
#: Files of a Zarr store that are not chunks.
_METADATA_FILES = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json", OWNER_FILE})
_OPEN = threading.local()


def require_large(module: str, what: str = "images larger than memory") -> Any:
    """Import ``module`` of the ``large`` extra, or raise ValueError in one line naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} need the optional package {LARGE_PACKAGES.get(module, module)}: {LARGE_HINT}"
                         ) from None


def is_zarr_path(path: str | os.PathLike) -> bool:
    """``.zarr`` (also ``.ome.zarr``), any case, with or without a trailing slash."""
    return str(path).rstrip("/\\").lower().endswith(".zarr")


@dataclass(frozen=True)
class ArrayReader:
    """An image array on disk, read region by region; picklable (paths only).

    kind: ``zarr`` (a Zarr array inside ``path``, at ``dataset``: "" for a bare array, "0" for an OME-Zarr's
    level 0) or ``tiff`` (level ``dataset`` of tifffile's Zarr view of the file, "" when it has one level).
    """

    path: str
    kind: str
    dataset: str
    shape: tuple[int, ...]
    dtype: str
    stamp: int = 0  # the file's modification time (TIFF): a file replaced since is opened again

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def open(self) -> Any:
        """The zarr array, opened once per thread (the last few kept)."""
        cache = _OPEN.__dict__.setdefault("arrays", {})
        if self not in cache:
            if len(cache) >= 4:
                cache.clear()
            cache[self] = _open_array(self.path, self.kind, self.dataset)
        return cache[self]

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.open()[key])


def _open_array(path: str, kind: str, dataset: str) -> Any:
    zarr = require_large("zarr", "Zarr and large TIFF images")
    if kind == "tiff":
        import tifffile

        store = tifffile.imread(path, aszarr=True)
        node = zarr.open(store, mode="r")
    else:
        node = zarr.open(path, mode="r")
    return node[dataset] if dataset else node


@dataclass
class LazyImage:
    """An image opened without reading it.

    reader: reads regions (:class:`ArrayReader`).
    axes: axis names (``"yx"``, ``"czyx"``, ...) from OME-Zarr metadata or TIFF; None when unknown.
    ome: level 0's OME-Zarr metadata (``version``, ``axes``: a list of dicts, ``scale``: per axis, ``name``),
        or None.
    zarr_format: 2 or 3 (the format an OME-Zarr output of this image is written in).
    """

    reader: ArrayReader
    axes: str | None = None
    ome: dict[str, Any] | None = None
    zarr_format: int = 2

    def to_dask(self, chunks: int | tuple[int, ...] | str = "auto") -> Any:
        """The image as a dask array whose chunks read the file when computed (anywhere: the reader is paths);
        ``"auto"``: whole stored chunks, up to about 16 MiB a dask chunk."""
        da = require_large("dask.array")
        from dask.array.core import normalize_chunks

        stored = getattr(self.reader.open(), "chunks", None)
        chunks = normalize_chunks(chunks, self.reader.shape, limit="16MiB", dtype=np.dtype(self.reader.dtype),
                                  previous_chunks=stored)
        return da.from_array(self.reader, chunks=chunks, asarray=True, fancy=False,
                             meta=np.empty((0,) * self.reader.ndim, dtype=self.reader.dtype))

    @property
    def channel_axis(self) -> int | None:
        """The OME ``c`` axis, or None."""
        return self.axes.index("c") if self.axes and "c" in self.axes else None


def open_lazy(path: str | os.PathLike) -> LazyImage:
    """Open a Zarr array, an OME-Zarr image (its level 0) or a TIFF file (series 0, level 0) without reading it.

    Before anything is planned on it, its header is checked against the data present (:func:`io.safety.check_claim`:
    a claim over 1 GB or 10^6 chunks must be backed by at least 1/1000 of its bytes and chunks in chunk files, or in
    the strips and tiles of the TIFF's table), its values must be numbers, and an OME-Zarr dataset must be a path
    inside the store.

    Raises:
        ValueError: one line naming the file: missing, not an image store, a header that claims far more than the
            file holds, not numbers, or the ``large`` extra missing.
    """
    zarr = require_large("zarr", "Zarr and large TIFF images")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or Zarr store")
    if not is_zarr_path(path):
        return _open_tiff(path)
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises many types; name the store
        raise ValueError(f"{path}: not a Zarr store ({' '.join(str(e).split())[:200]})") from e
    fmt = int(getattr(node.metadata, "zarr_format", 2))
    if isinstance(node, zarr.Array):
        return LazyImage(_zarr_reader(path, "", node), zarr_format=fmt)
    attrs = dict(node.attrs)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in node.arrays())
        if len(arrays) != 1:
            raise ValueError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata and {len(arrays)} arrays; "
                             "give the path of one array (e.g. store.zarr/0)")
        return LazyImage(_zarr_reader(path, arrays[0], node[arrays[0]]), zarr_format=fmt)
    ome = _ome_level0(multiscales[0], (attrs.get("ome") or {}).get("version"), path)
    try:
        array = node[ome["path"]]
    except (KeyError, ValueError):
        array = None
    if not isinstance(array, zarr.Array):
        held = "a group, not an array" if array is not None else "not in the store"
        raise ValueError(f"{path}: OME-Zarr 'multiscales' metadata names dataset {ome['path']!r}, which is {held}")
    reader = _zarr_reader(path, ome["path"], array)
    names = "".join(a["name"][0] for a in ome["axes"]) if len(ome["axes"]) == array.ndim else None
    return LazyImage(reader, names, ome, fmt)


def _zarr_reader(path: Path, dataset: str, array: Any) -> ArrayReader:
    """The reader of ``array`` (at ``dataset`` in the store ``path``), once its values are numbers and its header is
    backed by its chunk files."""
    check_numeric(str(path), array.dtype)
    shape = tuple(int(n) for n in array.shape)
    check_stored_claim(str(path), zarr_claim(array), [path / dataset])
    return ArrayReader(str(path), "zarr", dataset, shape, str(array.dtype))


def zarr_claim(array: Any, shape: Sequence[int] | None = None) -> Claim:
    """What a Zarr ``array``'s header claims (of ``shape``, default its own): its chunks counted as the files that
    hold them (shards, when it has them)."""
    shape = tuple(int(n) for n in (array.shape if shape is None else shape))
    stored = getattr(array, "shards", None) or array.chunks
    chunks = math.prod(-(-n // max(int(c), 1)) for n, c in zip(shape, stored)) if len(stored) == len(shape) else None
    return Claim(shape, array.dtype, chunks)


def check_stored_claim(name: str, claim: Claim, folders: Sequence[Path]) -> None:
    """:func:`io.safety.check_claim` of an image whose data are the files in ``folders`` (Zarr arrays' folders; their
    metadata files not counted); files are counted only while the claim needs them.

    Raises:
        ValueError: one line naming ``name``, the claimed shape and the bytes of chunks present.
    """
    need_bytes, need_files = claim.needs()
    if not need_bytes and not need_files:
        return
    held = files = 0
    for root, _, files_there in (step for folder in folders for step in os.walk(folder)):
        for file in files_there:
            if file in _METADATA_FILES:
                continue
            try:
                held += os.stat(os.path.join(root, file)).st_size
            except OSError:
                continue
            files += 1
            if held >= need_bytes and files >= need_files:
                return
    check_claim(name, claim, held, files, f"holds {held:,} bytes of chunks ({files:,} file{'s' * (files != 1)})")


def _ome_level0(multiscale: dict[str, Any], version: str | None, path: Path) -> dict[str, Any]:
    """Level 0 of an OME-Zarr ``multiscales`` entry: its path, axes (dicts; plain names of 0.3 and the
    implicit ``tczyx`` of 0.1/0.2 converted), scale per axis and the image's name.

    Raises:
        ValueError: no dataset listed, or its path is not a relative path inside the store (absolute, ``..``, empty).
    """
    datasets = multiscale.get("datasets") or []
    if not datasets or "path" not in datasets[0]:
        raise ValueError(f"{path}: OME-Zarr 'multiscales' metadata lists no dataset")
    dataset = datasets[0]["path"]
    dataset = str(dataset) if type(dataset) is int else dataset
    if (not isinstance(dataset, str) or dataset.startswith(("/", "\\")) or PureWindowsPath(dataset).drive
            or any(part in ("", ".", "..") for part in dataset.replace("\\", "/").split("/"))):
        raise ValueError(f"{path}: OME-Zarr 'multiscales' metadata names dataset {dataset!r}, which is not a path "
                         "inside the store (absolute, '..' or empty)")
    axes = multiscale.get("axes")
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes] if axes else None
    scale = next((t.get("scale") for t in datasets[0].get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    return {"version": version or multiscale.get("version", "0.4"), "path": dataset,
            "axes": axes or [], "scale": scale, "name": multiscale.get("name")}


class _RefusedTiff(ValueError):
    """A TIFF refused for what its header says (passed on as it is, not as a file that could not be opened)."""


def _open_tiff(path: Path) -> LazyImage:
    import tifffile

    zarr = require_large("zarr", "large TIFF images")
    try:
        with _held_tifffile_logs() as complaints:
            with tifffile.TiffFile(path) as tiff:
                series = tiff.series[0]
                axes = series.axes.lower()
                _check_tiff_claim(path, series, complaints)
            node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except _RefusedTiff:
        raise
    except Exception as e:  # noqa: BLE001 - readers raise many types; name the file
        raise ValueError(f"{path}: could not open the TIFF lazily ({' '.join(str(e).split())[:200]})") from e
    dataset = "" if isinstance(node, zarr.Array) else "0"
    array = node[dataset] if dataset else node
    names = axes if len(axes) == array.ndim and "s" not in axes else None
    reader = ArrayReader(str(path), "tiff", dataset, tuple(array.shape), str(array.dtype), path.stat().st_mtime_ns)
    return LazyImage(reader, names)


def _check_tiff_claim(path: Path, series: Any, complaints: list[logging.LogRecord]) -> None:
    """:func:`io.safety.check_claim` of a TIFF series: the data present are the bytes its pages' strip and tile
    tables list inside their files (a file counted at most its size: strips may point at the same bytes); a
    compressed file holds fewer bytes than its pixels, so the table is what is compared, not the pixel count."""
    try:
        check_numeric(str(path), series.dtype)
    except ValueError as e:
        raise _RefusedTiff(str(e)) from None
    claim = Claim(tuple(int(n) for n in series.shape), series.dtype,
                  math.prod(series.keyframe.chunked) * len(series))
    need_bytes, need_chunks = claim.needs()
    if not need_bytes and not need_chunks:
        return
    listed: dict[str, int] = {}
    held_chunks = 0
    for page in series.pages:
        if page is None:
            continue
        handle = page.parent.filehandle
        size = int(handle.size)
        inside = [int(n) for offset, n in zip(page.dataoffsets, page.databytecounts) if 0 < n and offset + n <= size]
        listed[handle.path] = min(listed.get(handle.path, 0) + sum(inside), size)
        held_chunks += len(inside)
        if sum(listed.values()) >= need_bytes and held_chunks >= need_chunks:
            return
    held = sum(listed.values())
    note = f" (tifffile: {' '.join(complaints[0].getMessage().split())[:120]})" if complaints else ""
    try:
        check_claim(str(path), claim, held, held_chunks, f"its strip and tile table lists {held:,} bytes in "
                    f"{held_chunks:,} chunks inside the file{note}")
    except ValueError as e:
        raise _RefusedTiff(str(e)) from None


@contextlib.contextmanager
def _held_tifffile_logs() -> Iterator[list[logging.LogRecord]]:
    """tifffile's complaints while a header is read, held back: a refusal names the first one (one line instead of
    several log lines); when the file is opened they are passed on as they were."""
    logger = logging.getLogger("tifffile")
    held: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = held.append  # type: ignore[method-assign]
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    refused = False
    try:
        yield held
    except _RefusedTiff:
        refused = True
        raise
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        if not refused:
            for record in held:
                logger.handle(record)
