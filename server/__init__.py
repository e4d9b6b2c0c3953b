"""The donor: serves a shard's layers to the mesh, with sessions, batching and a bounded memory.

Map:
  serve.py       `mesh serve`: load the layers, measure, join the DHT, run until a signal
  donor.py       Donor (server + session sweeper) and Heartbeat (the DHT announcement)
  handlers.py    data-plane requests: ping, info, open, step, close, forward; every field checked
  forwarding.py  forwarded steps: output pushed to the next donor, results to the session's client
  compute.py     BatchingExecutor: runs the shard, one-token steps of concurrent sessions batched,
                 long prompts in pieces with other steps between them
  pacing.py      how much prompt work a flush takes on: what computes in about two seconds
  sessions.py    per-session KV caches reserved against a byte budget, idle expiry, step buffers
  throughput.py  start-up speed: the tokens/s a donor announces, and its first prompt speed
  host_memory.py freed large buffers go back to the system (glibc's mmap threshold)
"""
