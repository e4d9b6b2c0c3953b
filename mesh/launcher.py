"""Start `mesh` processes on this machine and stop them again: for tests, benchmarks and `mesh up`.

Each process is a `python -m mesh.cli ...` child (or another module's, for benchmarks); its output
is read by a thread so it never blocks on a full pipe, and lines are kept for waiting on readiness
markers and for error reports. Every process is stopped by its own PID (SIGTERM, then SIGKILL after
a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class LaunchError(RuntimeError):
    """A child process exited or stayed silent instead of becoming ready."""


class ManagedProcess:
    def __init__(self, name: str, args: list[str], env: dict | None = None, module: str = "mesh.cli"):
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, "-u", "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first output line starting with `prefix`; LaunchError if the process dies or times out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise LaunchError(f"{self.name} exited with code {self.popen.returncode}:\n{self.output()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LaunchError(f"{self.name} was not ready after {timeout:.0f}s:\n{self.output()}")
                self._cond.wait(min(remaining, 0.5))

    def output(self, last: int = 40) -> str:
        return "\n".join(self.lines[-last:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the process and its helpers (hivemind's DHT process and daemon), as a crash would."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a graceful goodbye), SIGKILL after `grace`; then sweep any helper left in its group."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def _signal_group(self, sig: int) -> None:
        # The child leads its own session (start_new_session), so its group id is its own PID.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class DonorProcess:
    process: ManagedProcess
    address: str
    peer_id: str
    start: int
    end: int

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


@dataclass
class LocalSwarm:
    """A bootstrap DHT node and donors on 127.0.0.1."""

    ready_timeout: float = 120.0
    dht: ManagedProcess | None = None
    initial_peers: list[str] = field(default_factory=list)
    donors: list[DonorProcess] = field(default_factory=list)
    gateways: list[ManagedProcess] = field(default_factory=list)
    launched: list[ManagedProcess] = field(default_factory=list)  # every donor process, ready or not

    def start_dht(self) -> list[str]:
        self.dht = ManagedProcess("dht", ["dht", "--host", "127.0.0.1"])
        line = self.dht.wait_for_line("MESH_DHT_READY", self.ready_timeout)
        self.initial_peers = line.split()[1:]
        return self.initial_peers

    def launch_donor(self, model: str, layers: str, *extra: str, name: str | None = None,
                     env: dict | None = None) -> ManagedProcess:
        """Start a donor without waiting; pair with `wait_donor`, so several can load at once."""
        args = ["serve", "--model", model, "--layers", layers, "--host", "127.0.0.1",
                "--initial-peers", *self.initial_peers, *extra]
        process = ManagedProcess(name or f"donor[{layers}]", args, env)
        self.launched.append(process)  # stopped by stop() even if it never becomes ready
        return process

    def wait_donor(self, process: ManagedProcess) -> DonorProcess:
        line = process.wait_for_line("MESH_READY", self.ready_timeout)
        info = json.loads(line.split(" ", 1)[1])
        donor = DonorProcess(process, info["address"], info["peer_id"], info["start"], info["end"])
        self.donors.append(donor)
        return donor

    def start_donors(self, model: str, ranges: list[str], *extra: str, env: dict | None = None,
                     on_ready: Callable[[DonorProcess], None] | None = None) -> list[DonorProcess]:
        """Launch one donor per range (they load at the same time), then wait for each in turn."""
        launched = [self.launch_donor(model, r, *extra, env=env) for r in ranges]
        ready = []
        for process in launched:
            ready.append(self.wait_donor(process))
            if on_ready is not None:
                on_ready(ready[-1])
        return ready

    def start_gateway(self, model: str, port: int = 0, *extra: str) -> tuple[ManagedProcess, str]:
        """`mesh gateway` on 127.0.0.1; returns the process and its /v1 base URL once it serves."""
        process = ManagedProcess("gateway", ["gateway", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                                             "--initial-peers", *self.initial_peers, *extra])
        self.gateways.append(process)
        line = process.wait_for_line("MESH_GATEWAY_READY", self.ready_timeout)
        return process, line.split()[1]

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        self.gateways.clear()
        for process in self.launched:
            process.stop()
        self.launched.clear()
        self.donors.clear()
        if self.dht is not None:
            self.dht.stop()
            self.dht = None

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
