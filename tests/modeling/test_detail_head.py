"""The detail head (issue 22): the prompt-free head's masks corrected at the input's full resolution. A new head
changes nothing (its correction starts at zero), it trains with the adapters, it is saved in the model file and
read back, older files load without one, and the recipe decides when a run gets one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import images, make_model, perturb_trainable

from napari_convlora import AdaptedSAM, load_base, load_model, save_adapter
from napari_convlora.config import TrainRecipe
from napari_convlora.errors import ConfigError
from napari_convlora.training.losses import segmentation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("num_classes, multiclass, context", [(2, "matched", True), (4, "per_class", False),
                                                              (3, "matched", True)])
def test_a_new_detail_head_predicts_what_the_head_alone_predicts_at_full_resolution(tiny_checkpoint, num_classes,
                                                                                   multiclass, context):
    model = make_model(tiny_checkpoint, num_classes=num_classes, input_size=64, multiclass=multiclass, detail=True,
                       detail_context=context)
    plain = make_model(tiny_checkpoint, num_classes=num_classes, input_size=64, multiclass=multiclass)
    plain.load_state_dict(model.state_dict(), strict=False)  # the same adapters and head, no detail head
    x = images(2, 64)
    model.eval(), plain.eval()
    with torch.no_grad():
        out, low = model(x), plain(x)
        assert low.mask_logits.shape[-1] == 16
        assert out.mask_logits.shape == (2, model.config.head.num_mask_tokens, 64, 64)
        upsampled = F.interpolate(low.mask_logits, size=(64, 64), mode="bilinear", align_corners=False)
        torch.testing.assert_close(out.mask_logits, upsampled)
        torch.testing.assert_close(model.class_probabilities(x), plain.class_probabilities(x))


def test_the_detail_head_trains_with_the_adapters_and_learns_from_the_loss(tiny_checkpoint):
    model = make_model(tiny_checkpoint, input_size=64, detail=True)
    head = {id(p) for p in model.detail_head.parameters()}
    assert head <= {id(p) for p in model.trainable_parameters()}
    assert any(k.startswith("detail_head.") for k in model.trainable_state_dict())
    targets = torch.zeros(1, 64, 64, dtype=torch.long)
    targets[:, 30:32, :] = 1  # a line 2 px wide: a quarter of the resolution cannot draw it
    loss = segmentation_loss(model(images(1, 64)), targets, num_classes=2)["total"]
    loss.backward()
    last = model.detail_head.maps.fuse[-1]
    assert float(last.weight.grad.abs().sum()) > 0  # the zero-initialised correction gets a gradient


def test_the_detail_head_round_trips_through_the_model_file_and_older_files_have_none(tiny_checkpoint, tmp_path):
    model = perturb_trainable(make_model(tiny_checkpoint, input_size=64, detail=True))
    path = save_adapter(model, tmp_path / "m.safetensors")
    loaded = load_model(path, tiny_checkpoint)
    assert loaded.config.head.detail and loaded.detail_head is not None
    x = images(1, 64, seed=3)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).mask_logits, model(x).mask_logits)
    older = make_model(tiny_checkpoint, input_size=64)
    assert older.config.head.detail is False and older.detail_head is None
    with pytest.raises(ValueError, match="detail head reads the early feature"):
        model.capture_early_feature(False)


def test_the_recipe_trains_a_detail_head_for_small_inputs_unless_told_otherwise():
    assert TrainRecipe(input_size=256).trains_detail_head
    assert not TrainRecipe(input_size=1024).trains_detail_head
    assert TrainRecipe(input_size=1024, detail_head="on").trains_detail_head
    assert not TrainRecipe(input_size=256, detail_head="off").trains_detail_head
    with pytest.raises(ConfigError, match="detail head setting 'yes'"):
        TrainRecipe(detail_head="yes")


def test_a_model_config_with_a_detail_head_builds_one_on_a_fresh_base(tiny_checkpoint):
    config = dataclasses.replace(make_model(tiny_checkpoint, input_size=64).config)
    config.head = dataclasses.replace(config.head, detail=True)
    model = AdaptedSAM(load_base(tiny_checkpoint).sam, config)
    assert model.detail_head is not None and model(images(1, 64)).mask_logits.shape[-1] == 64


def test_the_context_pyramid_lets_a_pixel_see_twelve_pixels_away_at_full_resolution():
    """Issue 22: a lesion a few pixels across is told from the organ's texture by its surroundings; the image stem's
    two 3 x 3 convolutions and the fusion see 3 px on each side of a pixel, the pyramid about 20 (the encoder's features
    held fixed, so only the full-resolution path is compared)."""
    from napari_convlora.modeling.features import ImageFeatures
    from napari_convlora.modeling.full_resolution import FullResolutionMaps

    torch.manual_seed(0)
    features = ImageFeatures(embedding=torch.randn(1, 32, 4, 4), early=torch.randn(1, 4, 4, 48))
    for context, sees in ((False, False), (True, True)):
        maps = FullResolutionMaps(32, 48, out_channels=1, context=context).eval()
        image = torch.randn(1, 3, 64, 64)
        moved = image.clone()
        moved[:, :, 32, 44] += 5.0  # 12 px right of the pixel read below
        with torch.no_grad():
            change = (maps(features, moved) - maps(features, image))[0, 0, 32, 32].abs()
        assert bool(change > 0) is sees, f"context={context}: change {float(change)}"


def test_new_runs_give_the_detail_head_its_context_and_older_detail_heads_load_without_one(tiny_checkpoint, tmp_path):
    from napari_convlora.config import ModelConfig
    from napari_convlora.config.records import from_record, to_record

    new = make_model(tiny_checkpoint, input_size=64, detail=True, detail_context=True)
    assert any(".maps.context." in k for k in new.trainable_state_dict())
    older = perturb_trainable(make_model(tiny_checkpoint, input_size=64, detail=True))
    assert older.config.head.detail_context is False
    assert not any(".context." in k for k in older.trainable_state_dict())
    record = to_record(new.config)
    record["head"].pop("detail_context")  # as a file written before the field existed
    assert from_record(ModelConfig, record, "model.json").head.detail_context is False
    loaded = load_model(save_adapter(older, tmp_path / "older.safetensors"), tiny_checkpoint)
    assert loaded.detail_head.maps.context is None
    x = images(1, 64, seed=5)
    older.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).mask_logits, older(x).mask_logits)
