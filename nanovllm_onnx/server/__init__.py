"""OpenAI-compatible HTTP server (FastAPI + uvicorn) around the engine."""

# Here, not in api_server, so the CLI shows them without importing the web stack.
DEFAULT_MAX_WAITING = 256  # sequences waiting for a place in the batch
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
