"""How Conv-LoRA sends the rows of its bottleneck to the scale experts its gate chose: two dispatches, one result.

* ``"indexed"`` gathers each expert's rows and runs the expert on those rows only. The rows per expert are
  worked out on the host from one copy of the small N x M gate matrix: one device-to-host copy (a wait for
  the GPU) per adapted layer, and shapes that depend on the routing (no CUDA graph, no ``torch.compile``
  without graph breaks). Experts that got no row do not run, so their gradients stay ``None``.
* ``"masked"`` runs every expert on every row (about ``num_experts`` times the expert arithmetic of top-1
  ``indexed``) and keeps expert e's result for row n only where the gate chose e (``torch.where`` on the
  N x M selection, times the gate value with ``weight_by_gate``). No device-to-host copy, no ``nonzero``,
  fixed shapes. Same output, in fp32 and under autocast (each kept result rounded to the bottleneck's dtype,
  then summed, as indexed rounds each expert's rows before adding them): the same sums for top-1 (the kept
  result plus exact zeros) and top-2, up to the order of the additions for top-3 and more. The experts' own
  results can differ in the last bits, as CPU convolution kernels round differently with the number of rows
  they run on (about 1e-6 relative in fp32; tests/test_conv_lora_dispatch.py).
* ``"auto"`` picks one of the two by the device type (:data:`AUTO_DISPATCH`).

Gradients and AdamW. Masked dispatch gives every chosen expert the same gradient as indexed dispatch (up to
rounding: its weight gradient sums over all rows, the unchosen rows adding exact zeros), and A, B and the gate
the same gradients. An expert that no row chose gets an all-zero gradient instead of ``None``; AdamW does not
skip a zero gradient (its moments decay, its step count and weight decay apply), so one more step would
change that expert. Whether a gradient is ``None`` is host state, so making it ``None`` needs the host to
know which experts were chosen: a device-to-host copy that cannot be avoided. :func:`~.routing.drop_unrouted_expert_grads`
makes it ONE copy per optimizer step for all layers together (instead of one per layer and forward), after
``backward``: call it before ``optimizer.step()`` (or register it with ``optimizer.register_step_pre_hook``)
and training is the same as with indexed dispatch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DISPATCHES = ("auto", "indexed", "masked")

#: The dispatch ``"auto"`` uses, by ``device.type``; device types not listed use ``"indexed"``. Measured
#: 2026-11-26 (vit_b geometry, rank 3, 8 experts, top-1; issue 14), masked was slower everywhere, as it runs all
#: 8 experts on every row:
#: - CPU, one thread, fp32, paired in alternation: the bottleneck alone (forward + backward) 4.97 x indexed's time
#:   on 25 windows of 14 x 14, 6.83 x on one 64 x 64 global map; the whole qkv layer (768 -> 2304) 1.17 x and
#:   1.21 x; whole vit_b training steps at 256 / 512 px, paired with LoRA: 1.17 / 1.07 (indexed 1.09 / 0.99).
#: - CUDA, one H100, bf16 autocast, whole vit_b steps paired with LoRA (bench_expert_variants.py): 1024 px batch 1
#:   2.14 x LoRA (indexed 2.01 x), batch 4 2.00 x (indexed 1.32 x); GPU busy 119 ms per step (indexed 70, LoRA
#:   53) and 47.7k host operators per step (indexed 37.2k, LoRA 20.3k). Removing the per-layer host wait does
#:   not pay for the extra expert work and launches unless the step is also captured (CUDA graphs), which the
#:   fixed shapes of masked allow and indexed does not.
AUTO_DISPATCH: dict[str, str] = {"cpu": "indexed", "cuda": "indexed"}


def resolve_dispatch(mode: str, device_type: str) -> str:
    """``"indexed"`` or ``"masked"``: ``mode`` itself, or for ``"auto"`` the rule of :data:`AUTO_DISPATCH`."""
    if mode not in DISPATCHES:
        raise ValueError(f"unknown expert dispatch {mode!r}; expected one of {DISPATCHES}")
    return AUTO_DISPATCH.get(device_type, "indexed") if mode == "auto" else mode


def indexed_mix(experts: nn.ModuleList, zc: torch.Tensor, gates: torch.Tensor, weight_by_gate: bool) -> torch.Tensor:
    """The experts' contribution, each expert run on its own rows only (one host copy of ``gates``).

    Args:
        experts: M modules mapping N' x r x h x w to the same shape (in their weights' dtype).
        zc: N x r x h x w bottleneck (channels first), any float dtype.
        gates: N x M, non-zero only at each row's chosen experts (fp32).
        weight_by_gate: multiply each expert's result by its gate value.

    Returns:
        N x r x h x w in ``zc``'s dtype: sum over the chosen experts e of (g_ne *) E_e(z_n).
    """
    # One dispatch for all experts: the (expert, row) pairs of the non-zero gates, in expert order, and how
    # many rows each expert got, worked out on the host from ONE copy of the small N x M gate matrix: the
    # only point where the host waits for a GPU in this layer (``nonzero`` then ``bincount().tolist()``
    # waited twice; a loop of one ``nonzero`` per expert, eight times). Experts without rows are skipped,
    # as in the reference, so they get no gradient in that step.
    chosen = gates.detach().t().cpu().numpy() != 0  # M x N
    expert_of, row_of = np.nonzero(chosen)  # sorted by expert, then row
    counts = np.bincount(expert_of, minlength=len(experts)).tolist()
    rows = torch.from_numpy(row_of).to(zc.device, non_blocking=True)
    experts_of = torch.from_numpy(expert_of).to(zc.device, non_blocking=True)
    # The experts run in their weights' dtype (fp32 under mixed precision): in bf16, bicubic resizing's
    # backward made each expert 3-8 x slower on an H200 (benchmarks/bench_expert_variants.py).
    dtype = experts[0].conv.weight.dtype
    with torch.autocast(zc.device.type, enabled=False):
        inputs = zc.to(dtype).index_select(0, rows).split(counts)
        out = torch.cat([expert(x) for expert, x, n in zip(experts, inputs, counts) if n])
    if weight_by_gate:
        out = out * gates[rows, experts_of].view(-1, 1, 1, 1).to(out.dtype)
    return torch.zeros_like(zc).index_add(0, rows, out.to(zc.dtype))


def masked_mix(experts: nn.ModuleList, zc: torch.Tensor, gates: torch.Tensor, weight_by_gate: bool) -> torch.Tensor:
    """The experts' contribution, every expert run on every row and kept where chosen (no host copy).

    Same arguments and result as :func:`indexed_mix`; shapes depend only on ``zc``'s shape, never on the
    routing. Keeps a result with ``torch.where`` (not a product with the 0/1 mask), so an unchosen expert's
    non-finite value cannot leak into a row.
    """
    dtype = experts[0].conv.weight.dtype
    chosen = (gates.detach() != 0)[:, :, None, None, None]  # N x M x 1 x 1 x 1
    with torch.autocast(zc.device.type, enabled=False):
        x = zc.to(dtype)
        out = torch.stack([expert(x) for expert in experts], dim=1)  # N x M x r x h x w
        if weight_by_gate:
            out = out * gates.to(dtype)[:, :, None, None, None]
        kept = torch.where(chosen, out, 0.0).to(zc.dtype)  # rounded as indexed_mix rounds each expert's rows
    return kept.sum(dim=1)  # top-1: the one kept result plus exact zeros
