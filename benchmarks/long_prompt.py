"""What a long prompt does to the sessions already decoding on the same donor.

Two donors serve every layer of the same model, one running prompts in pieces (`mesh serve
--prefill-chunk-tokens N`, the default 512) and one in a single piece. On each in turn, in
alternating rounds: one session decodes step after step (hidden states in, hidden states out)
while a second session sends a long prompt. Reports, per donor: how long the prompt took, and the
decoding session's longest step while the prompt ran (against its median step before), and how many
of its steps finished while the prompt ran.

Usage: python -m benchmarks.long_prompt [--size tiny|mid] [--prompt-tokens 2048] [--chunk 512] [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.generate import SIZES, save_size_model
from benchmarks.report import command_line, save

DECODE_CONTEXT = 32  # the decoding session's prompt
DECODE_CAPACITY = 2048  # the decoding session's reservation: its prompt and every step it takes
ALONE_STEPS = 20  # steps timed before the long prompt arrives
ONE_PIECE = 1 << 30


def decode_until(connection, session: str, position: int, hidden_size: int, stop: threading.Event,
                 spans: list[tuple[float, float]], max_steps: int) -> int:
    """Decode steps on `session` until `stop` is set (or max_steps); each step's (start, end) into `spans`."""
    step = torch.randn(1, 1, hidden_size)
    for _ in range(max_steps):
        if stop.is_set():
            break
        started = time.perf_counter()
        connection.request({"type": "step", "session": session, "position": position}, [step], timeout=600)
        spans.append((started, time.perf_counter()))
        position += 1
    return position


def one_round(port: int, num_layers: int, hidden_size: int, prompt_tokens: int) -> dict:
    from mesh.transport import Connection

    decoder, prompter = Connection.open("127.0.0.1", port), Connection.open("127.0.0.1", port)
    try:
        sessions = []
        for connection, length in ((decoder, DECODE_CAPACITY), (prompter, prompt_tokens)):
            sessions.append(connection.request({"type": "open", "start": 0, "end": num_layers, "max_length": length},
                                               timeout=60).header["session"])
        decoder.request({"type": "step", "session": sessions[0], "position": 0},
                        [torch.randn(1, DECODE_CONTEXT, hidden_size)], timeout=600)
        alone: list[tuple[float, float]] = []
        position = decode_until(decoder, sessions[0], DECODE_CONTEXT, hidden_size, threading.Event(), alone, ALONE_STEPS)
        alone_step = statistics.median(end - start for start, end in alone)
        during: list[tuple[float, float]] = []
        stop = threading.Event()
        thread = threading.Thread(target=decode_until, args=(decoder, sessions[0], position, hidden_size, stop,
                                                             during, DECODE_CAPACITY - position))
        thread.start()
        prompt = torch.randn(1, prompt_tokens, hidden_size)
        time.sleep(alone_step * 2)  # the decoding session is mid-stream when the prompt lands
        started = time.perf_counter()
        prompter.request({"type": "step", "session": sessions[1], "position": 0}, [prompt], timeout=600)
        finished = time.perf_counter()
        stop.set()
        thread.join(timeout=600)
        overlapping = [end - start for start, end in during if end > started and start < finished]
        return {"prompt_s": finished - started, "alone_step_ms": 1000 * alone_step,
                "longest_step_ms": 1000 * max(overlapping, default=0.0),
                "steps_during": sum(1 for _, end in during if started <= end <= finished)}
    finally:
        decoder.close()
        prompter.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=512, help="the piece size of the donor that runs prompts in pieces")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mesh.launcher import LocalSwarm

    size = SIZES[args.size]
    layers = f"0:{size['num_hidden_layers']}"
    cache = str(2 * (DECODE_CAPACITY + args.prompt_tokens))
    samples: dict[str, list[dict]] = {"in pieces": [], "in one piece": []}
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(ready_timeout=300) as swarm:
        path = save_size_model(args.size, Path(tmp) / f"{args.size}-llama",
                               max_position_embeddings=max(4096, 2 * args.prompt_tokens))
        swarm.start_dht()
        flags = ("--torch-threads", "2", "--cache-tokens", cache, "--prefill-chunk-tokens")
        [pieces] = swarm.start_donors(path, [layers], *flags, str(args.chunk))
        [whole] = swarm.start_donors(path, [layers], *flags, str(ONE_PIECE))
        for _ in range(args.rounds):
            for label, donor in (("in pieces", pieces), ("in one piece", whole)):
                samples[label].append(one_round(donor.port, size["num_hidden_layers"], size["hidden_size"],
                                                args.prompt_tokens))
    rows = []
    for label, rounds in samples.items():
        rows.append({"prefill": label, "prompt_tokens": args.prompt_tokens,
                     "prompt_s": statistics.median(r["prompt_s"] for r in rounds),
                     "alone_step_ms": statistics.median(r["alone_step_ms"] for r in rounds),
                     "longest_step_ms": statistics.median(r["longest_step_ms"] for r in rounds),
                     "steps_during": statistics.median(r["steps_during"] for r in rounds)})
    print(f"\ncommand: {command_line(argv, 'benchmarks.long_prompt')}\nmodel: {args.size} random llama, fp32, "
          f"one donor per row serving layers {layers} with 2 torch threads; medians over {args.rounds} rounds")
    print(f"{'prefill':<14} {'prompt tokens':>13} {'prompt s':>9} {'decode step alone ms':>21} "
          f"{'longest step during prompt ms':>30} {'steps during prompt':>20}")
    for r in rows:
        print(f"{r['prefill']:<14} {r['prompt_tokens']:>13} {r['prompt_s']:>9.2f} {r['alone_step_ms']:>21.1f} "
              f"{r['longest_step_ms']:>30.1f} {r['steps_during']:>20.0f}")
    save(args.json, command_line(argv, "benchmarks.long_prompt"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
