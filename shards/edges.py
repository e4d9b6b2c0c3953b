"""The client's pieces of a model: token embeddings, final norm and LM head."""

from __future__ import annotations

import torch
from torch import nn

from shards.device import DeviceInfo, detect_device
from shards.layers import RMSNorm


class ModelEdges(nn.Module):
    """embed(ids) gives the first layer's input; logits(hidden) turns the last layer's output into logits."""

    def __init__(self, config, tied: bool, device_info: DeviceInfo | None = None):
        super().__init__()
        self.config = config
        self.device_info = device_info or detect_device("cpu")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tied = tied
        if tied:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] -> hidden: [B, T, D]."""
        return self.embed_tokens(input_ids.to(self.device))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, D] -> logits: [B, T, vocab], in float32 for sampling."""
        return self.lm_head(self.norm(hidden.to(device=self.device, dtype=self.dtype))).float()
