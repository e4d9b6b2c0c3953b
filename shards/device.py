"""The device abstraction: which backend runs the shard, in which dtype, with how much memory.

This is the only module that asks torch which accelerator vendor it runs on. Everything torch
reports about hardware goes through `TorchProbe`, so tests can simulate CUDA, ROCm, MPS and CPU
machines by passing a fake probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from shards.errors import DeviceError, DtypeNotSupportedError

BACKENDS = ("cuda", "rocm", "mps", "cpu")

DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
SHORT_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class HardwareProbe(Protocol):
    """What the device layer needs to know about the machine (see `TorchProbe`)."""

    def cuda_available(self) -> bool: ...
    def cuda_device_count(self) -> int: ...
    def hip_version(self) -> str | None: ...
    def mps_available(self) -> bool: ...
    def device_name(self, index: int) -> str: ...
    def gpu_memory(self, index: int) -> tuple[int, int]: ...
    def gpu_bf16_supported(self, index: int) -> bool: ...
    def mps_bf16_supported(self) -> bool: ...
    def host_memory(self) -> tuple[int | None, int | None]: ...


class TorchProbe:
    """The real machine, as torch sees it."""

    def cuda_available(self) -> bool:
        return torch.cuda.is_available()

    def cuda_device_count(self) -> int:
        return torch.cuda.device_count()

    def hip_version(self) -> str | None:
        # ROCm builds of torch expose AMD GPUs through the "cuda" device type; this is the tell.
        return getattr(torch.version, "hip", None)

    def mps_available(self) -> bool:
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())

    def device_name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)

    def gpu_memory(self, index: int) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)

    def gpu_bf16_supported(self, index: int) -> bool:
        with torch.cuda.device(index):
            return bool(torch.cuda.is_bf16_supported())

    def mps_bf16_supported(self) -> bool:
        try:  # bf16 on MPS needs macOS 14; older systems raise on allocation.
            torch.zeros(1, dtype=torch.bfloat16, device="mps")
            return True
        except (RuntimeError, TypeError):
            return False

    def host_memory(self) -> tuple[int | None, int | None]:
        available, total = _read_meminfo()
        return _within_cgroup_limit(available, total, _read_cgroup_memory())


def _within_cgroup_limit(available: int | None, total: int | None,
                         cgroup: tuple[int, int] | None) -> tuple[int | None, int | None]:
    """(available, total) host memory as a process of this container sees it: a container with a
    memory limit is killed at its limit, however much the machine has free."""
    if cgroup is None:
        return available, total
    limit, used = cgroup
    room = max(0, limit - used)
    return (room if available is None else min(available, room)), (limit if total is None else min(total, limit))


def _read_cgroup_memory(root: str = "/sys/fs/cgroup") -> tuple[int, int] | None:
    """(limit, usage) in bytes of this container's memory cgroup (v2, else v1); None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(os.path.join(root, limit_file)) as f:
                limit_text = f.read().strip()
            with open(os.path.join(root, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:  # v1 says "none" so
            return None
        return int(limit_text), usage
    return None


def _read_meminfo() -> tuple[int | None, int | None]:
    """(available, total) bytes of host memory, or None where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return fields.get("MemAvailable"), fields.get("MemTotal")
    except OSError:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            return None, os.sysconf("SC_PHYS_PAGES") * page
        except (ValueError, OSError, AttributeError):
            return None, None


@dataclass(frozen=True)
class DeviceInfo:
    """One compute device: what it is, how torch addresses it, and its memory."""

    backend: str  # one of BACKENDS
    torch_device: str  # what torch calls it: "cuda:0" (also for ROCm), "mps", "cpu"
    name: str
    total_memory: int | None
    probe: HardwareProbe = field(repr=False, compare=False, default_factory=TorchProbe)

    @property
    def index(self) -> int:
        return int(self.torch_device.split(":")[1]) if ":" in self.torch_device else 0

    @property
    def is_gpu(self) -> bool:
        return self.backend in ("cuda", "rocm", "mps")

    def free_memory(self) -> int | None:
        """Bytes free right now (GPU memory on a GPU, available host memory on the CPU)."""
        if self.backend in ("cuda", "rocm"):
            return self.probe.gpu_memory(self.index)[0]
        return self.probe.host_memory()[0]

    def supports_bf16(self) -> bool:
        if self.backend in ("cuda", "rocm"):
            return self.probe.gpu_bf16_supported(self.index)
        if self.backend == "mps":
            return self.probe.mps_bf16_supported()
        return True

    def describe(self, dtype: torch.dtype | None = None) -> str:
        """A short line for announcements and logs, e.g. 'rocm AMD Radeon RX 7900 XTX 24.0GiB bf16'."""
        parts = [self.backend, self.name]
        if self.total_memory:
            parts.append(f"{self.total_memory / 2**30:.1f}GiB")
        if dtype is not None:
            parts.append(SHORT_DTYPE_NAME.get(dtype, str(dtype)))
        return " ".join(parts)


def detect_device(requested: str | None = None, probe: HardwareProbe | None = None) -> DeviceInfo:
    """The device to run on: `requested` ("auto", "cuda", "cuda:1", "rocm", "mps", "cpu") or the best present."""
    probe = probe or TorchProbe()
    want = (requested or "auto").strip().lower()
    kind, _, index_text = want.partition(":")
    if kind == "auto":
        if probe.cuda_available():
            return _gpu_device(probe, 0)
        if probe.mps_available():
            return DeviceInfo("mps", "mps", "Apple MPS", probe.host_memory()[1], probe)
        return _cpu_device(probe)
    if kind == "cpu":
        return _cpu_device(probe)
    if kind == "mps":
        if not probe.mps_available():
            raise DeviceError("device 'mps' was requested but Apple MPS is not available on this machine")
        return DeviceInfo("mps", "mps", "Apple MPS", probe.host_memory()[1], probe)
    if kind in ("cuda", "rocm", "gpu"):
        return _requested_gpu(probe, kind, index_text, want)
    raise DeviceError(f"unknown device {requested!r}; use auto, cuda[:N], rocm[:N], mps or cpu")


def _requested_gpu(probe: HardwareProbe, kind: str, index_text: str, want: str) -> DeviceInfo:
    if not probe.cuda_available():
        raise DeviceError(
            f"device {want!r} was requested but torch sees no CUDA or ROCm GPU "
            "(check the driver, and that the installed torch build matches it)"
        )
    is_rocm = probe.hip_version() is not None
    if kind == "rocm" and not is_rocm:
        raise DeviceError("device 'rocm' was requested but this torch build is for CUDA, not ROCm")
    if kind == "cuda" and is_rocm:
        pass  # ROCm builds address AMD GPUs as "cuda"; accept the common spelling.
    try:
        index = int(index_text) if index_text else 0
    except ValueError:
        raise DeviceError(f"bad device index in {want!r}; expected e.g. cuda:0") from None
    count = probe.cuda_device_count()
    if not 0 <= index < count:
        raise DeviceError(f"device {want!r} does not exist: this machine has {count} GPU(s), indices 0..{count - 1}")
    return _gpu_device(probe, index)


def _gpu_device(probe: HardwareProbe, index: int) -> DeviceInfo:
    backend = "rocm" if probe.hip_version() is not None else "cuda"
    total = probe.gpu_memory(index)[1]
    return DeviceInfo(backend, f"cuda:{index}", probe.device_name(index), total, probe)


def _cpu_device(probe: HardwareProbe) -> DeviceInfo:
    return DeviceInfo("cpu", "cpu", f"CPU ({os.cpu_count()} cores)", probe.host_memory()[1], probe)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a user's spelling; None for "auto" or None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in DTYPE_NAMES:
        raise DtypeNotSupportedError(
            f"unknown dtype {name!r}; choose one of auto, bfloat16 (bf16), float16 (fp16), float32 (fp32)"
        )
    return DTYPE_NAMES[key]


def choose_dtype(device: DeviceInfo, requested: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype policy: bf16 where supported, fp16 on other GPUs, fp32 on CPU; an explicit choice is checked."""
    dtype = parse_dtype(requested)
    if dtype is None:
        if device.backend == "cpu":
            return torch.float32
        return torch.bfloat16 if device.supports_bf16() else torch.float16
    if dtype == torch.bfloat16 and not device.supports_bf16():
        raise DtypeNotSupportedError(
            f"bfloat16 is not supported on {device.describe()}; use --dtype float16 (or float32)"
        )
    return dtype
