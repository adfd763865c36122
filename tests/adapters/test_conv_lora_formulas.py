"""Conv-LoRA / LoRA layers checked against an independent reference written from METHODS.md §1.3-1.5, §1.12.

The reference below is deliberately naive (explicit loops over rows and chosen experts, dense gates) and
reads only the layer's parameters, never its forward code:

* y = W0 x + b0 + s * B(z + E_{e(n)}(z)),  z = A x viewed as an r-channel image (NCHW), s = alpha / r  (§1.3)
* E_e = Down ∘ GELU ∘ Conv3x3 ∘ Up, bicubic, align_corners=False, integer scale sigma_e = e + 1,
  both resizes skipped for sigma = 1  (§1.3 step 4, §1.12.7)
* gate on the spatially pooled bottleneck f = mean_{h,w} z; clean logits f W_g; training noise
  eps * (softplus(f W_n) + 1e-2) from one randn_like(clean); top-(k+1); softmax over the top-k  (§1.4)
* load: train = sum_n Phi((clean - thr_n) / std), thr_n = (k+1)-th largest noisy logit if the expert is in
  the top-k else the k-th largest; eval = rows routed. importance = sum_n gates.
  L = 0.01 * (CV²(imp) + CV²(load)), CV² = var_unbiased / (mean² + 1e-10), 0 for length 1  (§1.4)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_convlora.adapters.gate import cv_squared
from napari_convlora.adapters.layers import ConvLoRALinear, LoRALinear, ScaleExpert

D, R, M, ALPHA = 32, 3, 8, 32.0
ATOL, RTOL = 1e-5, 1e-5


# ----------------------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------------------
def ref_cv2(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    if v.numel() == 1:
        return torch.zeros((), dtype=v.dtype, device=v.device)
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def ref_expert(z_nchw: torch.Tensor, conv: nn.Conv2d, sigma: int) -> torch.Tensor:
    h, w = z_nchw.shape[-2:]
    u = z_nchw
    if sigma != 1:
        u = F.interpolate(u, scale_factor=sigma, mode="bicubic", align_corners=False)
    v = F.gelu(F.conv2d(u, conv.weight, conv.bias, stride=1, padding=1))
    if sigma != 1:
        v = F.interpolate(v, size=(h, w), mode="bicubic", align_corners=False)
    return v


def ref_gate(f: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, k: int, train: bool):
    """Returns dense gates (N x M), top indices (N x k), balance loss. Draws noise with one randn_like."""
    clean = f @ w_gate
    n, m = clean.shape
    if train:
        std = F.softplus(f @ w_noise) + 1e-2
        noisy = clean + torch.randn_like(clean) * std
    else:
        std = None
        noisy = clean
    top_vals, top_idx = noisy.topk(min(k + 1, m), dim=1)
    top_k_vals, top_k_idx = top_vals[:, :k], top_idx[:, :k]
    gates = torch.zeros_like(clean).scatter(1, top_k_idx, torch.softmax(top_k_vals, dim=1))
    importance = gates.sum(0)
    if train and k < m:
        thr_in = top_vals[:, k : k + 1]  # (k+1)-th largest noisy logit
        thr_out = top_vals[:, k - 1 : k]  # k-th largest noisy logit
        is_in = noisy > thr_in
        normal = torch.distributions.Normal(0.0, 1.0)
        p_in = normal.cdf((clean - thr_in) / std)
        p_out = normal.cdf((clean - thr_out) / std)
        load = torch.where(is_in, p_in, p_out).sum(0)
    else:
        load = (gates > 0).sum(0).float()
    loss = 0.01 * (ref_cv2(importance) + ref_cv2(load))
    return gates, top_k_idx, loss


def ref_conv_lora(layer: ConvLoRALinear, x: torch.Tensor, *, alpha: float, rank: int, k: int = 1,
                  weight_by_gate: bool = False, train: bool = False):
    W0, b0 = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A.weight, layer.lora_B.weight  # r x d, 3d x r
    s = alpha / rank
    y0 = x @ W0.t() + b0
    z = x @ A.t()  # N h w r
    f = z.mean(dim=(1, 2))  # N x r  (global average pooling per row)
    gates, idx, loss = ref_gate(f, layer.gate.w_gate, layer.gate.w_noise, k, train)
    zc = z.permute(0, 3, 1, 2)  # N r h w
    rows = []
    for n in range(zc.shape[0]):
        zn = zc[n : n + 1]
        delta = torch.zeros_like(zn)
        for j in range(k):
            e = int(idx[n, j])
            out = ref_expert(zn, layer.experts[e].conv, sigma=e + 1)
            delta = delta + (gates[n, e] * out if weight_by_gate else out)
        rows.append(zn + delta)  # residual inside the bottleneck, before B
    zp = torch.cat(rows, 0).permute(0, 2, 3, 1)  # N h w r
    y = y0 + s * (zp @ B.t())
    return y, loss, idx


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def make_layer(seed: int = 0, d: int = D, **kw) -> ConvLoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(d, 3 * d)
    layer = ConvLoRALinear(base, rank=R, alpha=ALPHA, **kw)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.2)
        layer.gate.w_gate.normal_(0.0, 3.0)
        layer.gate.w_noise.normal_(0.0, 1.0)
        for ex in layer.experts:
            ex.conv.weight.normal_(0.0, 0.3)
            ex.conv.bias.normal_(0.0, 0.2)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    return layer


def make_input(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, h, w, d = shape
    # per-row offsets so the pooled bottleneck (and hence the routing) differs strongly between rows
    return torch.randn(shape, generator=g) + 2.0 * torch.randn(n, 1, 1, d, generator=g)


def test_layer_structure_matches_methods():
    layer = ConvLoRALinear(nn.Linear(D, 3 * D), rank=R, alpha=ALPHA)
    assert math.isclose(layer.scaling, ALPHA / R)
    assert tuple(layer.lora_A.weight.shape) == (R, D) and layer.lora_A.bias is None
    assert tuple(layer.lora_B.weight.shape) == (3 * D, R) and layer.lora_B.bias is None
    assert len(layer.experts) == M
    assert [float(e.scale) for e in layer.experts] == [float(i + 1) for i in range(M)]  # sigma_e = e + 1
    for e in layer.experts:
        assert isinstance(e, ScaleExpert)
        assert (e.conv.in_channels, e.conv.out_channels, e.conv.kernel_size, e.conv.padding) == (R, R, (3, 3), (1, 1))
    assert tuple(layer.gate.w_gate.shape) == (R, M) and tuple(layer.gate.w_noise.shape) == (R, M)


# ----------------------------------------------------------------------------------------------------------
# 1. Eval mode: outputs and balance loss, windowed and global shapes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,need_diverse", [((8, 14, 14, D), True), ((2, 16, 16, D), False)])
def test_eval_matches_reference(shape, need_diverse):
    layer = make_layer(seed=1).eval()
    x = make_input(shape, seed=2)
    with torch.no_grad():
        y = layer(x)
        y_ref, loss_ref, idx = ref_conv_lora(layer, x, alpha=ALPHA, rank=R)
    assert y.shape == (shape[0], shape[1], shape[2], 3 * D)
    if need_diverse:
        assert len(set(idx[:, 0].tolist())) >= 2, f"routing not diverse: {idx[:, 0].tolist()}"
    # the LoRA branch must actually contribute (B non-zero), otherwise the comparison is vacuous
    assert (y_ref - layer.base_layer(x)).abs().max() > 1e-2
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    assert layer.balance_loss is not None
    torch.testing.assert_close(layer.balance_loss.reshape(()).float(), loss_ref.reshape(()), atol=1e-6, rtol=1e-5)


def test_eval_routes_to_many_experts_including_large_scales():
    """More rows, so several scales (incl. sigma > 2) are exercised in one comparison."""
    layer = make_layer(seed=3).eval()
    x = make_input((24, 14, 14, D), seed=4)
    with torch.no_grad():
        y = layer(x)
        y_ref, loss_ref, idx = ref_conv_lora(layer, x, alpha=ALPHA, rank=R)
    chosen = set(idx[:, 0].tolist())
    assert len(chosen) >= 3 and max(chosen) >= 2, chosen
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.balance_loss.reshape(()).float(), loss_ref.reshape(()), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 2. Train mode with a fixed seed
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 14, 14, D), (2, 16, 16, D)])
def test_train_matches_reference_and_gradients(shape):
    layer = make_layer(seed=5).train()
    x = make_input(shape, seed=6)

    torch.manual_seed(1234)
    y = layer(x)
    loss = layer.balance_loss
    torch.manual_seed(1234)
    y_ref, loss_ref, _ = ref_conv_lora(layer, x, alpha=ALPHA, rank=R, train=True)

    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loss.reshape(()).float(), loss_ref.reshape(()), atol=1e-6, rtol=1e-5)
    assert float(loss.detach()) > 0

    wg, wn = layer.gate.w_gate, layer.gate.w_noise
    g_wg, g_wn = torch.autograd.grad(loss, [wg, wn], retain_graph=True)
    assert g_wg.abs().sum() > 0 and g_wn.abs().sum() > 0
    r_wg, r_wn = torch.autograd.grad(loss_ref, [wg, wn])
    torch.testing.assert_close(g_wg, r_wg, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g_wn, r_wn, atol=1e-6, rtol=1e-4)

    # top-1, no gate weighting: the task output carries no gradient to the gate (§1.4, §1.12.4)
    (g_task,) = torch.autograd.grad(y.sum(), wg, allow_unused=True)
    assert g_task is None or torch.count_nonzero(g_task) == 0
    # ... but it does reach A, B and the experts
    gA, gB = torch.autograd.grad(y.sum(), [layer.lora_A.weight, layer.lora_B.weight], retain_graph=True)
    assert gA.abs().sum() > 0 and gB.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# 3. Identity at init
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_identity_at_init(train):
    torch.manual_seed(7)
    base = nn.Linear(D, 3 * D)
    conv = ConvLoRALinear(base, rank=R, alpha=ALPHA).train(train)
    lora = LoRALinear(base, rank=R, alpha=ALPHA).train(train)
    # init per §1.5
    assert torch.count_nonzero(conv.lora_B.weight) == 0 and torch.count_nonzero(lora.lora_B.weight) == 0
    assert torch.count_nonzero(conv.gate.w_gate) == 0 and torch.count_nonzero(conv.gate.w_noise) == 0
    assert all(torch.count_nonzero(e.conv.bias) == 0 for e in conv.experts)
    bound = 1.0 / math.sqrt(D)
    assert conv.lora_A.weight.abs().max() <= bound + 1e-7 and conv.lora_A.weight.abs().max() > 0.5 * bound
    for shape in [(8, 14, 14, D), (2, 16, 16, D), (5, D)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y0 = base(x)
            if len(shape) == 4:
                assert torch.equal(conv(x), y0)
            assert torch.equal(lora(x), y0)


def test_plain_lora_formula():
    torch.manual_seed(8)
    base = nn.Linear(D, 3 * D)
    lora = LoRALinear(base, rank=R, alpha=ALPHA).eval()
    with torch.no_grad():
        lora.lora_B.weight.normal_(0.0, 0.2)
        x = torch.randn(4, 6, 6, D)
        ref = x @ base.weight.t() + base.bias + (ALPHA / R) * ((x @ lora.lora_A.weight.t()) @ lora.lora_B.weight.t())
        torch.testing.assert_close(lora(x), ref, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------
# 4. weight_by_gate=True, top-2, eval
# ----------------------------------------------------------------------------------------------------------
def test_weight_by_gate_top2_eval():
    layer = make_layer(seed=9, top_k=2, weight_by_gate=True).eval()
    x = make_input((8, 14, 14, D), seed=10)
    with torch.no_grad():
        y = layer(x)
        y_ref, loss_ref, idx = ref_conv_lora(layer, x, alpha=ALPHA, rank=R, k=2, weight_by_gate=True)
        y_unweighted, _, _ = ref_conv_lora(layer, x, alpha=ALPHA, rank=R, k=2, weight_by_gate=False)
    assert idx.shape == (8, 2)
    assert (y_ref - y_unweighted).abs().max() > 1e-3  # the weighting matters for this input
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.balance_loss.reshape(()).float(), loss_ref.reshape(()), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 5. Scale experts
# ----------------------------------------------------------------------------------------------------------
def test_scale_one_expert_does_not_resize(monkeypatch):
    torch.manual_seed(11)
    ex = ScaleExpert(R, 1)
    with torch.no_grad():
        ex.conv.bias.normal_()
    calls = []
    real = F.interpolate

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(F, "interpolate", spy)
    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    z = torch.randn(3, R, 14, 14)
    with torch.no_grad():
        out = ex(z)
    assert calls == []
    torch.testing.assert_close(out, F.gelu(F.conv2d(z, ex.conv.weight, ex.conv.bias, padding=1)), atol=1e-6, rtol=1e-6)


def test_scale_three_expert_explicit():
    torch.manual_seed(12)
    ex = ScaleExpert(R, 3)
    with torch.no_grad():
        ex.conv.bias.normal_()
    z = torch.randn(3, R, 14, 14)
    with torch.no_grad():
        out = ex(z)
        u = F.interpolate(z, scale_factor=3, mode="bicubic", align_corners=False)
        assert u.shape[-2:] == (42, 42)
        v = F.gelu(ex.conv(u))
        ref = F.interpolate(v, size=(14, 14), mode="bicubic", align_corners=False)
    assert out.shape == z.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 6. cv_squared
# ----------------------------------------------------------------------------------------------------------
def test_cv_squared():
    assert float(cv_squared(torch.tensor([3.7]))) == 0.0
    v = torch.tensor([1.0, 0.0, 4.0, 2.0, 2.0, 0.5, 0.0, 3.0])
    expected = v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)
    torch.testing.assert_close(cv_squared(v).reshape(()), expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(cv_squared(v).reshape(()), ref_cv2(v), atol=1e-7, rtol=1e-6)
    u = torch.full((8,), 2.5)
    assert float(cv_squared(u)) == 0.0


# ----------------------------------------------------------------------------------------------------------
# 7. Parameter count per wrapped qkv (§1.5)
# ----------------------------------------------------------------------------------------------------------
def test_parameter_count_vit_b_qkv():
    d, r, m = 768, 3, 8
    layer = ConvLoRALinear(nn.Linear(d, 3 * d), rank=r, alpha=32.0)
    n_adapter = sum(p.numel() for name, p in layer.named_parameters() if not name.startswith("base_layer."))
    formula = r * d + 3 * d * r + 2 * r * m + m * (9 * r * r + r)
    assert formula == 4 * r * d + 720 == 9936
    assert n_adapter == formula
    lora = LoRALinear(nn.Linear(d, 3 * d), rank=r, alpha=32.0)
    assert sum(p.numel() for name, p in lora.named_parameters() if not name.startswith("base_layer.")) == 4 * r * d
