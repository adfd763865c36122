"""BioImage Model Zoo packages: exported, then run by bioimageio.core's own model test, offline."""

from __future__ import annotations

import re
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from napari_convlora.cli import main
from napari_convlora.config import InputSpec
from napari_convlora.data.samples import synthetic_cells

pytest.importorskip("bioimageio.core")


@pytest.fixture()
def offline(monkeypatch):
    """No connection to another machine: the export and the package test must work without a network."""
    connect = socket.socket.connect

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"the network is off in this test (connect to {address})")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)


def bioimageio_test(package: Path):
    """bioimageio.core's model test of ``package``: its validation summary."""
    from bioimageio.core import test_model

    summary = test_model(str(package), devices=["cpu"])
    failed = [f"{d.name}: {[e.msg for e in d.errors]}" for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed
    return summary


def test_a_trained_model_exported_from_the_cli_passes_the_bioimageio_model_test(tmp_path, tiny_checkpoint, offline,
                                                                                capsys):
    image, labels = synthetic_cells(160, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    model = tmp_path / "model.safetensors"
    assert main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "lab.tif"), "--out", str(model), "--input-size", "64", "--steps", "1",
                 "--class-names", "background,nucleus,rod", "--device", "cpu"]) == 0
    package = tmp_path / "out" / "nuclei model.zip"
    start = time.perf_counter()
    assert main(["export-bioimageio", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--out",
                 str(package), "--image", str(tmp_path / "img.tif"), "--name", "Nuclei and rods (test)",
                 "--author", "A. Tester", "--tag", "nuclei", "--device", "cpu"]) == 0
    assert str(package) in capsys.readouterr().out
    bioimageio_test(package)
    assert time.perf_counter() - start < 60

    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        readme = z.read("README.md").decode()
        environment = yaml.safe_load(z.read("environment.yaml"))
    assert {"rdf.yaml", "weights.pt", "bioimageio_model.py", "environment.yaml", "test_input.npy", "test_output.npy",
            "cover.png", "README.md"} <= names
    assert rdf["format_version"].startswith("0.5") and rdf["name"] == "Nuclei and rods (test)"
    assert [a["name"] for a in rdf["authors"]] == ["A. Tester"] and "nuclei" in rdf["tags"]
    assert {c["doi"] for c in rdf["cite"]} == {"10.48550/arXiv.2304.02643", "10.48550/arXiv.2401.17868",
                                               "10.48550/arXiv.2304.13785"}  # 3 classes: the per-class head, SAMed's
    (inp,), (out,) = rdf["inputs"], rdf["outputs"]
    assert [a.get("type") for a in inp["axes"]] == ["batch", "channel", "space", "space"]
    assert [p["id"] for p in inp["preprocessing"] if p["id"] != "ensure_dtype"] == ["scale_range", "clip"]
    assert out["axes"][1]["channel_names"] == ["background", "nucleus", "rod"]
    weights = rdf["weights"]["pytorch_state_dict"]
    assert weights["architecture"]["callable"] == "AdaptedSamSegmenter" and weights["architecture"]["sha256"]
    assert weights["architecture"]["kwargs"]["config"]["input_size"] == 64
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert any(p.startswith("napari-convlora") for p in pip) and any(p.startswith("segment-anything") for p in pip)
    assert "## Validation" in readme and "| 2 | rod | 2 |" in readme and "99.8" in readme
    assert weights["architecture"]["kwargs"]["config"]["head"]["detail"] is True  # the default at 64 px: it runs there
    assert "detail head" in readme
    assert not list(package.parent.glob(".*"))  # no staging folder or temporary file left behind


