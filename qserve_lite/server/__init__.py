"""OpenAI-compatible HTTP server (the optional `[server]` extra: fastapi + uvicorn).

    qserve-lite serve --model smollm2-135m --port 8000

Modules, each importing only those listed before it:

    protocol.py      request / response bodies (pydantic)
    metrics.py       the server's counters and histograms, in Prometheus text format
    async_engine.py  the engine's step loop on its own thread; requests in, per-token deltas out
    errors.py        APIError and OpenAI's {"error": {...}} body for every error (validation errors included)
    middleware.py    GuardMiddleware: the bearer API key (401) and the request body's size (413)
    serving.py       what the routes do: checks that need the model, SamplingParams, prompts, logprobs,
                     response bodies and server-sent event streams, client disconnects
    app.py           create_app(): the FastAPI app and its routes
    launch.py        serve(): builds the engine from an EngineConfig and runs the app under uvicorn

Importing this package does not import fastapi; `missing_server_deps()` says what is not installed.
"""

from __future__ import annotations

import importlib.util

SERVER_DEPS = ("fastapi", "uvicorn")


def missing_server_deps() -> list[str]:
    """The server's packages that are not installed (empty when `pip install 'qserve-lite[server]'` ran)."""
    return [name for name in SERVER_DEPS if importlib.util.find_spec(name) is None]
