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

import json
import math
import struct
from dataclasses import dataclass, field

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
ELEMENT_SIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in ALLOWED_DTYPES.values()}


class ProtocolError(Exception):
    """A message that cannot be accepted. `code` is machine-readable; `fatal` means the byte stream
    can no longer be trusted (bad framing) and the connection must close after the error reply."""

    def __init__(self, code: str, message: str, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass
class Message:
    header: dict
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def type(self) -> str:
        return self.header.get("type", "")


def parse_prefix(prefix: bytes, max_payload: int) -> tuple[int, int]:
    """(header length, payload length) from the fixed 18-byte prefix, or a fatal ProtocolError."""
    magic, version, header_len, payload_len = PREFIX.unpack(prefix)
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
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError("bad_frame", f"header is not valid JSON: {err}", fatal=True) from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("bad_request", "header must be a JSON object with a string 'type'")
    return header


def decode_tensors(header: dict, payload: memoryview | bytes) -> list[torch.Tensor]:
    """Tensors described by header["tensors"], viewing `payload` (no copy). Validates everything first."""
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError("bad_tensor", f"'tensors' must be a list of at most {MAX_TENSORS} entries")
    layout = []
    offset = 0
    for index, spec in enumerate(specs):
        dtype, shape = _tensor_spec(index, spec)
        nbytes = math.prod(shape) * ELEMENT_SIZE[dtype]
        layout.append((dtype, shape, offset, nbytes))
        offset += nbytes
    if offset != len(payload):
        raise ProtocolError("bad_tensor", f"tensors need {offset} payload bytes, the message carries {len(payload)}")
    tensors = []
    for dtype, shape, start, nbytes in layout:
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        flat = torch.frombuffer(payload, dtype=dtype, count=nbytes // ELEMENT_SIZE[dtype], offset=start)
        tensors.append(flat.view(shape))
    return tensors


def _tensor_spec(index: int, spec) -> tuple[torch.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise ProtocolError("bad_tensor", f"tensor {index}: expected an object with 'dtype' and 'shape'")
    dtype = ALLOWED_DTYPES.get(spec.get("dtype"))
    if dtype is None:
        raise ProtocolError("bad_tensor", f"tensor {index}: dtype {spec.get('dtype')!r} is not one of "
                                          f"{', '.join(ALLOWED_DTYPES)}")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError("bad_tensor", f"tensor {index}: shape must be a list of at most 8 non-negative integers")
    return dtype, tuple(shape)


def encode(header: dict, tensors: list[torch.Tensor] = ()) -> list[bytes | memoryview]:
    """The frame as a list of buffers to write in order (tensor bytes are not copied when contiguous)."""
    buffers = []
    specs = []
    for tensor in tensors:
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot send a tensor of dtype {tensor.dtype}")
        tensor = tensor.detach().cpu().contiguous()
        specs.append({"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)})
        if tensor.numel():
            buffers.append(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    if specs:
        header = {**header, "tensors": specs}
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    payload_len = sum(len(b) for b in buffers)
    return [PREFIX.pack(MAGIC, PROTOCOL_VERSION, len(raw_header), payload_len), raw_header, *buffers]


def error_header(request_id, code: str, message: str) -> dict:
    return {"type": "error", "id": request_id, "code": code, "message": message}
