"""The instance head (issue 23, item 1): three full-resolution maps on the adapted encoder, trained with the adapters,
saved in the model file with its watershed thresholds; the loss leaves unannotated pixels out."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import images, make_model, perturb_trainable

from napari_convlora import AdaptedSAM, load_base, load_model, save_adapter
from napari_convlora.config import HeadConfig, ModelConfig
from napari_convlora.config.instances import InstanceConfig
from napari_convlora.errors import ConfigError
from napari_convlora.training.instance_loss import instance_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_head(checkpoint, method="conv_lora", **instances):
    base = load_base(checkpoint)
    plain = make_model(base, method=method, input_size=64)
    config = dataclasses.replace(plain.config, instances=InstanceConfig(**instances))
    return AdaptedSAM(load_base(checkpoint).sam, config)


@pytest.mark.parametrize("method", ["conv_lora", "lora", "decoder"])
def test_the_head_gives_three_full_resolution_maps_and_trains_with_the_adapters(tiny_checkpoint, method):
    model = _with_head(tiny_checkpoint, method)
    out = model(images(2, 64))
    assert out.instance_logits.shape == (2, 3, 64, 64) and out.mask_logits.shape == (2, 1, 16, 16)
    head = {id(p) for p in model.instance_head.parameters()}
    assert head <= {id(p) for p in model.trainable_parameters()}
    assert any(k.startswith("instance_head.") for k in model.trainable_state_dict())
    with torch.no_grad():
        both = model.probabilities_and_maps(images(1, 64))
    assert both.shape == (1, 5, 64, 64) and 0 <= float(both[:, 2:].min()) and float(both[:, 2:].max()) <= 1
    plain = make_model(tiny_checkpoint, method=method, input_size=64)
    assert plain.instance_head is None and plain(images(1, 64)).instance_logits is None
    with pytest.raises(ValueError, match="no instance head"):
        plain.probabilities_and_maps(images(1, 64))


def test_the_head_and_its_thresholds_round_trip_through_the_model_file(tiny_checkpoint, tmp_path):
    model = perturb_trainable(_with_head(tiny_checkpoint, foreground=0.6, min_distance=5, min_size=5,
                                         chosen_on="validation"))
    path = save_adapter(model, tmp_path / "m.safetensors")
    loaded = load_model(path, tiny_checkpoint)
    assert loaded.config.instances == InstanceConfig(0.6, 5, 5, "validation")
    x = images(1, 64, seed=3)
    model.eval()
    torch.testing.assert_close(loaded(x).instance_logits, model(x).instance_logits)


def test_only_a_binary_head_takes_instances(tiny_checkpoint):
    base = load_base(tiny_checkpoint)
    with pytest.raises(ConfigError, match="one class"):
        ModelConfig(base=base.architecture, head=HeadConfig(num_classes=3), instances=InstanceConfig())


def test_the_loss_ignores_unannotated_pixels_and_reaches_its_minimum_on_the_targets():
    targets = torch.rand(2, 3, 16, 16).round()
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[:, :, :4] = False
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    terms = instance_loss(logits, targets, valid)
    sum(terms.values()).backward()
    assert logits.grad[:, :, :, :4].abs().max() == 0 and logits.grad[:, :, :, 4:].abs().max() > 0
    changed = logits.detach().clone()
    changed[:, :, :, :4] = 50.0  # what the model says where nobody annotated does not matter
    again = instance_loss(changed, targets, valid)
    for name in terms:
        torch.testing.assert_close(again[name], terms[name].detach())
    perfect = instance_loss((targets * 2 - 1) * 30, targets, valid)
    assert float(perfect["instance_bce"]) < 1e-6 and float(perfect["instance_dice"]) < 1e-3
    nothing = instance_loss(logits, targets, torch.zeros_like(valid))
    assert float(nothing["instance_bce"].detach()) == 0 and float(nothing["instance_dice"].detach()) == 0
