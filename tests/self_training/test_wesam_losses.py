"""WeSAM's loss terms (METHODS.md 3.4) against plain re-statements of their formulas (numpy and loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_convlora.self_training.losses import (
    BranchOutputs,
    anchor_loss,
    contrastive_loss,
    dice_loss,
    focal_loss,
    iou_mse_loss,
    pseudo_labels,
    wesam_loss,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, h: int, w: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, h, w, generator=_gen(seed)) * scale


# ---- plain re-statements ----------------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _np_focal(logits, target, alpha, gamma=2.0):
    p = _sigmoid(np.asarray(logits, dtype=np.float64)).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    total = 0.0
    for pi, ti in zip(p, t):
        bce = -(ti * max(math.log(pi) if pi > 0 else -math.inf, -100.0)
                + (1 - ti) * max(math.log(1 - pi) if pi < 1 else -math.inf, -100.0))
        total += alpha * (1 - math.exp(-bce)) ** gamma * bce
    return total / len(p)


def _np_dice(logits, target, smooth):
    p = _sigmoid(np.asarray(logits, dtype=np.float64)).ravel()
    t = np.asarray(target, dtype=np.float64).ravel()
    return 1 - (2 * np.sum(p * t) + smooth) / (np.sum(p) + np.sum(t) + smooth)


def _np_iou_mse(logits, target, iou_pred, num_masks):
    total = 0.0
    for n in range(logits.shape[0]):
        inter = union_a = union_b = 0
        for i in range(logits.shape[1]):
            for j in range(logits.shape[2]):
                a = 1 if logits[n, i, j] >= 0.5 else 0  # the threshold is on logits
                b = int(target[n, i, j])
                inter += a * b
                union_a += a
                union_b += b
        iou = inter / (union_a + union_b - inter + 1e-7)
        total += (float(iou_pred[n]) - iou) ** 2
    return total / num_masks


def _np_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (PyTorch's align_corners=False, no antialiasing)."""
    in_h, in_w = image.shape
    out = np.zeros((out_h, out_w))

    def source(dst, in_size, out_size):
        src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = min(math.floor(src), in_size - 1)
        return lo, min(lo + 1, in_size - 1), src - lo

    for i in range(out_h):
        y0, y1, fy = source(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, fx = source(j, in_w, out_w)
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def _np_instance_features(embedding: np.ndarray, low_res: np.ndarray) -> np.ndarray:
    c, h, w = embedding.shape
    normed = np.zeros_like(embedding)
    for i in range(h):
        for j in range(w):
            v = embedding[:, i, j]
            normed[:, i, j] = v / max(np.sqrt(np.sum(v * v)), 1e-12)
    features = []
    for logits in low_res:
        mask = _sigmoid(_np_bilinear(logits, h, w)) > 0.5
        count = int(mask.sum()) or 1
        features.append(sum(normed[:, i, j] for i in range(h) for j in range(w) if mask[i, j]) / count
                        if mask.any() else np.zeros(c))
    return np.stack(features)


def _np_similarity(teacher_emb, anchor_emb, teacher_low, anchor_low, tau=0.3):
    a = _np_instance_features(teacher_emb, teacher_low)
    b = _np_instance_features(anchor_emb, anchor_low)
    n = len(a)
    sim = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            sim[i, j] = np.dot(a[i], b[j]) / max(np.linalg.norm(a[i]) * np.linalg.norm(b[j]), 1e-8) / tau
    return sim


def _np_contrastive(*args):
    sim = _np_similarity(*args)
    diagonal = sum(math.exp(sim[i, i]) for i in range(len(sim)))
    everything = sum(math.exp(v) for v in sim.ravel())
    return -math.log(diagonal / everything)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---- single terms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.8, 3.0])
def test_focal_matches_its_formula(alpha):
    logits = _logits(3, 9, 7, seed=0)
    target = pseudo_labels(_logits(3, 9, 7, seed=1))
    got = focal_loss(logits, target, alpha=alpha)
    assert got.shape == ()
    assert float(got) == pytest.approx(_np_focal(_np(logits), _np(target), alpha), rel=1e-5)


def test_focal_clamps_the_log_like_the_reference():
    """A saturated wrong pixel costs 100 (PyTorch's clamp of log at -100), not infinity."""
    logits = torch.tensor([[[40.0]]])
    got = focal_loss(logits, torch.zeros(1, 1, 1), alpha=1.0)
    assert float(got) == pytest.approx(100.0)


@pytest.mark.parametrize("smooth", [1.0, 5.0])
def test_dice_matches_its_formula(smooth):
    logits = _logits(4, 6, 8, seed=2)
    target = pseudo_labels(_logits(4, 6, 8, seed=3))
    assert float(dice_loss(logits, target, smooth)) == pytest.approx(_np_dice(_np(logits), _np(target), smooth), rel=1e-5)


