"""A donor gives the memory of a finished prefill back to the system instead of keeping its peak."""

import platform
import subprocess
import sys

import pytest

# Frees a large buffer (which raises glibc's mmap threshold), then fills and frees another of the
# same size the way a second prefill's activations come and go; prints how much resident memory
# the process kept.
SCRIPT = """
import sys
from server.handlers import process_memory
from server.host_memory import return_large_buffers_to_the_system
if sys.argv[1] == "donor":
    assert return_large_buffers_to_the_system(environ={})
before = process_memory("VmRSS")
for _ in range(2):
    buffer = bytearray(8 << 20)  # zero-filled: every page is touched
    del buffer
print((process_memory("VmRSS") - before) >> 20)
"""


def kept_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_a_donor_returns_freed_activations_to_the_system():
    assert kept_mib("plain") >= 7  # what a process keeps without it: the test can tell the difference
    assert kept_mib("donor") <= 1


def test_the_users_own_threshold_wins():
    from server.host_memory import return_large_buffers_to_the_system

    assert return_large_buffers_to_the_system(environ={"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
