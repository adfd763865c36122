"""Loading SAM checkpoints: architecture inference, wrappers, and refusal of bad files."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_convlora import CheckpointError, SamArchitecture, load_base, load_sam, random_sam, save_sam_checkpoint
from napari_convlora.io.atomic import sha256_file
from napari_convlora.config import PRESETS, TINY
from napari_convlora.modeling.sam_build import infer_architecture


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_checkpoint_round_trips_with_inferred_architecture(tiny_checkpoint):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and "image_encoder.patch_embed.proj.weight" in state  # official layout
    base = load_base(tiny_checkpoint)
    sam = base.sam
    assert base.architecture == TINY and base.architecture.model_type is None
    assert base.checkpoint.file_name == "tiny_sam.pth" and base.checkpoint.sha256 == sha256_file(tiny_checkpoint)
    assert not hasattr(sam, "architecture")  # nothing bolted onto segment_anything's Sam
    assert all(torch.equal(sam.state_dict()[k], v) for k, v in state.items())
    out = sam.image_encoder(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, TINY.prompt_embed_dim, 16, 16)


@pytest.mark.parametrize(
    "arch",
    [
        SamArchitecture(image_size=128, encoder_embed_dim=48, encoder_depth=3, encoder_num_heads=3,
                        encoder_global_attn_indexes=(0, 2), window_size=3, prompt_embed_dim=16, mask_in_chans=4,
                        decoder_depth=1, decoder_mlp_dim=32, iou_head_depth=2, iou_head_hidden_dim=16,
                        encoder_mlp_ratio=2.0, num_multimask_outputs=2),
        SamArchitecture(image_size=192, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
                        encoder_global_attn_indexes=(), window_size=5, prompt_embed_dim=16, mask_in_chans=8,
                        decoder_mlp_dim=16, iou_head_hidden_dim=8, qkv_bias=False),
    ],
)
def test_non_standard_geometries_are_inferred(tmp_path, arch):
    path = save_sam_checkpoint(random_sam(arch, seed=3), tmp_path / "odd.pth")
    assert load_base(path).architecture == arch


def test_vit_b_geometry_is_inferred(tmp_path):
    sam = random_sam("vit_b")
    assert infer_architecture(sam.state_dict()) == PRESETS["vit_b"]
    path = save_sam_checkpoint(sam, tmp_path / "sam_vit_b_random.pth")
    loaded = load_base(path, model_type="vit_b")
    assert loaded.architecture.model_type == "vit_b"
    with pytest.raises(CheckpointError, match="expected a vit_h checkpoint"):
        load_sam(path, model_type="vit_h")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["vit_l", "vit_h"])
def test_large_geometries_are_inferred(model_type):
    sam = random_sam(model_type)
    assert infer_architecture(sam.state_dict()).model_type == model_type


@pytest.mark.parametrize("wrap", ["model_state", "prefix", "both", "safetensors"])
def test_wrapped_and_prefixed_state_dicts(tmp_path, tiny_checkpoint, wrap):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    if wrap in ("prefix", "both"):
        state = {f"sam.{k}": v for k, v in state.items()}
    if wrap in ("model_state", "both"):
        state = {"model_state": state, "epoch": 3}
    if wrap == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "sam.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "wrapped.pth"
        torch.save(state, path)
    assert _same_weights(load_sam(path), load_sam(tiny_checkpoint))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the payload's protocol
def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": payload}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_sam(path)
    assert not marker.exists()
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=str(legacy.name)):
        load_sam(legacy)
    assert not marker.exists()


def test_truncated_file(tmp_path, tiny_checkpoint):
    data = Path(tiny_checkpoint).read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_sam(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"weight": torch.zeros(3)}, "not a SAM checkpoint"),
        ([torch.zeros(3)], "expected a state dict"),
    ],
)
def test_foreign_files(tmp_path, content, message):
    path = tmp_path / "foreign.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_sam(path)
    assert "foreign.pth" in str(info.value)


def test_text_file_and_missing_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth"):
        load_sam(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_sam(tmp_path / "absent.pth")


def test_missing_and_extra_keys(tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"Missing 1 keys \['mask_decoder.iou_token.weight'\]"):
        load_sam(tmp_path / "missing.pth")
    extra = dict(state, **{"mask_decoder.hf_token.weight": torch.zeros(1, 32)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="HQ-SAM"):
        load_sam(tmp_path / "extra.pth")


def test_loading_never_calls_unsafe_torch_load(monkeypatch, tiny_checkpoint):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_sam(tiny_checkpoint)
    assert calls and all(c.get("weights_only") is True and c.get("map_location") == "cpu" for c in calls)


def test_zip_is_official_torch_format(tiny_checkpoint):
    assert zipfile.is_zipfile(tiny_checkpoint)


def test_file_problems_are_named_for_what_they_are(tmp_path, tiny_checkpoint, monkeypatch):
    """A safetensors file renamed .pth was called a file that "could run code"; an unreadable file was reported
    as missing; a folder as a damaged checkpoint."""
    from safetensors.torch import save_file

    import napari_convlora.io.safety as safety

    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    renamed = tmp_path / "sam_weights.pth"
    save_file(state, str(renamed))
    assert _same_weights(load_sam(renamed), load_sam(tiny_checkpoint))
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        load_sam(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_sam(tmp_path / "missing.pth")
    real_access = safety.os.access
    monkeypatch.setattr(safety.os, "access", lambda p, mode: False if Path(p) == renamed else real_access(p, mode))
    with pytest.raises(CheckpointError, match="sam_weights.pth: no permission to read it"):
        load_sam(renamed)


def test_a_malicious_training_state_is_refused_without_torchs_advice(tmp_path):
    from napari_convlora.checkpoints.training_state import load_training_state

    marker = tmp_path / "ran"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "m.training.pt"
    torch.save({"step": payload}, path)
    with pytest.raises(CheckpointError) as refused:
        load_training_state(path)
    assert "could run code" in str(refused.value) and "weights_only" not in str(refused.value)
    assert not marker.exists()


def test_files_that_are_plainly_not_checkpoints_are_named_for_what_they_are(tmp_path):
    """A TIFF chosen as the checkpoint was called a pickle that "could run code", a text file gave "(101)"."""
    import tifffile

    from napari_convlora.errors import CheckpointError
    from napari_convlora.checkpoints.sam_files import read_tensors

    tifffile.imwrite(tmp_path / "cells.pth", np.zeros((8, 8), np.uint8))
    (tmp_path / "notes.pth").write_text("sam_vit_b: download it from the website\n")
    for name, kind in (("cells.pth", "a TIFF image"), ("notes.pth", "a text file")):
        with pytest.raises(CheckpointError) as info:
            read_tensors(tmp_path / name)
        message = str(info.value)
        assert f"{name}: this is {kind}, not a model checkpoint" in message and "run code" not in message


def test_damaged_files_are_not_called_files_that_could_run_code(tmp_path):
    """5000 random bytes named .pth were refused as a pickle that "could run code" (issue 21); a pickle that names
    code to run still is."""
    from napari_convlora.checkpoints.sam_files import read_tensors
    from napari_convlora.checkpoints.training_state import load_training_state

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "noise.pth").write_bytes(b"\x01" + noise[1:])  # neither a zip archive nor a pickle
    (tmp_path / "damaged.pth").write_bytes(b"\x80" + noise[1:])  # a pickle's first byte, then garbage
    (tmp_path / "damaged.training.pt").write_bytes(b"\x80" + noise[1:])
    for name, words in (("noise.pth", "neither a zip archive nor a pickle"), ("damaged.pth", "its pickle is damaged")):
        with pytest.raises(CheckpointError) as info:
            read_tensors(tmp_path / name)
        assert words in str(info.value) and "run code" not in str(info.value)
    with pytest.raises(CheckpointError, match="damaged.training.pt: could not read the training state: the file is "
                                              "damaged"):
        load_training_state(tmp_path / "damaged.training.pt")


def test_a_training_state_whose_step_is_not_a_count_is_refused_in_one_line(tmp_path, tiny_checkpoint):
    """A training state whose step is a string gave a traceback (issue 21)."""
    from napari_convlora.checkpoints.training_state import load_training_state

    path = tmp_path / "m.training.pt"
    for step in ("12", -1, 2.5, True):
        torch.save({"state_version": 2, "step": step, "best": 0.0, "history": {}, "optimizer": {}, "scheduler": {},
                    "rng": {}, "recipe": {}}, path)
        with pytest.raises(CheckpointError, match=r"m.training.pt: the training state is damaged: its step is "):
            load_training_state(path)
