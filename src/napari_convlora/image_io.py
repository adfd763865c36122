"""Images in and out: TIFF with tifffile, common 2D formats (PNG, JPEG, BMP) with imageio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .safety import unreadable_reason

TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED = "TIFF (.tif, .tiff, also stacks and 16/32-bit), PNG, JPEG, BMP"
#: Formats people bring from medical imaging, refused with a clear message instead of a reader's error.
UNSUPPORTED = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage",
               ".mhd": "MetaImage", ".dcm": "DICOM"}


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


def write_image(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write atomically: TIFF (zlib-compressed) for ``.tif``/``.tiff``, else a 2D format via imageio."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            tifffile.imwrite(tmp, array, compression="zlib", photometric="minisblack")
        else:
            import imageio.v3 as iio

            iio.imwrite(tmp, array, extension=path.suffix)
    return path


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
