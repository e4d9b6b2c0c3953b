"""Every family: client edges plus chained shards reproduce transformers exactly (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from shards import LocalPipeline, load_edges, load_shard
from tests.conftest import FP32_TOLERANCE, ALL_FAMILIES, random_prompt, reference_model

SPLITS = {"two shards": ["0:2", "2:6"], "three shards": ["0:1", "1:4", "4:6"]}
PROMPT_LENGTH = 20  # longer than every sliding window in the random configs, so windows matter


def chain(path, splits) -> LocalPipeline:
    return LocalPipeline(load_edges(path, device="cpu"), [load_shard(path, s, device="cpu") for s in splits])


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
@pytest.mark.parametrize("split", list(SPLITS))
def test_chained_shards_reproduce_logits(model_dir, model_type, split):
    path = model_dir(model_type)
    prompt = random_prompt(PROMPT_LENGTH)
    with torch.no_grad():
        expected = reference_model(path)(prompt).logits
    got = chain(path, SPLITS[split]).forward(prompt)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **FP32_TOLERANCE)


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_cached_greedy_decoding_matches_generate(model_dir, model_type):
    path = model_dir(model_type)
    prompt = random_prompt(PROMPT_LENGTH)
    reference = reference_model(path)
    reference.generation_config.eos_token_id = None  # random weights: never stop early on a random "eos"
    config = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = reference.generate(prompt, generation_config=config)[0, PROMPT_LENGTH:].tolist()
    assert len(expected) == 16
    assert len(set(expected)) > 3, "the random model should not be degenerate, or the test proves little"
    got = chain(path, SPLITS["three shards"]).greedy(prompt[0].tolist(), 16)
    assert got == expected


def test_step_by_step_prefill_equals_whole_prompt(model_dir):
    """Feeding the prompt in pieces (cache continuation with T > 1) gives the same logits as at once."""
    path = model_dir("mistral")  # sliding window 7: pieces straddle the window edge
    pipe = chain(path, SPLITS["two shards"])
    prompt = random_prompt(PROMPT_LENGTH)
    whole = pipe.forward(prompt)[0, -1]
    session = pipe.new_session(PROMPT_LENGTH)
    for start, end in [(0, 5), (5, 6), (6, 13), (13, 20)]:
        last = pipe.step([session], prompt[:, start:end])
    torch.testing.assert_close(last[0], whole, **FP32_TOLERANCE)
