"""The consumer side: use a model whose layers run on the swarm.

Map:
  model.py     MeshModel (entry point): generate(), stream(), forward(), inference_session()
  session.py   RemoteSession: a chain of donors, steps forwarded donor to donor (or relayed), failover and replay
  swarm.py     records from the DHT, round trips, bans, routes that wait for missing layers
  remote.py    RemoteSpan: one hop (connection + donor-side session)
  sampling.py  greedy / temperature / top-k / top-p / penalties / seed; token logprobs
  gateway/     the OpenAI-compatible HTTP gateway (imports only `client`; FastAPI loaded lazily)
"""

from client.model import ContextLengthError, InferenceSession, MeshModel, TokenEvent
from client.sampling import Sampler, SamplingParams
from client.session import MeshSessionError
from mesh.routing import NoRouteError  # raised by the client when layers have no donor

__all__ = ["ContextLengthError", "InferenceSession", "MeshModel", "MeshSessionError", "NoRouteError", "Sampler",
           "SamplingParams", "TokenEvent"]
