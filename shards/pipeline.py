"""A whole model run locally from edges and a chain of shards: the reference for what the mesh does
remotely, and a tool for `mesh check`, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shards.edges import ModelEdges
from shards.kv_cache import KVCache
from shards.shard import Shard


@dataclass
class LocalSession:
    """One generation: a KV cache in every shard of the chain."""

    caches: list[KVCache]
    tokens: list[int] = field(default_factory=list)


class LocalPipeline:
    def __init__(self, edges: ModelEdges, shards: list[Shard]):
        expected = 0
        for shard in shards:
            if shard.start != expected:
                raise ValueError(f"shards must chain: expected one starting at layer {expected}, got {shard.start}")
            expected = shard.end
        if expected != edges.config.num_hidden_layers:
            raise ValueError(f"shards cover layers [0, {expected}) of {edges.config.num_hidden_layers}")
        self.edges, self.shards = edges, shards

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for whole sequences, without caches."""
        hidden = self.edges.embed(input_ids)
        for shard in self.shards:
            hidden = shard(hidden)
        return self.edges.logits(hidden)

    def new_session(self, capacity: int) -> LocalSession:
        return LocalSession([shard.new_cache(capacity) for shard in self.shards])

    def step(self, sessions: list[LocalSession], input_ids: torch.Tensor) -> torch.Tensor:
        """Feed input_ids [B, T] (row b continues sessions[b]); returns logits of the last token, [B, vocab]."""
        hidden = self.edges.embed(input_ids)
        for index, shard in enumerate(self.shards):
            hidden = shard(hidden, [s.caches[index] for s in sessions])
        for session, row in zip(sessions, input_ids.tolist()):
            session.tokens.extend(row)
        return self.edges.logits(hidden[:, -1:])[:, 0]

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding with caches: prefill the prompt, then one token per step."""
        session = self.new_session(len(prompt) + max_new_tokens)
        device = self.edges.device
        logits = self.step([session], torch.tensor([prompt], device=device))
        generated = []
        for _ in range(max_new_tokens):
            token = int(logits[0].argmax())
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
            logits = self.step([session], torch.tensor([[token]], device=device))
        return generated
