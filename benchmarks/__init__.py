"""Standalone benchmarks (run from the repository root as `python -m benchmarks.NAME`); each prints
one table last, writes JSON with --json, and stops every process it started by PID.

Map:
  hop_latency.py  added latency per hop per decode step, through 1, 2 and 4 donors
  bare_relay.py   its floor: the same chain of processes passing bytes only
  transport.py    round trip and bandwidth of the data plane beside hivemind's libp2p streams
  generate.py     transformers generate vs the project's shards vs the mesh (decode, TTFT, prefill)
  concurrency.py  1..64 concurrent sessions on one donor, via the Python client and the gateway
  gpu.py          on a GPU: transformers generate vs the mesh, 8B-class model, bf16 and nf4
  memory.py       a serving donor's peak resident memory against weights plus cache budget
  long_prompt.py  how long a decoding session stalls while another session sends a long prompt
  cold_path.py    the data plane's per-message operations, warm and right after compute or a pause
  connect_burst.py  many clients connecting at once to a busy donor loop: its listener vs create_server
Results, machines and command lines: RESULTS.md.
"""
