"""Predicting many images: several --image files or a folder into an --out folder, one line per image, bad
files skipped, clashes and outputs that are inputs refused before any work; the generator the dock drives."""

from __future__ import annotations

import re

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from helpers import make_model, perturb_trainable

from napari_convlora.prediction.batch import images_in_folder, output_paths, predict_files
from napari_convlora.cli import main
from napari_convlora.checkpoints.model_files import save_adapter
from napari_convlora.metrics import class_pixel_counts
from napari_convlora.data.samples import synthetic_cells


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = make_model(tiny_checkpoint, num_classes=3, input_size=64, class_names=("bg", "nucleus", "rod"))
    return perturb_trainable(m, scale=0.3).eval()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    return save_adapter(model, tmp_path_factory.mktemp("model") / "m.safetensors")


def _cells(size: int, seed: int) -> np.ndarray:
    return synthetic_cells(size, seed=seed)[0]


def _predict(model_file, tiny_checkpoint, *args: str) -> int:
    return main(["predict", "--model", str(model_file), "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                 *args])


def test_class_pixel_counts():
    labels = np.array([[0, 2, 2], [5, 0, 7]], np.uint8)  # 7 is not a class value: not counted
    assert class_pixel_counts(labels, (0, 2, 5, 9)) == {0: 2, 2: 2, 5: 1, 9: 0}
    assert class_pixel_counts(labels.astype(np.int32), (0, 2, 5, 9)) == {0: 2, 2: 2, 5: 1, 9: 0}
    assert list(class_pixel_counts(labels, (5, 0))) == [5, 0]  # in the order of the class values


def test_output_names_keep_medical_formats(tmp_path):
    assert output_paths("in/a.png", tmp_path, probabilities=True) == {
        "labels": tmp_path / "a_labels.tif", "probabilities": tmp_path / "a_probabilities.tif"}
    assert output_paths("in/scan.v2.nii.gz", tmp_path, instances=True) == {
        "labels": tmp_path / "scan.v2_labels.nii.gz", "instances": tmp_path / "scan.v2_instances.nii.gz"}
    assert output_paths("in/s.NRRD", tmp_path)["labels"] == tmp_path / "s_labels.NRRD"


def test_a_folder_with_an_unreadable_image_skips_it_and_exits_1(model_file, tiny_checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    tifffile.imwrite(images / "a.tif", _cells(64, 0))
    iio.imwrite(images / "b.png", (_cells(80, 1) // 256).astype(np.uint8)[:, :72])
    (images / "c.tif").write_bytes(b"not a tiff at all")
    (images / "notes.txt").write_text("not an image")
    (images / "sub").mkdir()  # not recursive
    tifffile.imwrite(images / "sub" / "d.tif", _cells(64, 2))
    out = tmp_path / "out"  # created
    assert _predict(model_file, tiny_checkpoint, "--image", str(images), "--out", str(out)) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif"]
    assert tifffile.imread(out / "b_labels.tif").shape == (80, 72)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"\[1/3\] a\.tif: 64 x 64, classes present .*, \d+\.\d s -> .*a_labels\.tif", lines[0])
    assert lines[1].startswith("[2/3] b.png: 80 x 72, classes present ")
    assert lines[2].startswith("[3/3] c.tif: skipped: could not read the image")
    assert re.fullmatch(rf"predicted 2 of 3 image\(s\) into {re.escape(str(out))} in \d+\.\d s; 1 failed: c\.tif\n",
                        captured.out)


def test_several_images_match_predicting_each_alone(model_file, tiny_checkpoint, tmp_path, capsys):
    paths = [tmp_path / "one.tif", tmp_path / "two.tif"]
    tifffile.imwrite(paths[0], _cells(64, 3))
    tifffile.imwrite(paths[1], _cells(96, 4)[:70])
    out = tmp_path / "preds"
    code = _predict(model_file, tiny_checkpoint, "--image", str(paths[0]), "--image", str(paths[1]), "--out",
                    str(out), "--probabilities", "--instances")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{kind}.tif" for stem in ("one", "two") for kind in ("labels", "probabilities", "instances"))
    assert capsys.readouterr().out.startswith("predicted 2 of 2 image(s) into ")
    for path in paths:
        alone = tmp_path / f"{path.stem}_alone.tif"
        assert _predict(model_file, tiny_checkpoint, "--image", str(path), "--out", str(alone)) == 0
        assert f"-> {alone}" in capsys.readouterr().out  # the single-image form prints as before
        assert np.array_equal(tifffile.imread(out / f"{path.stem}_labels.tif"), tifffile.imread(alone))
    assert tifffile.imread(out / "two_probabilities.tif").shape == (3, 70, 96)


def test_a_name_clash_is_refused_before_anything_is_written(model_file, tiny_checkpoint, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", _cells(64, 0))
    iio.imwrite(tmp_path / "a.png", (_cells(64, 1) // 256).astype(np.uint8))
    out = tmp_path / "out"
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"--image {tmp_path / 'a.png'} and --image {tmp_path / 'a.tif'} would both be written to" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path / "a.tif"), "--image",
                    str(tmp_path / "a.tif"), "--out", str(out)) == 2
    assert "is given twice" in capsys.readouterr().err and not out.exists()


def test_outputs_that_are_inputs_are_refused(model_file, tiny_checkpoint, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", _cells(64, 0))
    tifffile.imwrite(tmp_path / "a_labels.tif", _cells(64, 1))  # a run before, into the same folder
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path), "--out", str(tmp_path)) == 2
    assert re.search(r"--out .*a_labels\.tif is the same file as --image .*a_labels\.tif", capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "a_labels.tif").symlink_to(tmp_path / "a.tif")  # an output that is an input through a link
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path / "a.tif"), "--out", str(link_dir)) == 2
    assert "is the same file as --image" in capsys.readouterr().err
    assert (tmp_path / "a.tif").read_bytes() == before["a.tif"]


def test_options_that_cannot_work_with_several_images(model_file, tiny_checkpoint, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", _cells(64, 0))
    tifffile.imwrite(tmp_path / "b.tif", _cells(64, 1))
    two = ["--image", str(tmp_path / "a.tif"), "--image", str(tmp_path / "b.tif")]
    assert _predict(model_file, tiny_checkpoint, *two, "--out", str(tmp_path / "a.tif")) == 2
    assert "is a file; with several images" in capsys.readouterr().err
    assert _predict(model_file, tiny_checkpoint, *two, "--out", str(tmp_path / "o"), "--probabilities", "p.tif") == 2
    assert "--probabilities p.tif: with several images or a folder --probabilities takes no file name" in \
        capsys.readouterr().err
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path / "a.tif"), "--out", str(tmp_path / "o.tif"),
                    "--instances") == 2
    assert "--instances: give the file to write" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 2
    assert "the folder holds no image file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tif").exists()


