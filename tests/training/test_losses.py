"""Tests of the training losses against independent computations of their formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from napari_convlora.training import losses
from napari_convlora.constants import IGNORE_INDEX
from napari_convlora.training.losses import (
    hungarian_match,
    mask_classification_loss,
    match_tokens,
    matching_cost,
    pixel_coords,
    sample_logits,
    segmentation_loss,
    structure_loss,
)
from napari_convlora.modeling import SegmentationOutput


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# structure loss


def _structure_reference(logits: np.ndarray, target: np.ndarray, valid: np.ndarray) -> float:
    """Per-image loop in numpy (float64); images without valid pixels are skipped."""
    losses = []
    for x, g, v in zip(logits[:, 0], target[:, 0], valid[:, 0]):
        if not v.any():
            continue
        g = np.where(v, g, 0.0)
        pooled = ndimage.uniform_filter(g, size=31, mode="constant", cval=0.0)  # zero pad, /961
        w = (1 + 5 * np.abs(pooled - g)) * v
        bce = np.maximum(x, 0) - x * g + np.log1p(np.exp(-np.abs(x)))
        wbce = (w * bce).sum() / w.sum()
        p = 1 / (1 + np.exp(-x))
        inter = (w * p * g).sum()
        union = (w * (p + g)).sum()
        losses.append(wbce + 1 - (inter + 1) / (union - inter + 1))
    return float(np.mean(losses))


def _blobs(batch: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(batch, 1, size, size)), sigma=(0, 0, 4, 4))
    return torch.from_numpy((smooth > 0).astype(np.float32))


@pytest.mark.parametrize("with_valid", [False, True])
def test_structure_loss_matches_numpy(with_valid: bool) -> None:
    torch.manual_seed(0)
    target = _blobs(3, 48, seed=1)
    logits = torch.randn(3, 1, 48, 48) * 3
    valid = torch.rand(3, 1, 48, 48) > 0.3 if with_valid else torch.ones(3, 1, 48, 48, dtype=torch.bool)
    got = structure_loss(logits, target, valid if with_valid else None)
    want = _structure_reference(logits.double().numpy(), target.double().numpy(), valid.numpy())
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_structure_weighting_emphasises_boundaries() -> None:
    target = torch.zeros(1, 1, 64, 64)
    target[..., 16:48, 16:48] = 1
    good = target * 8 - 4  # +4 inside, -4 outside
    boundary, interior = good.clone(), good.clone()
    boundary[..., 16:48, 16:18] *= -1  # 64 wrong pixels at the edge of the square
    interior[..., 30:34, 16:32] *= -1  # 64 wrong pixels deep inside
    plain = [F.binary_cross_entropy_with_logits(x, target).item() for x in (boundary, interior)]
    assert plain[0] == pytest.approx(plain[1])
    assert structure_loss(boundary, target).item() > 1.3 * structure_loss(interior, target).item()


def test_structure_ignored_pixels_have_no_influence() -> None:
    torch.manual_seed(1)
    target = _blobs(2, 40, seed=2)
    valid = torch.zeros(2, 1, 40, 40, dtype=torch.bool)
    valid[..., 5:30, 8:35] = True
    logits = torch.randn(2, 1, 40, 40, requires_grad=True)
    loss = structure_loss(logits, target, valid)
    (grad,) = torch.autograd.grad(loss, logits)

    changed = torch.where(valid, logits.detach(), torch.randn(2, 1, 40, 40) * 50).requires_grad_()
    other_target = torch.where(valid, target, 1.0 - target)
    loss2 = structure_loss(changed, other_target, valid)
    (grad2,) = torch.autograd.grad(loss2, changed)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(grad2[valid], grad[valid])
    assert grad[~valid].abs().max() == 0


def test_structure_perfect_and_inverted() -> None:
    target = _blobs(2, 32, seed=3)
    perfect = structure_loss(target * 20 - 10, target).item()
    inverted = structure_loss(10 - target * 20, target).item()
    assert perfect < 1e-3
    assert inverted > 10


def test_structure_image_without_labels_contributes_nothing() -> None:
    target = _blobs(2, 32, seed=4)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[1] = False
    loss = structure_loss(logits, target, valid)
    assert loss.item() == pytest.approx(structure_loss(logits[:1], target[:1]).item(), rel=1e-6)
    none = structure_loss(logits, target, torch.zeros_like(valid))
    none.backward()
    assert none.item() == 0 and torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------------
# mask classification: building blocks


def test_sample_logits_matches_bilinear_upsampling() -> None:
    logits = torch.randn(3, 5, 7)
    up = F.interpolate(logits[None], size=(20, 28), mode="bilinear", align_corners=False)[0]
    coords = pixel_coords(torch.arange(20 * 28), 20, 28)
    torch.testing.assert_close(sample_logits(logits, coords), up.flatten(1))
    per_map = sample_logits(logits, coords[None].expand(3, -1, -1))
    torch.testing.assert_close(per_map, up.flatten(1))


@pytest.mark.parametrize("shape", [(3, 3), (4, 2), (5, 3), (6, 4)])
def test_hungarian_equals_brute_force(shape: tuple[int, int]) -> None:
    gen = _gen(sum(shape))
    for _ in range(5):
        cost = torch.rand(*shape, generator=gen)
        rows, cols = hungarian_match(cost)
        assert sorted(cols.tolist()) == list(range(shape[1]))
        brute = min(sum(cost[r, c].item() for c, r in enumerate(perm))
                     for perm in itertools.permutations(range(shape[0]), shape[1]))
        assert cost[rows, cols].sum().item() == pytest.approx(brute)


def test_matching_cost_formula() -> None:
    gen = _gen(3)
    logits, class_logits = torch.randn(4, 30, generator=gen), torch.randn(4, 6, generator=gen)
    classes = torch.tensor([0, 2, 5])
    targets = (torch.rand(3, 30, generator=gen) > 0.5).float()
    cost = matching_cost(logits, class_logits, targets, classes)
    for q in range(4):
        for j, c in enumerate(classes.tolist()):
            x, t = logits[q], targets[j]
            p = torch.sigmoid(x)
            bce = (-(t * torch.log(p) + (1 - t) * torch.log(1 - p))).mean()
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            want = -torch.softmax(class_logits[q], 0)[c] + 5 * bce + 5 * dice
            assert cost[q, j].item() == pytest.approx(want.item(), rel=1e-5)


def _stripes(size: int = 16) -> torch.Tensor:
    """H x W labels: rows 0-5 class 0, 6-9 class 1, 10-15 class 2."""
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[6:10] = 1
    labels[10:] = 2
    return labels


def _planted(labels: torch.Tensor, perm: list[int], num_tokens: int, num_classes: int,
             low: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits (Q x low x low) and class logits (Q x K+1) where token j predicts class perm[j]."""
    small = F.interpolate(labels[None, None].float(), size=(low, low), mode="nearest")[0, 0].long()
    masks = torch.full((num_tokens, low, low), -8.0)
    classes = torch.zeros(num_tokens, num_classes + 1)
    classes[:, num_classes] = 4.0
    for token, cls in enumerate(perm):
        masks[token] = torch.where(small == cls, 8.0, -8.0)
        classes[token] = 0.0
        classes[token, cls] = 4.0
    return masks, classes