def test_a_bundle_with_chosen_channels_and_rescaling_passes_without_a_checkpoint(tmp_path, tiny_checkpoint, offline):
    """Channels 2 and 0 of a 3-channel image into the green and red slots, objects shrunk by half: the package's
    preprocessing and forward reproduce napari-convlora's own prediction."""
    from helpers import make_model, perturb_trainable

    from napari_convlora.checkpoints.model_files import save_bundle

    spec = InputSpec(channels=(2, 0), rgb_slots=(1, 0), percentiles=(2.0, 99.0), rescale=0.5)
    model = perturb_trainable(make_model(tiny_checkpoint, num_classes=3, input_size=64, input=spec))
    bundle = save_bundle(model, tmp_path / "bundle.safetensors")
    cells = synthetic_cells(96, seed=1)[0]
    image = np.stack([cells, np.zeros_like(cells), cells[::-1].copy()])  # C x Y x X
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="minisblack")
    package = tmp_path / "package.zip"
    assert main(["export-bioimageio", "--model", str(bundle), "--out", str(package), "--image",
                 str(tmp_path / "img.tif"), "--channel-axis", "0", "--device", "cpu"]) == 0
    bioimageio_test(package)
    with zipfile.ZipFile(package) as z:
        assert np.load(z.open("test_input.npy")).shape == (1, 2, 96, 96)
        assert np.load(z.open("test_output.npy")).shape == (1, 3, 96, 96)


def test_the_built_in_sample_is_used_without_an_image_and_the_model_is_left_as_it_was(tmp_path, tiny_checkpoint):
    from helpers import make_model

    from napari_convlora.bioimageio.export import TEST_SIDE, export_bioimageio

    model = make_model(tiny_checkpoint, num_classes=2, input_size=64, method="lora").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_bioimageio(model, tmp_path / "m.zip")
    assert model.training and all((v == model.state_dict()[k]).all() for k, v in before.items())
    with zipfile.ZipFile(tmp_path / "m.zip") as z:
        assert np.load(z.open("test_input.npy")).shape[-2:] == (256, 256) != (TEST_SIDE, TEST_SIDE)
        assert "LoRA" in yaml.safe_load(z.read("rdf.yaml"))["name"]


def test_options_that_cannot_work_are_refused_before_any_work(tmp_path, tiny_checkpoint, capsys):
    from helpers import make_model

    from napari_convlora.checkpoints.model_files import save_bundle

    bundle = save_bundle(make_model(tiny_checkpoint, input_size=64), tmp_path / "b.safetensors")
    before = bundle.read_bytes()
    link = tmp_path / "b.zip"
    link.symlink_to(bundle)
    base = ["export-bioimageio", "--model", str(bundle), "--device", "cpu"]
    for extra, message in ((["--out", str(tmp_path / "m.safetensors")], "is a .zip file"),
                           (["--out", str(link)], "--out .* is the same file as --model"),
                           (["--out", str(tmp_path / "m.zip"), "--name", "a/b"], "bioimageio name"),
                           (["--out", str(tmp_path / "m.zip"), "--author", "Lab A/B"], r"author 'Lab A/B' \(--author\)"),
                           (["--out", str(tmp_path / "m.zip"), "--license", "not-a-license"], "not an SPDX license id"),
                           (["--out", str(tmp_path / "m.zip"), "--plane", "5"], r"plane 5 \(--plane\) does not exist")):
        capsys.readouterr()
        code = main([*base, *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err
    assert bundle.read_bytes() == before and not (tmp_path / "m.zip").exists()


def test_a_failed_write_keeps_the_previous_package(tmp_path, tiny_checkpoint, monkeypatch):
    import bioimageio.spec

    from helpers import make_model

    from napari_convlora.bioimageio.export import export_bioimageio

    model = make_model(tiny_checkpoint, input_size=64)
    package = tmp_path / "m.zip"
    package.write_bytes(b"the previous package")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bioimageio.spec, "save_bioimageio_package", fail)
    with pytest.raises(OSError, match="disk full"):
        export_bioimageio(model, package)
    assert package.read_bytes() == b"the previous package"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.zip"]


def test_an_hq_model_passes_and_cites_hq_sam(tmp_path, tiny_hq_checkpoint, offline):
    """HQ-SAM's parts travel in the package's weights and its rebuilt architecture; the package names and cites
    HQ-SAM."""
    from helpers import make_model, perturb_trainable

    from napari_convlora.bioimageio.export import export_bioimageio

    model = perturb_trainable(make_model(tiny_hq_checkpoint, num_classes=3, input_size=64, hq="sam+hq"))
    package = export_bioimageio(model.eval(), tmp_path / "hq.zip")
    bioimageio_test(package)
    with zipfile.ZipFile(package) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        readme = z.read("README.md").decode()
    assert "Conv-LoRA + HQ" in rdf["name"] and "10.48550/arXiv.2306.01567" in {c["doi"] for c in rdf["cite"]}
    assert "HQ-SAM's output token and feature fusion: SAM's mask plus the HQ mask" in readme


def test_a_per_class_model_passes_and_cites_samed(tmp_path, tiny_checkpoint, offline):
    """SAMed's one-token-per-class head (no class head) is rebuilt from the package's config and predicts the
    softmax of its K masks, as napari-convlora does."""
    from helpers import make_model, perturb_trainable

    from napari_convlora.bioimageio.export import export_bioimageio

    model = perturb_trainable(make_model(tiny_checkpoint, num_classes=3, input_size=64, multiclass="per_class"))
    package = export_bioimageio(model.eval(), tmp_path / "per_class.zip")
    bioimageio_test(package)
    with zipfile.ZipFile(package) as z:
        rdf = yaml.safe_load(z.read("rdf.yaml"))
        readme = z.read("README.md").decode()
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]["config"]["head"]["multiclass"] == "per_class"
    assert "10.48550/arXiv.2304.13785" in {c["doi"] for c in rdf["cite"]}
    assert "3 mask tokens" in readme and "one token per class (SAMed)" in readme


