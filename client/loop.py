"""A private asyncio event loop in a daemon thread, so the synchronous API can drive async I/O."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine


class LoopThread:
    def __init__(self, name: str = "mesh-client"):
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

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
