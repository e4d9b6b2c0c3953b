"""Many clients connect at once to a server whose event loop is busy: how long until each one's
first reply? The donor's listener (mesh/listener.py) beside the loop's own `create_server`, in the
same run, on the donor's loop (uvloop where installed).

A donor's loop turn can last a whole decode batch; the server here stands for it with turns that
block for --turn-ms (a sleep: the loop is held as by compute, and the clients keep the CPU). Every
client thread opens a connection at the same moment and sends a ping; the table gives the time
from its connect call to the ping's answer, and that of a second ping on the same connection (one
turn or so, for comparison).

Usage: python -m benchmarks.connect_burst [--clients 64] [--turn-ms 100] [--rounds 3]
       [--loop uvloop|asyncio] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from benchmarks.report import command_line, save
from mesh.transport import Connection, ServerConnection, start_server

TIMEOUT = 120.0  # seconds a client waits for a reply before the run counts it as lost


def ping(message, connection, respond):
    respond.ok({"type": "pong"})


async def loop_create_server(host: str, port: int):
    """The server as asyncio (or uvloop) builds it, for comparison."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ServerConnection(ping, lambda c: None, 1 << 20).protocol, host, port)


SERVERS = {"mesh listener": lambda host, port: start_server(ping, host, port, lambda c: None),
           "loop.create_server": loop_create_server}


class BusyServer:
    """A server on its own thread and loop, whose every turn blocks for `turn_seconds`."""

    def __init__(self, kind: str, loop_name: str, turn_seconds: float):
        self.kind, self.loop_name, self.turn_seconds = kind, loop_name, turn_seconds
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "BusyServer":
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("the server did not start within 30 s")
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)

    def _run(self):
        loop = new_loop(self.loop_name)
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self):
        server = await SERVERS[self.kind]("127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        loop.call_soon(self._busy_turn, loop)
        self.ready.set()
        while not self.stopping.is_set():
            await asyncio.sleep(0.05)
        server.close()

    def _busy_turn(self, loop):
        time.sleep(self.turn_seconds)
        if not self.stopping.is_set():
            loop.call_soon(self._busy_turn, loop)


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def burst(port: int, clients: int) -> tuple[list[float], list[float], int]:
    """Seconds to the first reply and to a second one, per client; and how many clients failed."""
    first, second, failed = [], [], []
    barrier = threading.Barrier(clients)

    def client():
        barrier.wait(TIMEOUT)
        started = time.perf_counter()
        try:
            connection = Connection.open("127.0.0.1", port, timeout=TIMEOUT)
            connection.request({"type": "ping"}, timeout=TIMEOUT)
            answered = time.perf_counter()
            connection.request({"type": "ping"}, timeout=TIMEOUT)
            first.append(answered - started)
            second.append(time.perf_counter() - answered)
            connection.close()
        except (OSError, TimeoutError):
            failed.append(1)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + 10)
    return first, second, len(failed)


def measure(kind: str, args) -> dict:
    first, second, failed = [], [], 0
    with BusyServer(kind, args.loop, args.turn_ms / 1000) as server:
        for _ in range(args.rounds):
            f, s, lost = burst(server.port, args.clients)
            first += f
            second += s
            failed += lost
    return {"server": kind, "loop": args.loop, "clients": args.clients, "turn_ms": args.turn_ms,
            "rounds": args.rounds, "failed": failed,
            "first_reply_p50_ms": _ms(statistics.median, first), "first_reply_max_ms": _ms(max, first),
            "second_reply_p50_ms": _ms(statistics.median, second), "second_reply_max_ms": _ms(max, second)}


def _ms(statistic, seconds: list[float]) -> float:
    return 1000 * statistic(seconds) if seconds else float("nan")  # nan: every client failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64, help="clients that connect at the same moment")
    parser.add_argument("--turn-ms", type=float, default=100.0, help="how long each turn of the server's loop blocks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default=default_loop())
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = [measure(kind, args) for kind in SERVERS]
    for row in rows:
        row["slowest_first_reply_vs_listener"] = row["first_reply_max_ms"] / rows[0]["first_reply_max_ms"]
    command = command_line(argv, "benchmarks.connect_burst")
    print(f"\ncommand: {command}\n{args.clients} clients connect at once, {args.rounds} times, to a server on "
          f"{args.loop} whose loop turns each block {args.turn_ms:g} ms")
    print(f"{'server':<20} {'first reply p50 ms':>19} {'max ms':>9} {'second p50 ms':>14} {'max ms':>9} {'failed':>7}")
    for r in rows:
        print(f"{r['server']:<20} {r['first_reply_p50_ms']:>19.1f} {r['first_reply_max_ms']:>9.1f} "
              f"{r['second_reply_p50_ms']:>14.1f} {r['second_reply_max_ms']:>9.1f} {r['failed']:>7}")
    print(f"slowest first reply, loop.create_server / mesh listener: {rows[1]['slowest_first_reply_vs_listener']:.1f}x")
    save(args.json, command, rows)
    return 0


def default_loop() -> str:
    """The loop a donor runs (transport.install_fast_event_loop): uvloop where it is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


if __name__ == "__main__":
    raise SystemExit(main())
