"""Model-wide control of Conv-LoRA's expert dispatch (``dispatch.py`` holds the per-layer computations): the
layers of a model, the dispatch they use, and the gradients of experts that no row was routed to."""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import resolve_dispatch
from .layers import ConvLoRALinear


def conv_lora_layers(model: nn.Module) -> list[nn.Module]:
    """The Conv-LoRA layers (:class:`~.layers.ConvLoRALinear`) under ``model``."""
    return [m for m in model.modules() if isinstance(m, ConvLoRALinear)]


def set_expert_dispatch(model: nn.Module, mode: str) -> int:
    """Set the dispatch (``"auto"``, ``"indexed"`` or ``"masked"``) of every Conv-LoRA layer under ``model``.

    A runtime choice, like ``model.train()``: not part of the model's configuration or saved files.

    Returns:
        The number of layers set.
    """
    resolve_dispatch(mode, "cpu")  # validates
    layers = conv_lora_layers(model)
    for layer in layers:
        layer.dispatch = mode
        layer.routed_experts = None  # a record of another dispatch's forwards must not drop this one's gradients
    return len(layers)


def drop_unrouted_expert_grads(model: nn.Module) -> int:
    """Set to ``None`` the gradients of experts that no row was routed to since gradients were last cleared.

    After ``backward`` and before ``optimizer.step()``, this makes masked dispatch train exactly like indexed
    dispatch (where such experts never ran, so AdamW skips them). One device-to-host copy of M booleans per
    Conv-LoRA layer, all layers in one copy; nothing to do for layers that ran indexed.

    Returns:
        The number of experts whose gradients were dropped.
    """
    layers = [m for m in conv_lora_layers(model) if m.routed_experts is not None]
    if not layers:
        return 0
    routed = torch.cat([m.routed_experts for m in layers]).cpu().tolist()  # the one host copy
    dropped, start = 0, 0
    for layer in layers:
        for expert, was_routed in zip(layer.experts, routed[start : start + len(layer.experts)]):
            if not was_routed:
                dropped += 1
                for p in expert.parameters():
                    p.grad = None
        start += len(layer.experts)
        layer.routed_experts = None  # used: the next step records afresh
    return dropped
