"""SAM's encoder attention through SDPA (``modeling/fast_attention.py``) computes what SAM's own ``Attention.forward``
computes: outputs and gradients (input, adapters), windowed and global blocks, with and without relative positions,
alone and through a whole tiny SAM (padded windows, checkpointing, HQ-SAM's early-feature hook, bf16 autocast);
the switch changes no tensor name and "off" brings back SAM's forward itself."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import images, make_model, perturb_trainable
from segment_anything.modeling.image_encoder import Attention

from napari_convlora.adapters.inject import make_adapter
from napari_convlora.config import AdapterConfig
from napari_convlora.modeling import fast_attention
from napari_convlora.modeling.fast_attention import fast_attention_modes, set_fast_attention

# (tokens B x H x W, the table size SAM gives the block): 14 x 14 windows; a global map whose tables interpolate
# (1024 px tables, 256 px input); a map that is not square.
SHAPES = {"window": ((5, 14, 14), (14, 14)), "global": ((2, 16, 16), (64, 64)), "oblong": ((1, 6, 10), (6, 10))}


def _attention(method: str, use_rel_pos: bool, input_size: tuple[int, int], dim: int = 64) -> Attention:
    """SAM's Attention (4 heads) with random relative-position tables and its qkv wrapped by an adapter whose
    weights are away from the identity, in training mode."""
    torch.manual_seed(0)
    attn = Attention(dim, num_heads=4, use_rel_pos=use_rel_pos, input_size=input_size)
    if use_rel_pos:
        torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
        torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    attn.requires_grad_(False)
    attn.qkv = make_adapter(attn.qkv, AdapterConfig(method=method, rank=4))
    return perturb_trainable(attn).train()


def _run(module: torch.nn.Module, x: torch.Tensor, call=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Output, gradient of a fixed loss w.r.t. x and w.r.t. the trainable parameters (Conv-LoRA's noise seeded)."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    torch.manual_seed(1)
    out = (call or module)(x)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * weights).sum() + out.square().mean(), [x, *params], allow_unused=True)
    return out.detach(), grads[0], _used(grads[1:])


def _used(grads) -> list[torch.Tensor]:
    """The gradients, an unrouted Conv-LoRA expert's None as an empty tensor (so both paths must agree on it)."""
    return [torch.empty(0) if g is None else g for g in grads]


def _assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], tol: float = 1e-5) -> None:
    """Each tensor within ``tol`` of the other, relative to its largest value (fp32 rounding in other orders)."""
    assert len(got) == len(expected)
    for i, (u, v) in enumerate(zip(got, expected)):
        assert u.shape == v.shape, f"tensor {i}: shapes {u.shape} and {v.shape}"
        if v.numel() == 0:
            continue
        scale = v.abs().max().clamp_min(1.0)
        assert (u - v).abs().max() <= tol * scale, f"tensor {i}: {(u - v).abs().max():.3g} off at scale {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize("method", ["lora", "conv_lora"])
def test_sdpa_attention_equals_sams_forward_with_gradients(shape, use_rel_pos, method, monkeypatch):
    tokens, table = SHAPES[shape]
    attn = _attention(method, use_rel_pos, table)
    x = torch.randn(*tokens, 64, generator=torch.Generator().manual_seed(2))
    out_sam, gx_sam, gp_sam = _run(attn, x, lambda t: Attention.forward(attn, t))
    assert set_fast_attention(attn, "on") == 1
    sdpa, biases = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: biases.append(k["attn_mask"] is not None) or sdpa(*a, **k))
    out, gx, gp = _run(attn, x)
    assert biases == [use_rel_pos]  # SDPA ran, with the bias exactly when SAM adds relative positions
    assert gp and any(g.abs().sum() > 0 for g in gp)  # the adapter trains through the new path
    _assert_close([out, gx, *gp], [out_sam, gx_sam, *gp_sam])


def test_the_bias_is_sams_decomposed_rel_pos():
    """rel_pos_bias equals what SAM's add_decomposed_rel_pos adds to a zero score matrix."""
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    attn = _attention("lora", True, (14, 14))
    q = torch.randn(3, 4, 14 * 14, 16)
    zero = torch.zeros(12, 196, 196)
    expected = add_decomposed_rel_pos(zero, q.reshape(12, 196, 16), attn.rel_pos_h, attn.rel_pos_w, (14, 14), (14, 14))
    torch.testing.assert_close(fast_attention.rel_pos_bias(attn, q, (14, 14)).reshape(12, 196, 196), expected)


def test_off_restores_sams_forward_and_the_switch_changes_no_tensor_name():
    attn = _attention("lora", True, (14, 14))
    keys = list(attn.state_dict())
    set_fast_attention(attn, True)
    assert fast_attention_modes(attn) == {"on"} and list(attn.state_dict()) == keys
    set_fast_attention(attn, "auto")
    assert fast_attention_modes(attn) == {"auto"}
    set_fast_attention(attn, False)
    assert "forward" not in vars(attn) and attn.forward.__func__ is Attention.forward
    assert fast_attention_modes(attn) == {"off"} and list(attn.state_dict()) == keys
    with pytest.raises(ValueError, match="unknown fast-attention mode"):
        set_fast_attention(attn, "fast")


