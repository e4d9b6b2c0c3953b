"""The data-plane frame format: round trips, limits, and refusal of malformed input."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from mesh.protocol import (
    MAGIC,
    PREFIX,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_header,
    decode_tensors,
    encode,
    parse_prefix,
)
from mesh.transport import FrameProtocol


def roundtrip(header, tensors, chunk: int | None = None):
    """Encode, then feed the bytes to a FrameProtocol in chunks of `chunk` bytes."""
    data = b"".join(bytes(b) for b in encode(header, tensors))
    received, errors = [], []
    protocol = FrameProtocol(received.append, errors.append, lambda exc: None, max_payload=1 << 26)
    step = chunk or len(data)
    for offset in range(0, len(data), step):
        piece = data[offset:offset + step]
        while piece:
            buffer = protocol.get_buffer(len(piece))
            n = min(len(buffer), len(piece))
            buffer[:n] = piece[:n]
            protocol.buffer_updated(n)
            piece = piece[n:]
    assert not errors
    return received


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_tensors_survive_the_wire_exactly(dtype, chunk):
    tensors = [torch.randn(2, 3, 5).to(dtype), torch.arange(7).to(dtype), torch.empty(0, 4, dtype=dtype)]
    [message] = roundtrip({"type": "step", "id": 3, "session": "s"}, tensors, chunk)
    assert message.header["type"] == "step" and message.header["session"] == "s"
    assert len(message.tensors) == 3
    for got, sent in zip(message.tensors, tensors):
        assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)


def test_large_payloads_bypass_the_staging_buffer_and_back_to_back_frames_split():
    big = torch.randn(1, 300, 512)  # 600 KB, larger than the staging buffer
    frames = encode({"type": "a"}, [big]) + encode({"type": "b"}) + encode({"type": "c"}, [torch.ones(3)])
    data = b"".join(bytes(b) for b in frames)
    received = []
    protocol = FrameProtocol(received.append, pytest.fail, lambda exc: None, max_payload=1 << 26)
    while data:
        buffer = protocol.get_buffer(-1)
        n = min(len(buffer), len(data), 40000)
        buffer[:n] = data[:n]
        protocol.buffer_updated(n)
        data = data[n:]
    assert [m.type for m in received] == ["a", "b", "c"]
    assert torch.equal(received[0].tensors[0], big) and torch.equal(received[2].tensors[0], torch.ones(3))


def test_prefix_checks():
    good = PREFIX.pack(MAGIC, PROTOCOL_VERSION, 10, 100)
    assert parse_prefix(good, 0, 1000) == (10, 100)
    assert parse_prefix(b"junk" + good, 4, 1000) == (10, 100)
    for prefix, code in [(PREFIX.pack(b"HTTP", PROTOCOL_VERSION, 10, 0), "bad_frame"),
                         (PREFIX.pack(MAGIC, 2, 10, 0), "unsupported_version"),
                         (PREFIX.pack(MAGIC, PROTOCOL_VERSION, 1 << 20, 0), "too_large"),
                         (PREFIX.pack(MAGIC, PROTOCOL_VERSION, 10, 1001), "too_large")]:
        with pytest.raises(ProtocolError) as err:
            parse_prefix(prefix, 0, 1000)
        assert err.value.code == code and err.value.fatal


@pytest.mark.parametrize("specs, fragment", [
    ([{"dtype": "complex64", "shape": [1]}], "dtype 'complex64' is not one of"),
    ([{"dtype": "float32", "shape": [-1]}], "non-negative integers"),
    ([{"dtype": "float32", "shape": [True]}], "non-negative integers"),
    ([{"dtype": "float32", "shape": "1,2"}], "non-negative integers"),
    (["float32"], "expected an object"),
    ([{"dtype": "float32", "shape": [3]}], "need 12 payload bytes, the message carries 8"),
    ({"dtype": "float32"}, "must be a list"),
])
def test_tensor_specs_are_validated_before_use(specs, fragment):
    with pytest.raises(ProtocolError, match=fragment) as err:
        decode_tensors({"type": "x", "tensors": specs}, bytearray(8))
    assert err.value.code == "bad_tensor" and not err.value.fatal


def test_headers_must_be_objects_with_a_type():
    with pytest.raises(ProtocolError, match="'type'"):
        decode_header(json.dumps([1, 2]).encode())
    with pytest.raises(ProtocolError, match="not valid JSON") as err:
        decode_header(b"\xff\xfe")
    assert err.value.fatal


def test_no_pickle_anywhere_on_the_wire():
    frame = b"".join(bytes(b) for b in encode({"type": "x"}, [torch.ones(2)]))
    header_len = struct.unpack("<I", frame[6:10])[0]
    assert json.loads(frame[18:18 + header_len]) == {"type": "x", "tensors": [{"dtype": "float32", "shape": [2]}]}
