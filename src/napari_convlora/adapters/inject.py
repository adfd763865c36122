"""Put adapters into a module tree, find them, switch them off, merge or remove them."""

from __future__ import annotations

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from .layers import ConvLoRALinear, LoRALinear
from .qkv_lora import QkvSliceLoRALinear, is_fused_qkv


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, child)


def make_adapter(base: nn.Linear, config: AdapterConfig) -> LoRALinear:
    """Wrap one Linear as the config says (``lora``, on the whole output or on qkv slices, or ``conv_lora``)."""
    if config.method == "lora" and config.qkv_slices is not None:
        return QkvSliceLoRALinear(base, config.rank, config.alpha, config.dropout, slices=config.qkv_slices)
    if config.method == "lora":
        return LoRALinear(base, config.rank, config.alpha, config.dropout)
    if config.method == "conv_lora":
        return ConvLoRALinear(
            base,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            scales=config.expert_scales,
            top_k=config.top_k,
            weight_by_gate=config.weight_by_gate,
            noisy_gating=config.noisy_gating,
            balance_coef=config.balance_coef,
        )
    raise ValueError(f"method {config.method!r} has no encoder adapter")


def inject_adapters(root: nn.Module, config: AdapterConfig) -> list[str]:
    """Replace every ``nn.Linear`` in ``root`` whose name ends with a target by its adapter.

    Returns:
        The names of the wrapped layers (empty for methods without an encoder adapter: decoder, hq).

    Raises:
        ValueError: no Linear layer matched the targets (nothing would be adapted).
        ConfigError: ``qkv_slices`` on a matched Linear that is not a fused qkv (out = 3 x in); nothing changed.
    """
    if not config.has_encoder_adapter:
        return []
    names = [
        name for name, module in root.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and _matches(name, config.targets)
        and ".base_layer" not in name and not name.endswith(("lora_A", "lora_B"))
        and ".lora_A." not in name and ".lora_B." not in name  # the per-slice branches of a qkv-slice adapter
    ]
    if not names:
        raise ValueError(
            f"no Linear layer matches the adapter targets {config.targets}; "
            "SAM's encoder blocks have attn.qkv, attn.proj, mlp.lin1 and mlp.lin2"
        )
    if config.qkv_slices is not None:
        unfused = [name for name in names if not is_fused_qkv(root.get_submodule(name))]
        if unfused:
            layer = root.get_submodule(unfused[0])
            raise ConfigError(f"qkv_slices needs fused qkv layers (out = 3 x in); '{unfused[0]}' maps "
                              f"{layer.in_features} -> {layer.out_features}")
    for name in names:
        base = root.get_submodule(name)
        adapter = make_adapter(base, config).to(base.weight.device)
        _set_child(root, name, adapter)
    return names


def adapter_layers(root: nn.Module) -> list[tuple[str, LoRALinear]]:
    """All adapter layers under ``root`` with their names, found by type (not by name matching)."""
    return [(name, m) for name, m in root.named_modules() if isinstance(m, LoRALinear)]


def set_adapters_enabled(root: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (the model computes plain SAM) or back on."""
    for _, layer in adapter_layers(root):
        layer.enabled = enabled


def remove_adapters(root: nn.Module, merge: bool = False) -> int:
    """Put the original Linear layers back; with ``merge`` fold LoRA updates into them first.

    Raises:
        NotImplementedError: ``merge`` with Conv-LoRA layers (non-linear, cannot be merged).

    Returns:
        The number of layers unwrapped.
    """
    layers = adapter_layers(root)
    if merge:
        merged = [(name, layer.merged()) for name, layer in layers]  # raises before changing anything
    else:
        merged = [(name, layer.base_layer) for name, layer in layers]
    for name, linear in merged:
        _set_child(root, name, linear)
    return len(merged)
