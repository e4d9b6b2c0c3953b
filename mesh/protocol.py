"""The data plane's message format: a versioned frame with a JSON header and raw tensor bytes.

    offset  size  field
    0       4     magic b"MESH"
    4       2     protocol version (little-endian u16)
    6       4     header length in bytes (u32, at most MAX_HEADER_BYTES)
    10      8     payload length in bytes (u64, at most the receiver's limit)
    18      ...   header: a UTF-8 JSON object; "type" names the message, "tensors" lists each
                  tensor's {"dtype", "shape"} in payload order
    ...     ...   payload: the tensors' bytes, C-contiguous, little-endian, back to back

No pickle: a tensor is only ever rebuilt from a dtype name in ALLOWED_DTYPES and a shape, and its
byte count is checked against the payload before any use. Pure code; transport.py moves frames.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy
import orjson
import torch

MAGIC = b"MESH"
PROTOCOL_VERSION = 1
PREFIX = struct.Struct("<4sHIQ")
MAX_HEADER_BYTES = 64 * 2**10
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 2**20
MAX_TENSORS = 16

ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}
# Dtypes numpy also has: their bytes are viewed through numpy, a few microseconds cheaper per tensor
# than torch.frombuffer; bfloat16 (unknown to numpy) takes the torch route.
NUMPY_DTYPES = {torch.float32: numpy.float32, torch.float16: numpy.float16, torch.int64: numpy.int64}
WIRE_ELEMENT_SIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in ALLOWED_DTYPES.items()}


class ProtocolError(Exception):
    """A message that cannot be accepted. `code` is machine-readable; `fatal` means the byte stream
    can no longer be trusted (bad framing) and the connection must close after the error reply."""

    def __init__(self, code: str, message: str, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(slots=True)
class WireTensor:
    """A tensor as it travels: a dtype name, a shape and exactly its bytes, already checked against
    each other. It becomes a torch tensor only when asked, so that a client relaying activations from
    one donor to the next, or a donor copying a decode step into its session's input buffer, does not
    call into torch between hops (on a busy machine, each first torch call after a pause costs tens of
    microseconds; see benchmarks/RESULTS.md)."""

    dtype: str  # a key of ALLOWED_DTYPES
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> "WireTensor":
        name = DTYPE_NAMES.get(tensor.dtype)
        if name is None:
            raise ValueError(f"cannot send a tensor of dtype {tensor.dtype}")
        # Each call below is skipped when it would be a no-op: a donor's output is usually a
        # contiguous CPU tensor without autograd already, and every torch call counts here.
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        data = _tensor_bytes(tensor) if tensor.numel() else b""
        return cls(name, tuple(tensor.shape), data)

    def to_torch(self) -> torch.Tensor:
        """A tensor viewing `data` (no copy; writable when data is a bytearray)."""
        dtype = ALLOWED_DTYPES[self.dtype]
        if not len(self.data):
            return torch.empty(self.shape, dtype=dtype)
        as_numpy = NUMPY_DTYPES.get(dtype)
        if as_numpy is not None:
            flat = torch.from_numpy(numpy.frombuffer(self.data, dtype=as_numpy))
        else:
            flat = torch.frombuffer(self.data, dtype=dtype)
        return flat.view(self.shape)

    @property
    def spec(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}


class Message:
    """A decoded frame: its header and its tensors, kept as WireTensors until `tensors` is read."""

    __slots__ = ("header", "wire", "_tensors")

    def __init__(self, header: dict, wire: list[WireTensor] | None = None):
        self.header = header
        self.wire = wire or []
        self._tensors: list[torch.Tensor] | None = None

    @property
    def type(self) -> str:
        return self.header.get("type", "")

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            self._tensors = [w.to_torch() for w in self.wire]
        return self._tensors


def parse_prefix(buffer, offset: int, max_payload: int) -> tuple[int, int]:
    """(header length, payload length) from the fixed 18-byte prefix at buffer[offset:], or a fatal
    ProtocolError."""
    magic, version, header_len, payload_len = PREFIX.unpack_from(buffer, offset)
    if magic != MAGIC:
        raise ProtocolError("bad_frame", "not a mesh data-plane message (bad magic bytes)", fatal=True)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version",
                            f"protocol version {version} is not supported; this peer speaks {PROTOCOL_VERSION}",
                            fatal=True)
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}", fatal=True)
    if payload_len > max_payload:
        raise ProtocolError("too_large", f"payload of {payload_len} bytes exceeds the limit of {max_payload}",
                            fatal=True)
    return header_len, payload_len


def decode_header(raw: bytes) -> dict:
    try:
        header = orjson.loads(raw)  # 4-5x faster than the json module for these small headers
    except orjson.JSONDecodeError as err:
        raise ProtocolError("bad_frame", f"header is not valid JSON: {err}", fatal=True) from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("bad_request", "header must be a JSON object with a string 'type'")
    return header


def decode_tensors(header: dict, payload: memoryview | bytes) -> list[WireTensor]:
    """The tensors described by header["tensors"], each a slice of `payload` (no copy). Validates
    every spec and the byte count before anything is built; touches no torch code."""
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError("bad_tensor", f"'tensors' must be a list of at most {MAX_TENSORS} entries")
    tensors = []
    offset = 0
    for index, spec in enumerate(specs):
        dtype, shape = _tensor_spec(index, spec)
        nbytes = math.prod(shape) * WIRE_ELEMENT_SIZE[dtype]
        tensors.append(WireTensor(dtype, shape, payload[offset:offset + nbytes]))
        offset += nbytes
    if offset != len(payload):
        raise ProtocolError("bad_tensor", f"tensors need {offset} payload bytes, the message carries {len(payload)}")
    return tensors


def _tensor_spec(index: int, spec) -> tuple[str, tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise ProtocolError("bad_tensor", f"tensor {index}: expected an object with 'dtype' and 'shape'")
    dtype = spec.get("dtype")
    if dtype not in WIRE_ELEMENT_SIZE:
        raise ProtocolError("bad_tensor", f"tensor {index}: dtype {spec.get('dtype')!r} is not one of "
                                          f"{', '.join(ALLOWED_DTYPES)}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError("bad_tensor", f"tensor {index}: shape must be a list of at most 8 non-negative integers")
    return dtype, tuple(shape)


def encode(header: dict, tensors: list[torch.Tensor | WireTensor] = ()) -> list[bytes | memoryview]:
    """The frame as a list of buffers to write in order (tensor bytes are not copied when contiguous)."""
    buffers = []
    specs = []
    for tensor in tensors:
        wire = tensor if isinstance(tensor, WireTensor) else WireTensor.from_torch(tensor)
        specs.append(wire.spec)
        if len(wire.data):
            buffers.append(wire.data)
    if specs:
        header = {**header, "tensors": specs}
    raw_header = orjson.dumps(header)
    payload_len = sum(len(b) for b in buffers)
    return [PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(raw_header), payload_len), raw_header, *buffers]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    if tensor.dtype in NUMPY_DTYPES:
        return memoryview(tensor.numpy()).cast("B")
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def error_header(request_id, code: str, message: str) -> dict:
    return {"type": "error", "id": request_id, "code": code, "message": message}
