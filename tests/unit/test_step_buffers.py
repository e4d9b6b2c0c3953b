"""The donor's reusable decode-step buffers and the wire form of tensors they rely on."""

import pytest
import torch

from mesh.protocol import WireTensor, decode_tensors, encode
from server.sessions import StepBuffer


def wire_of(tensor: torch.Tensor) -> WireTensor:
    frame = encode({"type": "step"}, [tensor])
    header = {"type": "step", "tensors": [WireTensor.from_torch(tensor).spec]}
    return decode_tensors(header, memoryview(bytearray(b"".join(bytes(b) for b in frame[2:]))))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_refills_one_tensor_with_each_step(dtype):
    buffer = StepBuffer()
    first, second = torch.randn(1, 1, 8).to(dtype), torch.randn(1, 1, 8).to(dtype)
    a = buffer.load(wire_of(first))
    assert torch.equal(a, first)
    b = buffer.load(wire_of(second))
    assert b is a and torch.equal(b, second)  # the same storage, new contents
    c = buffer.load(wire_of(torch.ones(1, 1, 4, dtype=dtype)))  # another shape gets its own tensor
    assert c.shape == (1, 1, 4) and torch.equal(c, torch.ones(1, 1, 4, dtype=dtype))


def test_a_buffer_made_inside_inference_mode_still_serves_outside_it():
    # A donor loads a session's first step wherever it happens to be (a batch or a lone step).
    buffer = StepBuffer()
    first, second = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    with torch.inference_mode():
        buffer.load(wire_of(first))
    loaded = buffer.load(wire_of(second))
    assert not loaded.is_inference() and torch.equal(torch.cat([loaded, loaded]), torch.cat([second, second]))


def test_store_works_inside_and_outside_inference_mode():
    # A donor stores batch rows inside inference mode and lone steps outside it.
    buffer = StepBuffer()
    with torch.inference_mode():
        row = torch.randn(2, 1, 8)[1:]
        stored = buffer.store(row)
    assert stored.to_torch().tolist() == row.tolist()
    lone = torch.randn(1, 1, 8)
    assert torch.equal(buffer.store(lone).to_torch(), lone)
    with torch.inference_mode():
        again = torch.randn(1, 1, 8)
        assert torch.equal(buffer.store(again).to_torch(), again)


def test_wire_tensors_stay_out_of_torch_until_asked():
    tensor = torch.randn(2, 3)
    wire = wire_of(tensor)
    assert (wire.dtype, wire.shape, len(wire.data)) == ("float32", (2, 3), 24)
    assert torch.equal(wire.to_torch(), tensor)
    assert WireTensor.from_torch(torch.zeros(0, 5)).to_torch().shape == (0, 5)
    with pytest.raises(ValueError, match="dtype"):
        WireTensor.from_torch(torch.zeros(2, dtype=torch.complex64))
