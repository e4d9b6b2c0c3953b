"""The floor under the hop latency: the same chain of processes, passing bytes and nothing else.

`hop_latency` measures what the mesh adds per hop. Part of that is not the mesh's at all: waking a
process that sat idle while the others computed, and moving a few hundred bytes through the
kernel. This module measures that part alone, with the same shape as a forwarded step: the client
sends a frame to relay 1, each relay busy-waits as long as a donor computes its slice, then hands
the frame to the next, and the last one answers the client. Relays are bare asyncio processes (the
standard library only); each appends (received, sent, worked) perf_counter stamps to the frame, so
the floor splits into the same segments as the mesh's trace.

A relay, on its own: python -m benchmarks.bare_relay --next HOST:PORT --work-us N
(it listens on a free port of 127.0.0.1 and prints "relay listening on PORT").
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
import time

from mesh.launcher import ManagedProcess

LENGTH = struct.Struct("<I")
STAMPS = struct.Struct("<ddd")  # received, sent, seconds spent in the busy wait
CONNECT_TIMEOUT = 20.0  # seconds a relay keeps trying to reach the next one


def busy_wait(seconds: float) -> float:
    """Stay on the CPU for `seconds`, like a donor's compute; returns the time actually spent."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass
    return time.perf_counter() - started


class Relay(asyncio.Protocol):
    """Receives length-prefixed frames, works, stamps, and writes them on to `downstream`."""

    def __init__(self, downstream: asyncio.Transport, work_seconds: float):
        self.downstream, self.work_seconds = downstream, work_seconds
        self.buffer = bytearray()

    def connection_made(self, transport):
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < LENGTH.size + length:
                return
            received = time.perf_counter()
            frame = self.buffer[LENGTH.size:LENGTH.size + length]
            del self.buffer[:LENGTH.size + length]
            worked = busy_wait(self.work_seconds)
            frame += STAMPS.pack(received, time.perf_counter(), worked)
            self.downstream.write(LENGTH.pack(len(frame)) + frame)


async def serve_relay(next_address: str, work_seconds: float) -> None:
    host, port = next_address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            downstream, _ = await loop.create_connection(asyncio.Protocol, host, int(port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    downstream.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = await loop.create_server(lambda: Relay(downstream, work_seconds), "127.0.0.1", 0)
    print(f"relay listening on {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


class BareChain:
    """`hops` relays in a chain that ends at this process; a context manager that stops them by PID."""

    def __init__(self, hops: int, work_seconds: float):
        self.hops, self.work_seconds = hops, work_seconds
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> "BareChain":
        self.listener = socket.create_server(("127.0.0.1", 0))
        next_address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        try:
            # Started last relay first: each one connects to the next as soon as it starts.
            for index in reversed(range(self.hops)):
                process = ManagedProcess(f"relay-{index}", ["--next", next_address,
                                                            "--work-us", str(int(self.work_seconds * 1e6))],
                                         module="benchmarks.bare_relay")
                self.processes.append(process)
                port = process.wait_for_line("relay listening on", timeout=30).rsplit(" ", 1)[1]
                next_address = f"127.0.0.1:{port}"
                if index == self.hops - 1:
                    self.listener.settimeout(30)
                    self.inbound, _ = self.listener.accept()
            self.outbound = socket.create_connection(("127.0.0.1", int(port)), timeout=30)
            for sock in (self.inbound, self.outbound):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(30)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def step(self, payload: bytes) -> tuple[float, float, list[tuple[float, float, float]]]:
        """Send one frame around the chain: (sent, answered, each relay's stamps)."""
        started = time.perf_counter()
        self.outbound.sendall(LENGTH.pack(len(payload)) + payload)
        data = bytearray()
        while len(data) < LENGTH.size or len(data) < LENGTH.size + LENGTH.unpack_from(data)[0]:
            chunk = self.inbound.recv(1 << 16)
            if not chunk:
                raise ConnectionError("a relay closed the chain")
            data += chunk
        finished = time.perf_counter()
        tail = data[LENGTH.size + len(payload):]
        return started, finished, [STAMPS.unpack_from(tail, i * STAMPS.size) for i in range(self.hops)]

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.stop(grace=5)
        for sock in (getattr(self, "outbound", None), getattr(self, "inbound", None), self.listener):
            if sock is not None:
                sock.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--next", required=True, help="HOST:PORT of the next relay (or of the client)")
    parser.add_argument("--work-us", type=int, default=0, help="microseconds of busy work per frame")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve_relay(args.next, args.work_us / 1e6))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
