"""The OpenAI-compatible HTTP gateway: a mesh client that speaks `/v1`.

Map:
  app.py      create_app(): routes for /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics
  schemas.py  request models and their validation (invalid values are 400s, not 422s)
  errors.py   OpenAI-shaped error bodies and the exception handlers that produce them
  engine.py   runs generations in worker threads and hands their tokens to async handlers
  text.py     incremental detokenization, stop sequences, logprob formatting
  metrics.py  Prometheus metrics (mesh_ prefix, base units)
  serve.py    `mesh gateway`: build the app around a MeshModel and serve it with uvicorn
"""
