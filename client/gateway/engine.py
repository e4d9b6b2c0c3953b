"""Runs generations for the async HTTP handlers: each generation in a worker thread (the mesh client
blocks on sockets), its events handed to the event loop through a queue.

A generation first opens its donor sessions; `started()` returns only then, so a request that
cannot be routed gets its error status before any byte of a stream is sent. `cancel()` (a client
that went away) stops the worker at the next step, which closes the donors' sessions.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from client import MeshModel, SamplingParams

_OPENED, _TOKEN, _PROMPT, _END, _ERROR = "opened", "token", "prompt", "end", "error"


@dataclass
class GenerationRequest:
    ids: list[int]
    max_tokens: int
    params: SamplingParams
    logprobs: int | None = None
    prompt_logprobs: bool = False


class Generation:
    def __init__(self, engine: "Engine", request: GenerationRequest):
        self.request = request
        self.prompt_logprobs: list[float | None] | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()
        self._opened = False
        self._ended = False
        engine.pool.submit(self._run, engine.model)

    def _push(self, kind: str, value=None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))

    def _run(self, model: MeshModel) -> None:
        r = self.request
        try:
            events = model.stream_events(
                r.ids, r.max_tokens, r.params, logprobs=r.logprobs,
                on_session=lambda session: self._push(_OPENED),
                on_prompt_logprobs=(lambda lps: self._push(_PROMPT, lps)) if r.prompt_logprobs else None)
            for event in events:
                self._push(_TOKEN, event)
                if self._cancel.is_set():
                    events.close()  # closes the donors' sessions now
                    break
            self._push(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the request's handler
            self._push(_ERROR, err)

    async def started(self) -> None:
        """Wait until the donors accepted the session; raises what prevented it."""
        while not self._opened:
            kind, value = await self._queue.get()
            if kind == _ERROR:
                raise value
            self._opened = kind == _OPENED
            if kind == _END:
                self._ended = True
                return

    async def events(self):
        """TokenEvents as they come; raises the generation's error, if any."""
        await self.started()
        while not self._ended:
            kind, value = await self._queue.get()
            if kind == _TOKEN:
                yield value
            elif kind == _PROMPT:
                self.prompt_logprobs = value
            elif kind == _ERROR:
                raise value
            elif kind == _END:
                self._ended = True

    def cancel(self) -> None:
        self._cancel.set()


class Engine:
    def __init__(self, model: MeshModel, max_concurrency: int = 64):
        self.model = model
        self.tokenizer = model.tokenizer
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="generation")

    def generate(self, request: GenerationRequest) -> Generation:
        return Generation(self, request)

    def has_route(self) -> bool:
        try:
            self.model.swarm.route(0, self.model.swarm.num_layers, timeout=0)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

