"""Export a fine-tuned model as a BioImage Model Zoo package (model description format 0.5), which tools built
on bioimageio.core run (its ``pytorch_state_dict`` weights need napari-convlora and segment-anything in the
environment; tools that only run TorchScript or ONNX weights, such as deepImageJ, cannot).

The package (one ``.zip``, written atomically) holds:

- ``weights.pt``: the state dict of :class:`~.architecture.AdaptedSamSegmenter` (base SAM, adapters and
  head: self-contained). Conv-LoRA's data-dependent expert routing cannot be traced to TorchScript faithfully,
  so the weights are ``pytorch_state_dict`` with the architecture given as Python source,
  ``bioimageio_model.py`` (a copy of ``architecture.py``), built from the model's config stored as its kwargs;
- ``environment.yaml``: the dependencies (pytorch, segment-anything, napari-convlora);
- ``test_input.npy`` / ``test_output.npy``: a crop of a real image (the one given, or the built-in synthetic
  sample) and the class probabilities napari-convlora itself predicts for it (the same as ``sample_*.tif``);
- ``cover.png`` (the test output's labels over the test input), ``README.md`` (classes, input, preprocessing,
  how to run and validate) and ``rdf.yaml`` (the description, with citations and napari-convlora's version).

Axes: input ``batch, channel, y, x`` (the model's 1 to 3 input channels, float32 raw intensities; any
``y, x`` of at least 16 pixels), preprocessed per sample and channel by ``scale_range`` (the model's
percentiles -> 0..1) and ``clip`` (0..1); output ``batch, channel, y, x`` float32 class probabilities
(channel = class, summing to 1), the size of the input.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import InputSpec, to_record
from ..config.choices import FORMAT_VERSION
from ..data import ImageLayout, SamPlanes, rescale_probabilities, validate_image
from ..data.sampling import mirror_margin
from ..errors import ConfigError
from ..io.atomic import atomic_path, sha256_file
from ..modeling import AdaptedSAM
from ..prediction.planes import PROMPTABLE_ONLY
from ..prediction.tiling import predict_tiled, probabilities_to_labels
from .architecture import strict_float32
from .text import MIN_SIDE, class_names, citations, default_description, default_name, readme, versions

#: Largest side of the test input (a centre crop of the sample image's plane).
TEST_SIDE = 512
#: Largest side of the cover image.
COVER_SIDE = 256


DEFAULT_LICENSE = "Apache-2.0"  # the license of SAM's weights, which every exported model contains
BASE_TAGS = ("2d", "pytorch", "semantic-segmentation", "segment-anything", "napari-convlora", "napari")
NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")


def export_bioimageio(
    model: AdaptedSAM,
    path: str | os.PathLike,
    sample_image: np.ndarray | None = None,
    layout: ImageLayout | None = None,
    *,
    plane: int | None = None,
    name: str | None = None,
    authors: Sequence[str] = (),
    description: str | None = None,
    license: str = DEFAULT_LICENSE,
    tags: Sequence[str] = (),
    overlap: float = 0.25,
    model_file: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` as a BioImage Model Zoo package (``.zip``), atomically: ``path`` appears whole or not at all.

    Args:
        model: a fine-tuned model (any device, any mode; it is left as it was).
        path: the ``.zip`` to write (its suffix must be ``.zip``, so that no model or image file is overwritten).
        sample_image: an image as a napari layer holds it (read with ``layout``), from which the test input is
            cut: a centre crop of at most ``TEST_SIDE`` pixels of one plane, with the model's input channels.
            None: the built-in synthetic sample (``data.samples.synthetic_cells``).
        plane: which plane of a stack (C order over the leading axes); default the middle one.
        name, authors, description, license, tags: the package's metadata (defaults say what the model is;
            ``license`` an SPDX id, by default SAM's own, Apache-2.0; ``tags`` are added to the defaults).
        overlap: tile overlap of the package's forward (napari-convlora's default).
        model_file: the file ``model`` was loaded from, named in the refusal of a model adapted from weak labels.

    Returns:
        ``path``.

    Raises:
        ValueError: a model adapted from weak labels (``config.promptable``, WeSAM): its prompt-free head, the one
            a package runs, never trained (``prediction.planes.PROMPTABLE_ONLY``); refused before anything is
            written.
        ConfigError: bioimageio.spec not installed, a path that is not ``.zip``, metadata the format rejects,
            an input spec the format cannot express, a sample image that does not fit the model.
    """
    check_prompt_free(model, model_file)
    path = check_export(path, name, license, authors)
    spec = model.config.input
    if spec.percentiles[1] <= 1.0:
        raise ConfigError(f"the model's high percentile {spec.percentiles[1]} cannot be written in a bioimageio "
                          "package (its scale_range takes percentiles above 1)")
    if sample_image is None:
        from ..data.samples import synthetic_cells

        sample_image, layout = synthetic_cells(256)[0], ImageLayout()
    crop = sample_crop(sample_image, layout or ImageLayout(), spec, plane)
    probabilities = reference_probabilities(model, crop, overlap)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".staging", dir=path.parent)  # path's disk
    with staging as folder:
        folder = Path(folder)
        files = _write_package_files(model, folder, crop, probabilities)
        descr = _describe(model, files, crop.shape[-1], name=name, authors=authors, description=description,
                          license=license, tags=tags, overlap=overlap)
        _save_package(descr, path, folder)
    return path


