"""HQ-SAM's point-sampled mask loss: equal to the official ``loss_masks`` on fully labelled targets, blind to
unannotated pixels, wired to the recipe (``TrainRecipe.mask_loss``) and usable in a short training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import drain

from napari_convlora.config import RunOptions, TrainRecipe, from_record, to_record
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.data import TrainingPair, prepare_training_data
from napari_convlora.data.samples import synthetic_cells
from napari_convlora.errors import ConfigError
from napari_convlora.modeling import SegmentationOutput
from napari_convlora.training.hq_mask_loss import hq_mask_loss, point_targets
from napari_convlora.training.losses import segmentation_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# The reference: HQ-SAM's train/utils/loss_mask.py (SysCV/sam-hq), transcribed operation for operation


def _ref_point_sample(input, point_coords, **kwargs):
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    return output.squeeze(3) if add_dim else output


def _ref_uncertain_coords(coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio):
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, device=coarse_logits.device)
    point_logits = _ref_point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long, device=coarse_logits.device)
    idx += shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(num_boxes, num_uncertain_points, 2)
    if num_random_points > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_boxes, num_random_points, 2, device=coarse_logits.device)], dim=1)
    return point_coords


def _ref_dice_loss(inputs, targets, num_masks):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def _ref_sigmoid_ce_loss(inputs, targets, num_masks):
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def _ref_calculate_uncertainty(logits):
    assert logits.shape[1] == 1
    return -(torch.abs(logits.clone()))


def _ref_loss_masks(src_masks, target_masks, num_masks, oversample_ratio=3.0):
    with torch.no_grad():
        point_coords = _ref_uncertain_coords(src_masks, _ref_calculate_uncertainty, 112 * 112, oversample_ratio,
                                             0.75)
        point_labels = _ref_point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
    point_logits = _ref_point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
    return (_ref_sigmoid_ce_loss(point_logits, point_labels, num_masks),
            _ref_dice_loss(point_logits, point_labels, num_masks))


# ------------------------------------------------------------------------------------------------
# Inputs


def _logits(batch: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, size, size, generator=g) * 4


def _labels(batch: int, size: int, seed: int) -> torch.Tensor:
    """B x size x size int64 in {0, 1}: smooth random blobs, so that boundaries exist at every scale."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 1, max(size // 8, 2), max(size // 8, 2), generator=g)
    return (F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0).long()