def test_iou_mse_matches_its_formula_with_the_threshold_on_logits():
    logits = _logits(3, 10, 10, seed=4)
    logits[0, 0, :5] = 0.3  # positive logits below 0.5: background for the IoU (sigmoid(0.3) > 0.5 would say mask)
    target = pseudo_labels(_logits(3, 10, 10, seed=5))
    iou_pred = torch.rand(3, 1, generator=_gen(6))
    got = iou_mse_loss(logits, target, iou_pred, num_masks=5)
    assert float(got) == pytest.approx(_np_iou_mse(_np(logits), _np(target), _np(iou_pred).ravel(), 5), rel=1e-5)


def test_anchor_term_matches_its_formula():
    student, teacher = _logits(2, 8, 8, seed=7), _logits(2, 8, 8, seed=8)
    anchor = pseudo_labels(_logits(2, 8, 8, seed=9))
    expected = 0.5 * _np_dice(_np(student), _np(anchor), 1.0) + 0.5 * _np_dice(_np(teacher), _np(anchor), 1.0)
    assert float(anchor_loss(student, teacher, anchor)) == pytest.approx(expected, rel=1e-5)


def test_contrastive_matches_its_formula_on_random_embeddings():
    g = _gen(10)
    teacher_emb, anchor_emb = torch.randn(16, 8, 8, generator=g), torch.randn(16, 8, 8, generator=g)
    teacher_low, anchor_low = torch.randn(4, 16, 16, generator=g) * 2, torch.randn(4, 16, 16, generator=g) * 2
    teacher_low[3] = -5.0  # an empty mask: divides by 1, its feature is the zero vector
    got = contrastive_loss(teacher_emb, anchor_emb, teacher_low, anchor_low)
    expected = _np_contrastive(_np(teacher_emb), _np(anchor_emb), _np(teacher_low), _np(anchor_low))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_contrastive_is_zero_for_one_instance():
    g = _gen(11)
    got = contrastive_loss(torch.randn(8, 4, 4, generator=g), torch.randn(8, 4, 4, generator=g),
                           torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g))
    assert float(got) == 0.0


def test_contrastive_is_one_ratio_over_the_whole_matrix_not_a_row_mean():
    """Three instances in separate quarters of the grid; the anchor's features make the rows unequal, so the
    mean of row-wise InfoNCE terms differs from the single ratio over the matrix."""
    low = torch.full((3, 8, 8), -4.0)
    low[0, :4, :4] = low[1, :4, 4:] = low[2, 4:, :4] = 4.0
    teacher_emb = torch.zeros(3, 8, 8)
    teacher_emb[0, :4, :4] = teacher_emb[1, :4, 4:] = teacher_emb[2, 4:, :4] = 1.0
    anchor_emb = teacher_emb.clone()
    anchor_emb[:, :4, 4:] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # the anchor's instance 1 looks like 0
    got = float(contrastive_loss(teacher_emb, anchor_emb, low, low))
    sim = _np_similarity(_np(teacher_emb), _np(anchor_emb), _np(low), _np(low))
    whole = -math.log(sum(math.exp(sim[i, i]) for i in range(3)) / np.exp(sim).sum())
    row_mean = float(np.mean([-math.log(math.exp(sim[i, i]) / np.exp(sim[i]).sum()) for i in range(3)]))
    assert abs(whole - row_mean) > 0.1
    assert got == pytest.approx(whole, rel=1e-5)


# ---- the total --------------------------------------------------------------------------------------

