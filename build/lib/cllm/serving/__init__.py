"""Serving a model: `engine` (one thread decodes every in-flight request in one batch),
`api` (the OpenAI-compatible HTTP API, /metrics and the live page), `server` (uvicorn with a
graceful shutdown), `chat` (the terminal chat) and `load` (the load generator)."""
