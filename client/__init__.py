"""The consumer side: use a model whose layers run on the swarm.

Map:
  model.py     MeshModel (entry point): generate(), stream(), forward(), inference_session()
  session.py   RemoteSession: a chain of donors with failover and replay
  swarm.py     records from the DHT, round trips, bans, routes that wait for missing layers
  remote.py    RemoteSpan: one hop (connection + donor-side session)
  sampling.py  greedy / temperature / top-k / top-p / repetition penalty / seed
"""

from client.model import InferenceSession, MeshModel
from client.sampling import Sampler, SamplingParams

__all__ = ["InferenceSession", "MeshModel", "Sampler", "SamplingParams"]
