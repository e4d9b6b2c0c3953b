"""Shared fixtures: tiny random checkpoints (built once per test run) and bounded torch threads."""

from __future__ import annotations

import os

import pytest
import torch

from shards.random_model import FAMILY_OVERRIDES, save_random_model

# Two cores are shared by the test process and any servers it starts; oversubscription collapses speed.
torch.set_num_threads(int(os.environ.get("MESH_TEST_THREADS", "1")))

ALL_FAMILIES = sorted(FAMILY_OVERRIDES)
# "Within 1e-5" in fp32: 1e-5 absolute plus torch's default fp32 relative term (1.3e-6 x |expected|),
# since hidden states of magnitude ~10 differ by a few ulps between batched and single-row GEMMs.
FP32_TOLERANCE = dict(atol=1e-5, rtol=1.3e-6)


def assert_hidden_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Hidden states (or caches) of two fp32 paths that differ only in how the kernels group the
    arithmetic (a batched GEMM against single rows, a prompt in pieces against whole): within
    FP32_TOLERANCE, or 2e-6 of the tensor's largest entry. Rounding errors follow the residual
    stream's scale, not each element's size: on an AMD EPYC (AVX-512) a mistral shard's batched
    step was 1.3e-5 from the single-row one, and 1.3e-5 from a float64 run, on values up to 15."""
    atol = max(FP32_TOLERANCE["atol"], 2e-6 * expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=atol, rtol=FP32_TOLERANCE["rtol"])


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(model_type, **overrides) -> path of a saved random checkpoint (cached per arguments)."""
    made: dict[tuple, object] = {}

    def make(model_type: str, **kwargs):
        key = (model_type, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"{model_type}-model")
            made[key] = save_random_model(model_type, path, **kwargs)
        return made[key]

    return make


def reference_model(path):
    """The transformers model of a checkpoint, fp32, eval mode: what every family is tested against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_prompt(length: int, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def fail_on_call(monkeypatch, module, call: int, message: str = "out of memory") -> list:
    """Make `module.forward` raise RuntimeError(message) on its `call`-th call (1 = the first);
    returns the list that counts the calls."""
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return type(module).forward(module, *args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls
