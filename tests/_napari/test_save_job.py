"""The dock's Save and Export bundle without Qt: never over the model's base SAM checkpoint (issue 21, item 4),
whichever path names it, and nothing written when refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import make_model
from napari_convlora._napari import jobs
from napari_convlora.checkpoints.model_files import describe
from napari_convlora.errors import ConfigError


def _save(model, path: Path, bundle: bool, **base) -> str:
    gen = jobs.save_job(model, str(path), bundle, **base)
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


@pytest.fixture
def base_copy(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny SAM that this module may lose (the session's checkpoint stays safe if a refusal fails)."""
    path = tmp_path / "sam" / "tiny_sam.pth"
    path.parent.mkdir()
    shutil.copy(tiny_checkpoint, path)
    return path


@pytest.mark.parametrize("bundle", [False, True], ids=["adapter", "bundle"])
def test_save_job_refuses_the_base_checkpoint_the_model_records(base_copy, tmp_path, bundle):
    """save_job(model, base_path) replaced the SAM file: the model's own base is known by its sha256, so it is
    refused under its own path, through a link, or as a copy under another name."""
    model = make_model(base_copy, method="lora")
    original = base_copy.read_bytes()
    link, copy = tmp_path / "link.pth", tmp_path / "copy-of-base.safetensors"
    os.symlink(base_copy, link)
    shutil.copy(base_copy, copy)
    for target in (base_copy, link, copy):
        with pytest.raises(ConfigError, match=rf"^the file chosen {target} is the SAM checkpoint .*'tiny_sam.pth'") \
                as refused:
            _save(model, target, bundle)
        assert "\n" not in str(refused.value)
    assert base_copy.read_bytes() == original and copy.read_bytes() == original
    assert not list(base_copy.parent.glob("*.tmp*")) and sorted(p.name for p in base_copy.parent.iterdir()) == [
        "tiny_sam.pth"]

    kind = "napari-convlora-bundle" if bundle else "napari-convlora-adapter"
    saved = tmp_path / "model.safetensors"
    assert _save(model, saved, bundle) == str(saved) and describe(saved)["format"] == kind
    assert _save(model, saved, bundle) == str(saved)  # a model file saved before may be replaced


def test_save_job_refuses_the_sam_checkpoint_it_is_given(base_copy, other_tiny_checkpoint, tmp_path):
    """The SAM checkpoint chosen in the dock (here another one than the model's base) is refused by path, before
    anything is written."""
    model = make_model(base_copy, method="lora")
    chosen = tmp_path / "other.pth"
    shutil.copy(other_tiny_checkpoint, chosen)
    original = chosen.read_bytes()
    with pytest.raises(ConfigError, match=rf"^the file chosen {chosen} is the same file as the SAM checkpoint"):
        _save(model, chosen, False, base=str(chosen))
    assert chosen.read_bytes() == original
