"""Adapter and merged files: content bounds, round trips, base checks, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from napari_convlora import CheckpointError, ConvLoRASAM, describe, load_model, load_sam, random_sam, save_adapter, save_merged
from napari_convlora.atomic import sha256_file
from napari_convlora.files import METADATA_KEY


def _trained_model(checkpoint, num_classes=3, method="conv_lora", seed=0):
    model = ConvLoRASAM(load_sam(checkpoint), num_classes=num_classes, adapter=method, input_size=128,
                        class_names=tuple(f"class {i}" for i in range(num_classes)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _images():
    return torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5)) * 255


@pytest.mark.parametrize("method", ["conv_lora", "lora", "decoder"])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_adapter_and_merged_round_trip(tmp_path, tiny_checkpoint, method, num_classes):
    model = _trained_model(tiny_checkpoint, num_classes, method)
    with torch.no_grad():
        expected = model.class_probabilities(_images())
    adapter = save_adapter(model, tmp_path / "a.safetensors", tiny_checkpoint)
    merged = save_merged(model, tmp_path / "m.safetensors")
    for path, base in ((adapter, tiny_checkpoint), (merged, None)):
        loaded = load_model(path, base=base)
        with torch.no_grad():
            assert torch.equal(loaded.class_probabilities(_images()), expected)
        assert loaded.config == model.config
    assert sorted(tmp_path.iterdir()) == [tmp_path / "a.safetensors", tmp_path / "m.safetensors"]  # no temp left


def test_adapter_holds_only_trained_tensors_and_config(tmp_path, tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors", tiny_checkpoint)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        record = json.loads(f.metadata()[METADATA_KEY])
    assert keys == set(model.trainable_state_dict())
    assert not any(".base_layer." in k or "prompt_encoder" in k or "iou_prediction_head" in k for k in keys)
    assert record["format"] == "napari-convlora-adapter" and record["format_version"] == 1
    assert record["base_checkpoint"]["sha256"] == sha256_file(tiny_checkpoint)
    assert record["config"]["head"]["class_names"] == ["class 0", "class 1", "class 2"]
    assert record["config"]["input_size"] == 128
    assert record["config"]["adapter"]["method"] == "conv_lora"
    assert record["config"]["normalisation"]["percentiles"] == [1.0, 99.8]
    assert describe(path)["config"] == record["config"]


def test_vit_b_adapter_size_is_bounded(tmp_path):
    sam = random_sam("vit_b")
    base = tmp_path / "vit_b.pth"
    torch.save(sam.state_dict(), base)
    model = ConvLoRASAM(sam, input_size=256)
    path = save_adapter(model, tmp_path / "a.safetensors", base)
    with safe_open(str(path), framework="pt") as f:
        n = sum(f.get_tensor(k).numel() for k in f.keys())
    assert n == 119_232 + 3_505_536  # adapters + binary decoder, nothing of the 90M-parameter base
    assert path.stat().st_size < 15_000_000


def test_wrong_base_is_refused_unless_overridden(tmp_path, tiny_checkpoint, other_tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors", tiny_checkpoint)
    with pytest.raises(CheckpointError, match="different sha256"):
        load_model(path, base=other_tiny_checkpoint)
    with pytest.raises(CheckpointError, match="needs its base SAM checkpoint"):
        load_model(path)
    loaded = load_model(path, base=other_tiny_checkpoint, check_base_hash=False)
    assert torch.equal(loaded.sam.image_encoder.patch_embed.proj.weight,
                       load_sam(other_tiny_checkpoint).image_encoder.patch_embed.proj.weight)


def test_tampered_adapter_files(tmp_path, tiny_checkpoint):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors", tiny_checkpoint)
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
    good = save_merged(model, tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_failed_save_leaves_previous_file_intact(tmp_path, tiny_checkpoint, monkeypatch):
    model = _trained_model(tiny_checkpoint)
    path = save_adapter(model, tmp_path / "a.safetensors", tiny_checkpoint)
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, path, tiny_checkpoint)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_describe_official_checkpoint(tiny_checkpoint, tmp_path):
    info = describe(tiny_checkpoint)
    assert info["format"] == "sam-checkpoint" and info["model_type"] is None
    assert info["architecture"]["encoder_embed_dim"] == 64
    base = tmp_path / "sam_vit_b.pth"
    torch.save(random_sam("vit_b").state_dict(), base)
    assert describe(base)["model_type"] == "vit_b"
