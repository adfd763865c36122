"""Conv-LoRA's two expert dispatches (``adapters/dispatch.py``): masked gives indexed's result with no host copy.

* outputs and balance loss equal (top-1 and top-2; windowed-like 25 x 14 x 14 x r and global 2 x 64 x 64 x r
  rows; fp32, and under CPU bf16 autocast within bf16 rounding); the mixing itself is bit-exact for top-1
  and top-2 (the experts' CPU convolutions round differently with the number of rows, hence tolerances);
* gradients equal for A, B, the gate and the chosen experts; unchosen experts get zeros (masked) instead of
  ``None`` (indexed) until ``drop_unrouted_expert_grads``, after which AdamW steps are the same;
* the masked forward and backward run on fake tensors (no data at all, so no host copy and no shape that
  depends on the routing), call no ``nonzero`` / ``item`` / ``tolist`` / ``cpu`` / ``numpy``, and launch
  the same operators with the same shapes whatever the routing.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from napari_convlora.adapters.dispatch import AUTO_DISPATCH, indexed_mix, masked_mix, resolve_dispatch
from napari_convlora.adapters.routing import drop_unrouted_expert_grads, set_expert_dispatch
from napari_convlora.adapters.layers import ConvLoRALinear, ScaleExpert

D_IN, R, M = 16, 3, 8
SHAPES = {"windowed": (25, 14, 14), "global": (2, 64, 64)}  # rows x h x w


def _layer(top_k: int, weight_by_gate: bool = False, seed: int = 0) -> ConvLoRALinear:
    """A Conv-LoRA layer with every parameter random (B, gate and expert biases are zero at init)."""
    torch.manual_seed(seed)
    layer = ConvLoRALinear(nn.Linear(D_IN, 3 * D_IN), rank=R, top_k=top_k, weight_by_gate=weight_by_gate)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def _pair(layer: ConvLoRALinear) -> tuple[ConvLoRALinear, ConvLoRALinear]:
    indexed, masked = layer, copy.deepcopy(layer)
    indexed.dispatch, masked.dispatch = "indexed", "masked"
    return indexed, masked


def _run(layer: nn.Module, fn, seed: int = 1):
    torch.manual_seed(seed)  # the same gate noise for both dispatches
    return fn(layer)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("weight_by_gate", [False, True])
@pytest.mark.parametrize("block", list(SHAPES))
def test_masked_bottleneck_equals_indexed_fp32(block: str, weight_by_gate: bool, top_k: int):
    indexed, masked = _pair(_layer(top_k, weight_by_gate))
    z = torch.randn(*SHAPES[block], R)
    a = _run(indexed, lambda m: m.bottleneck(z))
    b = _run(masked, lambda m: m.bottleneck(z))
    assert a.shape == b.shape == z.shape
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # CPU convolutions round by batch size
    assert torch.equal(masked.balance_loss, indexed.balance_loss)


class _RowwiseExpert(nn.Module):
    """An expert that runs row by row, so that its result for a row cannot depend on the other rows."""

    def __init__(self, expert: ScaleExpert):
        super().__init__()
        self.conv, self.expert = expert.conv, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.expert(x[i : i + 1].clone()) for i in range(x.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_by_gate", [False, True])
def test_masked_mix_is_bit_exact_for_top1_and_top2(weight_by_gate: bool, dtype: torch.dtype):
    """Given the same per-row expert results, the mixing adds the same numbers: top-1 and top-2 bit for bit
    (one or two kept results plus exact zeros), top-3 up to the order of the additions."""
    zc = torch.randn(6, R, 14, 14).to(dtype)  # bf16: the bottleneck under autocast, experts still in fp32
    for top_k in (1, 2, 3):
        layer = _layer(top_k, weight_by_gate)
        experts = nn.ModuleList(_RowwiseExpert(e) for e in layer.experts)
        gates, _ = layer.gate(zc)
        masked, indexed = (mix(experts, zc, gates, weight_by_gate) for mix in (masked_mix, indexed_mix))
        assert masked.dtype == indexed.dtype == dtype
        if top_k < 3:
            assert torch.equal(masked, indexed), top_k
        else:
            torch.testing.assert_close(masked, indexed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("block", list(SHAPES))
def test_masked_layer_equals_indexed_under_bf16_autocast(block: str, top_k: int):
    indexed, masked = _pair(_layer(top_k))
    x = torch.randn(*SHAPES[block], D_IN)

    def forward(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    a, b = _run(indexed, forward), _run(masked, forward)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(masked.balance_loss, indexed.balance_loss)


def _backward(layer: ConvLoRALinear, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    ((y * weights).sum() + layer.balance_loss).backward()
    return y


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to the rounding of sums in a different order: relative to the gradient's largest entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("weight_by_gate", [False, True])
def test_gradients_equal_and_unrouted_experts_dropped(weight_by_gate: bool, top_k: int):
    indexed, masked = _pair(_layer(top_k, weight_by_gate))
    x = torch.randn(3, 14, 14, D_IN)  # 3 rows for 8 experts: some experts get no row
    weights = torch.randn(3, 14, 14, 3 * D_IN)
    _run(indexed, lambda m: _backward(m, x, weights))
    _run(masked, lambda m: _backward(m, x, weights))
    for name in ("lora_A.weight", "lora_B.weight", "gate.w_gate", "gate.w_noise", "base_layer.weight"):
        a, b = indexed.get_parameter(name).grad, masked.get_parameter(name).grad
        _assert_grad_close(b, a, name)
    unrouted = [i for i, e in enumerate(indexed.experts) if e.conv.weight.grad is None]
    assert unrouted and masked.routed_experts.tolist() == [i not in unrouted for i in range(M)]
    for i, (e_idx, e_mask) in enumerate(zip(indexed.experts, masked.experts)):
        for p_idx, p_mask in zip(e_idx.parameters(), e_mask.parameters()):
            if i in unrouted:
                assert p_idx.grad is None and torch.count_nonzero(p_mask.grad) == 0
            else:
                _assert_grad_close(p_mask.grad, p_idx.grad, f"expert {i}")
    assert drop_unrouted_expert_grads(masked) == len(unrouted)
    assert [e.conv.weight.grad is None for e in masked.experts] == [i in unrouted for i in range(M)]
    assert all(e.conv.bias.grad is None for i, e in enumerate(masked.experts) if i in unrouted)


def _train(layer: ConvLoRALinear, steps: int, drop: bool) -> ConvLoRALinear:
    """AdamW with weight decay, zero_grad(set_to_none=True), two micro-batches per step, as train.py does."""
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(7)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for _ in range(2):
            x = torch.randn(2, 14, 14, D_IN, generator=g)
            _backward(layer, x, torch.randn(2, 14, 14, 3 * D_IN, generator=g))
        if drop:
            drop_unrouted_expert_grads(layer)
        optimizer.step()
    return layer


def test_masked_training_with_dropped_grads_matches_indexed():
    indexed, masked = _pair(_layer(1))
    plain_masked = copy.deepcopy(masked)
    _train(indexed, 4, drop=False)
    _train(masked, 4, drop=True)
    _train(plain_masked, 4, drop=False)
    drifted = False
    for (name, a), b, c in zip(indexed.named_parameters(), masked.parameters(), plain_masked.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
        drifted |= not torch.allclose(c, a, rtol=1e-4, atol=1e-5)
    assert drifted  # without dropping, AdamW moves experts that got zero gradients (weight decay, moments)


def test_routed_record_spans_micro_batches_and_restarts_after_zero_grad():
    layer = _layer(1)
    layer.dispatch = "masked"
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    seen = torch.zeros(M, dtype=torch.bool)
    torch.manual_seed(0)
    for _ in range(4):  # micro-batches of one step: the record is their union
        x = torch.randn(1, 14, 14, D_IN) + 2 * torch.randn(D_IN)  # images of different means route apart
        noise = torch.get_rng_state()
        gates, _ = layer.gate(layer.lora_A(x).permute(0, 3, 1, 2))
        seen |= gates.ne(0).any(0)
        torch.set_rng_state(noise)  # the same gate noise in the forward
        layer(x).sum().backward()
        assert torch.equal(layer.routed_experts, seen)
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    layer(torch.randn(1, 14, 14, D_IN)).sum().backward()
    assert int(layer.routed_experts.sum()) == 1  # a new step: only this micro-batch's expert
    assert int(seen.sum()) > 1
    with torch.no_grad():  # forwards without gradients leave the record alone
        layer(torch.randn(4, 14, 14, D_IN))
    assert int(layer.routed_experts.sum()) == 1


def test_masked_forward_and_backward_run_on_fake_tensors():
    """Fake tensors carry shapes but no data: a host copy or a routing-dependent shape would raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dispatch in ("masked", "indexed"):
        with FakeTensorMode():
            layer = ConvLoRALinear(nn.Linear(D_IN, 3 * D_IN), rank=R, top_k=2, weight_by_gate=True)
            layer.dispatch = dispatch
            x = torch.randn(5, 14, 14, D_IN)
            if dispatch == "indexed":  # the guard of this test: indexed dispatch needs the gate values
                with pytest.raises(RuntimeError):
                    layer(x)
                continue
            y = layer(x)
            (y.sum() + layer.balance_loss).backward()
            assert y.shape == (5, 14, 14, 3 * D_IN)
            assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.experts.parameters())


