"""SAM's decoder as loaded, kept beside the one the prompt-free head trains (issue 23): segment everything and
SAM-refined objects prompt it on the adapted encoder; adapter files rebuild it from the base, bundles carry it,
bundles saved before it existed load with the decoder they hold."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_model, perturb_trainable

from napari_convlora import load_base, load_model, save_adapter, save_bundle
from napari_convlora.checkpoints.builtin import builtin_checkpoint
from napari_convlora.data import ImageLayout
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.prediction.everything import segment_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_decoder_as_loaded_is_used_inside_the_block_and_the_trained_one_after(tiny_checkpoint):
    model = make_model(tiny_checkpoint, input_size=64)
    loaded = {k: v.clone() for k, v in model.sam.mask_decoder.state_dict().items()}
    perturb_trainable(model)  # the head's training moves parts of SAM's live decoder
    trained = {k: v.clone() for k, v in model.sam.mask_decoder.state_dict().items()}
    assert not _same(trained, loaded)
    with model.promptable_decoder_as_loaded():
        assert _same(model.sam.mask_decoder.state_dict(), loaded)
    assert _same(model.sam.mask_decoder.state_dict(), trained)
    with pytest.raises(KeyError), model.promptable_decoder_as_loaded():
        raise KeyError("a failure inside the block")
    assert _same(model.sam.mask_decoder.state_dict(), trained)  # put back all the same
    # outside the state dict: Model Zoo packages exported before it existed load into the model strictly
    assert set(model.state_dict()) == set(make_model(tiny_checkpoint, input_size=64).state_dict())
    assert not any("as_loaded" in k for k in model.state_dict())


def test_adapter_files_rebuild_it_from_the_base_and_bundles_carry_it(tiny_checkpoint, tmp_path):
    model = perturb_trainable(make_model(tiny_checkpoint, input_size=64))
    loaded = load_base(tiny_checkpoint).sam.mask_decoder.state_dict()
    from_adapter = load_model(save_adapter(model, tmp_path / "a.safetensors"), tiny_checkpoint)
    assert _same(from_adapter.decoder_as_loaded, loaded)
    bundle = save_bundle(model, tmp_path / "b.safetensors")
    from_bundle = load_model(bundle)
    assert _same(from_bundle.decoder_as_loaded, loaded)
    assert _same(from_bundle.sam.mask_decoder.state_dict(), model.sam.mask_decoder.state_dict())

    # a bundle written before the decoder as loaded was kept: it loads, with the decoder it holds
    from safetensors import safe_open

    with safe_open(str(bundle), "pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(str(bundle)).items() if not k.startswith("sam_decoder_as_loaded.")}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    old = load_model(tmp_path / "old.safetensors")
    assert _same(old.decoder_as_loaded, model.sam.mask_decoder.state_dict())


def test_segment_everything_prompts_the_decoder_as_loaded_after_training_moved_the_live_one():
    model = make_model(builtin_checkpoint(), input_size=256).eval()
    with torch.no_grad():
        for p in model.sam.mask_decoder.transformer.parameters():  # what a fine-tuning does to it, in the extreme
            p.add_(torch.randn_like(p))
    image, classes = synthetic_cells(256, seed=1)
    found = segment_everything(model, image, ImageLayout())[0]
    assert found.max() >= 10  # 14 of 20 cells match with the decoder as loaded; with the moved one, none does
    model.decoder_as_loaded = {k: v.clone() for k, v in model.sam.mask_decoder.state_dict().items()}
    assert segment_everything(model, image, ImageLayout())[0].max() < found.max() / 2
