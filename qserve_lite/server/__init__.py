"""OpenAI-compatible HTTP server (the optional `[server]` extra: fastapi + uvicorn).

    qserve-lite serve --model smollm2-135m --port 8000

app.py (routes, validation, errors), async_engine.py (the engine's step loop on its own thread),
protocol.py (request / response bodies), metrics.py (Prometheus text format). Importing this package does
not import fastapi; `missing_server_deps()` says what is not installed.
"""

from __future__ import annotations

import importlib.util

SERVER_DEPS = ("fastapi", "uvicorn")


def missing_server_deps() -> list[str]:
    """The server's packages that are not installed (empty when `pip install 'qserve-lite[server]'` ran)."""
    return [name for name in SERVER_DEPS if importlib.util.find_spec(name) is None]
