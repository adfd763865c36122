"""Reading and writing images: the medical volumes (NIfTI, NRRD) in Z x Y x X order, with their geometry."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_convlora.cli import main
from napari_convlora.io.images import read_image, write_image
from napari_convlora.data.samples import synthetic_cells

nib = pytest.importorskip("nibabel")
nrrd = pytest.importorskip("nrrd")

AFFINE = np.array([[0.0, 0.0, 2.5, -40.0], [0.0, 0.8, 0.0, 12.0], [-0.8, 0.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _volume() -> np.ndarray:
    """Z x Y x X = 3 x 5 x 7 with every voxel distinct."""
    return np.arange(3 * 5 * 7, dtype=np.int16).reshape(3, 5, 7)


def test_nifti_is_read_in_zyx_order_with_its_scaling(tmp_path):
    volume = _volume()
    image = nib.Nifti1Image(volume.T.astype(np.int16), AFFINE)  # the file's own order: x, y, z
    image.header.set_slope_inter(2.0, 1.0)
    nib.save(image, tmp_path / "scan.nii.gz")
    read = read_image(tmp_path / "scan.nii.gz")
    assert read.shape == (3, 5, 7) and np.allclose(read, volume * 2.0 + 1.0)


def test_nifti_and_nrrd_outputs_take_the_geometry_of_the_scan_they_were_predicted_from(tmp_path):
    volume = _volume()
    nib.save(nib.Nifti1Image(volume.T, AFFINE), tmp_path / "scan.nii")
    labels = (volume % 3).astype(np.uint8)
    write_image(tmp_path / "labels.nii.gz", labels, like=tmp_path / "scan.nii")
    written = nib.load(tmp_path / "labels.nii.gz")
    assert np.allclose(written.affine, AFFINE) and written.get_data_dtype() == np.uint8
    assert np.array_equal(read_image(tmp_path / "labels.nii.gz"), labels)
    assert np.array_equal(np.asanyarray(written.dataobj), labels.T)  # x, y, z in the file, as the scan

    directions = np.array([[0.0, 0.0, 1.5], [0.0, 0.7, 0.0], [0.7, 0.0, 0.0]])
    nrrd.write(str(tmp_path / "scan.nrrd"), volume, {"space": "left-posterior-superior", "space directions": directions,
                                                       "space origin": np.array([1.0, 2.0, 3.0])}, index_order="C")
    assert np.array_equal(read_image(tmp_path / "scan.nrrd"), volume)
    write_image(tmp_path / "labels.nrrd", labels, like=tmp_path / "scan.nrrd")
    header = nrrd.read_header(str(tmp_path / "labels.nrrd"))
    assert np.allclose(header["space directions"], directions) and np.allclose(header["space origin"], [1, 2, 3])
    assert np.array_equal(read_image(tmp_path / "labels.nrrd"), labels)
    with pytest.raises(ValueError, match="labels.nhdr: a detached NRRD header needs a data file"):
        write_image(tmp_path / "labels.nhdr", labels)


def test_without_the_optional_reader_the_message_names_the_extra(tmp_path, monkeypatch):
    import importlib

    nib.save(nib.Nifti1Image(_volume().T, AFFINE), tmp_path / "scan.nii.gz")
    real_import = importlib.import_module

    def no_nibabel(name, *args):
        if name == "nibabel":
            raise ImportError("No module named 'nibabel'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_nibabel)
    with pytest.raises(ValueError, match=r"scan.nii.gz: reading NIfTI needs the optional package nibabel: "
                                         r"pip install 'napari-convlora\[medical\]'"):
        read_image(tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match="writing NIfTI needs the optional package nibabel"):
        write_image(tmp_path / "out.nii.gz", np.zeros((2, 3, 4), np.uint8))
    assert not (tmp_path / "out.nii.gz").exists() and len(list(tmp_path.iterdir())) == 1


def test_cli_trains_on_a_nifti_scan_and_writes_nifti_labels_aligned_with_it(tmp_path, tiny_checkpoint, capsys):
    image, labels = synthetic_cells(96, seed=1)
    stack_image, stack_labels = np.stack([image, image[::-1]]), np.stack([labels, labels[::-1]])
    nib.save(nib.Nifti1Image(stack_image.T, AFFINE), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(stack_labels.astype(np.uint8).T, AFFINE), tmp_path / "atlas.nii.gz")
    model = tmp_path / "m.safetensors"
    assert main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "scan.nii.gz"),
                 "--labels", str(tmp_path / "atlas.nii.gz"), "--out", str(model), "--input-size", "64",
                 "--steps", "2", "--device", "cpu", "--grad-accum", "1"]) == 0
    out = tmp_path / "pred.nii.gz"
    assert main(["predict", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(tmp_path / "scan.nii.gz"), "--out", str(out), "--device", "cpu"]) == 0
    written = nib.load(out)
    assert written.shape == (96, 96, 2) and np.allclose(written.affine, AFFINE)
    tifffile.imwrite(tmp_path / "scan.tif", stack_image)
    assert main(["predict", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(tmp_path / "scan.tif"), "--out", str(tmp_path / "pred.tif"), "--device", "cpu"]) == 0
    assert np.array_equal(read_image(out), tifffile.imread(tmp_path / "pred.tif"))  # same labels as from TIFF


def test_nifti_labels_whose_geometry_differs_from_the_image_are_warned_about(tmp_path, tiny_checkpoint, capsys):
    """NIfTI labels with another affine than the image's were accepted without a word (issue 21)."""
    nibabel = pytest.importorskip("nibabel")

    from napari_convlora.data.samples import synthetic_cells
    from napari_convlora.io.images import geometry_mismatch

    image, labels = synthetic_cells(64, seed=0)
    volume, label_volume = np.stack([image] * 2, axis=-1), np.stack([labels] * 2, axis=-1).astype(np.uint8)
    same, other = np.eye(4), np.diag([0.5, 0.5, 2.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, same), str(tmp_path / "img.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(label_volume, same), str(tmp_path / "lab.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(label_volume, other), str(tmp_path / "moved.nii.gz"))
    assert geometry_mismatch(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz") is None
    message = geometry_mismatch(tmp_path / "img.nii.gz", tmp_path / "moved.nii.gz")
    assert message.startswith(f"{tmp_path / 'moved.nii.gz'}: its NIfTI geometry differs from") and "0.5" in message
    assert main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.nii.gz"), "--labels",
                 str(tmp_path / "moved.nii.gz"), "--out", str(tmp_path / "m.safetensors"), "--input-size", "64",
                 "--steps", "1", "--device", "cpu"]) == 0
    assert "napari-convlora train: warning: " + message in capsys.readouterr().err
