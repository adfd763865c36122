"""SAM's image-encoder attention computed with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

``segment_anything``'s ``Attention.forward`` materialises the score matrix ``(q * scale) @ k^T`` (N x N per head,
N = H * W tokens: 196 in a 14 x 14 window, 4096 in a global block at 1024 px), adds the decomposed
relative-position terms (``add_decomposed_rel_pos``) in separate kernels, softmaxes and keeps the probabilities
for the backward pass. :func:`sdpa_attention` computes the same result through SDPA, with the relative-position
terms passed as an additive float ``attn_mask`` of shape B x heads x N x N::

    bias[b, n, (qh, qw), (kh, kw)] = rel_h[b, n, qh, qw, kh] + rel_w[b, n, qh, qw, kw]

where ``rel_h = q . Rh``, ``rel_w = q . Rw`` and ``Rh``, ``Rw`` come from SAM's own ``get_rel_pos`` (so the
tables interpolate as in SAM when the input size changes). The bias is built in the query's dtype.

What this wraps, and how: the module keeps its class, parameters, ``state_dict`` keys and submodules; it still
calls ``self.qkv`` (a LoRA / Conv-LoRA wrapper where adapters were injected) and ``self.proj``. Only the
instance's ``forward`` is replaced by a bound method (:func:`set_fast_attention`); switching off deletes it, so
the class's ``forward`` (SAM's) runs again. Block-level wrappers and hooks (activation checkpointing, HQ-SAM's
early-feature hook) see the same block. The switch is a runtime choice, like ``model.train()``: not saved.

What is and is not saved for the backward pass (per attention call, per head):

- The bias itself is N x N, as large as the score matrix, and is built in every forward. When it needs no gradient
  (``torch.no_grad``, or nothing before q trains: decoder-only), CPU and CUDA run fused kernels that never store
  the scores or probabilities.
- In training with encoder adapters q requires a gradient, so the bias does too. On the CPU (torch 2.x) SDPA then
  falls back to its math path: scores and probabilities are materialised and saved much as in SAM's forward (a
  few % fewer bytes saved, about the same time: :data:`AUTO_FAST_ATTENTION`). On CUDA the memory-efficient kernel
  accepts a bias with a gradient: it saves q, k, v, the output, the log-sum-exp and the bias (N x N in bf16)
  instead of SAM's softmax output (fp32 under autocast) and its bf16 copy, and fuses scale, bias, softmax and the
  products; the bias's gradient (N x N) is written in the backward pass. Expected on an H100 at 1024 px: about a
  third of the attention activations of the global blocks, fewer kernels. UNTESTED on a GPU so far.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "on", "off")
AUTO_RULES = ("always", "without_grad", "never")

#: What ``"auto"`` does, by ``device.type`` (device types not listed: ``"never"``): ``"always"`` SDPA,
#: ``"never"`` SAM's forward, ``"without_grad"`` SDPA only where no gradient flows through the attention (no
#: grad mode, or neither the input nor a parameter of the module needs one: prediction, decoder-only training),
#: the cases in which torch's fused CPU kernel runs; with a gradient through the bias SDPA's CPU math path does
#: what SAM's forward does, no faster. CPU, measured 2026-11-26 (one thread, fp32, random weights, paired in
#: alternation in one process, benchmarks/bench_fast_attention.py), time SDPA / SAM:
#: - forwards under no_grad (fused kernel): vit_b 0.92 at 256 px, 0.90 at 512 px, 0.65 at 1024 px (peak RSS
#:   1773 against 2467 MiB); the small built-in geometry 0.965 at 256 px; vit_b decoder-only training steps
#:   0.954 at 256 px, 0.890 at 512 px;
#: - training steps with encoder adapters (math path): vit_b LoRA / Conv-LoRA 1.008 / 1.010 at 256 px,
#:   0.985 / 0.999 at 512 px; small at 256 px 1.018 / 1.025; 3-6 % fewer bytes saved for backward.
#: CUDA: not measured yet (benchmarks/gpu_suite.py part ``fast_attention_vit_b``): set ``"always"`` if it pays.
AUTO_FAST_ATTENTION: dict[str, str] = {"cpu": "without_grad", "cuda": "never"}


def resolve_fast_attention(mode: str, device_type: str, needs_grad: bool = True) -> bool:
    """Whether ``mode`` (``"auto"``, ``"on"``, ``"off"``) computes with SDPA on a device of type ``device_type``,
    ``needs_grad`` saying whether a gradient will flow through the attention."""
    if mode not in MODES:
        raise ValueError(f"unknown fast-attention mode {mode!r}; expected one of {MODES}")
    if mode != "auto":
        return mode == "on"
    rule = AUTO_FAST_ATTENTION.get(device_type, "never")
    if rule not in AUTO_RULES:
        raise ValueError(f"unknown automatic fast-attention rule {rule!r} for {device_type}; "
                         f"expected one of {AUTO_RULES}")
    return rule == "always" or (rule == "without_grad" and not needs_grad)


def _sam_attention_class() -> type[nn.Module]:
    from segment_anything.modeling.image_encoder import Attention

    return Attention


def rel_pos_bias(attn: nn.Module, q: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative-position terms as one additive attention bias.

    Args:
        attn: SAM's ``Attention`` (its ``rel_pos_h``: (2H-1) x d or any length ``get_rel_pos`` interpolates).
        q: B x heads x N x d queries, unscaled (as SAM's ``add_decomposed_rel_pos`` takes them), N = H * W.
        hw: (H, W), the token grid (a window or the whole map).

    Returns:
        B x heads x N x N in q's dtype: ``rel_h[..., qh, qw, kh] + rel_w[..., qh, qw, kw]`` at (qh*W + qw, kh*W + kw).
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    h, w = hw
    b, heads, n, d = q.shape
    rh = get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)  # H x H x d (query row, key row)
    rw = get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)  # W x W x d
    grid_q = q.reshape(b, heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rh)  # B x heads x H x W x H
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rw)  # B x heads x H x W x W
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, n)


def sdpa_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What SAM's ``Attention.forward`` computes, through SDPA: x B x H x W x C -> B x H x W x C.

    Same order of operations around the attention: ``attn.qkv`` (adapted or not), split into heads, attention
    with ``scale = head_dim ** -0.5`` and the relative-position bias (:func:`rel_pos_bias`) when
    ``attn.use_rel_pos``, heads merged, ``attn.proj``.
    """
    b, h, w, _ = x.shape
    # qkv: 3 x B x heads x N x d
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = rel_pos_bias(attn, q, (h, w)) if attn.use_rel_pos else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)  # B x heads x N x d
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class _SwitchedForward:
    """What a switched Attention's ``forward`` calls (bound to it with ``types.MethodType``): SDPA or the class's own
    forward, as ``mode`` says for the input's device and gradient. The one trace on SAM's module is that bound
    ``forward``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in attn.parameters()))
        if resolve_fast_attention(self.mode, x.device.type, needs_grad):
            return sdpa_attention(attn, x)
        return type(attn).forward(attn, x)


def sam_attentions(module: nn.Module) -> list[nn.Module]:
    """The modules under ``module`` (itself included) that run SAM's image-encoder ``Attention.forward`` (subclasses
    that override it are left alone)."""
    cls = _sam_attention_class()
    return [m for m in module.modules() if isinstance(m, cls) and type(m).forward is cls.forward]


def set_fast_attention(module: nn.Module, mode: str | bool) -> int:
    """Make every SAM image-encoder ``Attention`` under ``module`` compute with SDPA, or with SAM's own forward.

    Args:
        module: an ``AdaptedSAM``, a ``Sam``, its ``image_encoder``, a block or one ``Attention``.
        mode: ``"on"`` / True (SDPA on every device), ``"off"`` / False (SAM's forward exactly: the bound forward is
            removed), ``"auto"`` (SDPA where :data:`AUTO_FAST_ATTENTION` says so for the input's device type and
            whether a gradient flows, decided at each call: moving the model to another device needs no new call).

    Returns:
        The number of attention modules set.
    """
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    resolve_fast_attention(mode, "cpu")  # validates
    attentions = sam_attentions(module)
    for attn in attentions:
        if mode == "off":
            attn.__dict__.pop("forward", None)
        else:
            attn.forward = types.MethodType(_SwitchedForward(mode), attn)
    return len(attentions)


def fast_attention_modes(module: nn.Module) -> set[str]:
    """The modes of the SAM attention modules under ``module`` (``"off"`` for those never switched)."""
    return {getattr(getattr(m.__dict__.get("forward"), "__func__", None), "mode", "off")
            for m in sam_attentions(module)}