def test_auto_decides_by_device_type_and_gradient_at_each_call(monkeypatch):
    attn = _attention("lora", True, (14, 14))  # its adapter's weights need gradients
    calls = []
    monkeypatch.setattr(fast_attention, "sdpa_attention", lambda a, x: calls.append(x.device.type) or x)
    set_fast_attention(attn, "auto")
    x = torch.randn(1, 14, 14, 64)
    for rule, with_grad, without_grad in (("never", 0, 0), ("always", 1, 1), ("without_grad", 0, 1)):
        monkeypatch.setitem(fast_attention.AUTO_FAST_ATTENTION, "cpu", rule)
        calls.clear()
        attn(x)
        with torch.no_grad():
            attn(x)
        assert calls == ["cpu"] * (with_grad + without_grad), rule
    attn.requires_grad_(False)  # frozen (decoder-only training): no gradient flows, so SDPA runs
    calls.clear()
    assert attn(x) is x and calls == ["cpu"]
    assert attn(x.requires_grad_()) is not x and calls == ["cpu"]  # unless the input needs one
    monkeypatch.setitem(fast_attention.AUTO_FAST_ATTENTION, "cpu", "sometimes")
    with pytest.raises(ValueError, match="unknown automatic fast-attention rule"):
        attn(x)
    copied = copy.deepcopy(attn)  # a copy keeps its mode, bound to the copy
    assert fast_attention_modes(copied) == {"auto"} and copied.forward.__self__ is copied


def _model_run(model, x, early: bool):
    """The encoder's embedding (and the early feature), gradients w.r.t. every trainable encoder tensor."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("sam.image_encoder")]
    torch.manual_seed(1)
    features = model.encode(x)
    outs = [features.embedding] + ([features.early] if early else [])
    loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    return [o.detach() for o in outs], _used(torch.autograd.grad(loss, params, allow_unused=True))


@pytest.mark.parametrize("method", ["lora", "conv_lora"])
@pytest.mark.parametrize("size", [256, 96])  # 96 px: a 6 x 6 grid in 4 x 4 windows, padded
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 5e-5), (torch.float64, 1e-12)])
def test_whole_encoder_equal_with_checkpointing_and_the_early_feature_hook(tiny_checkpoint, method, size,
                                                                            checkpointing, dtype, tol):
    """fp32: two encoder blocks, LayerNorms and gradients summed over the map round differently (about 1e-5 of
    the largest value); fp64 shows that both compute the same thing."""
    model = perturb_trainable(make_model(tiny_checkpoint, method=method, input_size=size)).train().to(dtype)
    model.capture_early_feature(True)  # HQ-SAM's forward hook on the first global block
    model.set_activation_checkpointing(checkpointing)
    x = images(2, size).to(dtype)
    model.set_fast_attention("off")
    expected = _model_run(model, x, early=True)
    assert model.set_fast_attention("on") is None and fast_attention_modes(model) == {"on"}
    got = _model_run(model, x, early=True)
    _assert_close(got[0] + got[1], expected[0] + expected[1], tol)


@pytest.mark.parametrize("method", ["lora", "conv_lora"])
def test_whole_model_under_cpu_bf16_autocast_is_as_accurate_as_sams_attention(tiny_checkpoint, method):
    """Under bf16 autocast both paths round differently: each is compared with the fp32 result, and SDPA's error
    (outputs and gradients) is at most about SAM's own."""
    model = perturb_trainable(make_model(tiny_checkpoint, method=method, input_size=128), scale=0.05).eval()
    x = images(2, 128)
    results = {}
    for name, mode, autocast in (("fp32", "off", False), ("off", "off", True), ("on", "on", True)):
        model.set_fast_attention(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x).mask_logits.float()
        grads = torch.autograd.grad(out.square().mean(), model.trainable_parameters(), allow_unused=True)
        results[name] = out.detach(), torch.cat([g.flatten() for g in grads if g is not None])
    for i in (0, 1):  # outputs, gradients
        reference = results["fp32"][i]
        error = {name: float((results[name][i] - reference).norm() / reference.norm()) for name in ("off", "on")}
        assert error["on"] <= 1.5 * error["off"] + 0.01, error


def test_the_model_switches_at_runtime_and_saves_nothing_of_it(tiny_checkpoint):
    model = make_model(tiny_checkpoint, method="lora", input_size=128)
    assert fast_attention_modes(model) == {"auto"}  # the default: the rule by device type
    keys, trained = list(model.state_dict()), list(model.trainable_state_dict())
    model.set_fast_attention("on")
    assert list(model.state_dict()) == keys and list(model.trainable_state_dict()) == trained
    assert set_fast_attention(model, "off") == model.config.base.encoder_depth