def test_predict_files_reports_counts_and_stops_between_files(model, tmp_path):
    for i in range(3):
        tifffile.imwrite(tmp_path / f"im{i}.tif", _cells(64, i))
    paths = images_in_folder(tmp_path)
    results = []
    stop = lambda: len(results) == 2  # noqa: E731 - pressed while the second file was predicted
    for result in predict_files(model, paths, tmp_path / "out", device="cpu", should_stop=stop):
        results.append(result)
    assert [r.path.name for r in results] == ["im0.tif", "im1.tif"] and all(r.ok for r in results)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["im0_labels.tif", "im1_labels.tif"]
    first = results[0]
    labels = tifffile.imread(first.outputs["labels"])
    assert first.pixel_counts == {v: int((labels == v).sum()) for v in (0, 1, 2)}
    assert sum(first.pixel_counts.values()) == 64 * 64 and first.shape == (64, 64)
    assert first.absent_classes() == [v for v, n in first.pixel_counts.items() if n == 0]


def test_a_nifti_scan_keeps_its_format_and_geometry(model_file, tiny_checkpoint, tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    stack = np.stack([_cells(64, 0), _cells(64, 1)])
    nib.save(nib.Nifti1Image(stack.T, affine), tmp_path / "scan.nii.gz")
    tifffile.imwrite(tmp_path / "flat.tif", _cells(64, 2))
    out = tmp_path / "out"
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path), "--out", f"{out}/") == 0
    assert sorted(p.name for p in out.iterdir()) == ["flat_labels.tif", "scan_labels.nii.gz"]
    written = nib.load(out / "scan_labels.nii.gz")
    assert written.shape == (64, 64, 2) and np.allclose(written.affine, affine)
    assert "[2/2] scan.nii.gz: 2 x 64 x 64, classes present" in capsys.readouterr().err


def test_one_image_into_an_existing_folder(model_file, tiny_checkpoint, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", _cells(64, 0))
    (tmp_path / "out").mkdir()
    assert _predict(model_file, tiny_checkpoint, "--image", str(tmp_path / "a.tif"), "--out", str(tmp_path / "out")) == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a_labels.tif"]
    assert capsys.readouterr().err.startswith("[1/1] a.tif: 64 x 64, classes present ")
