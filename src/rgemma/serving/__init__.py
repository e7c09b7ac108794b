"""The OpenAI-compatible HTTP server over the continuous-batching engine.

``app`` (FastAPI routes, the server thread), ``protocol`` (request models),
``formatting`` (responses and stream chunks), ``metrics`` (Prometheus). Those
modules import torch and fastapi; this one imports nothing, so the command
line can show the defaults below without them.
"""

DEFAULT_HOST = "127.0.0.1"  # this machine only
DEFAULT_PORT = 8000
