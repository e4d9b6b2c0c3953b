"""Sampling parameters: every out-of-range value is refused with a message naming it."""

from __future__ import annotations

import math

import pytest
import torch

from client.sampling import Sampler, SamplingParams


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "temperature must be >= 0"),
    ("temperature", math.nan, "temperature must be a finite number"),
    ("top_p", 1.5, "top_p must be in"),
    ("top_p", math.nan, "top_p must be a finite number"),
    ("top_k", -1, "top_k must be >= 0"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("repetition_penalty", math.inf, "repetition_penalty must be a finite number"),
    ("presence_penalty", 2.5, "presence_penalty must be between -2 and 2"),
    ("frequency_penalty", -math.inf, "frequency_penalty must be a finite number"),
    ("seed", 2**64, "seed must be between"),
    ("seed", -2**63 - 1, "seed must be between"),
])
def test_out_of_range_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("seed", [2**64 - 1, -2**63, 0])
def test_seeds_across_the_whole_range_sample_reproducibly(seed):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=seed)
    one, two = Sampler(params), Sampler(params)
    assert [one(logits, []) for _ in range(8)] == [two(logits, []) for _ in range(8)]
