"""A test server on its own event loop in a daemon thread: `with` starts it and waits until its
`_main` coroutine says it is ready (`self.ready.set()`)."""

from __future__ import annotations

import asyncio
import threading


class ServerThread:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.stop()
        self.thread.join(10)

    def stop(self) -> None:
        raise NotImplementedError  # tell _main to return, from another thread

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self):
        raise NotImplementedError