class _OpLog(TorchDispatchMode):
    """Records every aten operator with the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


@contextmanager
def _no_host_reads():
    """Make the Python-level ways of reading a tensor on the host raise."""
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor in the masked dispatch")

    names = ("cpu", "numpy", "item", "tolist", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_nonzero = torch.nonzero
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        torch.nonzero = refuse
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.nonzero = saved_nonzero


@pytest.mark.parametrize("block", list(SHAPES))
def test_masked_forward_reads_nothing_on_host_and_shapes_ignore_routing(block: str):
    x = torch.randn(*SHAPES[block], D_IN)
    logs, routings = [], []
    for seed in (0, 1):  # two layers that route the rows differently
        layer = _layer(2, weight_by_gate=True, seed=seed)
        layer.dispatch = "masked"
        with _no_host_reads(), _OpLog() as log:
            y = layer(x)
            (y.sum() + layer.balance_loss).backward()
        routings.append(layer.gate(layer.lora_A(x).permute(0, 3, 1, 2))[0].ne(0))
        logs.append(log.ops)
    assert not torch.equal(routings[0], routings[1])
    forbidden = ("nonzero", "_local_scalar_dense", "bincount", "masked_select", "unique")
    assert not [op for op, _ in logs[0] if any(f in op for f in forbidden)]
    assert logs[0] == logs[1]  # the same operators on the same shapes whatever the routing
    indexed = _layer(2)
    indexed.dispatch = "indexed"
    with pytest.raises(AssertionError, match="host read"), _no_host_reads():
        indexed(x)


def test_dispatch_choice_is_a_runtime_setting():
    model = nn.Sequential(_layer(1), nn.ReLU(), nn.Linear(3 * D_IN, D_IN), _layer(1))
    keys = set(model.state_dict())
    assert all(m.dispatch == "auto" for m in model if isinstance(m, ConvLoRALinear))
    assert resolve_dispatch("auto", "cpu") == AUTO_DISPATCH["cpu"] == "indexed"
    assert resolve_dispatch("masked", "cpu") == "masked"
    assert set_expert_dispatch(model, "masked") == 2
    assert all(m.dispatch == "masked" for m in model if isinstance(m, ConvLoRALinear))
    model(torch.randn(1, 14, 14, D_IN)).sum().backward()
    assert set(model.state_dict()) == keys  # neither the choice nor the routing record is saved
    with pytest.raises(ValueError, match="dispatch"):
        set_expert_dispatch(model, "sparse")
    assert drop_unrouted_expert_grads(nn.Linear(2, 2)) == 0


def test_the_training_loop_trains_the_same_with_either_dispatch(tmp_path, tiny_checkpoint, monkeypatch):
    """train() drops the zero gradients of unrouted experts under masked dispatch (before AdamW sees them)."""
    import numpy as np
    from safetensors.torch import load_file

    import napari_convlora.adapters.dispatch as dispatch
    from napari_convlora.config import RunOptions, TrainRecipe
    from napari_convlora.data import TrainingPair, prepare_training_data
    from napari_convlora.data.samples import synthetic_cells
    from napari_convlora.training.loop import train

    image, labels = synthetic_cells(96, seed=1)
    recipe = TrainRecipe(input_size=64, steps=4, grad_accum=2, lr=1e-2, val_fraction=0.0, seed=5)
    data = prepare_training_data([TrainingPair(image, labels)], recipe)
    weights = {}
    for mode in ("indexed", "masked"):
        monkeypatch.setitem(dispatch.AUTO_DISPATCH, "cpu", mode)
        out = tmp_path / f"{mode}.safetensors"
        for _ in train(tiny_checkpoint, data, out, recipe, RunOptions(device="cpu", num_threads=1)):
            pass
        weights[mode] = load_file(out)
    experts = [k for k in weights["indexed"] if ".experts." in k]
    assert experts and weights["indexed"].keys() == weights["masked"].keys()
    for key, value in weights["indexed"].items():
        np.testing.assert_allclose(weights["masked"][key].numpy(), value.numpy(), atol=1e-4, err_msg=key)


def test_a_record_left_by_masked_forwards_never_drops_an_indexed_steps_gradients():
    torch.manual_seed(0)
    layer = ConvLoRALinear(nn.Linear(16, 16), rank=3)
    layer.dispatch = "masked"
    layer(torch.randn(4, 14, 14, 16)).sum().backward()  # leaves a record of the experts it routed to
    layer.zero_grad(set_to_none=True)
    set_expert_dispatch(layer, "indexed")
    assert layer.routed_experts is None
    layer(torch.randn(4, 14, 14, 16)).sum().backward()
    with_grads = sum(e.conv.weight.grad is not None for e in layer.experts)
    assert drop_unrouted_expert_grads(layer) == 0
    assert sum(e.conv.weight.grad is not None for e in layer.experts) == with_grads > 0