def test_matching_recovers_planted_permutation() -> None:
    labels = _stripes()
    perm = [2, 0, 1]
    masks, classes = _planted(labels, perm, num_tokens=5, num_classes=4)
    # shuffle the tokens so the answer is not the identity
    order = torch.tensor([3, 0, 4, 2, 1])
    tokens, matched = match_tokens(masks[order], classes[order], labels, num_points=500, generator=_gen())
    found = {int(order[t]): int(c) for t, c in zip(tokens, matched)}
    assert found == {0: 2, 1: 0, 2: 1}
    # the masks alone (uninformative class logits) also decide
    tokens, matched = match_tokens(masks[order], torch.zeros(5, 5), labels, 500, _gen(1))
    assert {int(order[t]): int(c) for t, c in zip(tokens, matched)} == {0: 2, 1: 0, 2: 1}


# ------------------------------------------------------------------------------------------------
# mask classification: the loss


def test_class_cross_entropy_by_hand() -> None:
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[4:] = 1
    masks = torch.stack([torch.where(labels == 1, 9.0, -9.0), torch.where(labels == 0, 9.0, -9.0),
                         torch.full((8, 8), -9.0)])
    class_logits = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.1, -0.4], [0.2, 0.7, -1.1]])
    out = mask_classification_loss(masks[None], class_logits[None], labels[None], num_classes=2,
                                   num_points=64, generator=_gen())
    log_p = torch.log_softmax(class_logits, dim=1)
    nll = [-log_p[0, 1], -log_p[1, 0], -log_p[2, 2]]  # token0 -> 1, token1 -> 0, token2 -> no object
    want = (nll[0] + nll[1] + 0.1 * nll[2]) / (1 + 1 + 0.1)
    assert out["class"].item() == pytest.approx(want.item(), rel=1e-6)


