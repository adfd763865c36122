"""Adapter and bundle files: content bounds, round trips, base checks, bad files, the record policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import make_model, perturb_trainable

from napari_convlora import CheckpointError, describe, load_model, load_sam, random_base, random_sam, save_adapter, save_bundle
from napari_convlora.io.atomic import sha256_file
from napari_convlora.checkpoints.model_files import METADATA_KEY


def _trained_model(checkpoint, num_classes=3, method="conv_lora", seed=0):
    model = make_model(checkpoint, num_classes=num_classes, method=method, input_size=128,
                       class_names=tuple(f"class {i}" for i in range(num_classes)))
    return perturb_trainable(model, scale=0.1, seed=seed).eval()


def _images():
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5)) * 255


@pytest.mark.parametrize("method", ["conv_lora", "lora", "decoder"])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_adapter_and_bundle_round_trip(tmp_path, tiny_checkpoint, method, num_classes):
    model = _trained_model(tiny_checkpoint, num_classes, method)
    with torch.no_grad():
        expected = model.class_probabilities(_images())
    adapter = save_adapter(model, tmp_path / "a.safetensors")
    bundle = save_bundle(model, tmp_path / "m.safetensors")
    for path, base in ((adapter, tiny_checkpoint), (bundle, None)):
        loaded = load_model(path, base=base)
        with torch.no_grad():
            assert torch.equal(loaded.class_probabilities(_images()), expected)
        assert loaded.config == model.config
    assert sorted(tmp_path.iterdir()) == [tmp_path / "a.safetensors", tmp_path / "m.safetensors"]  # no temp left


def test_adapter_holds_only_trained_tensors_and_config(tmp_path, tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        record = json.loads(f.metadata()[METADATA_KEY])
    assert keys == set(model.trainable_state_dict())
    assert not any(".base_layer." in k or "prompt_encoder" in k or "iou_prediction_head" in k for k in keys)
    assert record["format"] == "napari-convlora-adapter" and record["format_version"] == 2
    assert record["config"]["base_checkpoint"] == {"file_name": "tiny_sam.pth", "sha256": sha256_file(tiny_checkpoint)}
    assert record["config"]["head"]["class_names"] == ["class 0", "class 1", "class 2"]
    assert record["config"]["input_size"] == 128
    assert record["config"]["adapter"]["method"] == "conv_lora"
    assert record["config"]["input"]["percentiles"] == [1.0, 99.8]
    assert describe(path)["config"] == record["config"]


def test_vit_b_adapter_size_is_bounded(tmp_path):
    base = tmp_path / "vit_b.pth"
    torch.save(random_sam("vit_b").state_dict(), base)
    model = make_model(base, input_size=256)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        n = sum(f.get_tensor(k).numel() for k in f.keys())
    assert n == 119_232 + 3_505_536  # adapters + binary decoder, nothing of the 90M-parameter base
    assert path.stat().st_size < 15_000_000


def test_wrong_base_is_refused_unless_overridden(tmp_path, tiny_checkpoint, other_tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"trained on 'tiny_sam.pth' \(sha256 .*\) but other_sam.pth has sha256"):
        load_model(path, base=other_tiny_checkpoint)
    with pytest.raises(CheckpointError, match=r"built in memory, no file\) has no checkpoint file to hash"):
        load_model(path, base=random_base("tiny"))
    with pytest.raises(CheckpointError, match="needs its base SAM checkpoint"):
        load_model(path)
    loaded = load_model(path, base=other_tiny_checkpoint, check_base_hash=False)
    assert torch.equal(loaded.sam.image_encoder.patch_embed.proj.weight,
                       load_sam(other_tiny_checkpoint).image_encoder.patch_embed.proj.weight)


def test_tampered_adapter_files(tmp_path, tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    extra = dict(tensors, **{"sam.image_encoder.blocks.0.attn.qkv.base_layer.weight": torch.zeros(192, 64)})
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(tmp_path / "extra.safetensors", base=tiny_checkpoint)
    missing = {k: v for k, v in tensors.items() if "lora_B" not in k}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="missing trained tensors"):
        load_model(tmp_path / "missing.safetensors", base=tiny_checkpoint)


def test_foreign_and_truncated_files(tmp_path, tiny_checkpoint):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not one written by napari-convlora"):
        load_model(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="for a SAM checkpoint use load_sam"):
        load_model(tiny_checkpoint)
    model = _trained_model(tiny_checkpoint)
    good = save_bundle(model, tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_a_model_file_that_may_not_be_read_says_so_not_no_such_file(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """safetensors calls a file without read permission "No such file or directory"; the user is told the truth."""
    import napari_convlora.io.safety as safety
    from napari_convlora.cli import main

    locked = save_bundle(_trained_model(tiny_checkpoint), tmp_path / "locked.safetensors")
    real_access = safety.os.access
    monkeypatch.setattr(safety.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(CheckpointError, match="locked.safetensors: no permission to read it"):
        load_model(locked)
    assert main(["info", str(locked)]) != 0
    err = capsys.readouterr().err
    assert "no permission to read it" in err and "No such file" not in err and len(err.strip().splitlines()) == 1


def test_failed_save_leaves_previous_file_intact(tmp_path, tiny_checkpoint, monkeypatch):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_describe_official_checkpoint(tiny_checkpoint, tmp_path):
    info = describe(tiny_checkpoint)
    assert info["format"] == "sam-checkpoint" and info["model_type"] is None
    assert info["architecture"]["encoder_embed_dim"] == 64
    base = tmp_path / "sam_vit_b.pth"
    torch.save(random_sam("vit_b").state_dict(), base)
    assert describe(base)["model_type"] == "vit_b"


def test_a_model_built_in_memory_saves_as_a_bundle_not_an_adapter(tmp_path):
    model = make_model(random_base("tiny"), input_size=64)
    with pytest.raises(CheckpointError, match="save a bundle"):
        save_adapter(model, tmp_path / "a.safetensors")
    loaded = load_model(save_bundle(model, tmp_path / "b.safetensors"))
    assert loaded.config == model.config and loaded.config.base_checkpoint is None


def test_saved_files_get_the_usual_permissions(tmp_path, tiny_checkpoint):
    """Atomic writes went through a private temporary file (mode 0600): a lab could not read each other's models."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        model = _trained_model(tiny_checkpoint)
        path = save_adapter(model, tmp_path / "a.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o640)  # a mode the user chose stays
        save_adapter(model, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_unknown_keys_warn_and_missing_keys_name_the_file_and_key(tmp_path, tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record["config"]["adapter"]["from_the_future"] = 1
    save_file(tensors, str(tmp_path / "newer.safetensors"), metadata={METADATA_KEY: json.dumps(record)})
    with pytest.warns(UserWarning, match=r"newer.safetensors: config.adapter: ignoring unknown keys \['from_the_future'\]"):
        load_model(tmp_path / "newer.safetensors", base=tiny_checkpoint)
    del record["config"]["adapter"]["from_the_future"]
    del record["config"]["head"]["label_mode"]
    save_file(tensors, str(tmp_path / "older.safetensors"), metadata={METADATA_KEY: json.dumps(record)})
    with pytest.raises(CheckpointError, match="older.safetensors: the record lacks 'config.head.label_mode'"):
        load_model(tmp_path / "older.safetensors", base=tiny_checkpoint)


def test_an_adapter_on_a_base_of_another_geometry_is_refused_with_its_name(tmp_path, tiny_checkpoint):
    from napari_convlora import save_sam_checkpoint
    from napari_convlora.config import SamArchitecture

    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors")
    odd = SamArchitecture(image_size=128, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                          encoder_global_attn_indexes=(1,), window_size=4, prompt_embed_dim=32, mask_in_chans=8,
                          decoder_mlp_dim=64, iou_head_hidden_dim=32)
    other = save_sam_checkpoint(random_sam(odd), tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"a.safetensors: cannot be built on odd.pth: .*geometry.*image_size"):
        load_model(path, base=other, check_base_hash=False)


def test_a_bundle_whose_record_claims_a_larger_sam_is_refused_before_building_it(tmp_path, tiny_checkpoint,
                                                                                monkeypatch):
    """A tiny file whose config claimed vit_h built the whole vit_h (3.2 GB, 26 s) before refusing it."""
    import napari_convlora.checkpoints.model_files as files
    from napari_convlora.config import PRESETS, to_record

    model = _trained_model(tiny_checkpoint)
    path = save_bundle(model, tmp_path / "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    record["config"]["base"] = to_record(PRESETS["vit_h"])
    save_file(tensors, str(tmp_path / "claims_vit_h.safetensors"), metadata={METADATA_KEY: json.dumps(record)})
    built = []
    monkeypatch.setattr(files, "build_sam", lambda arch: built.append(arch))
    with pytest.raises(CheckpointError, match=r"claims_vit_h.safetensors: its tensors are not the SAM its record "
                                              r"describes"):
        load_model(tmp_path / "claims_vit_h.safetensors")
    assert built == []


def test_a_format_version_that_is_not_a_number_is_called_damaged_not_newer(tmp_path):
    """A string format version was reported as "written by a newer napari-convlora, please upgrade" (issue 21)."""
    import json

    from safetensors.torch import save_file

    from napari_convlora.checkpoints.model_files import METADATA_KEY, read_record

    path = tmp_path / "odd.safetensors"
    for version, words in (("2", "damaged: format version '2' is not a version number"), (99, "newer napari-convlora")):
        save_file({"x": torch.zeros(1)}, str(path), metadata={METADATA_KEY: json.dumps({"format_version": version})})
        with pytest.raises(CheckpointError, match=words):
            read_record(path)


@pytest.mark.parametrize("kind", ["adapter", "bundle"])
def test_a_misshapen_tensor_is_refused_from_the_header_before_any_tensor_is_read(tmp_path, tiny_checkpoint,
                                                                               monkeypatch, kind):
    """An 8 GB adapter with one misshapen tensor was read whole before its shape was checked (issue 21)."""
    import safetensors.torch

    model = _trained_model(tiny_checkpoint)
    path = tmp_path / f"m.{kind}.safetensors"
    (save_adapter if kind == "adapter" else save_bundle)(model, path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if "lora_A" in k or "class_head" in k or "mask_tokens" in k)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, str(path), metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(CheckpointError, match=f"'{name}' has shape"):
        load_model(path, base=tiny_checkpoint if kind == "adapter" else None)


def test_no_writer_writes_over_the_models_base_checkpoint(tmp_path, tiny_checkpoint):
    """The dock refused; save_adapter / save_bundle from a script (and so every other writer) did not (issue 21)."""
    import shutil

    from napari_convlora import load_base
    from napari_convlora.errors import ConfigError

    base_copy = tmp_path / "sam.pth"
    shutil.copyfile(tiny_checkpoint, base_copy)
    model = perturb_trainable(make_model(load_base(base_copy), 2, "conv_lora", input_size=64))
    before = base_copy.read_bytes()
    for save in (save_adapter, save_bundle):
        with pytest.raises(ConfigError, match=r"sam.pth is the SAM checkpoint this model was built on"):
            save(model, base_copy)
        assert base_copy.read_bytes() == before
    assert save_adapter(model, tmp_path / "fine.safetensors").exists()
