"""Predict many image files with one model: which files a folder holds, where each output goes, and a
generator that predicts them one by one (the command line and the dock drive the same generator).

Each input ``<stem>.<ext>`` gets ``<stem>_labels.tif`` (and ``_probabilities`` / ``_instances`` when asked for)
in the output folder; a NIfTI or NRRD scan keeps its format (``scan.nii.gz`` -> ``scan_labels.nii.gz``) and its
orientation and voxel spacing. A file that cannot be read or predicted is reported and skipped.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

from ..errors import ConfigError, describe_error
from ..io.safety import check_outputs_are_not_inputs, check_writable

if TYPE_CHECKING:
    import torch

    from ..data import ImageLayout
    from ..modeling import AdaptedSAM

#: What a folder of images is read for (not recursive); the medical formats need the 'medical' extra.
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".nii", ".nii.gz", ".nrrd")
#: Suffixes whose outputs keep the input's format (so they keep the scan's geometry).
_KEEP_FORMAT = (".nii.gz", ".nii", ".nrrd")
#: The outputs of one input, in the order they are written.
OUTPUT_KINDS = ("labels", "probabilities", "instances")


def split_suffix(path: str | os.PathLike) -> tuple[str, str]:
    """``a/scan.nii.gz`` -> ``("scan", ".nii.gz")``; ``a/img.tif`` -> ``("img", ".tif")``."""
    name = Path(path).name
    lower = name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), Path(name).suffix)
    return name[: len(name) - len(suffix)], name[len(name) - len(suffix):]


def images_in_folder(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (suffixes of :data:`IMAGE_SUFFIXES`, any case; hidden files
    skipped), sorted by name.

    Raises:
        ConfigError: the folder holds no image file.
    """
    folder = Path(folder)
    found = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda p: p.name)
    if not found:
        raise ConfigError(f"--image {folder}: the folder holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return found


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders replaced by the images in them (:func:`images_in_folder`), in order."""
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(images_in_folder(path) if path.is_dir() else [path])
    return files


def output_paths(image: str | os.PathLike, out_dir: str | os.PathLike, probabilities: bool = False,
                 instances: bool = False) -> dict[str, Path]:
    """Where the outputs of ``image`` go: kind (of :data:`OUTPUT_KINDS`) -> ``out_dir/<stem>_<kind><suffix>``,
    the suffix ``.tif`` or the input's own for NIfTI and NRRD."""
    stem, suffix = split_suffix(image)
    suffix = suffix if suffix.lower() in _KEEP_FORMAT else ".tif"
    wanted = {"labels": True, "probabilities": probabilities, "instances": instances}
    return {kind: Path(out_dir) / f"{stem}_{kind}{suffix}" for kind in OUTPUT_KINDS if wanted[kind]}


def plan_outputs(
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    probabilities: bool = False,
    instances: bool = False,
    other_inputs: Mapping[str, str | os.PathLike | None] | None = None,
) -> list[dict[str, Path]]:
    """The outputs of each image (:func:`output_paths`), checked before any work.

    other_inputs: further files that must not be overwritten, option name -> path (``{"--model": ...}``).

    Raises:
        ConfigError: ``out_dir`` is a file or cannot be written; two inputs map to the same output (naming
            both); an output is one of the inputs (also through a link).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; with several images (or a folder) --out names a folder")
    plans = [output_paths(image, out_dir, probabilities, instances) for image in images]
    owner: dict[Path, Path] = {}
    for image, plan in zip(map(Path, images), plans):
        first = owner.setdefault(plan["labels"], image)
        if first is image:
            continue
        if first == image:
            raise ConfigError(f"--image {image} is given twice (also through a folder); give each image once")
        raise ConfigError(f"--image {first} and --image {image} would both be written to {plan['labels']}; "
                          "rename one or predict them into different --out folders")
    numbered = {"--image" if len(images) == 1 else f"--image #{i}": p for i, p in enumerate(images, start=1)}
    inputs = {**numbered, **(other_inputs or {})}
    _refuse_outputs_that_are_inputs(plans, inputs)
    if plans:
        check_writable(plans[0]["labels"], "--out")
    return plans


def _refuse_outputs_that_are_inputs(plans: list[dict[str, Path]], inputs: Mapping[str, str | os.PathLike | None]
                                    ) -> None:
    """:func:`io.safety.check_outputs_are_not_inputs` for every output, without comparing every pair: only an
    output whose resolved path is an input's, or that exists (a hard link), is looked at closely."""
    given = {name: Path(p) for name, p in inputs.items() if p is not None}
    real = {os.path.realpath(p) for p in given.values()}
    for plan in plans:
        for path in plan.values():
            if os.path.realpath(path) in real or path.exists():
                check_outputs_are_not_inputs({"--out": path}, given)


@dataclass
class FileResult:
    """What became of one input file.

    index, total: its position (1-based) among the files of the run.
    outputs: kind (``labels``, ``probabilities``, ``instances``) -> file written; those written before an
        error are kept and listed.
    shape: the labels' shape (Y x X, or Z x Y x X); ``()`` when the image could not be read.
    pixel_counts: class value -> pixels (voxels) predicted as that class, in the model's class order.
    seconds: reading, predicting and writing.
    error: one line saying why the file was skipped, or None.
    """

    index: int
    total: int
    path: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    pixel_counts: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def absent_classes(self) -> list[int]:
        """The class values with no predicted pixel."""
        return [value for value, count in self.pixel_counts.items() if count == 0]

    def line(self, class_names: Sequence[str] | None = None) -> str:
        """``[3/12] name.tif: 512 x 512, classes present nucleus, rod (absent: debris), 1.2 s -> out/name_labels.tif``
        or ``[3/12] name.tif: skipped: <why>``; ``class_names`` in the order of ``pixel_counts``."""
        head = f"[{self.index}/{self.total}] {self.path.name}"
        if self.error is not None:
            return f"{head}: skipped: {self.error}"
        names = dict(zip(self.pixel_counts, class_names or [str(v) for v in self.pixel_counts]))
        present = [names[v] for v, n in self.pixel_counts.items() if n]
        absent = [names[v] for v in self.absent_classes()]
        classes = f"classes present {', '.join(present) or 'none'}" + (f" (absent: {', '.join(absent)})" if absent else "")
        written = ", ".join(str(p) for p in self.outputs.values())
        return f"{head}: {' x '.join(map(str, self.shape))}, {classes}, {self.seconds:.1f} s -> {written}"


def summary(results: Sequence[FileResult], out_dir: str | os.PathLike, seconds: float) -> str:
    """One line: how many files were predicted into ``out_dir``, how many failed (named), and the time."""
    failed = [r.path.name for r in results if not r.ok]
    done = len(results) - len(failed)
    text = f"predicted {done} of {len(results)} image(s) into {out_dir} in {seconds:.1f} s"
    return text + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")


def predict_files(
    model: "AdaptedSAM",
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    layout: "ImageLayout | None" = None,
    device: "str | torch.device" = "auto",
    overlap: float = 0.25,
    batch_size: int = 4,
    probabilities: bool = False,
    instances: bool = False,
    instances_3d: bool = False,
    other_inputs: Mapping[str, str | os.PathLike | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    instance_method: str = "auto",
) -> Iterator[FileResult]:
    """Predict image files one by one into ``out_dir`` (created if missing), yielding a :class:`FileResult`
    after each: its outputs written, or the one-line reason it was skipped (unreadable, not fitting the model's
    input spec or ``layout``, not writable). The others go on.

    The outputs are planned and checked (:func:`plan_outputs`) at the first ``next()``, before anything is
    written. ``progress(done, total)`` counts tiles within the current file. ``should_stop`` is polled between
    files and between tile batches; when it returns True the generator ends, and the file in progress is not
    written (the files finished before it are kept). ``instance_method`` as for ``planes.predict_image`` (a
    method the model cannot run is refused before any file is read).
    """
    import numpy as np

    from ..io.images import read_image, write_image
    from ..metrics import class_pixel_counts
    from .planes import instance_method_for, predict_image
    from .tiling import PredictionCancelled

    if instances:
        instance_method_for(model, instance_method, instances_3d)
    paths = [Path(p) for p in images]
    plans = plan_outputs(paths, out_dir, probabilities, instances, other_inputs)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    values = model.config.head.class_values
    for index, (path, plan) in enumerate(zip(paths, plans), start=1):
        if should_stop is not None and should_stop():
            return
        result, start = FileResult(index, len(paths), path), time.perf_counter()
        try:
            prediction = predict_image(
                model, read_image(path), layout, device=device, overlap=overlap, batch_size=batch_size,
                return_probabilities=probabilities, instances=instances, instances_3d=instances_3d,
                progress=progress, should_stop=should_stop, instance_method=instance_method)
            result.shape = tuple(prediction.labels.shape)
            result.pixel_counts = class_pixel_counts(prediction.labels, values)
            arrays: dict[str, np.ndarray | None] = {"labels": prediction.labels,
                                                     "probabilities": prediction.probabilities,
                                                     "instances": prediction.instances}
            for kind, out in plan.items():
                result.outputs[kind] = write_image(out, arrays[kind], like=path)
        except PredictionCancelled:
            return
        except (ValueError, OSError, MemoryError, RuntimeError) as e:
            message = describe_error(e)
            result.error = message[len(f"{path}: "):] if message.startswith(f"{path}: ") else message
        result.seconds = time.perf_counter() - start
        yield result
