"""`qserve-lite serve`: build the engine (a model through LLM, or random weights of a model's shape) with one
EngineConfig, wrap it in the app (app.py) and run it under uvicorn until interrupted.
"""

from __future__ import annotations

import logging
import time

from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.random_engine import build_random_engine
from qserve_lite.llm import LLM
from qserve_lite.server.app import create_app
from qserve_lite.server.async_engine import AsyncEngine
from qserve_lite.server.middleware import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger("qserve_lite.server")


def build_engine(
    model: str,
    engine_config: EngineConfig,
    *,
    precision: str | None = None,
    served_model_name: str | None = None,
    random_weights: str | None = None,
    tokenizer: str | None = None,
    group_size: int = 128,
) -> tuple[LLMEngine, str, dict | None, str]:
    """(the engine, the served model's name, its /v1/models metadata (random weights only), a line saying
    what was loaded)."""
    if random_weights is not None:
        built = build_random_engine(
            random_weights,
            tokenizer or model,
            precision=precision,
            group_size=group_size,
            config=engine_config,
        )
        engine = built.engine
        what = f"{built.describe()}; max_model_len {engine.max_model_len}, {engine.block_manager.num_pages}"
        what += " KV pages"
        return engine, served_model_name or built.default_name, built.metadata(), what
    t0 = time.perf_counter()
    llm = LLM(model, precision, config=engine_config)
    engine = llm.engine
    what = (
        f"{model} loaded in {time.perf_counter() - t0:.1f}s ({llm.precision}, max_model_len "
        f"{engine.max_model_len}, {engine.block_manager.num_pages} KV pages)"
    )
    return engine, served_model_name or model, None, what


def serve(
    model: str,
    *,
    engine_config: EngineConfig | None = None,
    precision: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    shutdown_timeout: float = 30.0,
    access_log: bool = True,
    log_level: str = "info",
    random_weights: str | None = None,
    tokenizer: str | None = None,
    group_size: int = 128,
) -> None:
    """Load the model and serve it until interrupted (Ctrl-C: in-flight requests get shutdown_timeout seconds
    to finish, then are aborted). engine_config: how the engine runs (default EngineConfig(): the CPU).

    random_weights: a shipped config name (llama-3-8b, ...) or a config.json: serve random weights of that
    shape at `precision` (default w4a8kv4; group_size for W4) with the vocabulary of `tokenizer` (default:
    `model`'s), for load tests (engine/random_engine.py). The startup line and /v1/models say so."""
    import uvicorn  # the optional [server] extra

    engine, name, metadata, what = build_engine(
        model, engine_config or EngineConfig(), precision=precision, served_model_name=served_model_name,
        random_weights=random_weights, tokenizer=tokenizer, group_size=group_size,
    )
    print(f"qserve-lite: {what}; serving as '{name}' on http://{host}:{port}/v1", flush=True)
    if metadata is not None:
        log.warning("serving RANDOM weights (outputs are random text): %s", metadata)
    app = create_app(
        AsyncEngine(engine), name, api_key=api_key, max_request_bytes=max_request_bytes,
        model_metadata=metadata,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=access_log,
        timeout_graceful_shutdown=max(1, round(shutdown_timeout)), lifespan="on",
    )
    uvicorn.Server(config).run()