def check_prompt_free(model: AdaptedSAM, model_file: str | os.PathLike | None = None) -> None:
    """Refuse a model adapted from weak labels (WeSAM): a package segments without prompts, with the prompt-free
    head, which such a model never trained (its test output would be the untrained head's 0.5 everywhere).

    Raises:
        ValueError: one line, naming ``model_file`` when given, with ``predict``'s reason.
    """
    if model.config.promptable is not None:
        named = f"{model_file}: " if model_file is not None else ""
        raise ValueError(f"{named}not exported: a BioImage Model Zoo package segments without prompts, and "
                         f"{PROMPTABLE_ONLY}")


def check_export(path: str | os.PathLike, name: str | None = None, license: str = DEFAULT_LICENSE,
                 authors: Sequence[str] = ()) -> Path:
    """Refuse, before any work, what cannot be exported: a ``path`` that is not ``.zip``, bioimageio.spec not
    installed, a ``name``, ``license`` or author name the format rejects. Returns ``path`` as a Path.

    Raises:
        ConfigError: naming the option.
    """
    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise ConfigError(f"{path}: a BioImage Model Zoo package is a .zip file; give a name ending in .zip")
    if name is not None:
        bad = sorted(set(name) - NAME_CHARACTERS)
        if bad or not 5 <= len(name) <= 128:
            raise ConfigError(f"name {name!r}: a bioimageio name has 5 to 128 letters, digits, spaces or _+-()"
                              + (f", not {''.join(bad)!r}" if bad else ""))
    for author in authors or ():
        if not author.strip() or "/" in author or "\\" in author:
            raise ConfigError(f"author {author!r} (--author): a bioimageio author name is not empty and has no / "
                              "or \\ (give one --author per person)")
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ConfigError("exporting to the BioImage Model Zoo needs bioimageio.spec: "
                          "pip install 'napari-convlora[bioimageio]'") from None
    from bioimageio.spec.model.v0_5 import DeprecatedLicenseId, LicenseId

    for kind in (LicenseId, DeprecatedLicenseId):
        try:
            kind(license)
            return path
        except ValueError:
            pass
    raise ConfigError(f"license {license!r} is not an SPDX license id (for example Apache-2.0, MIT or CC-BY-4.0)")


