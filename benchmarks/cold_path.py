"""What the data plane's per-message operations cost warm (in a tight loop) and cold (right after
the process did other work and slept, as a donor or client does between two decode steps).

On a shared virtual machine, code that ran a few milliseconds ago has been pushed out of the
caches by the other processes; library calls that touch a lot of code (a torch or numpy call,
the json module) then cost many times their warm price, while a plain memory copy does not.
The data plane's hot path is built around this table: tensors travel as WireTensors, a decode
step is copied into a session's reusable input tensor, and headers go through orjson.

Usage: python -m benchmarks.cold_path [--repeats 200] [--pause-ms 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import orjson
import torch

from benchmarks.report import command_line, save
from mesh.protocol import WireTensor, decode_tensors, encode
from server.sessions import StepBuffer

HIDDEN = 1024
HEADER = {"type": "step", "session": "0123456789abcdef0123456789abcdef", "position": 17, "id": 5}


def operations() -> dict[str, callable]:
    """name -> a zero-argument call doing one message's worth of that operation."""
    hidden = torch.randn(1, 1, HIDDEN)
    frame = encode(HEADER, [hidden])
    header = orjson.loads(frame[1])
    payload = bytearray(b"".join(bytes(b) for b in frame[2:]))
    raw_header = bytes(frame[1])
    step_in, step_out = StepBuffer(), StepBuffer()
    return {
        "header: json.loads": lambda: json.loads(raw_header),
        "header: orjson.loads": lambda: orjson.loads(raw_header),
        "payload -> torch tensor (view)": lambda: decode_tensors(header, memoryview(payload))[0].to_torch(),
        "payload -> WireTensor (no torch)": lambda: decode_tensors(header, memoryview(payload)),
        "payload -> StepBuffer.load (copy)": lambda: step_in.load(decode_tensors(header, memoryview(payload))[0]),
        "tensor -> frame (encode)": lambda: b"".join(encode(HEADER, [hidden])),
        "tensor -> StepBuffer.store -> frame": lambda: b"".join(encode(HEADER, [step_out.store(hidden)])),
    }


def other_work(pause: float, weights: torch.Tensor) -> None:
    """What happens before a message: some compute, then (unless pause is 0) a sleep."""
    x = weights[:1]
    for _ in range(20):
        x = torch.nn.functional.linear(x, weights)
    if pause:
        time.sleep(pause)


def time_operation(call, repeats: int, pause: float | None, weights: torch.Tensor) -> float:
    """Median microseconds of one call, warm (pause None) or right after other work and a pause."""
    samples = []
    for _ in range(repeats):
        if pause is not None:
            other_work(pause, weights)
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[repeats // 10:]) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200, help="calls timed per operation and state")
    parser.add_argument("--pause-ms", type=float, default=3.0, help="sleep between cold calls")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    weights = torch.randn(256, 256)
    results = []
    for name, call in operations().items():
        warm = time_operation(call, args.repeats, None, weights)
        after_compute = time_operation(call, args.repeats, 0.0, weights)
        cold = time_operation(call, args.repeats, args.pause_ms / 1000, weights)
        results.append({"operation": name, "warm_us": warm, "after_compute_us": after_compute, "cold_us": cold,
                        "cold_vs_warm": cold / warm})
    command = command_line(argv, "benchmarks.cold_path")
    print(f"\ncommand: {command}\none decode step's hidden states: [1, 1, {HIDDEN}] float32; warm = in a tight loop; "
          f"after compute = right after some torch work (a donor's reply); cold = after that and a "
          f"{args.pause_ms:g} ms sleep (a request after a wait); medians of {args.repeats} calls")
    print(f"{'operation':<38} {'warm us':>8} {'after compute us':>17} {'cold us':>8} {'cold/warm':>10}")
    for r in results:
        print(f"{r['operation']:<38} {r['warm_us']:>8.1f} {r['after_compute_us']:>17.1f} {r['cold_us']:>8.1f} "
              f"{r['cold_vs_warm']:>10.1f}")
    save(args.json, command, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
