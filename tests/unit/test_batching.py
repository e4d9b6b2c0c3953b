"""How the donor's executor forms decode batches: a lone session runs at once, concurrent sessions
wait (a bounded time) for each other, and a batch gives each session what it would get alone."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.compute import MAX_STRAGGLER_WAIT, BatchingExecutor, Job, SessionEnded
from shards.loading import load_shard
from tests.conftest import FP32_TOLERANCE, assert_hidden_close, fail_on_call


@pytest.fixture(scope="module")
def shard(model_dir):
    return load_shard(str(model_dir("llama")))


class Step:
    """One session's decode step: submit it, then see whether and how it finished."""

    def __init__(self, executor: BatchingExecutor, session: object, cache, hidden: torch.Tensor):
        self.result = None
        executor.submit(hidden, (executor.shard.start, executor.shard.end), cache, self._done, submitter=session)

    def _done(self, output, error, seconds):
        self.result = (output.clone() if output is not None else None, error)


def new_session(shard, prompt_seed: int):
    cache = shard.new_cache(64)
    gen = torch.Generator().manual_seed(prompt_seed)
    shard(torch.randn(1, 4, shard.config.hidden_size, generator=gen), [cache])
    return object(), cache


def token(shard, seed: int) -> torch.Tensor:
    return torch.randn(1, 1, shard.config.hidden_size, generator=torch.Generator().manual_seed(seed))


async def both_run(*steps: Step) -> None:
    for _ in range(1000):
        if all(step.result is not None for step in steps):
            return
        await asyncio.sleep(0.0005)
    raise AssertionError("steps did not run")


def test_a_lone_session_runs_at_once(shard):
    async def scenario():
        executor = BatchingExecutor(shard)
        session, cache = new_session(shard, 1)
        for seed in range(3):
            step = Step(executor, session, cache, token(shard, seed))
            assert step.result is not None  # finished inside submit: no loop iteration, no timer
        assert executor.stats.batch_sizes == {1: 3}

    asyncio.run(scenario())


def test_active_sessions_wait_for_each_other_and_match_running_alone(shard):
    async def scenario():
        executor = BatchingExecutor(shard)
        (a, cache_a), (b, cache_b) = new_session(shard, 1), new_session(shard, 2)
        await both_run(Step(executor, a, cache_a, token(shard, 10)), Step(executor, b, cache_b, token(shard, 11)))
        # Both stepped just now: both are active sessions.
        first = Step(executor, a, cache_a, token(shard, 12))
        assert first.result is None  # waits for b, whose step is on its way
        second = Step(executor, b, cache_b, token(shard, 13))
        await asyncio.sleep(0)
        assert first.result is not None and second.result is not None
        return executor, first.result[0], second.result[0]

    executor, out_a, out_b = asyncio.run(scenario())
    assert executor.stats.batch_sizes[2] >= 1
    # The same steps, each session on its own.
    for seeds, got in (((1, 10, 12), out_a), ((2, 11, 13), out_b)):
        _, cache = new_session(shard, seeds[0])
        shard(token(shard, seeds[1]), [cache])
        torch.testing.assert_close(got, shard(token(shard, seeds[2]), [cache]), **FP32_TOLERANCE)


def test_waiting_for_a_straggler_is_bounded_and_closed_sessions_are_not_awaited(shard):
    async def scenario():
        executor = BatchingExecutor(shard)
        (a, cache_a), (b, cache_b) = new_session(shard, 1), new_session(shard, 2)
        await both_run(Step(executor, a, cache_a, token(shard, 10)), Step(executor, b, cache_b, token(shard, 11)))
        started = time.monotonic()
        lonely = Step(executor, a, cache_a, token(shard, 12))  # b never sends its step
        assert lonely.result is None  # it waits for b first
        while lonely.result is None and time.monotonic() - started < 5:
            await asyncio.sleep(0.001)
        waited = time.monotonic() - started
        assert lonely.result is not None and lonely.result[1] is None
        assert waited < MAX_STRAGGLER_WAIT + 0.5, waited
        assert executor.stats.batch_sizes[1] == 3  # a ran alone after the wait
        executor.forget(b)  # b closed: a is alone again and runs at once
        assert Step(executor, a, cache_a, token(shard, 13)).result is not None

    asyncio.run(scenario())


