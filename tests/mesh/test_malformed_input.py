"""Bad data-plane input gets an error reply, and the donor keeps serving a healthy session meanwhile."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time

import pytest
import torch

from mesh.protocol import MAGIC, PREFIX, PROTOCOL_VERSION, ProtocolError, encode
from mesh.transport import Connection, RemoteError, wait_for_first
from server.donor import Donor, DonorSettings
from shards import load_edges, load_shard
from tests.conftest import FP32_TOLERANCE, random_prompt

MAX_PAYLOAD = 1 << 20


@pytest.fixture(scope="module")
def donor(model_dir):
    """A donor for layers 0:3 in this process, on its own event loop thread, without a DHT."""
    shard = load_shard(model_dir("llama"), "0:3")
    settings = DonorSettings("tiny", cache_budget_bytes=shard.cache_spec.nbytes(256), max_payload=MAX_PAYLOAD)
    instance = Donor(shard, settings, throughput=1.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    address = asyncio.run_coroutine_threadsafe(instance.start(), loop).result(10)
    yield instance, int(address.rsplit(":", 1)[1])
    asyncio.run_coroutine_threadsafe(instance.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> list[dict]:
    """Send raw bytes; return the headers of every frame the donor sends back before it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except socket.timeout:
            pass
    headers = []
    while len(received) >= PREFIX.size:
        _, _, header_len, payload_len = PREFIX.unpack(received[:PREFIX.size])
        headers.append(json.loads(received[PREFIX.size:PREFIX.size + header_len]))
        received = received[PREFIX.size + header_len + payload_len:]
    return headers


def frame(header: dict, tensors=()) -> bytes:
    return b"".join(bytes(b) for b in encode(header, list(tensors)))


@pytest.mark.parametrize("data, code, fragment", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 32, "bad_frame", "bad magic bytes"),
    (struct.pack("<4sHIQ", MAGIC, 99, 2, 0) + b"{}", "unsupported_version", "protocol version 99"),
    (struct.pack("<4sHIQ", MAGIC, PROTOCOL_VERSION, 5, 0) + b"{oops", "bad_frame", "not valid JSON"),
    (struct.pack("<4sHIQ", MAGIC, PROTOCOL_VERSION, 2, MAX_PAYLOAD + 1) + b"{}", "too_large",
     f"exceeds the limit of {MAX_PAYLOAD}"),
])
def test_unparseable_streams_get_an_error_and_are_closed(donor, data, code, fragment):
    _, port = donor
    replies = raw_exchange(port, data)
    assert len(replies) == 1
    assert replies[0]["type"] == "error" and replies[0]["code"] == code and fragment in replies[0]["message"]


def test_declared_sizes_that_do_not_match_the_payload(donor):
    _, port = donor
    header = json.dumps({"type": "forward", "id": 1, "tensors": [{"dtype": "float32", "shape": [1, 2, 64]}]}).encode()
    data = struct.pack("<4sHIQ", MAGIC, PROTOCOL_VERSION, len(header), 16) + header + b"\0" * 16
    [reply] = raw_exchange(port, data)
    assert reply["code"] == "bad_tensor" and "need 512 payload bytes, the message carries 16" in reply["message"]