# ---- test input and output ----------------------------------------------------------------------------
def sample_crop(image: np.ndarray, layout: ImageLayout, spec: InputSpec, plane: int | None = None) -> np.ndarray:
    """A centre crop (at most ``TEST_SIDE`` pixels a side) of one plane of ``image`` with the model's input
    channels, raw intensities: float32 ``Y x X x C`` (C = 1 to 3, in the order of ``spec.channels``)."""
    image = np.asarray(image)
    try:
        validate_image(image, layout, spec)
    except ValueError as e:
        raise ConfigError(f"the sample image (--image) does not fit the model: {e}") from None
    if layout.rgb:
        channels_last = image[..., :3]
    elif layout.channel_axis is not None:
        channels_last = np.moveaxis(image, layout.channel_axis, -1)
    else:
        channels_last = image[..., None]
    used = list(spec.channels) if spec.channels is not None else list(range(channels_last.shape[-1]))
    leading = channels_last.shape[:-3]
    count = int(np.prod(leading)) if leading else 1
    index = count // 2 if plane is None else plane
    if not 0 <= index < count:
        raise ConfigError(f"plane {index} (--plane) does not exist: the sample image has {count} plane(s)")
    planar = channels_last[np.unravel_index(index, leading) if leading else ()]
    height, width = planar.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ConfigError(f"the sample image's (--image) planes are {height} x {width} pixels; the test input "
                          f"needs at least {MIN_SIDE} x {MIN_SIDE}")
    top, left = max(0, (height - TEST_SIDE) // 2), max(0, (width - TEST_SIDE) // 2)
    crop = planar[top : top + TEST_SIDE, left : left + TEST_SIDE][..., used]
    return np.ascontiguousarray(crop, dtype=np.float32)


def reference_probabilities(model: AdaptedSAM, crop: np.ndarray, overlap: float = 0.25) -> np.ndarray:
    """What napari-convlora predicts for ``crop`` (``Y x X x C`` from :func:`sample_crop`): ``K x Y x X`` float32.

    The same steps as ``prediction.planes.predict_plane_probabilities`` (``data.SamPlanes`` normalisation, the input
    spec's rescale, blended tiles), on the model's own device but in float32 without TF32 (``strict_float32``,
    as the package's forward), so that the test output is what any device reproduces."""
    spec = dataclasses.replace(model.config.input, channels=None)  # the crop holds exactly the used channels
    planes = SamPlanes(crop, ImageLayout(channel_axis=-1), spec)
    device = model.pixel_mean.device
    was_training = model.training
    model.eval()
    try:
        with strict_float32():
            probs = predict_tiled(lambda batch: model.class_probabilities(batch.to(device)).float(),
                                  planes.input_view(0), model.input_size, model.num_classes, overlap=overlap,
                                  border=mirror_margin(model.input_size))  # as the package's architecture
    finally:
        model.train(was_training)
    return rescale_probabilities(probs, planes.shape)


# ---- the package's files ----------------------------------------------------------------------------------
def _write_package_files(model: AdaptedSAM, folder: Path, crop: np.ndarray, probs: np.ndarray) -> dict[str, Path]:
    """The package's files in ``folder``: name -> path."""
    from . import architecture
    from ..io.images import overlay_png, write_image

    files = {name: folder / name for name in (
        "bioimageio_model.py", "weights.pt", "environment.yaml", "test_input.npy", "test_output.npy",
        "sample_input.tif", "sample_output.tif", "cover.png", "README.md")}
    shutil.copyfile(architecture.__file__, files["bioimageio_model.py"])  # named as packages always named it
    state = {f"model.{k}": v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save(state, files["weights.pt"])
    files["environment.yaml"].write_text(_environment_yaml())
    np.save(files["test_input.npy"], np.moveaxis(crop, -1, 0)[None])  # 1 x C x Y x X
    np.save(files["test_output.npy"], probs[None].astype(np.float32))  # 1 x K x Y x X
    write_image(files["sample_input.tif"], np.moveaxis(crop, -1, 0))  # the same, for people: C x Y x X
    write_image(files["sample_output.tif"], probs.astype(np.float32))  # K x Y x X
    step = -(-max(crop.shape[:2]) // COVER_SIDE)
    labels = probabilities_to_labels(probs, model.config.head.class_values)
    overlay_png(files["cover.png"], crop[::step, ::step], labels[::step, ::step],
                background=model.config.head.class_values[0])
    files["README.md"].write_text(readme(model, crop.shape))
    return files


def _environment_yaml() -> str:
    torch_version, version = versions()
    ours = "napari-convlora" if version == "unknown" else f"napari-convlora=={version}"
    return (
        "name: napari-convlora\n"
        "channels:\n  - conda-forge\n  - nodefaults\n"
        "dependencies:\n"
        "  - python>=3.10\n"
        f"  - pytorch>={torch_version}\n"
        "  - pip\n"
        "  - pip:\n"
        "      - segment-anything>=1.0\n"
        f"      - {ours}\n"
    )


def _describe(model: AdaptedSAM, files: dict[str, Path], num_channels: int, *, name: str | None,
              authors: Sequence[str], description: str | None, license: str, tags: Sequence[str],
              overlap: float) -> Any:
    """The package's ``ModelDescr`` (bioimageio.spec, model format 0.5) for the files written."""
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr, Author, AxisId, BatchAxis, ChannelAxis, CiteEntry, ClipDescr, ClipKwargs, Config,
        Doi, FileDescr, Identifier, InputTensorDescr, IntervalOrRatioDataDescr, ModelDescr, OutputTensorDescr,
        ParameterizedSize, PytorchStateDictWeightsDescr, ScaleRangeDescr, ScaleRangeKwargs, SizeReference,
        SpaceInputAxis, SpaceOutputAxis, TensorId, Version, WeightsDescr,
    )
    from pydantic import ValidationError

    name = name or default_name(model)
    spec = model.config.input
    torch_version, version = versions()
    image_id, probs_id = TensorId("image"), TensorId("probabilities")

    def file(key: str) -> Any:
        return FileDescr(source=files[key], sha256=sha256_file(files[key]))

    channel_names = [f"channel_{c}" for c in (spec.channels or range(num_channels))]
    spatial_in = [SpaceInputAxis(id=AxisId(a), size=ParameterizedSize(min=MIN_SIDE, step=1)) for a in ("y", "x")]
    spatial_out = [SpaceOutputAxis(id=AxisId(a), size=SizeReference(tensor_id=image_id, axis_id=AxisId(a)))
                   for a in ("y", "x")]
    try:
        return ModelDescr(
            name=name,
            description=description or default_description(model),
            authors=[Author(name=a) for a in (authors or ["napari-convlora user"])],
            cite=[CiteEntry(text=text, doi=Doi(doi)) for text, doi in citations(model.config)],
            license=license,
            tags=list(dict.fromkeys([*BASE_TAGS, model.config.adapter.method.replace("_", "-"), *tags])),
            documentation=file("README.md"),
            covers=[file("cover.png")],
            inputs=[InputTensorDescr(
                id=image_id,
                description="raw intensities of the model's input channels",
                axes=[BatchAxis(), ChannelAxis(channel_names=channel_names), *spatial_in],
                test_tensor=file("test_input.npy"),
                sample_tensor=file("sample_input.tif"),
                data=IntervalOrRatioDataDescr(type="float32"),
                preprocessing=[
                    ScaleRangeDescr(kwargs=ScaleRangeKwargs(axes=[AxisId("y"), AxisId("x")],
                                                            min_percentile=spec.percentiles[0],
                                                            max_percentile=spec.percentiles[1])),
                    ClipDescr(kwargs=ClipKwargs(min=0.0, max=1.0)),
                ],
            )],
            outputs=[OutputTensorDescr(
                id=probs_id,
                description="class probabilities (sum 1 over channels); labels = argmax over channels",
                axes=[BatchAxis(), ChannelAxis(channel_names=class_names(model)), *spatial_out],
                test_tensor=file("test_output.npy"),
                sample_tensor=file("sample_output.tif"),
                data=IntervalOrRatioDataDescr(type="float32"),
            )],
            weights=WeightsDescr(pytorch_state_dict=PytorchStateDictWeightsDescr(
                source=files["weights.pt"],
                sha256=sha256_file(files["weights.pt"]),
                architecture=ArchitectureFromFileDescr(
                    source=files["bioimageio_model.py"], sha256=sha256_file(files["bioimageio_model.py"]),
                    callable=Identifier("AdaptedSamSegmenter"),
                    kwargs={"config": to_record(model.config), "overlap": overlap, "batch_size": 4},
                ),
                pytorch_version=Version(torch_version),
                dependencies=file("environment.yaml"),
                comment="base SAM, adapters and head of a napari-convlora model (not merged)",
            )),
            # the architecture's kwargs hold the model's config as a napari-convlora record of this format version
            config=Config(napari_convlora={"package_version": version, "format_version": FORMAT_VERSION}),
        )
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ConfigError(f"the bioimageio description is invalid: {where}: {first.get('msg')}") from None


def _save_package(descr: Any, path: Path, folder: Path) -> None:
    """Zip ``descr`` and its files, check the zip loads as a valid package, then move it to ``path`` atomically."""
    from bioimageio.spec import save_bioimageio_package

    staged = folder / "package.zip"
    try:
        save_bioimageio_package(descr, output_path=staged)
    except ValueError as e:
        raise ConfigError(f"{path}: bioimageio.spec refused the package: {' '.join(str(e).split())[:500]}") from None
    with atomic_path(path) as tmp:
        shutil.move(staged, tmp)