def test_batches_and_prefills_run_oldest_first(shard):
    executor = BatchingExecutor(shard)
    layers = (shard.start, shard.end)
    hidden_size = shard.config.hidden_size

    def job(tokens):
        return Job(torch.zeros(1, tokens, hidden_size), layers, shard.new_cache(8), lambda *a: None)

    prefill, step_a, step_b, later_prefill = job(4), job(1), job(1), job(3)
    plan, deferred = executor._plan([prefill, step_a, later_prefill, step_b])
    # The prefill came first, so it runs before the batch that formed after it.
    assert [[id(j) for j in group] for group in plan] == [[id(prefill)], [id(step_a), id(step_b)], [id(later_prefill)]]
    assert deferred == []


def test_prompts_beyond_a_flush_budget_wait_for_the_next_flush(shard, monkeypatch):
    monkeypatch.setattr(shard, "prefill_chunk_tokens", 8)
    executor = BatchingExecutor(shard)
    layers = (shard.start, shard.end)

    def job(tokens, batch=1):
        return Job(torch.zeros(batch, tokens, shard.config.hidden_size), layers, shard.new_cache(8), lambda *a: None)

    first, second, step, third, fourth = job(5), job(3), job(1), job(1, batch=2), job(2)
    plan, deferred = executor._plan([first, second, step, third, fourth])
    # 5 + 3 tokens fill the budget of 8; the step runs anyway; the rest keep their order.
    assert [[id(j) for j in group] for group in plan] == [[id(first)], [id(second)], [id(step)]]
    assert [id(j) for j in deferred] == [id(third), id(fourth)]
    # A prompt longer than the budget still starts (its first piece), or it would never run.
    big, small = job(12), job(2)
    plan, deferred = executor._plan([big, small])
    assert [[id(j) for j in group] for group in plan] == [[id(big)]] and deferred == [small]


def test_a_decode_step_waits_for_one_budget_of_a_burst_of_prompts_not_all_of_it(shard, monkeypatch):
    monkeypatch.setattr(shard, "prefill_chunk_tokens", 4)
    hidden_size = shard.config.hidden_size
    prompts = [torch.randn(1, 4, hidden_size, generator=torch.Generator().manual_seed(s)) for s in (20, 21, 22)]
    finished, caches = [], [shard.new_cache(16) for _ in prompts]

    async def scenario():
        executor = BatchingExecutor(shard)
        session, cache = new_session(shard, 1)
        outputs = {}

        def done(name):
            def record(output, error, seconds):
                finished.append(name)
                outputs[name] = (output, error)
            return record

        layers = (shard.start, shard.end)
        # Three new sessions' prompts, then a decoding session's step, queued behind one long turn.
        executor._pending = [Job(prompt, layers, c, done(f"prompt {i}"), object())
                             for i, (prompt, c) in enumerate(zip(prompts, caches))]
        executor._pending.append(Job(token(shard, 5), layers, cache, done("decode step"), session))
        executor._flush_soon()
        for _ in range(1000):
            if len(finished) == 4:
                break
            await asyncio.sleep(0.001)
        return outputs

    outputs = asyncio.run(scenario())
    # Before the budget, the step waited for all three prompts.
    assert finished == ["prompt 0", "decode step", "prompt 1", "prompt 2"]
    for i, prompt in enumerate(prompts):  # the deferred prompts lost nothing
        output, error = outputs[f"prompt {i}"]
        assert error is None and caches[i].length == 4
        torch.testing.assert_close(output, shard(prompt, [shard.new_cache(16)]), **FP32_TOLERANCE)