def test_bad_requests_get_error_replies_while_a_healthy_session_runs(donor, model_dir):
    instance, port = donor
    path = model_dir("llama")
    embed = load_edges(path).embed
    reference = load_shard(path, "0:3")
    prompt = random_prompt(8)

    healthy = Connection.open("127.0.0.1", port)
    hostile = Connection.open("127.0.0.1", port)
    session = healthy.request({"type": "open", "start": 0, "end": 3, "max_length": 16}).header["session"]
    cache = reference.new_cache(16)
    outcomes, healthy_errors = {}, []

    def healthy_steps():  # runs in a thread, interleaved with the hostile requests below
        try:
            for position in range(8):
                hidden = embed(prompt[:, position:position + 1])
                reply = healthy.request({"type": "step", "session": session, "position": position}, [hidden])
                torch.testing.assert_close(reply.tensors[0], reference(hidden, [cache]), **FP32_TOLERANCE)
        except Exception as err:  # reported in the main thread
            healthy_errors.append(err)

    def expect(name, header, tensors=()):
        try:
            hostile.request(header, tensors, timeout=10)
            outcomes[name] = "accepted"
        except RemoteError as err:
            outcomes[name] = (err.code, err.message)

    worker = threading.Thread(target=healthy_steps)
    worker.start()
    mine = hostile.request({"type": "open", "start": 0, "end": 3, "max_length": 4}).header["session"]
    good = torch.zeros(1, 1, 64)
    expect("wrong shape", {"type": "step", "session": mine, "position": 0}, [torch.zeros(1, 1, 63)])
    expect("wrong rank", {"type": "step", "session": mine, "position": 0}, [torch.zeros(64)])
    expect("wrong dtype", {"type": "step", "session": mine, "position": 0}, [torch.zeros(1, 1, 64, dtype=torch.int64)])
    expect("no tensor", {"type": "step", "session": mine, "position": 0})
    expect("unknown session", {"type": "step", "session": "f" * 32, "position": 0}, [good])
    expect("someone else's session", {"type": "step", "session": session, "position": 0}, [good])
    expect("beyond reserved", {"type": "step", "session": mine, "position": 0}, [torch.zeros(1, 5, 64)])
    expect("bad position", {"type": "step", "session": mine, "position": 7}, [good])
    expect("layers not served", {"type": "open", "start": 2, "end": 5, "max_length": 4})
    expect("cache full", {"type": "open", "start": 0, "end": 3, "max_length": 250})
    expect("forward not a list", {"type": "step", "session": mine, "position": 0, "forward": "next"}, [good])
    expect("forward without address", {"type": "step", "session": mine, "position": 0,
                                        "forward": [{"address": "nowhere", "session": "s", "position": 0}]}, [good])
    expect("forward bad position", {"type": "step", "session": mine, "position": 0,
                                     "forward": [{"address": "127.0.0.1:1", "session": "s", "position": -1}]}, [good])
    expect("bad trace", {"type": "step", "session": mine, "position": 0, "trace": "yes"}, [good])
    expect("unknown type", {"type": "train"})
    expect("still fine", {"type": "step", "session": mine, "position": 0}, [good])
    worker.join(30)
    healthy.close()
    hostile.close()
    assert not healthy_errors, healthy_errors

    expected = {
        "wrong shape": ("bad_tensor", "must have shape [1, tokens, 64], got [1, 1, 63]"),
        "wrong rank": ("bad_tensor", "got [64]"),
        "wrong dtype": ("bad_tensor", "must be float32, float16 or bfloat16, not int64"),
        "no tensor": ("bad_tensor", "expected exactly one tensor"),
        "unknown session": ("unknown_session", "no open session"),
        "someone else's session": ("unknown_session", "on this connection"),
        "beyond reserved": ("cache_overflow", "exceeds the 4 tokens reserved"),
        "bad position": ("bad_request", "position 7 is ahead of this session's 0 tokens"),
        "layers not served": ("bad_request", "layers [2, 5) are not served here"),
        "cache full": ("cache_full", "needs"),
        "forward not a list": ("bad_request", "'forward' must be a list of 1 to 64 hops"),
        "forward without address": ("bad_request", "needs an 'address' host:port, got 'nowhere'"),
        "forward bad position": ("bad_request", "non-negative integer 'position'"),
        "bad trace": ("bad_request", "'trace' must be true or a list"),
        "unknown type": ("bad_request", "unknown message type 'train'"),
    }
    for name, (code, fragment) in expected.items():
        assert outcomes[name][0] == code and fragment in outcomes[name][1], (name, outcomes[name])
    assert outcomes["still fine"] == "accepted"
    for _ in range(50):  # both connections closed: the donor frees their sessions as it notices
        if not instance.sessions.sessions:
            break
        time.sleep(0.1)
    assert instance.sessions.sessions == {}


def test_a_next_donor_out_of_reach_is_reported_to_the_client(donor):
    """A forwarded step whose next donor cannot be reached: the client hears it on its own
    connection, as the next hop's failure, and the session still works."""
    _, port = donor
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    connection = Connection.open("127.0.0.1", port)
    try:
        session = connection.request({"type": "open", "start": 0, "end": 3, "max_length": 8}).header["session"]
        forward = [{"address": f"127.0.0.1:{closed_port}", "session": "0" * 32, "position": 0}]
        tag = connection.send({"type": "step", "session": session, "position": 0, "forward": forward},
                              [torch.zeros(1, 1, 64)])
        index, message = wait_for_first([connection], tag, timeout=15)
        assert index == 0 and message.type == "error"
        assert message.header["code"] == "unreachable" and message.header["next_hop_failed"] is True
        assert f"127.0.0.1:{closed_port}" in message.header["message"]
        reply = connection.request({"type": "step", "session": session, "position": 0}, [torch.zeros(1, 1, 64)])
        assert reply.wire[0].shape == (1, 1, 64)
    finally:
        connection.close()


def test_idle_sessions_expire(model_dir):
    from server.sessions import SessionTable

    now, ended = [0.0], []
    shard = load_shard(model_dir("llama"), "0:2")
    table = SessionTable(shard, shard.cache_spec.nbytes(100), idle_timeout=30, clock=lambda: now[0],
                         on_close=ended.append)
    owner = object()
    first = table.open(0, 2, 40, owner)
    second = table.open(0, 2, 40, owner)
    assert table.free_tokens() == 20
    now[0] = 20
    table.get(second.id, owner)  # used: its idle clock restarts
    now[0] = 35
    assert table.expire_idle() == [first.id]
    assert table.free_tokens() == 60
    assert ended == [first]  # the donor's executor hears of it (and drops the session's queued work)
    assert table.close_owned_by(owner) == 1 and ended == [first, second]
    # The owner of an expired session learns why (and that the donor is fine); a closed one is unknown.
    with pytest.raises(ProtocolError, match="closed after 30 s without a step") as caught:
        table.get(first.id, owner)
    assert caught.value.code == "session_expired"
    with pytest.raises(ProtocolError) as caught:
        table.get(second.id, owner)
    assert caught.value.code == "unknown_session"
