"""The control plane: a hivemind DHT node, and reading and writing our records in it.

hivemind is imported here, lazily, so that importing the client or `mesh --help` stays fast.
Records live under one key per model with the donor's peer id as subkey; each carries an
expiration time, so a donor that dies silently disappears once its last heartbeat expires.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from dataclasses import dataclass

from mesh.records import MODELS_KEY, DonorRecord, ModelInfo, model_key


def quiet_hivemind_logs() -> None:
    """hivemind logs every peer it meets at INFO; a donor's console is for our lines."""
    logging.getLogger("hivemind").setLevel(logging.WARNING)


class DHTError(RuntimeError):
    """The DHT node could not start: a malformed address, peers that do not answer, a port in use, an
    unusable identity file. Its message says which, for people."""


def start_dht(initial_peers: list[str] | None = None, host: str = "0.0.0.0", port: int = 0,
              client_mode: bool = False, identity_path: str | None = None, announce_host: str | None = None):
    """A running DHT node. `client_mode` nodes can read and write but do not serve others' records."""
    from mesh.listener import ensure_port_free

    if not client_mode:
        try:
            ensure_port_free(host, port, "the DHT")
        except OSError as err:
            in_use = err.errno == errno.EADDRINUSE
            raise DHTError(err.strerror if in_use else f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        return _start_hivemind_dht(initial_peers, host, port, client_mode, identity_path, announce_host)
    except (OSError, ValueError) as err:
        raise DHTError(f"cannot start the DHT node: {err}") from None
    except Exception as err:
        if type(err).__name__ != "P2PDaemonError":  # hivemind's, not imported here for one isinstance
            raise
        raise DHTError(_daemon_failure(str(err))) from None


def _daemon_failure(message: str) -> str:
    """The libp2p daemon's complaint without its prefix and time stamp, and what to do about it."""
    reason = re.sub(r"^Daemon failed to start:\s*(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s*)?", "", message.strip())
    if "failed to connect to bootstrap peers" in reason:
        return ("none of the initial peers answered: check the addresses (as `mesh dht` printed them) and "
                "that the node behind them runs and can be reached")
    if "multiaddr" in reason:
        return f"a malformed address ({reason}); addresses look like /ip4/1.2.3.4/tcp/31337/p2p/Qm..."
    return f"cannot start the DHT node: {reason}"


def _start_hivemind_dht(initial_peers, host, port, client_mode, identity_path, announce_host):
    import hivemind

    quiet_hivemind_logs()
    kwargs = dict(initial_peers=list(initial_peers or []), start=True, client_mode=client_mode)
    if not client_mode:
        kwargs["host_maddrs"] = [f"/ip4/{host}/tcp/{port}"]
        if announce_host:
            kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    if identity_path:
        kwargs["identity_path"] = identity_path
    # A serving node (a donor's, `mesh dht`) is started from the main thread of a process that lives
    # as long as it: it can die with that process. A client's may be started from any thread, and the
    # kernel's parent-death signal follows the starting thread, not the process.
    if not client_mode and threading.current_thread() is threading.main_thread():
        from mesh.lifetime import dying_with_its_parent

        return dying_with_its_parent(hivemind.DHT)(**kwargs)
    return hivemind.DHT(**kwargs)


def visible_addresses(dht) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


def dht_time() -> float:
    from hivemind.utils import get_dht_time

    return get_dht_time()


def announce(dht, record: DonorRecord, num_layers: int, ttl: float) -> bool:
    """Store (or refresh) the donor's record and its model's info; both expire after `ttl` seconds."""
    expiration = dht_time() + ttl
    stored = dht.store(model_key(record.model), subkey=record.peer_id, value=record.to_dict(),
                       expiration_time=expiration)
    dht.store(MODELS_KEY, subkey=record.model, value={"model": record.model, "num_layers": num_layers},
              expiration_time=expiration)
    return bool(stored)


def withdraw(dht, record: DonorRecord) -> None:
    """Replace the record by a tombstone (a newer value of None) so readers drop it at once."""
    dht.store(model_key(record.model), subkey=record.peer_id, value=None, expiration_time=dht_time() + 60)


@dataclass(frozen=True)
class Announcement:
    """What one donor last stored under a model's key, and until when (DHT time) it holds."""

    peer_id: str
    record: DonorRecord | None  # None: withdrawn, or not a record this version can read
    expires_at: float


def fetch_announcements(dht, model_id: str) -> list[Announcement]:
    """Every donor's entry under the model's key that the DHT returned. A read can come back
    incomplete: while a peer of the DHT is frozen, lookups wait for it, time out, and return only
    part of the entries, or none (client/swarm.py keeps what it saw until it expires)."""
    found = dht.get(model_key(model_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    announcements = []
    for peer_id, entry in found.value.items():
        record = DonorRecord.from_dict(getattr(entry, "value", None))
        if record is not None and record.peer_id != peer_id:
            record = None
        announcements.append(Announcement(peer_id, record, float(getattr(entry, "expiration_time", 0.0))))
    return announcements


def fetch_records(dht, model_id: str) -> list[DonorRecord]:
    """Live donor records of a model; unreadable or withdrawn ones are skipped."""
    return [a.record for a in fetch_announcements(dht, model_id) if a.record is not None]


def fetch_models(dht) -> list[ModelInfo]:
    found = dht.get(MODELS_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    infos = [ModelInfo.from_dict(getattr(entry, "value", None)) for entry in found.value.values()]
    return sorted((i for i in infos if i is not None), key=lambda i: i.model)


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """Poll `predicate()` until it returns something truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
