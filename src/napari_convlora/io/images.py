"""Images in and out: TIFF with tifffile, common 2D formats (PNG, JPEG, BMP) with imageio, and the volumes of
medical imaging (NIfTI with nibabel, NRRD with pynrrd: the optional ``medical`` extra) read in Z x Y x X order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .safety import unreadable_reason

TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED = ("TIFF (.tif, .tiff, also stacks and 16/32-bit), PNG, JPEG, BMP, NIfTI (.nii, .nii.gz) and NRRD "
             "(.nrrd, .nhdr) with the 'medical' extra")
#: Volumes of medical imaging read by an optional package: suffix -> (format, module, PyPI package).
MEDICAL = {".nii": ("NIfTI", "nibabel", "nibabel"), ".nii.gz": ("NIfTI", "nibabel", "nibabel"),
           ".nrrd": ("NRRD", "nrrd", "pynrrd"), ".nhdr": ("NRRD", "nrrd", "pynrrd")}
#: Formats refused with a clear message instead of a reader's error.
UNSUPPORTED = {".mha": "MetaImage", ".mhd": "MetaImage", ".dcm": "DICOM"}
#: NRRD's type names by the bytes of one value (the first word of the header's ``type``), for the memory check.
_NRRD_ITEMSIZE = {"signed": None, "unsigned": None, "int8": 1, "uint8": 1, "uchar": 1, "char": 1, "short": 2,
                  "ushort": 2, "int16": 2, "uint16": 2, "int": 4, "uint": 4, "int32": 4, "uint32": 4,
                  "float": 4, "double": 8, "longlong": 8, "ulonglong": 8, "int64": 8, "uint64": 8}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a numpy array (any dtype, any number of dimensions)."""
    path = Path(path)
    reason = unreadable_reason(path)
    if reason:
        raise (FileNotFoundError if reason == "no such file" else ValueError)(f"{path}: {reason}")
    name = path.name.lower()
    unsupported = next((kind for suffix, kind in UNSUPPORTED.items() if name.endswith(suffix)), None)
    if unsupported:
        raise ValueError(f"{path}: {unsupported} images are not read yet; save the image as TIFF "
                         f"(supported: {SUPPORTED})")
    medical = _medical_format(path)
    if medical:
        return _read_medical(path, *medical)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                _check_fits_in_memory(path, tiff.series[0].shape, tiff.series[0].dtype)
                return tiff.asarray()
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except Exception as e:  # noqa: BLE001 - readers raise many types; name the file
        raise ValueError(f"{path}: could not read the image ({' '.join(str(e).split())[:300]}); "
                         f"supported: {SUPPORTED}") from e


def _read_medical(path: Path, kind: str, module: str, package: str) -> np.ndarray:
    """A NIfTI or NRRD volume as a numpy array, axes reversed from the file's (x, y, z[, t]) to ([t,] z, y, x).

    NIfTI values are scaled as the header says (``scl_slope``/``scl_inter``); the orientation (affine, space
    directions) is not applied: image and labels of one scan share it, so they stay aligned.
    """
    import importlib

    try:
        reader = importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{path}: reading {kind} needs the optional package {package}: "
                         f"pip install 'napari-convlora[medical]' (or save the image as TIFF)") from None
    try:
        if kind == "NIfTI":
            image = reader.load(str(path))
            _check_fits_in_memory(path, image.shape, image.get_data_dtype())
            array = np.asanyarray(image.dataobj)
            return np.ascontiguousarray(array.transpose(tuple(range(array.ndim))[::-1]))
        header = reader.read_header(str(path))
        itemsize = _NRRD_ITEMSIZE.get(str(header.get("type", "")).split()[0], None) or 8
        _check_fits_in_memory(path, tuple(int(n) for n in header.get("sizes", ())), np.dtype(f"u{itemsize}"))
        array, _ = reader.read(str(path), index_order="C")
        return np.ascontiguousarray(array)
    except Exception as e:  # noqa: BLE001 - readers raise many types; name the file
        if isinstance(e, ValueError) and str(e).startswith(str(path)):  # the memory check's own message
            raise
        raise ValueError(f"{path}: could not read the {kind} image ({' '.join(str(e).split())[:300]})") from e


