"""Device detection and dtype policy on simulated machines (no GPU needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from shards import DeviceError, DtypeNotSupportedError, choose_dtype, detect_device, parse_dtype

GiB = 2**30


@dataclass
class FakeProbe:
    """A machine as torch would report it."""

    gpus: list[str]
    hip: str | None = None
    mps: bool = False
    bf16: bool = True
    free: int = 20 * GiB
    total: int = 24 * GiB

    def cuda_available(self): return bool(self.gpus)
    def cuda_device_count(self): return len(self.gpus)
    def hip_version(self): return self.hip
    def mps_available(self): return self.mps
    def device_name(self, index): return self.gpus[index]
    def gpu_memory(self, index): return self.free, self.total
    def gpu_bf16_supported(self, index): return self.bf16
    def mps_bf16_supported(self): return self.bf16
    def host_memory(self): return 10 * GiB, 64 * GiB


NVIDIA = FakeProbe(gpus=["NVIDIA GeForce RTX 4090"])
OLD_NVIDIA = FakeProbe(gpus=["Tesla T4"], bf16=False)
AMD = FakeProbe(gpus=["AMD Radeon RX 7900 XTX", "AMD Radeon RX 7900 XTX"], hip="6.2.41133")
APPLE = FakeProbe(gpus=[], mps=True)
APPLE_OLD = FakeProbe(gpus=[], mps=True, bf16=False)
PLAIN_CPU = FakeProbe(gpus=[])


@pytest.mark.parametrize("probe, backend, device, dtype", [
    (NVIDIA, "cuda", "cuda:0", torch.bfloat16),
    (OLD_NVIDIA, "cuda", "cuda:0", torch.float16),
    (AMD, "rocm", "cuda:0", torch.bfloat16),
    (APPLE, "mps", "mps", torch.bfloat16),
    (APPLE_OLD, "mps", "mps", torch.float16),
    (PLAIN_CPU, "cpu", "cpu", torch.float32),
])
def test_auto_detection_and_default_dtype(probe, backend, device, dtype):
    info = detect_device(None, probe)
    assert (info.backend, info.torch_device) == (backend, device)
    assert choose_dtype(info) == dtype


def test_rocm_is_told_apart_from_cuda_and_accepts_both_spellings():
    assert detect_device("rocm:1", AMD).torch_device == "cuda:1"
    assert detect_device("cuda", AMD).backend == "rocm"
    with pytest.raises(DeviceError, match="this torch build is for CUDA, not ROCm"):
        detect_device("rocm", NVIDIA)


def test_memory_and_description():
    info = detect_device("cuda", NVIDIA)
    assert info.free_memory() == 20 * GiB and info.total_memory == 24 * GiB
    assert info.describe(torch.bfloat16) == "cuda NVIDIA GeForce RTX 4090 24.0GiB bf16"
    assert detect_device("cpu", NVIDIA).free_memory() == 10 * GiB  # host memory on the CPU
    assert detect_device("auto", AMD).describe(torch.float16) == "rocm AMD Radeon RX 7900 XTX 24.0GiB fp16"


def test_the_real_machine_is_described():
    info = detect_device()
    assert info.backend in ("cuda", "rocm", "mps", "cpu")
    assert info.describe()


@pytest.mark.parametrize("requested, probe, message", [
    ("cuda", PLAIN_CPU, "torch sees no CUDA or ROCm GPU"),
    ("cuda:3", NVIDIA, r"this machine has 1 GPU\(s\), indices 0..0"),
    ("cuda:x", NVIDIA, "bad device index"),
    ("mps", NVIDIA, "Apple MPS is not available"),
    ("tpu", NVIDIA, "unknown device 'tpu'; use auto, cuda"),
])
def test_absent_devices_are_refused(requested, probe, message):
    with pytest.raises(DeviceError, match=message):
        detect_device(requested, probe)


def test_explicit_dtypes_override_the_policy():
    assert choose_dtype(detect_device("cpu", PLAIN_CPU), "bf16") == torch.bfloat16
    assert choose_dtype(detect_device("cuda", NVIDIA), "float32") == torch.float32
    assert choose_dtype(detect_device("cuda", OLD_NVIDIA), "fp16") == torch.float16
    assert parse_dtype("torch.bfloat16") == torch.bfloat16 and parse_dtype("auto") is None


def test_dtype_the_device_cannot_run_is_refused():
    with pytest.raises(DtypeNotSupportedError, match="bfloat16 is not supported on cuda Tesla T4.*use --dtype float16"):
        choose_dtype(detect_device("cuda", OLD_NVIDIA), "bfloat16")
    with pytest.raises(DtypeNotSupportedError, match="unknown dtype 'float64'; choose one of auto, bfloat16"):
        choose_dtype(detect_device("cpu", PLAIN_CPU), "float64")


def test_quantization_is_refused_on_mps():
    from shards.quantization import check_quantization

    with pytest.raises(DtypeNotSupportedError, match="does not run on Apple MPS"):
        check_quantization("nf4", detect_device("mps", APPLE))
