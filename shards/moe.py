"""A sparse mixture-of-experts MLP: a top-k softmax router over gated-MLP experts, plus an
optional shared expert behind a sigmoid gate (Qwen-MoE)."""

from __future__ import annotations

import torch
from torch import nn

from shards.layers import GatedMLP


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, expert_intermediate: int, num_experts: int, top_k: int, act: str,
                 normalize_top_k: bool, expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 shared_intermediate: int | None = None):
        super().__init__()
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            GatedMLP(hidden, expert_intermediate, act, names=expert_names) for _ in range(num_experts)
        )
        if shared_intermediate:
            self.shared_expert = GatedMLP(hidden, shared_intermediate, act)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, D]
        probs = torch.softmax(self.gate(flat), dim=-1, dtype=torch.float32)  # [N, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        for expert in chosen.unique().tolist():
            rows, slot = torch.where(chosen == expert)
            contribution = self.experts[expert](flat[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, contribution)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)