def geometry_mismatch(image_path: str | os.PathLike, labels_path: str | os.PathLike) -> str | None:
    """Why a label volume may not lie on its image, when both are NIfTI files whose affines (voxel size, orientation,
    origin) differ; None when they agree or carry no such geometry. The header alone is read."""
    paths = [Path(image_path), Path(labels_path)]
    if not all(_medical_format(p) and _medical_format(p)[0] == "NIfTI" for p in paths):
        return None
    try:
        import nibabel

        image, labels = (nibabel.load(str(p)) for p in paths)
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are read
        return None
    if image.shape[:3] != labels.shape[:3]:
        return None  # the shape check says so
    if np.allclose(image.affine, labels.affine, rtol=1e-4, atol=1e-3):
        return None
    voxel = [tuple(round(float(v), 4) for v in nib_img.header.get_zooms()[:3]) for nib_img in (image, labels)]
    return (f"{paths[1]}: its NIfTI geometry differs from {paths[0]}'s (voxel sizes {voxel[1]} and {voxel[0]}, or "
            "orientation or origin): the labels may not lie on the image; check that they belong to this scan")


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


#: An image that needs more than this share of the machine's memory is refused before it is read.
MEMORY_SHARE = 0.5


def _check_fits_in_memory(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    needed = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    total = memory_bytes()
    if total is not None and needed > MEMORY_SHARE * total:
        raise ValueError(f"{path}: the image is {' x '.join(map(str, shape))} {np.dtype(dtype)}, {needed / 2**30:.1f} GiB "
                         f"once read, more than half of this machine's {total / 2**30:.1f} GiB; crop it or split it "
                         "into parts first")


def _medical_format(path: Path) -> tuple[str, str, str] | None:
    name = path.name.lower()
    return next((reader for suffix, reader in MEDICAL.items() if name.endswith(suffix)), None)


def write_image(path: str | os.PathLike, array: np.ndarray, like: str | os.PathLike | None = None) -> Path:
    """Write atomically: TIFF (zlib-compressed) for ``.tif``/``.tiff``, NIfTI / NRRD (``.nii``, ``.nii.gz``,
    ``.nrrd``) for a ``[C x] Z x Y x X`` array, else a 2D format via imageio.

    like: the image the array was predicted from; a NIfTI or NRRD output of the same format takes its
        orientation and voxel spacing (affine / space directions), so that the labels overlay the scan in
        medical viewers.
    """
    path = Path(path)
    medical = _medical_format(path)
    if medical and path.name.lower().endswith(".nhdr"):
        raise ValueError(f"{path}: a detached NRRD header needs a data file; write .nrrd instead")
    with atomic_path(path) as tmp:
        if medical:
            _write_medical(tmp, path, array, medical, None if like is None else Path(like))
        elif path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(tmp, array, compression="zlib", photometric="minisblack")
        else:
            import imageio.v3 as iio

            iio.imwrite(tmp, array, extension=path.suffix)
    return path


def _write_medical(tmp: Path, path: Path, array: np.ndarray, medical: tuple[str, str, str], like: Path | None) -> None:
    import importlib

    kind, module, package = medical
    try:
        writer = importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{path}: writing {kind} needs the optional package {package}: "
                         f"pip install 'napari-convlora[medical]' (or write a .tif)") from None
    same_format = like is not None and _medical_format(like) is not None and _medical_format(like)[0] == kind
    if kind == "NIfTI":
        import gzip

        data = array.transpose(tuple(range(array.ndim))[::-1])  # back to the file's x, y, z[, c]
        affine, header = np.eye(4), None
        if same_format:
            source = writer.load(str(like))
            affine, header = source.affine, source.header.copy()
        image = writer.Nifti1Image(data, affine, header)
        image.header.set_data_dtype(data.dtype)
        image.header.set_slope_inter(1.0, 0.0)  # the values are written as they are, not rescaled
        raw = image.to_bytes()
        tmp.write_bytes(gzip.compress(raw) if path.name.lower().endswith(".gz") else raw)
    else:
        header = {}
        if same_format:
            source = writer.read_header(str(like))
            if len(source.get("sizes", ())) == array.ndim:
                header = {k: source[k] for k in ("space", "space directions", "space origin", "spacings")
                          if k in source}
        writer.write(str(tmp), np.ascontiguousarray(array), header, index_order="C")


def overlay_png(
    path: str | os.PathLike, image: np.ndarray, labels: np.ndarray, background: int = 0, alpha: float = 0.45
) -> Path:
    """A PNG of a 2D image (Y x X or Y x X x C, any dtype) with coloured labels (other than ``background``) on top."""
    gray = image.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(-1)
    lo, hi = np.percentile(gray, (1, 99.8))
    gray = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    palette = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.4, 1.0], [1.0, 0.8, 0.0],
                        [0.8, 0.2, 0.9], [0.0, 0.9, 0.9]], np.float32)
    for index, value in enumerate(v for v in np.unique(labels) if v != background):
        mask = labels == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * palette[index % len(palette)]
    return write_image(path, (rgb * 255).round().astype(np.uint8))
