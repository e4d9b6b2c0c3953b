"""The donor's compute step: every forward runs here, and decode steps of sessions run batched.

Handlers submit Jobs with a completion callback. A session that is the only active one runs at
once, inside `submit`. Otherwise its step waits, until the other active sessions' steps have
queued too or for a short bounded time (see `submit`), and then one `flush` runs the queued
one-token steps over the same layers as one batch (the shard's batched step), and new prompts of
one length together too, oldest request first, resolving each job's callback. A prompt budget
bounds the prompt work of one flush: the shard's `prefill_chunk_tokens`, fewer tokens on a donor
too slow to compute that many in about two seconds (pacing.py). New prompts beyond the budget
wait for the next flush, and a longer prompt runs one piece of that size per flush, going back in
the queue between pieces (a forward of several sequences without a cache, a few rows at a time).
So a decoding session waits for a budget of new prompts and a piece of each long prompt under
way, never for a whole burst of new sessions or a whole long prompt, and the loop is never held
so long that clients take the donor for dead.

Compute runs on the event loop's thread on purpose: handing each job to a worker thread and back
cost 0.13-0.45 ms per request on the 2-core test machine (measured during development with a
throwaway echo server), more than the whole per-hop budget. A flush that runs long hands the loop
back between groups, so handshakes and pings are still answered under load.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from server.pacing import PromptPace
from shards.kv_cache import KVCache
from shards.shard import Shard


class SessionEnded(Exception):
    """A queued step's session was closed (by its client, its connection's loss, or idleness)."""


# done(output [B, T, D] or None, error or None, compute seconds of the batch)
Done = Callable[[torch.Tensor | None, Exception | None, float], None]


@dataclass(eq=False)  # jobs are told apart by identity, never by comparing their tensors
class Job:
    hidden: torch.Tensor  # [B, T, D]
    layers: tuple[int, int]
    cache: KVCache | None
    done: Done
    submitter: object = None  # the session whose step this is (None: a forward without a session)
    pieces: Iterator[torch.Tensor | None] | None = None  # a long prompt under way (Shard.in_pieces)
    piece_tokens: int = 0  # ... in pieces of this many tokens
    tokens_done: int = 0  # ... of which the pieces that ran so far held this many
    seconds: float = 0.0  # compute spent on its pieces so far

    @property
    def batchable(self) -> bool:
        return self.cache is not None and self.hidden.shape[0] == 1 and self.hidden.shape[1] == 1


@dataclass
class ComputeStats:
    jobs: int = 0
    batches: int = 0
    max_batch: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # decode batches, and forwards run alone
    prompt_batch_sizes: Counter = field(default_factory=Counter)  # new prompts of several sessions run together
    compute_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"jobs": self.jobs, "batches": self.batches, "max_batch": self.max_batch,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "prompt_batch_sizes": {str(k): v for k, v in sorted(self.prompt_batch_sizes.items())},
                "compute_seconds": round(self.compute_seconds, 6)}


MIN_ACTIVE_WINDOW = 0.01  # seconds; a session that stepped this recently (plus two batch times) is active
MAX_STRAGGLER_WAIT = 0.05  # seconds a batch may wait for active sessions whose steps are still on their way
STRAGGLER_WAIT_SHARE = 0.25  # ... and at most this share of the last batch's compute time
MAX_FLUSH_SECONDS = 0.05  # a flush that has run this long hands the loop back before its next group


class BatchingExecutor:
    def __init__(self, shard: Shard, max_batch: int = 64):
        self.shard = shard
        self.max_batch = max_batch
        self.stats = ComputeStats()
        self._pending: list[Job] = []
        self._pending_submitters: set = set()
        self._active: dict[object, float] = {}  # session -> when it last submitted a step
        self._flush_scheduled = False  # a flush is queued for the next loop iteration
        self._timer: asyncio.TimerHandle | None = None  # a flush waiting for stragglers
        self._last_compute = 0.0
        self.pace = PromptPace()  # how many prompt tokens a flush takes on (pacing.py)

    @property
    def prompt_budget(self) -> int:
        """Prompt tokens one flush takes on, and the size of a long prompt's pieces."""
        return self.pace.budget(self.shard.prefill_chunk_tokens)

    def submit(self, hidden: torch.Tensor, layers: tuple[int, int], cache: KVCache | None, done: Done,
               submitter: object = None) -> None:
        """Queue a forward; `done` is called on the event loop when it ran (or failed).

        A session that is the only active one runs at once. Otherwise the step waits for the other
        active sessions' steps (those that stepped within about two batch times): until all of them
        are queued, or for a short bounded time. Sessions answered by the same batch send their
        next steps a few milliseconds apart (their clients sample and embed first); without the
        wait, the first of them would run alone and the rest would form the next batch.
        """
        now = time.monotonic()
        self._pending.append(Job(hidden, layers, cache, done, submitter))
        if submitter is not None:
            self._active[submitter] = now
            self._pending_submitters.add(submitter)
        if self._flush_scheduled:
            return
        missing = self._missing_sessions(now)
        if missing == 0 and len(self._pending) == 1 and self._timer is None:
            alone, self._pending, self._pending_submitters = self._pending, [], set()
            self._execute(alone)  # the shortest way to the shard
            return
        if missing == 0 or submitter is None:
            self._flush_soon()
        elif self._timer is None:
            wait = min(MAX_STRAGGLER_WAIT, STRAGGLER_WAIT_SHARE * self._last_compute)
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush)

    def forget(self, submitter: object) -> None:
        """A session ended: no batch waits for it, and its queued work (a step, the rest of a long
        prompt) is dropped with an error instead of computing into a cache nobody owns."""
        self._active.pop(submitter, None)
        self._pending_submitters.discard(submitter)
        if submitter is None:
            return
        dropped = [job for job in self._pending if job.submitter is submitter]
        if dropped:
            self._pending = [job for job in self._pending if job.submitter is not submitter]
            for job in dropped:
                if job.pieces is not None:
                    job.pieces.close()  # a prompt cut short leaves nothing in the cache
                job.done(None, SessionEnded("the session was closed before this step ran"), 0.0)

    def _missing_sessions(self, now: float) -> int:
        """Active sessions whose next step is not queued yet; forgets sessions gone quiet."""
        window = MIN_ACTIVE_WINDOW + 2 * self._last_compute
        quiet = [s for s, last in self._active.items() if now - last > window]
        for submitter in quiet:
            del self._active[submitter]
        return sum(1 for s in self._active if s not in self._pending_submitters)

    def _flush_soon(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, self._pending, self._flush_scheduled = self._pending, [], False
        self._pending_submitters = set()
        started = time.perf_counter()
        groups, deferred = self._plan(jobs)
        if deferred:
            self._requeue(deferred)  # prompts over this turn's budget: the next flush, one loop turn later
        with torch.inference_mode():
            while groups:
                self._execute(groups.pop(0))
                if groups and time.perf_counter() - started > MAX_FLUSH_SECONDS:
                    # Let the loop breathe (pings, new sessions, more steps to batch), then go on.
                    self._requeue([job for group in groups for job in group])
                    return

    def _requeue(self, jobs: list[Job]) -> None:
        """Put jobs back ahead of those that came since, for a flush on the next loop turn."""
        self._pending = jobs + self._pending
        self._pending_submitters.update(job.submitter for job in jobs if job.submitter is not None)
        if not self._flush_scheduled:
            self._flush_soon()

    def _plan(self, jobs: list[Job]) -> tuple[list[list[Job]], list[Job]]:
        """Groups to run now, and the jobs left for the next flush.

        Every queued one-token step runs now, batched with the others over the same layers (up to
        max_batch). New prompts run up to `prompt_budget` tokens per flush (at least one prompt),
        in arrival order, those of one length together (_prompt_groups); the others wait for the
        next flush, so that a burst of new sessions holds up a decoding session by one budget's
        worth of prompt, not by all of them. A long prompt that already started runs
        its next piece (of that size) at every flush, whatever came since, so it is never starved.

        Oldest request first: a decode batch re-forms at every flush, and if it always went first,
        prompts queued behind it would wait for ever under load. A prompt that already ran some of
        its pieces goes last, so the steps queued with it do not wait for that piece."""
        batches: dict[tuple[int, int], list[tuple[int, Job]]] = defaultdict(list)
        new_prompts: list[tuple[int, Job]] = []
        planned: list[tuple[int, list[Job]]] = []
        for order, job in enumerate(jobs):  # `jobs` is in arrival order
            if job.batchable:
                batches[job.layers].append((order, job))
            elif job.pieces is not None:
                planned.append((order, [job]))
            else:
                new_prompts.append((order, job))
        now, deferred = self._within_prompt_budget(new_prompts)
        planned += self._prompt_groups(now)
        for batch in batches.values():
            for i in range(0, len(batch), self.max_batch):
                chunk = batch[i:i + self.max_batch]
                planned.append((chunk[0][0], [job for _, job in chunk]))
        planned.sort(key=lambda item: (item[1][0].pieces is not None, item[0]))
        return [group for _, group in planned], deferred

    def _prompt_groups(self, prompts: list[tuple[int, Job]]) -> list[tuple[int, list[Job]]]:
        """New prompts of one length over the same layers run as one batch: a burst of new sessions
        often sends prompts alike, and one wider matrix product beats many narrow ones. The budget
        already bounds their tokens together, so a batch's working memory is that of one piece.
        Forwards without a session, and prompts that run in pieces, run alone."""
        groups: dict[tuple, tuple[int, list[Job]]] = {}
        for order, job in prompts:
            alike = job.cache is not None and job.hidden.shape[0] == 1 and not self._in_pieces(job)
            key = (job.layers, job.hidden.shape[1]) if alike else (order,)
            groups.setdefault(key, (order, []))[1].append(job)
        return list(groups.values())

    def _within_prompt_budget(self, prompts: list[tuple[int, Job]]) -> tuple[list[tuple[int, Job]], list[Job]]:
        """The first prompts whose tokens fit this flush's budget (at least one), and the rest."""
        budget = self.prompt_budget
        spent = 0
        for index, (_, job) in enumerate(prompts):
            spent += min(job.hidden.shape[0] * job.hidden.shape[1], budget)  # a long prompt: its first piece
            if index > 0 and spent > budget:
                return prompts[:index], [job for _, job in prompts[index:]]  # in order: none jumps the queue
        return prompts, []

    def _execute(self, group: list[Job]) -> None:
        if len(group) == 1 and self._in_pieces(group[0]):
            return self._execute_piece(group[0])
        started = time.perf_counter()
        try:
            if len(group) == 1:
                job = group[0]
                outputs = [self.shard(job.hidden, None if job.cache is None else [job.cache], job.layers)]
            else:
                batch = torch.cat([job.hidden for job in group])
                outputs = list(self.shard(batch, [job.cache for job in group], group[0].layers).split(1))
        except Exception as err:  # reported to each request of the group; the donor keeps serving
            for job in group:
                job.done(None, err, 0.0)
            return
        prompts = group[0].hidden.shape[1] > 1
        elapsed = self._count(len(group), started, prompts=prompts)
        if prompts:
            self.pace.observe(sum(job.hidden.shape[0] * job.hidden.shape[1] for job in group), elapsed)
        self.stats.jobs += len(group)
        for job, output in zip(group, outputs):
            job.done(output, None, elapsed)

    def _in_pieces(self, job: Job) -> bool:
        """A prompt longer than the budget, or a forward of several sequences more than the budget
        together (run a few rows at a time; a single sequence without a cache cannot be cut)."""
        if job.pieces is not None:
            return True
        rows, tokens = job.hidden.shape[0], job.hidden.shape[1]
        if job.cache is not None:
            return tokens > self.prompt_budget
        return rows > 1 and rows * tokens > self.prompt_budget

    def _execute_piece(self, job: Job) -> None:
        """The next piece of a long prompt (or rows of a forward); the job goes back in the queue
        until its last piece ran."""
        if job.pieces is None:
            if job.cache is None:
                rows = max(1, self.prompt_budget // job.hidden.shape[1])
                job.piece_tokens = rows * job.hidden.shape[1]
                job.pieces = self._rows_in_pieces(job, rows)
            else:
                job.piece_tokens = self.prompt_budget
                job.pieces = self.shard.in_pieces(job.hidden, [job.cache], job.layers, job.piece_tokens)
        piece = min(job.piece_tokens, job.hidden.shape[0] * job.hidden.shape[1] - job.tokens_done)
        started = time.perf_counter()
        try:
            output = next(job.pieces)  # a failed piece rolls the whole prompt back
        except Exception as err:
            job.done(None, err, 0.0)
            return
        seconds = self._count(1, started)
        job.seconds += seconds
        job.tokens_done += piece
        self.pace.observe(piece, seconds)
        if output is None:
            self._pending.append(job)
            # The next piece waits one loop turn, so that steps which came in while this one ran
            # are read and queued first; planned behind them (_plan), they do not wait for it.
            asyncio.get_running_loop().call_soon(self._resume)
            return
        self.stats.jobs += 1
        job.done(output, None, job.seconds)

    def _rows_in_pieces(self, job: Job, rows: int) -> Iterator[torch.Tensor | None]:
        """A forward without a cache, `rows` sequences at a time; yields like Shard.in_pieces."""
        outputs = []
        for begin in range(0, job.hidden.shape[0], rows):
            outputs.append(self.shard(job.hidden[begin:begin + rows], None, job.layers))
            if begin + rows < job.hidden.shape[0]:
                yield None
        yield torch.cat(outputs)

    def _resume(self) -> None:
        if self._pending and not self._flush_scheduled:
            self._flush_soon()

    def _count(self, jobs: int, started: float, prompts: bool = False) -> float:
        """Record a forward over `jobs` requests that began at `started`; its seconds. Batches of
        several prompts are counted apart, so that batch_sizes and max_batch tell of decode batching."""
        elapsed = time.perf_counter() - started
        self._last_compute = elapsed
        self.stats.batches += 1
        if prompts and jobs > 1:
            self.stats.prompt_batch_sizes[jobs] += 1
        else:
            self.stats.max_batch = max(self.stats.max_batch, jobs)
            self.stats.batch_sizes[jobs] += 1
        self.stats.compute_seconds += elapsed
        return elapsed
