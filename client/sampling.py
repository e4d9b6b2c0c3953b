"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p,
repetition, presence and frequency penalties, and a seed. Pure torch, runs on the client; the same
Sampler run over local logits gives the same tokens as over the mesh's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0  # Hugging Face style, over prompt and output
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI style, over the output so far
    frequency_penalty: float = 0.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {self.seed}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, previous: list[int], generated: list[int] = ()) -> int:
        """logits: [vocab] (any float dtype) -> the next token id. `previous`: prompt and output so
        far (for the repetition penalty); `generated`: the output so far (presence, frequency)."""
        logits = logits.detach().float().cpu()
        p = self.params
        if p.repetition_penalty != 1.0 and previous:
            seen = torch.tensor(sorted(set(previous)), dtype=torch.long)
            values = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated:
            counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long), minlength=logits.numel()).float()
            logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        if p.greedy:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            cutoff = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < cutoff, float("-inf"))
        if p.top_p < 1.0:
            logits = _top_p_filter(logits, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already enough
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its k most likely alternatives (before sampling
    transforms: these describe the model, not the sampler)."""
    logprobs = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
    alternatives = []
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        alternatives = [(int(i), float(v)) for i, v in zip(ids, values)]
    return float(logprobs[token]), alternatives
