"""SAMed's per-class multi-class head (``HeadConfig.multiclass="per_class"``): K tokens, token k is class k, no class
head; softmax probabilities; cross-entropy + Dice against an independent computation; it learns, round-trips through
files, and older files (without the setting) still load as the matched head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import drain, images, make_model, perturb_trainable

from napari_convlora import load_model, save_adapter
from napari_convlora.checkpoints.model_files import METADATA_KEY
from napari_convlora.cli import main
from napari_convlora.config import HeadConfig, RunOptions, TrainRecipe, from_record, to_record
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import TrainingPair, prepare_training_data
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.errors import ConfigError
from napari_convlora.modeling import SegmentationOutput
from napari_convlora.training.losses import segmentation_loss
from napari_convlora.training.per_class_loss import SAMED_WEIGHTS, per_class_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _per_class_model(checkpoint, num_classes=4, **options):
    return make_model(checkpoint, num_classes=num_classes, input_size=64, multiclass="per_class", **options)


# ------------------------------------------------------------------------------------------------
# config and head


def test_config_gives_one_token_per_class_and_binary_heads_ignore_it():
    head = HeadConfig(num_classes=5, multiclass="per_class")
    assert head.num_mask_tokens == 5 and head.per_class and not head.has_class_head
    assert HeadConfig(num_classes=5).num_mask_tokens == 10 and HeadConfig(num_classes=5).has_class_head
    binary = HeadConfig(num_classes=2, multiclass="per_class")
    assert binary.num_mask_tokens == 1 and not binary.per_class and not binary.has_class_head
    with pytest.raises(ConfigError, match="one mask token per class"):
        HeadConfig(num_classes=5, multiclass="per_class", num_mask_tokens=10)
    with pytest.raises(ConfigError, match="unknown multi-class head"):
        HeadConfig(num_classes=5, multiclass="hungarian")
    with pytest.raises(ConfigError, match="unknown multi-class head"):
        TrainRecipe(multiclass_head="hungarian")


def test_the_head_has_k_tokens_copied_from_sams_token_0_and_no_class_head(tiny_checkpoint):
    model = _per_class_model(tiny_checkpoint)
    sam_token = model.sam.mask_decoder.mask_tokens.weight[0]
    assert model.head.mask_tokens.weight.shape[0] == 4 and model.head.class_head is None
    assert torch.equal(model.head.mask_tokens.weight, sam_token.expand(4, -1))
    assert not any("class_head" in name for name in model.trainable_state_dict())
    with torch.no_grad():
        out = model(images(2, 64))
    assert out.mask_logits.shape == (2, 4, 16, 16) and out.class_logits is None


def test_probabilities_are_the_softmax_of_the_upsampled_logits_and_token_k_is_class_k(tiny_checkpoint):
    model = perturb_trainable(_per_class_model(tiny_checkpoint), scale=0.1).eval()
    with torch.no_grad():
        out = model(images(2, 64))
        probs = model.probabilities_from_output(out)
        up = torch.nn.functional.interpolate(out.mask_logits, size=(64, 64), mode="bilinear", align_corners=False)
        assert torch.allclose(probs, torch.softmax(up, dim=1), atol=1e-6)
        assert torch.allclose(probs.sum(1), torch.ones(2, 64, 64), atol=1e-5)
        for k in range(4):  # token k pushed up: every pixel goes to class k
            pushed = SegmentationOutput(out.mask_logits.clone(), None, out.balance_loss)
            pushed.mask_logits[:, k] += 1e3
            assert (model.probabilities_from_output(pushed).argmax(1) == k).all()


def test_an_adapter_round_trips_and_an_old_file_loads_as_the_matched_head(tmp_path, tiny_checkpoint):
    model = perturb_trainable(_per_class_model(tiny_checkpoint, method="lora"), scale=0.1).eval()
    with torch.no_grad():
        expected = model.class_probabilities(images(2, 64, seed=3))
    loaded = load_model(save_adapter(model, tmp_path / "a.safetensors"), base=tiny_checkpoint)
    assert loaded.config == model.config and loaded.config.head.multiclass == "per_class"
    with torch.no_grad():
        assert torch.equal(loaded.class_probabilities(images(2, 64, seed=3)), expected)

    matched = perturb_trainable(make_model(tiny_checkpoint, num_classes=3, input_size=64), scale=0.1).eval()
    path = save_adapter(matched, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del record["config"]["head"]["multiclass"]  # as files written before the setting existed
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={METADATA_KEY: json.dumps(record)})
    old = load_model(tmp_path / "old.safetensors", base=tiny_checkpoint)
    assert old.config.head.multiclass == "matched" and old.head.class_head is not None
    with torch.no_grad():
        assert torch.equal(old.class_probabilities(images(1, 64)), matched.class_probabilities(images(1, 64)))
    recipe = to_record(TrainRecipe())
    del recipe["multiclass_head"]  # a training state saved before the setting
    assert from_record(TrainRecipe, recipe, "old state").multiclass_head == "matched"


# ------------------------------------------------------------------------------------------------
# loss


def _reference(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """CE and Dice in float64 numpy, pixel by pixel: bilinear upsampling done by torch beforehand."""
    k = logits.shape[1]
    flat_logits = np.moveaxis(logits, 1, -1).reshape(-1, k).astype(np.float64)
    flat_targets = targets.reshape(-1)
    keep = flat_targets != IGNORE_INDEX
    z, t = flat_logits[keep], flat_targets[keep]
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -log_p[np.arange(len(t)), t].mean()
    p = np.exp(log_p)
    dices = []
    for c in range(k):
        g = (t == c).astype(np.float64)
        if g.sum() == 0:
            continue
        dices.append(1 - (2 * (p[:, c] * g).sum() + 1e-5) / (p[:, c].sum() + g.sum() + 1e-5))
    return ce, float(np.mean(dices))


def test_the_loss_is_ce_plus_dice_on_labelled_pixels():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 3, (2, 32, 32), generator=gen)  # class 3 absent: no Dice term for it
    targets[0, :10] = IGNORE_INDEX
    out = SegmentationOutput(low, None, torch.tensor(0.25))
    terms = segmentation_loss(out, targets, 4)
    assert set(terms) == {"ce", "dice", "balance", "total"}
    up = torch.nn.functional.interpolate(low.detach(), size=(32, 32), mode="bilinear", align_corners=False)
    ce, dice = _reference(up.numpy(), targets.numpy())
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)  # weighted 1 : 1
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert terms["total"].item() == pytest.approx(ce + dice + 0.25, rel=1e-5)
    terms["total"].backward()
    assert torch.isfinite(low.grad).all()
    samed = per_class_loss(low, targets, *SAMED_WEIGHTS)  # SAMed's 0.2 CE + 0.8 Dice
    assert samed["ce"].item() == pytest.approx(0.2 * ce, rel=1e-5)
    assert samed["dice"].item() == pytest.approx(0.8 * dice, rel=1e-5)

    nothing = per_class_loss(low, torch.full((2, 32, 32), IGNORE_INDEX))
    assert all(v.item() == 0.0 and v.requires_grad for v in nothing.values())


def test_the_loss_refuses_hq_points_and_masks_that_are_not_one_per_class():
    out = SegmentationOutput(torch.zeros(1, 3, 8, 8), None, torch.tensor(0.0))
    targets = torch.zeros(1, 32, 32, dtype=torch.long)
    with pytest.raises(ConfigError, match="mask loss 'hq_points'"):
        segmentation_loss(out, targets, 3, mask_loss="hq_points")
    with pytest.raises(ValueError, match="one mask per class"):
        segmentation_loss(out, targets, 4)


def test_a_short_run_lowers_the_loss(tmp_path, tiny_checkpoint):
    from napari_convlora.training.loop import train

    recipe = TrainRecipe(input_size=64, multiclass_head="per_class", val_fraction=0.2, steps=30, batch_size=4,
                         grad_accum=1, lr=2e-3, val_every=30, seed=0)
    image, labels = synthetic_cells(192, seed=0)
    data = prepare_training_data([TrainingPair(image, labels)], recipe)
    events, model = drain(train(tiny_checkpoint, data, tmp_path / "m.safetensors", recipe, RunOptions(device="cpu")))
    assert model.config.head.per_class and model.head.mask_tokens.weight.shape[0] == 3
    steps = [e for e in events if e.kind == "step"]
    assert all({"ce", "dice"} <= set(e.parts) and np.isfinite(e.loss) for e in steps)
    first, last = np.mean([e.loss for e in steps[:6]]), np.mean([e.loss for e in steps[-6:]])
    assert last < 0.9 * first, (first, last)


# ------------------------------------------------------------------------------------------------
# command line


def test_train_multiclass_head_per_class_on_the_command_line(tmp_path, tiny_checkpoint, capsys):
    import tifffile

    image, labels = synthetic_cells(160, seed=0)
    tifffile.imwrite(tmp_path / "img.tif", image)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    model = tmp_path / "model.safetensors"
    assert main(["train", "--checkpoint", str(tiny_checkpoint), "--image", str(tmp_path / "img.tif"), "--labels",
                 str(tmp_path / "lab.tif"), "--out", str(model), "--input-size", "64", "--steps", "2",
                 "--grad-accum", "1", "--multiclass-head", "per_class", "--device", "cpu"]) == 0
    assert "finished 2 steps" in capsys.readouterr().err
    loaded = load_model(model, base=tiny_checkpoint)
    assert loaded.config.head.multiclass == "per_class" and loaded.config.head.num_mask_tokens == 3
    assert main(["predict", "--model", str(model), "--checkpoint", str(tiny_checkpoint), "--image",
                 str(tmp_path / "img.tif"), "--out", str(tmp_path / "pred.tif"), "--device", "cpu"]) == 0
    assert set(np.unique(tifffile.imread(tmp_path / "pred.tif"))) <= {0, 1, 2}