def test_mask_and_dice_by_hand() -> None:
    """One class per image and constant logits per image: point choice cannot matter."""
    labels = torch.stack([torch.zeros(8, 8, dtype=torch.long), torch.full((8, 8), 2)])
    labels[1, :2] = IGNORE_INDEX
    consts = [1.5, -0.7]
    masks = torch.stack([torch.full((3, 4, 4), c) for c in consts])
    out = mask_classification_loss(masks, torch.randn(2, 3, 4, generator=_gen(5)), labels, 3,
                                   num_points=50, generator=_gen())
    num_points = 50
    mask_want = sum(math.log1p(math.exp(-c)) for c in consts) / 2
    dice_want = 0.0
    for c in consts:
        p = 1 / (1 + math.exp(-c))
        dice_want += 1 - (2 * p * num_points + 1) / (p * num_points + num_points + 1)
    assert out["mask"].item() == pytest.approx(mask_want, rel=1e-5)
    assert out["dice"].item() == pytest.approx(dice_want / 2, rel=1e-5)


def test_mask_terms_equal_reference_on_the_points_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the matches and points the loss used; recompute BCE and dice from upsampled logits."""
    calls: dict[str, list] = {"match": [], "points": []}

    def record(name, func):
        def wrapper(*args, **kwargs):
            result = func(*args, **kwargs)
            calls[name].append(result)
            return result
        return wrapper

    monkeypatch.setattr(losses, "match_tokens", record("match", losses.match_tokens))
    monkeypatch.setattr(losses, "_importance_points", record("points", losses._importance_points))
    gen = _gen(23)
    labels = torch.stack([_stripes(), torch.ones(16, 16, dtype=torch.long)])  # 3 + 1 masks
    labels[0, :, :3] = IGNORE_INDEX
    masks, class_logits = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 4, generator=gen)
    out = mask_classification_loss(masks, class_logits, labels, 3, num_points=64, generator=_gen(4))

    up = F.interpolate(masks, size=(16, 16), mode="bilinear", align_corners=False).flatten(2)
    bce_sum, dice_sum = 0.0, 0.0
    for b, ((tokens, classes), points) in enumerate(zip(calls["match"], calls["points"])):
        assert points.shape == (len(tokens), 64)
        assert (labels[b].flatten()[points] != IGNORE_INDEX).all()
        for token, cls, pts in zip(tokens, classes, points):
            p = torch.sigmoid(up[b, token, pts]).double()
            t = (labels[b].flatten()[pts] == cls).double()
            bce_sum += (-(t * torch.log(p) + (1 - t) * torch.log(1 - p))).mean().item()
            dice_sum += 1 - ((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)).item()
    assert out["mask"].item() == pytest.approx(bce_sum / 4, rel=1e-5)
    assert out["dice"].item() == pytest.approx(dice_sum / 4, rel=1e-5)


def test_importance_points_prefer_uncertain_valid_pixels() -> None:
    logits = torch.full((1, 16, 16), 10.0)
    logits[0, :, :8] = 0.0  # left half maximally uncertain
    valid = torch.ones(16, 16, dtype=torch.bool)
    valid[:, :2] = False  # ... but its first two columns are unlabelled
    valid_index = torch.nonzero(valid.flatten()).squeeze(1)
    points = losses._importance_points(logits, valid_index, 16, 16, num_points=40, oversample_ratio=3.0,
                                       importance_ratio=0.75, generator=_gen())
    cols = points[0] % 16
    assert (cols >= 2).all()
    assert (cols[:30] < 8).all()  # the 30 uncertain points all come from the uncertain half
    assert (cols[30:] >= 8).any()  # the 10 uniform ones need not


def test_sparse_labels_ignored_logits_change_nothing() -> None:
    gen = _gen(7)
    labels = torch.randint(0, 3, (2, 16, 16), generator=gen)
    labels[torch.rand(2, 16, 16, generator=gen) > 0.25] = IGNORE_INDEX
    masks = torch.randn(2, 4, 16, 16, generator=gen, requires_grad=True)  # same resolution as labels
    class_logits = torch.randn(2, 4, 4, generator=gen)
    out = mask_classification_loss(masks, class_logits, labels, 3, num_points=200, generator=_gen(1))
    ignored = (labels == IGNORE_INDEX)[:, None].expand_as(masks)
    changed = torch.where(ignored, torch.randn(2, 4, 16, 16, generator=gen) * 30, masks.detach())
    out2 = mask_classification_loss(changed, class_logits, labels, 3, num_points=200, generator=_gen(1))
    for key in ("class", "mask", "dice"):
        assert out2[key].item() == pytest.approx(out[key].item(), rel=1e-6), key
    (out["mask"] + out["dice"]).backward()
    assert masks.grad[ignored].abs().max() == 0
    assert masks.grad[~ignored].abs().max() > 0


def test_too_few_tokens_raises() -> None:
    labels = _stripes()[None]
    with pytest.raises(ValueError, match="mask tokens"):
        mask_classification_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4), labels, 3)
    with pytest.raises(ValueError, match="target values"):
        mask_classification_loss(torch.randn(1, 4, 4, 4), torch.randn(1, 4, 3), labels, 2)


def test_gradients_flow_and_unlabelled_image_contributes_nothing() -> None:
    gen = _gen(11)
    labels = torch.stack([_stripes(), torch.full((16, 16), IGNORE_INDEX)])
    masks = torch.randn(2, 5, 4, 4, generator=gen, requires_grad=True)  # 4x lower resolution
    class_logits = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    out = mask_classification_loss(masks, class_logits, labels, 3, num_points=300, generator=_gen(2))
    sum(out.values()).backward()
    for grad in (masks.grad, class_logits.grad):
        assert torch.isfinite(grad).all()
    assert masks.grad[0].abs().sum() > 0 and class_logits.grad[0].abs().sum() > 0
    assert masks.grad[1].abs().sum() == 0 and class_logits.grad[1].abs().sum() == 0
    alone = mask_classification_loss(masks[:1], class_logits[:1], labels[:1], 3, num_points=300,
                                      generator=_gen(2))
    for key in out:
        assert out[key].item() == pytest.approx(alone[key].item(), rel=1e-6)
    empty = mask_classification_loss(masks, class_logits, torch.full_like(labels, IGNORE_INDEX), 3)
    assert all(v.item() == 0 for v in empty.values())


def test_seeded_generator_is_deterministic() -> None:
    gen = _gen(13)
    labels = torch.randint(0, 4, (2, 32, 32), generator=gen)
    masks, class_logits = torch.randn(2, 6, 8, 8, generator=gen), torch.randn(2, 6, 5, generator=gen)
    runs = [mask_classification_loss(masks, class_logits, labels, 4, num_points=100, generator=_gen(s))
            for s in (0, 0, 1)]
    assert all(runs[0][k].item() == runs[1][k].item() for k in runs[0])
    assert runs[0]["mask"].item() != runs[2]["mask"].item()


# ------------------------------------------------------------------------------------------------
# dispatch


def test_segmentation_loss_binary() -> None:
    gen = _gen(17)
    targets = torch.randint(0, 2, (2, 32, 32), generator=gen)
    targets[:, :4] = IGNORE_INDEX
    mask_logits = torch.randn(2, 1, 8, 8, generator=gen, requires_grad=True)
    output = SegmentationOutput(mask_logits, None, torch.tensor(0.25))
    terms = segmentation_loss(output, targets, num_classes=2)
    assert set(terms) == {"structure", "balance", "total"}
    up = F.interpolate(mask_logits, size=(32, 32), mode="bilinear", align_corners=False)
    want = structure_loss(up, (targets == 1)[:, None].float(), (targets != IGNORE_INDEX)[:, None])
    assert terms["structure"].item() == pytest.approx(want.item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(want.item() + 0.25, rel=1e-6)
    terms["total"].backward()
    assert torch.isfinite(mask_logits.grad).all() and mask_logits.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        segmentation_loss(output, torch.full_like(targets, 2), num_classes=2)


def test_segmentation_loss_multiclass() -> None:
    gen = _gen(19)
    targets = torch.randint(0, 3, (2, 32, 32), generator=gen)
    mask_logits, class_logits = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 4, generator=gen)
    balance = torch.tensor(0.5, requires_grad=True)
    terms = segmentation_loss(SegmentationOutput(mask_logits, class_logits, balance), targets, 3,
                              generator=_gen(3))
    assert set(terms) == {"class", "mask", "dice", "balance", "total"}
    direct = mask_classification_loss(mask_logits, class_logits, targets, 3, generator=_gen(3))
    for key in direct:
        assert terms[key].item() == pytest.approx(direct[key].item(), rel=1e-6)
    assert terms["total"].item() == pytest.approx(sum(v.item() for v in direct.values()) + 0.5, rel=1e-6)
    terms["total"].backward()
    assert balance.grad.item() == 1.0