def _losses(fn, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return fn()


# ------------------------------------------------------------------------------------------------
# (a) equal to the official loss when every pixel is labelled


@pytest.mark.parametrize("batch, low, high", [(1, 8, 8), (2, 16, 64), (3, 64, 256), (2, 64, 48)])
def test_equals_official_loss_masks(batch, low, high):
    for seed in range(3):
        logits, labels = _logits(batch, low, seed), _labels(batch, high, seed + 10)
        ours = _losses(lambda: hq_mask_loss(logits, labels), seed)
        mask, dice = _losses(lambda: _ref_loss_masks(logits, labels[:, None].float(), batch), seed)
        assert torch.allclose(ours["mask"], mask, atol=1e-6, rtol=0), (ours["mask"], mask)
        assert torch.allclose(ours["dice"], dice, atol=1e-6, rtol=0), (ours["dice"], dice)


def test_a_generator_draws_what_the_global_one_would():
    logits, labels = _logits(2, 16, 0), _labels(2, 64, 1)
    from_global = _losses(lambda: hq_mask_loss(logits, labels), 5)
    from_generator = hq_mask_loss(logits, labels, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(from_global[k], from_generator[k]) for k in ("mask", "dice"))


def test_segmentation_loss_selects_it():
    logits, labels = _logits(2, 16, 0), _labels(2, 64, 1)
    output = SegmentationOutput(logits, None, torch.tensor(0.25))
    terms = segmentation_loss(output, labels, 2, generator=torch.Generator().manual_seed(3), mask_loss="hq_points")
    direct = hq_mask_loss(logits, labels, generator=torch.Generator().manual_seed(3))
    assert set(terms) == {"mask", "dice", "balance", "total"}
    assert torch.equal(terms["mask"], direct["mask"]) and torch.equal(terms["dice"], direct["dice"])
    assert torch.allclose(terms["total"], direct["mask"] + direct["dice"] + 0.25)
    assert set(segmentation_loss(output, labels, 2)) == {"structure", "balance", "total"}  # the default
    with pytest.raises(ConfigError, match="unknown mask loss 'points'"):
        segmentation_loss(output, labels, 2, mask_loss="points")


# ------------------------------------------------------------------------------------------------
# (b) unannotated pixels


def test_point_targets_read_labelled_pixels_only():
    # 4 x 4: columns 0-1 foreground, column 2 unannotated, column 3 background; points in row 1's centre line.
    targets = torch.tensor([[1, 1, IGNORE_INDEX, 0]] * 4)[None]
    xs = torch.tensor([1.9, 2.2, 3.2, 0.5]) / 4  # pixel coordinates x W; row centre y = 1.5 / 4
    points = torch.stack([xs, torch.full_like(xs, 1.5 / 4)], dim=-1)[None]
    truth, counted = point_targets(targets, points)
    assert counted.tolist() == [[True, False, True, True]]
    # 1.9: 60 % on column 1 (fg), 40 % on the unannotated column: renormalised, 1 (not 0.6).
    # 3.2: 30 % unannotated, 70 % background: 0. 0.5: the centre of column 0, 1.
    assert torch.allclose(truth, torch.tensor([[1.0, 0.0, 0.0, 1.0]]), atol=1e-6)
    # the zero padding outside the image counts as labelled background, as in HQ-SAM
    edge, _ = point_targets(targets, torch.tensor([[[0.1 / 4, 1.5 / 4]]]))
    assert torch.allclose(edge, torch.tensor([[0.6]]), atol=1e-6)


@pytest.mark.parametrize("low, high", [(32, 32), (16, 64)])
def test_logits_on_unannotated_pixels_do_not_matter(low, high):
    """An unannotated block; logits changed inside it, one logit pixel away from its edge (bilinear reading
    of a counted point near the edge still sees the logit pixels next to it)."""
    logits, labels = _logits(2, low, 3), _labels(2, high, 4)
    block = slice(high // 4, 3 * high // 4)
    labels[0, block, block] = IGNORE_INDEX
    labels[1, :, : high // 2] = IGNORE_INDEX
    changed = logits.clone()
    inner = slice(low // 4 + 1, 3 * low // 4 - 1)
    changed[0, 0, inner, inner] = torch.randn(changed[0, 0, inner, inner].shape) * 20
    changed[1, 0, :, : low // 2 - 1] = -30.0
    before = _losses(lambda: hq_mask_loss(logits, labels), 7)
    after = _losses(lambda: hq_mask_loss(changed, labels), 7)
    for k in ("mask", "dice"):
        assert torch.allclose(before[k], after[k], atol=1e-6), (k, before[k], after[k])
    everything = _losses(lambda: hq_mask_loss(logits, labels.clamp_min(0)), 7)  # labelled: another loss
    assert not torch.allclose(before["mask"], everything["mask"], atol=1e-4)


def test_an_unannotated_image_contributes_nothing():
    logits, labels = _logits(2, 16, 0), _labels(2, 64, 1)
    labels[1] = IGNORE_INDEX
    # with every point chosen by uncertainty there is one draw of 2 x N candidates, whose first half is what
    # one image alone draws: the two-image loss is then the first image's loss (divided by 1, not 2)
    pair = _losses(lambda: hq_mask_loss(logits, labels, importance_ratio=1.0), 2)
    alone = _losses(lambda: hq_mask_loss(logits[:1], labels[:1], importance_ratio=1.0), 2)
    for k in ("mask", "dice"):
        assert torch.allclose(pair[k], alone[k], atol=1e-6), (k, pair[k], alone[k])
    changed = logits.clone()
    changed[1] = 50.0
    assert torch.allclose(_losses(lambda: hq_mask_loss(changed, labels), 2)["mask"],
                          _losses(lambda: hq_mask_loss(logits, labels), 2)["mask"], atol=1e-6)

    nothing = torch.full_like(labels, IGNORE_INDEX)
    leaf = logits.clone().requires_grad_(True)
    terms = hq_mask_loss(leaf, nothing)
    assert terms["mask"].item() == 0.0 and terms["dice"].item() == 0.0
    (terms["mask"] + terms["dice"]).backward()
    assert torch.isfinite(leaf.grad).all() and not leaf.grad.any()


# ------------------------------------------------------------------------------------------------
# (c) gradients


def test_gradients_flow_to_the_logits():
    labels = _labels(2, 64, 1)
    labels[0, :10] = IGNORE_INDEX
    leaf = _logits(2, 16, 0).requires_grad_(True)
    terms = hq_mask_loss(leaf, labels, generator=torch.Generator().manual_seed(0))
    (terms["mask"] + terms["dice"]).backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[0].abs() > 0).float().mean() > 0.5 and leaf.grad[1].abs().sum() > 0

    # one gradient step on the logits lowers the loss
    with torch.no_grad():
        stepped = leaf - 50.0 * leaf.grad
    after = hq_mask_loss(stepped, labels, generator=torch.Generator().manual_seed(0))
    assert float((after["mask"] + after["dice"]).detach()) < float((terms["mask"] + terms["dice"]).detach())


# ------------------------------------------------------------------------------------------------
# (d), (e) the recipe field


def test_recipe_field_round_trips_and_old_records_mean_structure():
    assert TrainRecipe().mask_loss == "structure"
    recipe = TrainRecipe(mask_loss="hq_points")
    record = to_record(recipe)
    assert record["mask_loss"] == "hq_points"
    assert from_record(TrainRecipe, record, "run.training.pt") == recipe
    del record["mask_loss"]  # written before the field existed
    assert from_record(TrainRecipe, record, "old.training.pt").mask_loss == "structure"
    with pytest.raises(ConfigError, match="unknown mask loss 'pointy'"):
        TrainRecipe(mask_loss="pointy")
    with pytest.raises(ConfigError, match="old.training.pt: .*unknown mask loss"):
        from_record(TrainRecipe, {**record, "mask_loss": "pointy"}, "old.training.pt")


def test_multi_class_refuses_hq_points():
    with pytest.raises(ConfigError, match="mask loss 'hq_points'.*3 classes"):
        TrainRecipe(mask_loss="hq_points", class_names=("background", "nucleus", "membrane"))
    TrainRecipe(mask_loss="hq_points", class_names=("background", "cell"))  # binary: fine
    recipe = TrainRecipe(mask_loss="hq_points")  # classes unknown until the labels are read
    recipe.check_mask_loss(2)
    with pytest.raises(ConfigError, match="mask loss 'hq_points'.*4 classes"):
        recipe.check_mask_loss(4)
    TrainRecipe().check_mask_loss(4)
    output = SegmentationOutput(torch.zeros(1, 6, 8, 8), torch.zeros(1, 6, 4), torch.tensor(0.0))
    with pytest.raises(ConfigError, match="mask loss 'hq_points'"):
        segmentation_loss(output, torch.zeros(1, 32, 32, dtype=torch.long), 3, mask_loss="hq_points")


# ------------------------------------------------------------------------------------------------
# (f) training


def _cells(recipe: TrainRecipe):
    image, labels = synthetic_cells(256, seed=0)
    return prepare_training_data([TrainingPair(image, labels)], recipe)


def _recipe(**kw) -> TrainRecipe:
    """Nuclei and rods as one foreground class (instances mode: binary), 128 px patches, HQ-SAM's loss."""
    base = dict(input_size=128, label_mode="instances", val_fraction=0.2, steps=40, batch_size=4, grad_accum=1,
                lr=2e-3, val_every=40, seed=0, mask_loss="hq_points")
    base.update(kw)
    return TrainRecipe(**base)


def test_a_short_run_with_hq_points_learns(tmp_path, tiny_checkpoint):
    import napari_convlora.training.loop as loop

    recipe = _recipe()
    events, _ = drain(loop.train(tiny_checkpoint, _cells(recipe), tmp_path / "m.safetensors", recipe,
                                 RunOptions(device="cpu")))
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 40 and all({"mask", "dice"} <= set(e.parts) for e in steps)
    assert all(np.isfinite(e.loss) for e in steps)
    first, last = np.mean([e.loss for e in steps[:8]]), np.mean([e.loss for e in steps[-8:]])
    assert last < 0.9 * first, (first, last)


def test_the_loop_trains_with_the_recipe_mask_loss(tmp_path, tiny_checkpoint):
    from napari_convlora.training.loop import train

    recipe = _recipe(steps=2, val_every=2)
    events, _ = drain(train(tiny_checkpoint, _cells(recipe), tmp_path / "m.safetensors", recipe,
                            RunOptions(device="cpu")))
    assert all({"mask", "dice"} <= set(e.parts) for e in events if e.kind == "step")
