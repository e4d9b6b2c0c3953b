"""What a long prompt, or a burst of new sessions' prompts, does to the sessions already decoding
on the same donor.

Two donors serve every layer of the same model: one with `mesh serve --prefill-chunk-tokens N`
(the default 512: a long prompt runs in pieces of N tokens, and new prompts beyond N tokens wait
for the next round of work) and one without that limit, where only the donor's pacing bounds its
prompt work (server/pacing.py: what computes in about 2 s per round). On each in turn,
in alternating rounds: one session decodes step after step (hidden states in, hidden states out)
while --prompts other sessions each send a prompt of --prompt-tokens at the same moment (one long
prompt by default; `--prompts 64 --prompt-tokens 32` is 64 users arriving together). Reports, per
donor: how long until the last prompt was answered, the decoding session's longest step while the
prompts ran (against its median step before), and how many of its steps finished meanwhile.

Usage: python -m benchmarks.long_prompt [--size tiny|mid] [--prompt-tokens 2048] [--prompts 1]
       [--chunk 512] [--rounds 2] [--json FILE]
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
NO_LIMIT = 1 << 30  # --prefill-chunk-tokens: no limit of its own; the donor's pacing still cuts prompts
NO_LIMIT_LABEL = "paced only"


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


def one_round(port: int, num_layers: int, hidden_size: int, prompt_tokens: int, prompts: int) -> dict:
    from mesh.transport import Connection

    decoder = Connection.open("127.0.0.1", port)
    prompters = [Connection.open("127.0.0.1", port) for _ in range(prompts)]
    try:
        sessions = [decoder.request({"type": "open", "start": 0, "end": num_layers, "max_length": DECODE_CAPACITY},
                                    timeout=60).header["session"]]
        for prompter in prompters:
            sessions.append(prompter.request({"type": "open", "start": 0, "end": num_layers,
                                              "max_length": prompt_tokens}, timeout=60).header["session"])
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
        time.sleep(alone_step * 2)  # the decoding session is mid-stream when the prompts land
        started = time.perf_counter()
        send_together(prompters, sessions[1:], torch.randn(1, prompt_tokens, hidden_size))
        finished = time.perf_counter()
        stop.set()
        thread.join(timeout=600)
        overlapping = [end - start for start, end in during if end > started and start < finished]
        return {"prompt_s": finished - started, "alone_step_ms": 1000 * alone_step,
                "longest_step_ms": 1000 * max(overlapping, default=0.0),
                "steps_during": sum(1 for _, end in during if started <= end <= finished)}
    finally:
        for connection in (decoder, *prompters):
            connection.close()


def send_together(prompters, sessions: list[str], prompt: torch.Tensor) -> None:
    """Every prompter sends `prompt` on its session at the same moment; returns when all are answered."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompters))

    def send(connection, session):
        try:
            barrier.wait(60)
            connection.request({"type": "step", "session": session, "position": 0}, [prompt], timeout=600)
        except BaseException as err:  # raised below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=send, args=pair) for pair in zip(prompters, sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=660)
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompters)} prompts failed; first: {errors[0]!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="tokens in each prompt")
    parser.add_argument("--prompts", type=int, default=1, help="sessions that send a prompt at the same moment")
    parser.add_argument("--chunk", type=int, default=512, help="--prefill-chunk-tokens of the bounded donor")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from mesh.launcher import LocalSwarm

    size = SIZES[args.size]
    layers = f"0:{size['num_hidden_layers']}"
    cache = str(2 * (DECODE_CAPACITY + args.prompts * args.prompt_tokens))
    bounded = f"{args.chunk} tokens"
    samples: dict[str, list[dict]] = {bounded: [], NO_LIMIT_LABEL: []}
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(ready_timeout=300) as swarm:
        path = save_size_model(args.size, Path(tmp) / f"{args.size}-llama",
                               max_position_embeddings=max(4096, 2 * args.prompt_tokens))
        swarm.start_dht()
        flags = ("--torch-threads", "2", "--cache-tokens", cache, "--prefill-chunk-tokens")
        [pieces] = swarm.start_donors(path, [layers], *flags, str(args.chunk))
        [whole] = swarm.start_donors(path, [layers], *flags, str(NO_LIMIT))
        for _ in range(args.rounds):
            for label, donor in ((bounded, pieces), (NO_LIMIT_LABEL, whole)):
                samples[label].append(one_round(donor.port, size["num_hidden_layers"], size["hidden_size"],
                                                args.prompt_tokens, args.prompts))
    rows = []
    for label, rounds in samples.items():
        rows.append({"prefill_chunk": label, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                     "prompt_s": statistics.median(r["prompt_s"] for r in rounds),
                     "alone_step_ms": statistics.median(r["alone_step_ms"] for r in rounds),
                     "longest_step_ms": statistics.median(r["longest_step_ms"] for r in rounds),
                     "steps_during": statistics.median(r["steps_during"] for r in rounds)})
    print(f"\ncommand: {command_line(argv, 'benchmarks.long_prompt')}\nmodel: {args.size} random llama, fp32, "
          f"one donor per row serving layers {layers} with 2 torch threads; medians over {args.rounds} rounds;\n"
          f"prompts s: until the last of the prompts sent together was answered")
    print(f"{'prefill chunk':<14} {'prompts':>7} {'tokens each':>11} {'prompts s':>10} {'decode step alone ms':>21} "
          f"{'longest step meanwhile ms':>26} {'steps meanwhile':>16}")
    for r in rows:
        print(f"{r['prefill_chunk']:<14} {r['prompts']:>7} {r['prompt_tokens']:>11} {r['prompt_s']:>10.2f} "
              f"{r['alone_step_ms']:>21.1f} {r['longest_step_ms']:>26.1f} {r['steps_during']:>16.0f}")
    save(args.json, command_line(argv, "benchmarks.long_prompt"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
