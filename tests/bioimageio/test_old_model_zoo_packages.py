"""BioImage Model Zoo packages exported before the package was laid out in folders still run: their
``bioimageio_model.py`` imports ``napari_convlora.sam_build`` and ``napari_convlora.tiling``."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest
import tifffile

from napari_convlora.cli import main
from napari_convlora.data.samples import synthetic_cells

OLD_ARCHITECTURE = Path(__file__).resolve().parents[1] / "fixtures" / "model_zoo_0_2" / "bioimageio_model.py"

bioimageio_core = pytest.importorskip("bioimageio.core")


def test_a_package_exported_by_version_0_2_runs_and_reproduces_its_test_output(tmp_path, tiny_checkpoint,
                                                                              monkeypatch):
    old = OLD_ARCHITECTURE.read_text()
    assert "from napari_convlora.sam_build import build_sam" in old and "from napari_convlora.tiling import" in old
    image, labels = synthetic_cells(128, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    model = tmp_path / "model.safetensors"
    assert main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "lab.tif"), "--out", str(model), "--input-size", "64", "--steps", "1",
                 "--device", "cpu"]) == 0
    import napari_convlora.bioimageio.export as export

    monkeypatch.setattr(export, "mirror_margin", lambda tile: 0)  # test outputs as 0.2.0 computed them (no border)
    package = tmp_path / "package.zip"
    assert main(["export-bioimageio", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--out",
                 str(package), "--image", str(tmp_path / "img.tif"), "--device", "cpu"]) == 0
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    # the package as 0.2.0 wrote it: its architecture file, with that file's sha256 in rdf.yaml
    architecture = folder / "bioimageio_model.py"
    rdf = folder / "rdf.yaml"
    new_sha, old_sha = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (architecture, OLD_ARCHITECTURE))
    assert new_sha in rdf.read_text()
    shutil.copyfile(OLD_ARCHITECTURE, architecture)
    rdf.write_text(rdf.read_text().replace(new_sha, old_sha))
    summary = bioimageio_core.test_model(str(rdf), devices=["cpu"])
    failed = [f"{d.name}: {[e.msg for e in d.errors]}" for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
