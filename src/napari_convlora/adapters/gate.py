"""Noisy top-k gating with a load-balancing loss (Shazeer et al. 2017), as Conv-LoRA routes its experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / (mean(x)^2 + 1e-10)`` (unbiased var); 0 for one element."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class NoisyTopKGate(nn.Module):
    """Routes each row of a bottleneck map to ``top_k`` of ``num_experts`` experts.

    The input is pooled over space (one decision per image, or per window in windowed blocks).
    Clean logits ``f @ w_gate``; in training, noise ``N(0,1) * (softplus(f @ w_noise) + 1e-2)`` is added.
    Gates are the softmax over the top-k logits (exactly 1.0 for top-1). Both weights start at zero.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, noisy: bool = True, balance_coef: float = 0.01):
        super().__init__()
        self.num_experts, self.top_k, self.noisy, self.balance_coef = num_experts, top_k, noisy, balance_coef
        self.w_gate = nn.Parameter(torch.zeros(dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, num_experts))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route a bottleneck map.

        Args:
            z: N x r x h x w bottleneck (channels first).

        Returns:
            gates: N x M, non-zero only at the chosen experts (rows sum to 1).
            balance_loss: scalar ``coef * (CV^2(importance) + CV^2(load))``.
        """
        with torch.autocast(z.device.type, enabled=False):  # routing in fp32, also under mixed precision
            return self._route(z.float())

    def _route(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = z.mean(dim=(2, 3))  # N x r
        clean = pooled @ self.w_gate.float()
        use_noise = self.noisy and self.training
        if use_noise:
            noise_std = F.softplus(pooled @ self.w_noise.float()) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        k = self.top_k
        top_logits, top_idx = logits.topk(min(k + 1, self.num_experts), dim=1)
        top_k_gates = torch.softmax(top_logits[:, :k], dim=1)
        gates = torch.zeros_like(logits).scatter(1, top_idx[:, :k], top_k_gates)

        importance = gates.sum(0)
        if use_noise and k < self.num_experts:
            load = self._prob_in_top_k(clean, logits, noise_std, top_logits).sum(0)
        else:
            load = (gates > 0).sum(0).float()
        balance_loss = self.balance_coef * (cv_squared(importance) + cv_squared(load))
        return gates, balance_loss

    def _prob_in_top_k(
        self, clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_noisy: torch.Tensor
    ) -> torch.Tensor:
        """Differentiable P(expert m is in the top-k under fresh noise), N x M.

        The threshold is the (k+1)-th largest noisy logit for an expert now inside the top-k, else the k-th.
        """
        k = self.top_k
        threshold_if_in = top_noisy[:, k : k + 1]
        threshold_if_out = top_noisy[:, k - 1 : k]
        is_in = noisy > threshold_if_in
        normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()), validate_args=False)
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out)
