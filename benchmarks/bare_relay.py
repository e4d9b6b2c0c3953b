"""The floor under the hop latency: the same chain of processes, passing bytes and nothing else.

`hop_latency` measures what the mesh adds per hop. Part of that is not the mesh's at all: waking a
process that sat idle while the others computed, and moving a few hundred bytes through the
kernel. This module measures that part alone, with the same shape as a forwarded step: the client
sends a frame to relay 1, each relay busy-waits as long as a donor computes its slice, then hands
the frame to the next, and the last one answers the client. Relays are bare asyncio processes (the
standard library only); each appends (received, sent, worked) perf_counter stamps to the frame, so
the floor splits into the same segments as the mesh's trace.

The floor on its own, for chains of 1, 2 and 4 relays:

    python -m benchmarks.bare_relay [--hops 1,2,4] [--work-us 2500] [--steps 300]

prints the added latency per hop and the median crossing from one process to the next. One relay
(what the chain starts): python -m benchmarks.bare_relay --next HOST:PORT --work-us N; it listens
on a free port of 127.0.0.1 and prints "relay listening on PORT".
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import struct
import sys
import time

from benchmarks.report import command_line, save
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


def measure_chain(hops: int, work_seconds: float, steps: int, payload_bytes: int) -> dict:
    """The floor on its own: per hop, the median of (round trip - busy waits) / hops, and the median
    of a crossing from one process to the next (hops + 1 of them per step)."""
    payload, added, crossings = bytes(payload_bytes), [], []
    with BareChain(hops, work_seconds) as chain:
        for index in range(steps + 20):
            started, finished, stamps = chain.step(payload)
            if index < 20:
                continue  # warm-up
            added.append((finished - started - sum(worked for _, _, worked in stamps)) / hops)
            gaps = [stamps[i + 1][0] - stamps[i][1] for i in range(hops - 1)]
            crossings.append((stamps[0][0] - started + sum(gaps) + finished - stamps[-1][1]) / (hops + 1))
    return {"hops": hops, "work_us": work_seconds * 1e6, "added_per_hop_ms": statistics.median(added) * 1000,
            "crossing_us": statistics.median(crossings) * 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--next", help="run one relay that hands frames to HOST:PORT (the next relay or the "
                                       "client); without it, time a whole chain from this process")
    parser.add_argument("--work-us", type=int, default=0, help="microseconds of busy work per frame")
    parser.add_argument("--hops", default="1,2,4", help="chain: comma-separated relay counts")
    parser.add_argument("--steps", type=int, default=300, help="chain: frames timed per relay count")
    parser.add_argument("--bytes", type=int, default=456, help="chain: frame size (a decode step of hidden 64)")
    parser.add_argument("--json", help="chain: write the results here")
    args = parser.parse_args(argv)
    if args.next:
        try:
            asyncio.run(serve_relay(args.next, args.work_us / 1e6))
        except KeyboardInterrupt:
            pass
        return 0
    rows = [measure_chain(int(k), args.work_us / 1e6, args.steps, args.bytes) for k in args.hops.split(",")]
    command = command_line(argv, "benchmarks.bare_relay")
    print(f"\ncommand: {command}")
    print(f"{'relays':>6} {'busy us':>8} {'added/hop ms':>13} {'crossing us':>12}")
    for row in rows:
        print(f"{row['hops']:>6} {row['work_us']:>8.0f} {row['added_per_hop_ms']:>13.3f} {row['crossing_us']:>12.1f}")
    save(args.json, command, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