def _branches(n: int = 3, size: int = 16, seed: int = 20, grad: bool = True) -> tuple[BranchOutputs, ...]:
    g = _gen(seed)

    def branch():
        return BranchOutputs(
            mask_logits=(torch.randn(n, size, size, generator=g) * 3).requires_grad_(grad),
            iou_pred=torch.rand(n, 1, generator=g).requires_grad_(grad),
            low_res_logits=(torch.randn(n, size // 2, size // 2, generator=g) * 3).requires_grad_(grad),
            embedding=torch.randn(8, 4, 4, generator=g).requires_grad_(grad),
        )

    return branch(), branch(), branch()


def test_total_is_the_weighted_sum_of_the_terms_and_each_term_its_formula():
    student, teacher, anchor = _branches()
    terms = {k: v.detach() for k, v in wesam_loss(student, teacher, anchor).items()}
    assert set(terms) == {"focal", "dice", "iou_mse", "anchor", "contrastive", "total"}
    expected_total = 20 * terms["focal"] + terms["dice"] + terms["iou_mse"] + terms["anchor"] + terms["contrastive"]
    torch.testing.assert_close(terms["total"], expected_total)
    s, t, a = _np(student.mask_logits), _np(teacher.mask_logits), _np(anchor.mask_logits)
    pseudo, anchor_mask = (t > 0).astype(float), (a > 0).astype(float)
    assert float(terms["focal"]) == pytest.approx(_np_focal(s, pseudo, 0.8), rel=1e-5)
    assert float(terms["dice"]) == pytest.approx(_np_dice(s, pseudo, 1.0), rel=1e-5)
    assert float(terms["iou_mse"]) == pytest.approx(
        _np_iou_mse(s, pseudo, _np(student.iou_pred).ravel(), 3), rel=1e-5)
    assert float(terms["anchor"]) == pytest.approx(0.5 * _np_dice(s, anchor_mask, 1) + 0.5 * _np_dice(t, anchor_mask, 1),
                                                   rel=1e-5)
    assert float(terms["contrastive"]) == pytest.approx(_np_contrastive(
        _np(teacher.embedding), _np(anchor.embedding), _np(teacher.low_res_logits), _np(anchor.low_res_logits)),
        rel=1e-5)


@pytest.mark.parametrize("num_masks", [None, 7])
def test_the_quirk_flag_changes_exactly_the_focal_alpha_and_dice_smoothing(num_masks):
    student, teacher, anchor = _branches(n=3, grad=False)
    intended = wesam_loss(student, teacher, anchor, num_masks=num_masks)
    quirky = wesam_loss(student, teacher, anchor, num_masks=num_masks, reference_quirks=True)
    m = 3 if num_masks is None else num_masks
    s, pseudo = _np(student.mask_logits), (_np(teacher.mask_logits) > 0).astype(float)
    assert float(quirky["focal"]) == pytest.approx(_np_focal(s, pseudo, alpha=m), rel=1e-5)
    assert float(quirky["dice"]) == pytest.approx(_np_dice(s, pseudo, smooth=m), rel=1e-5)
    assert float(intended["focal"]) == pytest.approx(_np_focal(s, pseudo, alpha=0.8), rel=1e-5)
    assert float(intended["dice"]) == pytest.approx(_np_dice(s, pseudo, smooth=1.0), rel=1e-5)
    for key in ("iou_mse", "anchor", "contrastive"):
        assert torch.equal(quirky[key], intended[key]), key
    assert float(intended["iou_mse"]) == pytest.approx(
        _np_iou_mse(s, pseudo, _np(student.iou_pred).ravel(), m), rel=1e-5)


def test_no_gradient_reaches_the_pseudo_labels_or_the_anchor():
    student, teacher, anchor = _branches()
    assert not pseudo_labels(teacher.mask_logits).requires_grad
    terms = wesam_loss(student, teacher, anchor)
    # The self-training terms see the teacher only through its pseudo-labels.
    (20 * terms["focal"] + terms["dice"] + terms["iou_mse"]).backward(retain_graph=True)
    assert teacher.mask_logits.grad is None and student.mask_logits.grad is not None
    terms["total"].backward()
    for name in ("mask_logits", "iou_pred", "low_res_logits", "embedding"):
        assert getattr(anchor, name).grad is None, name
    assert teacher.low_res_logits.grad is None  # the contrastive masks are detached
    assert teacher.embedding.grad is not None and teacher.embedding.grad.abs().sum() > 0


def test_gradients_reach_student_and_teacher_through_the_anchor_term():
    student, teacher, anchor = _branches()
    wesam_loss(student, teacher, anchor)["anchor"].backward()
    for branch, other in ((student, teacher), (teacher, student)):
        logits = branch.mask_logits.detach().requires_grad_(True)
        (0.5 * dice_loss(logits, pseudo_labels(anchor.mask_logits))).backward()
        assert branch.mask_logits.grad.abs().sum() > 0
        torch.testing.assert_close(branch.mask_logits.grad, logits.grad)


def test_an_image_without_instances_gives_zeros_and_bad_inputs_are_explained():
    student, teacher, anchor = _branches(n=0)
    terms = wesam_loss(student, teacher, anchor)
    assert all(float(v.detach()) == 0.0 for v in terms.values())
    terms["total"].backward()
    student, teacher, anchor = _branches()
    with pytest.raises(ValueError, match="teacher's outputs lack"):
        wesam_loss(student, BranchOutputs(teacher.mask_logits), anchor)
    with pytest.raises(ValueError, match="N x H x W mask logits of one shape"):
        wesam_loss(student, BranchOutputs(teacher.mask_logits[:, :8], None, teacher.low_res_logits, teacher.embedding),
                   anchor)
