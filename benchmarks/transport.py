"""Round trip and bandwidth of the data plane, beside the hivemind libp2p daemon's streams.

Both run on loopback in this run: our frames (blocking client, asyncio + uvloop server in another
process, echoing a float32 tensor) and a hivemind P2P binary stream between two daemons (echoing
the same bytes, length-prefixed). Message sizes: 8 KB, 1 MB, 16 MB.

Usage: python -m benchmarks.transport [--sizes 8192,1048576,16777216] [--seconds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import command_line, save


def serve_echo() -> None:
    """Child process: an echo server on our transport; prints its port."""
    from mesh.transport import install_fast_event_loop, start_server

    def echo(message, connection, respond):
        respond.ok({"type": "echo"}, message.tensors)

    async def main():
        server = await start_server(echo, "127.0.0.1", 0, lambda c: None, max_payload=1 << 30)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    install_fast_event_loop()
    asyncio.run(main())


def time_calls(call, seconds: float, min_calls: int = 5) -> list[float]:
    call()  # warm-up
    times, deadline = [], time.monotonic() + seconds
    while len(times) < min_calls or time.monotonic() < deadline:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def measure_mesh(sizes: list[int], seconds: float) -> dict[int, float]:
    from mesh.transport import Connection

    root = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-m", "benchmarks.transport", "--serve"], stdout=subprocess.PIPE,
                             text=True, cwd=root)
    try:
        connection = Connection.open("127.0.0.1", int(child.stdout.readline()), max_payload=1 << 30)
        results = {}
        for size in sizes:
            tensor = torch.randn(size // 4)
            results[size] = statistics.median(time_calls(
                lambda: connection.request({"type": "echo"}, [tensor], timeout=60), seconds))
        connection.close()
        return results
    finally:
        child.kill()
        child.wait()


async def _measure_hivemind(sizes: list[int], seconds: float) -> dict[int, float]:
    from hivemind.p2p import P2P

    server, client = await P2P.create(), None
    try:
        async def echo(info, reader, writer):
            try:
                while True:
                    (length,) = struct.unpack("<Q", await reader.readexactly(8))
                    writer.write(struct.pack("<Q", length) + await reader.readexactly(length))
                    await writer.drain()
            except asyncio.IncompleteReadError:
                pass

        await server.add_binary_stream_handler("echo", echo)
        client = await P2P.create(initial_peers=await server.get_visible_maddrs())
        _, reader, writer = await client.call_binary_stream_handler(server.peer_id, "echo")
        results = {}
        for size in sizes:
            payload = bytes(size)
            times = []
            deadline = time.monotonic() + seconds
            for attempt in range(1_000_000):
                started = time.perf_counter()
                writer.write(struct.pack("<Q", size) + payload)
                await writer.drain()
                (length,) = struct.unpack("<Q", await reader.readexactly(8))
                await reader.readexactly(length)
                if attempt:  # the first is a warm-up
                    times.append(time.perf_counter() - started)
                if len(times) >= 5 and time.monotonic() > deadline:
                    break
            results[size] = statistics.median(times)
        writer.close()
        return results
    finally:
        if client is not None:
            await client.shutdown()
        await server.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8192,1048576,16777216", help="message sizes in bytes")
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent per size and transport")
    parser.add_argument("--no-hivemind", action="store_true", help="skip the libp2p daemon comparison")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_echo()
        return 0
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    mesh = measure_mesh(sizes, args.seconds)
    hive = {} if args.no_hivemind else asyncio.run(_measure_hivemind(sizes, args.seconds))
    command = command_line(argv, "benchmarks.transport")
    print(f"\ncommand: {command}")
    print(f"{'size':>10} {'mesh RTT ms':>12} {'mesh MB/s':>10} {'libp2p RTT ms':>14} {'libp2p MB/s':>12} {'speed-up':>9}")
    rows = []
    for size in sizes:
        mine, theirs = mesh[size], hive.get(size)
        row = {"bytes": size, "mesh_rtt_ms": mine * 1000, "mesh_mb_per_s": 2 * size / mine / 1e6,
               "libp2p_rtt_ms": theirs and theirs * 1000,
               "libp2p_mb_per_s": theirs and 2 * size / theirs / 1e6}
        rows.append(row)
        other = (f"{row['libp2p_rtt_ms']:>14.3f} {row['libp2p_mb_per_s']:>12.0f} {theirs / mine:>8.1f}x"
                 if theirs else f"{'-':>14} {'-':>12} {'-':>9}")
        print(f"{size:>10} {row['mesh_rtt_ms']:>12.3f} {row['mesh_mb_per_s']:>10.0f} {other}")
    print("MB/s counts the bytes of both directions of a round trip.")
    save(args.json, command, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
