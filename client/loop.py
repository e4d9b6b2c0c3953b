"""A private asyncio event loop in a daemon thread, so the synchronous API can drive async I/O."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator

_END = object()


class LoopThread:
    def __init__(self, name: str = "mesh-client"):
        try:
            import uvloop  # cheaper wakeups than the default loop; see mesh.transport

            self.loop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine, timeout: float | None = None):
        """Run `coro` on the loop and wait for its result from this (another) thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def iterate(self, source: AsyncIterator) -> Iterator:
        """Drive an async iterator on the loop; yield its items here as they come. Closing this
        iterator early cancels the producer (and so closes whatever it opened)."""
        items: queue.SimpleQueue = queue.SimpleQueue()

        async def produce():
            try:
                async for item in source:
                    items.put(item)
            except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
                items.put(_Failure(err))
            finally:
                items.put(_END)

        future = asyncio.run_coroutine_threadsafe(produce(), self.loop)
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            if not future.done():
                future.cancel()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
