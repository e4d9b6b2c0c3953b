"""A slow donor takes on prompts in pieces it can compute quickly (server/pacing.py), and forwards
of many sequences a few rows at a time, so that it keeps answering pings during a long prompt and
its clients do not take it for dead."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from mesh.transport import Connection, Liveness, Unresponsive
from server.compute import BatchingExecutor
from server.donor import Donor, DonorSettings
from server.pacing import MIN_PROMPT_TOKENS, PromptPace
from server.throughput import measure_prompt_speed
from shards.loading import load_shard
from tests.conftest import assert_hidden_close
from tests.unit.server_thread import ServerThread
from tests.unit.test_batching import NamedStep, both_run, new_session, token

QUICK = Liveness(probe_after=0.05, answer_within=0.4)
SECONDS_PER_TOKEN = 0.002  # what the slowed shard below costs per prompt token


def test_the_pace_learns_the_donors_prompt_speed_and_bounds_the_budget_by_it():
    pace = PromptPace(seconds=2.0)
    assert pace.budget(512) == 512  # nothing measured yet: the configured size
    pace.observe(MIN_PROMPT_TOKENS - 1, 10.0)
    assert pace.tokens_per_second is None  # too short to tell: its per-call cost would dominate
    pace.observe(100, 1.0)
    assert pace.budget(512) == 200 and pace.budget(64) == 64  # never above the configured size
    pace.observe(50, 5.0)  # 10 tokens/s: the estimate moves halfway, to 55
    assert pace.tokens_per_second == pytest.approx(55.0) and pace.budget(512) == 110
    for _ in range(20):
        pace.observe(20, 100.0)
    assert pace.budget(512) == MIN_PROMPT_TOKENS and pace.budget(8) == 8
    assert pace.as_dict(512) == {"prompt_tokens_per_second": pytest.approx(0.2, abs=0.05),
                                 "prompt_piece_tokens": MIN_PROMPT_TOKENS}


@pytest.fixture
def shard(model_dir):
    return load_shard(str(model_dir("llama")))


def test_a_long_prompt_on_a_slow_donor_runs_in_smaller_pieces_with_steps_between_them(shard):
    prompt = torch.randn(1, 50, shard.config.hidden_size, generator=torch.Generator().manual_seed(4))
    finished = []

    async def scenario():
        executor = BatchingExecutor(shard)
        executor.pace.observe(100, 10.0)  # 10 tokens/s: 20 tokens fit the 2 s
        session, cache = new_session(shard, 1)
        long_cache = shard.new_cache(64)
        long = NamedStep(finished, "prompt", executor, object(), long_cache, prompt)
        assert long.result is None and long_cache.length == 20  # its first piece ran at once
        step = NamedStep(finished, "decode step", executor, session, cache, token(shard, 5))
        await both_run(step, long)
        return executor, long.result, long_cache

    executor, (output, error), long_cache = asyncio.run(scenario())
    assert error is None and finished == ["decode step", "prompt"]
    assert executor.stats.batch_sizes == {1: 4}  # pieces of 20, 20 and 10 tokens, and the step
    assert executor.pace.tokens_per_second > 10  # it learned from the pieces how fast it really is
    whole = shard.new_cache(64)
    assert_hidden_close(output, shard(prompt, [whole]))
    assert long_cache.length == whole.length == 50


class SlowDonor(ServerThread):
    """A real donor on its own loop, over a shard slowed to SECONDS_PER_TOKEN per prompt token."""

    def __init__(self, shard, pace_seconds: float):
        super().__init__(asyncio.new_event_loop())
        self.shard, self.pace_seconds = shard, pace_seconds

    def stop(self):
        self.loop.call_soon_threadsafe(self.stopped.set)

    async def _main(self):
        self.stopped = asyncio.Event()
        donor = Donor(self.shard, DonorSettings(model_id="m", cache_budget_bytes=1 << 24), throughput=1.0)
        donor.worker.pace.seconds = self.pace_seconds
        donor.worker.pace.observe(*measure_prompt_speed(self.shard))  # as `mesh serve` does at start
        self.port = int((await donor.start()).rpartition(":")[2])
        self.ready.set()
        await self.stopped.wait()
        await donor.stop()


def slowed(shard, monkeypatch):
    block = shard.blocks[0]

    def forward(hidden, *args, **kwargs):
        if hidden.shape[1] > 1:
            time.sleep(SECONDS_PER_TOKEN * hidden.shape[0] * hidden.shape[1])
        return type(block).forward(block, hidden, *args, **kwargs)

    monkeypatch.setattr(block, "forward", forward)
    return shard


@pytest.mark.parametrize("paced", [True, False])
def test_a_slow_donor_keeps_answering_pings_during_a_long_prompt(shard, monkeypatch, paced):
    prompt = torch.randn(1, 400, shard.config.hidden_size, generator=torch.Generator().manual_seed(6))
    expected = shard(prompt, [shard.new_cache(400)])
    # Paced: pieces of about 0.1 s. Unpaced (a budget of 1000 s): the whole prompt, 0.8 s with the
    # loop held, while the client gives up a donor that leaves a ping unanswered for 0.4 s.
    with SlowDonor(slowed(shard, monkeypatch), pace_seconds=0.1 if paced else 1000.0) as donor:
        connection = Connection.open("127.0.0.1", donor.port)
        try:
            session = connection.request({"type": "open", "model": "m", "max_length": 400}).header["session"]
            step = {"type": "step", "session": session, "position": 0}
            if not paced:
                with pytest.raises(Unresponsive, match="answered no ping within 0.4s"):
                    connection.request(step, [prompt], timeout=30, liveness=QUICK)
                return
            reply = connection.request(step, [prompt], timeout=30, liveness=QUICK)
            info = connection.request({"type": "info"}).header["compute"]
        finally:
            connection.close()
    assert_hidden_close(reply.tensors[0], expected)
    assert info["prompt_piece_tokens"] < 100 and info["batch_sizes"]["1"] >= 5  # 400 tokens in pieces


def test_a_forward_of_many_sequences_on_a_slow_donor_runs_a_few_rows_at_a_time(shard):
    gen = torch.Generator().manual_seed(7)
    many = torch.randn(5, 8, shard.config.hidden_size, generator=gen)
    one_long = torch.randn(1, 30, shard.config.hidden_size, generator=gen)
    results, finished = {}, []

    def record(name):
        def done(output, error, seconds):
            finished.append(name)
            results[name] = (output, error)
        return done

    async def scenario():
        executor = BatchingExecutor(shard)
        executor.pace.observe(100, 10.0)  # 20 tokens fit the 2 s: two rows of 8 tokens at a time
        session, cache = new_session(shard, 1)
        layers = (shard.start, shard.end)
        executor.submit(many, layers, None, record("forward"))
        assert "forward" not in results  # its first two rows ran at once, the rest wait
        step = NamedStep(finished, "decode step", executor, session, cache, token(shard, 5))
        await both_run(step)
        for _ in range(1000):
            if "forward" in results:
                break
            await asyncio.sleep(0.001)
        executor.submit(one_long, layers, None, record("one sequence"))  # cannot be cut: runs whole
        return executor

    executor = asyncio.run(scenario())
    assert finished.index("decode step") < finished.index("forward")  # it ran between the rows
    output, error = results["forward"]
    assert error is None
    assert_hidden_close(output, shard(many))
    assert_hidden_close(results["one sequence"][0], shard(one_long))
    assert executor.stats.batch_sizes == {1: 5}  # rows 2 + 2 + 1, the step, the long sequence whole
