"""The donor's compute loop: one thread that runs every forward, batching decode steps.

The event loop only parses and validates; each accepted request becomes a Job. The compute thread
takes every job waiting, runs the one-token steps of sessions over the same layers as one batch
(the shard's batched step), runs the rest one by one, and hands results back to the event loop.
While a batch runs, new requests queue, so batches grow with load without any timer.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from shards.kv_cache import KVCache
from shards.shard import Shard


@dataclass
class Job:
    hidden: torch.Tensor  # [B, T, D]
    layers: tuple[int, int]
    cache: KVCache | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    compute_seconds: float = 0.0

    @property
    def batchable(self) -> bool:
        return self.cache is not None and self.hidden.shape[0] == 1 and self.hidden.shape[1] == 1


@dataclass
class ComputeStats:
    jobs: int = 0
    batches: int = 0
    max_batch: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    compute_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"jobs": self.jobs, "batches": self.batches, "max_batch": self.max_batch,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "compute_seconds": round(self.compute_seconds, 6)}


class ComputeWorker:
    def __init__(self, shard: Shard, max_batch: int = 64):
        self.shard = shard
        self.max_batch = max_batch
        self.stats = ComputeStats()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mesh-compute", daemon=True)
        self._thread.start()

    async def run(self, hidden: torch.Tensor, layers: tuple[int, int], cache: KVCache | None) -> tuple[torch.Tensor, float]:
        """Output hidden states and the compute seconds they took (a batch's time, for a batched step)."""
        loop = asyncio.get_running_loop()
        job = Job(hidden, layers, cache, loop.create_future(), loop)
        self._queue.put(job)
        output = await job.future
        return output, job.compute_seconds

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while (first := self._queue.get()) is not None:
            jobs = [first]
            while len(jobs) < 4 * self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # stop after this round
                    break
                jobs.append(job)
            for group in self._plan(jobs):
                self._execute(group)

    def _plan(self, jobs: list[Job]) -> list[list[Job]]:
        groups: dict[tuple[int, int], list[Job]] = defaultdict(list)
        singles = []
        for job in jobs:
            (groups[job.layers] if job.batchable else singles).append(job)
        planned = []
        for group in groups.values():
            planned.extend(group[i:i + self.max_batch] for i in range(0, len(group), self.max_batch))
        return planned + [[job] for job in singles]

    def _execute(self, group: list[Job]) -> None:
        started = time.perf_counter()
        try:
            if len(group) == 1:
                job = group[0]
                outputs = [self.shard(job.hidden, None if job.cache is None else [job.cache], job.layers)]
            else:
                batch = torch.cat([job.hidden for job in group])
                outputs = list(self.shard(batch, [job.cache for job in group], group[0].layers).split(1))
        except Exception as err:  # reported to each waiting request; the worker keeps serving
            for job in group:
                job.loop.call_soon_threadsafe(_set_exception, job.future, err)
            return
        elapsed = time.perf_counter() - started
        self.stats.jobs += len(group)
        self.stats.batches += 1
        self.stats.max_batch = max(self.stats.max_batch, len(group))
        self.stats.batch_sizes[len(group)] += 1
        self.stats.compute_seconds += elapsed
        for job, output in zip(group, outputs):
            job.compute_seconds = elapsed
            job.loop.call_soon_threadsafe(_set_result, job.future, output)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