def test_a_model_adapted_from_weak_labels_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint, capsys):
    """A WeSAM-adapted model's prompt-free head never trained: a semantic package of it would predict the untrained
    head's 0.5 everywhere. The CLI refuses it in one line naming the model file, as predict refuses it; nothing
    (no package, no staging folder) is left."""
    from helpers import drain, make_model
    from skimage.measure import label

    from napari_convlora.bioimageio.export import export_bioimageio
    from napari_convlora.config import RunOptions
    from napari_convlora.config.model import PromptableAdaptation
    from napari_convlora.config.self_training import SelfTrainingRecipe
    from napari_convlora.data.prompts import mask_box
    from napari_convlora.prediction.planes import PROMPTABLE_ONLY
    from napari_convlora.self_training import WeakPair, prepare_weak_data, self_train
    from napari_convlora.weak import WeakLabels, WeakObject

    image, labels = synthetic_cells(96, seed=0)
    instances = label(labels > 0)
    weak = WeakLabels(instances.shape, {(): [WeakObject((), "box", box=mask_box(instances == i), layer="boxes")
                                             for i in np.unique(instances) if i > 0]})
    recipe = SelfTrainingRecipe(input_size=64, steps=1, warmup_steps=0)
    adapted = tmp_path / "adapted.safetensors"
    drain(self_train(tiny_checkpoint, prepare_weak_data([WeakPair(image, weak)], recipe), adapted, recipe,
                     RunOptions(device="cpu")))
    out = tmp_path / "out"
    package = out / "adapted.zip"
    code = main(["export-bioimageio", "--model", str(adapted), "--checkpoint", str(tiny_checkpoint), "--out",
                 str(package), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(adapted) in err and PROMPTABLE_ONLY in err, err
    assert not out.exists() or not list(out.iterdir())

    model = make_model(tiny_checkpoint, input_size=64)  # the core function, as the dock's Model Zoo export calls it
    model.config.promptable = PromptableAdaptation(weak_labels=("box",), steps=1)
    with pytest.raises(ValueError, match="adapted to segment prompts") as refused:
        export_bioimageio(model, out / "m.zip", model_file="m.safetensors")
    assert str(refused.value).startswith("m.safetensors: ") and PROMPTABLE_ONLY in str(refused.value)
    with pytest.raises(ValueError, match=re.escape(PROMPTABLE_ONLY)):
        export_bioimageio(model, out / "m.zip")
    assert not out.exists() or not list(out.iterdir())
