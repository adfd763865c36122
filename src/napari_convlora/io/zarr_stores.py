"""Images larger than memory, read and written lazily: Zarr and OME-Zarr stores, and TIFF through tifffile's
Zarr interface (``tifffile.imread(path, aszarr=True)``).

Needs the optional ``large`` extra (dask, zarr >= 3: tifffile's Zarr interface requires zarr 3). Nothing is read
when a source is opened; a region is read when asked for. A source is described by a :class:`ArrayReader`
that holds only paths, so that it travels to dask workers as a few bytes: each worker thread opens the store
once and keeps it. An output store is written into a temporary folder next to its final name
(``.<name>.<random>.tmp``) and renamed at the end: an interrupted run leaves no half output under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: The optional packages of the ``large`` extra: module -> PyPI package.
LARGE_PACKAGES = {"dask": "dask[array,distributed]", "distributed": "dask[array,distributed]", "zarr": "zarr>=3"}
LARGE_HINT = "pip install 'napari-convlora[large]'"
#: Axis names OME-Zarr images use in this order; the default names for images without them.
OME_AXES = "tczyx"
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

    Raises:
        ValueError: one line naming the file: missing, not an image store, or the ``large`` extra missing.
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
        return LazyImage(ArrayReader(str(path), "zarr", "", tuple(node.shape), str(node.dtype)), zarr_format=fmt)
    attrs = dict(node.attrs)
    multiscales = (attrs.get("ome") or {}).get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in node.arrays())
        if len(arrays) != 1:
            raise ValueError(f"{path}: a Zarr group without OME-Zarr 'multiscales' metadata and {len(arrays)} arrays; "
                             "give the path of one array (e.g. store.zarr/0)")
        array = node[arrays[0]]
        return LazyImage(ArrayReader(str(path), "zarr", arrays[0], tuple(array.shape), str(array.dtype)),
                         zarr_format=fmt)
    ome = _ome_level0(multiscales[0], (attrs.get("ome") or {}).get("version"), path)
    array = node[ome["path"]]
    reader = ArrayReader(str(path), "zarr", ome["path"], tuple(array.shape), str(array.dtype))
    names = "".join(a["name"][0] for a in ome["axes"]) if len(ome["axes"]) == array.ndim else None
    return LazyImage(reader, names, ome, fmt)


def _ome_level0(multiscale: dict[str, Any], version: str | None, path: Path) -> dict[str, Any]:
    """Level 0 of an OME-Zarr ``multiscales`` entry: its path, axes (dicts; plain names of 0.3 and the
    implicit ``tczyx`` of 0.1/0.2 converted), scale per axis and the image's name."""
    datasets = multiscale.get("datasets") or []
    if not datasets or "path" not in datasets[0]:
        raise ValueError(f"{path}: OME-Zarr 'multiscales' metadata lists no dataset")
    axes = multiscale.get("axes")
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes] if axes else None
    scale = next((t.get("scale") for t in datasets[0].get("coordinateTransformations", [])
                  if t.get("type") == "scale"), None)
    return {"version": version or multiscale.get("version", "0.4"), "path": str(datasets[0]["path"]),
            "axes": axes or [], "scale": scale, "name": multiscale.get("name")}


def _open_tiff(path: Path) -> LazyImage:
    import tifffile

    zarr = require_large("zarr", "large TIFF images")
    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            axes = series.axes.lower()
        node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    except Exception as e:  # noqa: BLE001 - readers raise many types; name the file
        raise ValueError(f"{path}: could not open the TIFF lazily ({' '.join(str(e).split())[:200]})") from e
    dataset = "" if isinstance(node, zarr.Array) else "0"
    array = node[dataset] if dataset else node
    names = axes if len(axes) == array.ndim and "s" not in axes else None
    reader = ArrayReader(str(path), "tiff", dataset, tuple(array.shape), str(array.dtype), path.stat().st_mtime_ns)
    return LazyImage(reader, names)


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

    @property
    def target(self) -> tuple[str, str]:
        return str(self.tmp), self.dataset

    def commit(self) -> Path:
        """Rename the finished store to its final name (refused if something appeared there meanwhile)."""
        from .atomic import _umask

        if self.final.exists():
            raise FileExistsError(f"{self.final}: appeared while predicting; the result is left in {self.tmp}")
        for folder in [self.tmp, *(p for p in self.tmp.rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o777 & ~_umask())  # mkdtemp made it private
        os.replace(self.tmp, self.final)
        self.committed = True
        return self.final

    def discard(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def create_output(
    final: str | os.PathLike,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype | str,
    ome: dict[str, Any] | None = None,
    zarr_format: int = 2,
) -> ZarrOutput:
    """An empty (all 0) Zarr array under a temporary name next to ``final``.

    ome: None for a bare array; else OME-Zarr metadata of a one-level image (``axes``, ``scale``, ``name``,
        ``labels``: True to mark it as a label image), written as OME-Zarr 0.4 (Zarr 2) or 0.5 (Zarr 3).
    """
    zarr = require_large("zarr", "Zarr outputs")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        options = dict(shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0, zarr_format=zarr_format)
        if ome is None:
            zarr.create_array(str(tmp), overwrite=True, **options)
            dataset = ""
        else:
            group = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
            group.create_array("0", **{k: v for k, v in options.items() if k != "zarr_format"})
            group.attrs.update(_ome_attrs(ome, zarr_format))
            dataset = "0"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ZarrOutput(final, tmp, dataset, tuple(shape), str(np.dtype(dtype)))


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