def test_new_prompts_of_one_length_run_as_one_batch_and_each_gets_its_own_result(shard):
    hidden_size = shard.config.hidden_size
    layers = (shard.start, shard.end)
    gen = torch.Generator().manual_seed(30)
    prompts = [torch.randn(1, length, hidden_size, generator=gen) for length in (5, 5, 3, 5)]
    results: dict[int, tuple] = {}

    def record(index):
        return lambda output, error, seconds: results.__setitem__(index, (output, error))

    executor = BatchingExecutor(shard)
    caches = [shard.new_cache(16) for _ in prompts]
    jobs = [Job(prompt, layers, cache, record(i), object()) for i, (prompt, cache) in enumerate(zip(prompts, caches))]
    forward = Job(prompts[0], layers, None, record(9))  # a whole-sequence pass: never batched with prompts
    groups, deferred = executor._plan([jobs[0], jobs[1], forward, jobs[2], jobs[3]])
    assert [[id(j) for j in g] for g in groups] == [[id(jobs[0]), id(jobs[1]), id(jobs[3])], [id(forward)], [id(jobs[2])]]
    assert deferred == []
    for group in groups:
        executor._execute(group)

    assert executor.stats.prompt_batch_sizes == {3: 1}
    assert executor.stats.batch_sizes == {1: 2} and executor.stats.max_batch == 1  # decode batching's figures
    for i, prompt in enumerate(prompts):
        output, error = results[i]
        assert error is None and caches[i].length == prompt.shape[1]
        alone = shard.new_cache(16)
        assert_hidden_close(output, shard(prompt, [alone]))
        assert_hidden_close(caches[i].keys[:, :, :caches[i].length], alone.keys[:, :, :alone.length])


class NamedStep(Step):
    """A Step that writes its name into `finished` when it finishes."""

    def __init__(self, finished: list, name: str, *args):
        self.finished, self.name = finished, name
        super().__init__(*args)

    def _done(self, output, error, seconds):
        self.finished.append(self.name)
        super()._done(output, error, seconds)


def test_decode_steps_run_between_the_pieces_of_a_long_prompt(shard, monkeypatch):
    monkeypatch.setattr(shard, "prefill_chunk_tokens", 4)
    prompt = torch.randn(1, 10, shard.config.hidden_size, generator=torch.Generator().manual_seed(3))
    finished = []

    async def scenario():
        executor = BatchingExecutor(shard)
        session, cache = new_session(shard, 1)
        long_cache = shard.new_cache(64)
        long = NamedStep(finished, "prompt", executor, object(), long_cache, prompt)
        assert long.result is None and long_cache.length == 4  # alone: its first piece ran at once
        step = NamedStep(finished, "decode step", executor, session, cache, token(shard, 5))
        await both_run(step, long)
        return executor, long.result, long_cache

    executor, (output, error), long_cache = asyncio.run(scenario())
    assert finished == ["decode step", "prompt"]  # the step did not wait for the whole prompt
    assert error is None
    assert executor.stats.batch_sizes == {1: 4}  # three pieces (4 + 4 + 2 tokens) and the step
    whole = shard.new_cache(64)
    torch.testing.assert_close(output, shard(prompt, [whole]), **FP32_TOLERANCE)
    assert long_cache.length == whole.length == 10


def test_a_long_prompt_that_fails_midway_leaves_its_session_as_it_was(shard, monkeypatch):
    monkeypatch.setattr(shard, "prefill_chunk_tokens", 4)

    async def scenario():
        executor = BatchingExecutor(shard)
        _, cache = new_session(shard, 1)  # 4 tokens already
        fail_on_call(monkeypatch, shard.blocks[0], call=2)  # the second piece
        long = Step(executor, object(), cache, torch.randn(1, 10, shard.config.hidden_size))
        await both_run(long)
        return long.result, cache

    (output, error), cache = asyncio.run(scenario())
    assert output is None and "out of memory" in str(error)
    assert cache.length == 4  # the first piece's 4 tokens were rolled back


def test_a_session_that_ends_mid_prompt_stops_costing_compute(shard, monkeypatch):
    monkeypatch.setattr(shard, "prefill_chunk_tokens", 4)

    async def scenario():
        executor = BatchingExecutor(shard)
        session = object()
        cache = shard.new_cache(64)
        long = Step(executor, session, cache, torch.randn(1, 12, shard.config.hidden_size))
        assert long.result is None and cache.length == 4  # its first piece ran; two more are queued
        executor.forget(session)  # the client closed it, or its connection was lost
        await asyncio.sleep(0.01)
        return executor, long.result, cache

    executor, (output, error), cache = asyncio.run(scenario())
    assert output is None and isinstance(error, SessionEnded)
    assert executor.stats.batches == 1  # the remaining pieces never ran
    assert cache.length == 0  # and the piece that did is rolled back
