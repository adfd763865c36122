"""Activation checkpointing as a wrapper module: recompute a block in the backward pass instead of storing
its activations (less memory, about a third more compute, the same result).

The wrapper takes the block's place in its ``ModuleList`` and can be taken out again; its state-dict hooks
drop and restore its own name level, so saved files and tensor names are the same with and without it (as
PyTorch's own ``checkpoint_wrapper`` does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_INNER = "block."


class CheckpointedBlock(nn.Module):
    """``block`` run under ``torch.utils.checkpoint`` whenever gradients are being recorded."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self._register_state_dict_hook(_drop_inner_prefix)
        self._register_load_state_dict_pre_hook(_add_inner_prefix)

    def forward(self, *args: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)


def _drop_inner_prefix(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(prefix + _INNER)]:
        state[prefix + key[len(prefix + _INNER):]] = state.pop(key)


def _add_inner_prefix(state: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(prefix + _INNER)]:
        state[prefix + _INNER + key[len(prefix):]] = state.pop(key)


def set_activation_checkpointing(blocks: nn.ModuleList, enabled: bool) -> None:
    """Wrap every block of ``blocks`` in :class:`CheckpointedBlock` (or unwrap them)."""
    for index, block in enumerate(blocks):
        if enabled and not isinstance(block, CheckpointedBlock):
            blocks[index] = CheckpointedBlock(block)
        elif not enabled and isinstance(block, CheckpointedBlock):
            blocks[index] = block.block


def unwrapped(module: nn.Module) -> nn.Module:
    """The block inside a :class:`CheckpointedBlock`, or ``module`` itself."""
    return module.block if isinstance(module, CheckpointedBlock) else module
