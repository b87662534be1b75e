"""`qserve-lite serve`: take the listening address, build the engine (a model through LLM, or random weights
of a model's shape) with one EngineConfig, wrap it in the app (app.py) and run it under uvicorn until
interrupted.

The address is bound before anything is loaded, so a busy port fails at once with a one-line error
(QServeLiteError: exit status 2) and the startup line is printed only once the port is ours. At shutdown
(Ctrl-C, SIGTERM) GracefulServer gives the requests in flight the grace period, then aborts what is left
through the engine, so every stream still ends with a final chunk and data: [DONE].
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

import uvicorn  # the optional [server] extra, like fastapi (cli.py imports this module lazily)

from qserve_lite.engine.config import EngineConfig
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.random_engine import build_random_engine
from qserve_lite.errors import QServeLiteError
from qserve_lite.llm import LLM
from qserve_lite.server.app import create_app
from qserve_lite.server.async_engine import AsyncEngine
from qserve_lite.server.middleware import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger("qserve_lite.server")
uvicorn_log = logging.getLogger("uvicorn.error")

# past the grace period, uvicorn cancels the request tasks that still run (printing a traceback for each):
# only a backstop here, for a client that stopped reading, since the engine has ended every request by then
SHUTDOWN_BACKSTOP_S = 10.0
FORCE_EXIT_DRAIN_S = 2.0  # a second Ctrl-C: how long the streams get to send their last chunk


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens once the app is up); a busy port,
    an address not of this machine or an unknown host raise QServeLiteError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts need no wait
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            why = "the port is already in use (another server?); pick another --port"
        else:
            why = getattr(e, "strerror", None) or str(e)
        raise QServeLiteError(f"cannot listen on {_address(host, port)}: {why}") from None
    return sock


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GracefulServer(uvicorn.Server):
    """uvicorn's Server that ends the requests in flight itself at shutdown: they get shutdown_timeout
    seconds to finish, then the engine aborts what is left (AsyncEngine.stop), so each stream ends with a
    final chunk (finish_reason "abort") and data: [DONE], and a request waiting for its whole response gets
    a 503. uvicorn's own cancellation, SHUTDOWN_BACKSTOP_S later, is only a backstop."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float):
        config.timeout_graceful_shutdown = max(0.0, shutdown_timeout) + SHUTDOWN_BACKSTOP_S
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = max(0.0, shutdown_timeout)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:  # uvicorn says this only for the sockets it binds itself
            host, port = sockets[0].getsockname()[:2]
            uvicorn_log.info("Uvicorn running on http://%s (Press CTRL+C to quit)", _address(host, port))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.shutdown_timeout
        ender = asyncio.create_task(self._end_requests(grace, f"after the {grace:g}s shutdown timeout"))
        try:
            await super().shutdown(sockets)
            if self.force_exit:  # a second Ctrl-C: uvicorn waits no more; end what is left now, and tell
                ender.cancel()  # the streams so before the event loop goes
                await self._end_requests(0.0, "(forced quit)")
                deadline = time.monotonic() + FORCE_EXIT_DRAIN_S
                while self.server_state.tasks and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await self.lifespan.shutdown()  # uvicorn skips it on a forced quit: it would be cancelled
        finally:
            ender.cancel()

    async def _end_requests(self, delay: float, why: str) -> None:
        await asyncio.sleep(delay)
        n = self.engine.num_in_flight
        if n:
            log.warning("aborting %d generation(s) still running %s", n, why)
        await self.engine.stop()


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
    """Take host:port, load the model and serve it until interrupted (Ctrl-C: in-flight requests get
    shutdown_timeout seconds to finish, then are aborted: a stream ends with finish_reason "abort" and
    data: [DONE]). engine_config: how the engine runs (default EngineConfig(): the CPU). A busy port (or any
    address that cannot be bound) raises QServeLiteError before anything is loaded; port 0 takes a free one,
    which the startup line names.

    random_weights: a shipped config name (llama-3-8b, ...) or a config.json: serve random weights of that
    shape at `precision` (default w4a8kv4; group_size for W4) with the vocabulary of `tokenizer` (default:
    `model`'s), for load tests (engine/random_engine.py). The startup line and /v1/models say so."""
    with bind(host, port) as sock:
        engine, name, metadata, what = build_engine(
            model, engine_config or EngineConfig(), precision=precision, served_model_name=served_model_name,
            random_weights=random_weights, tokenizer=tokenizer, group_size=group_size,
        )
        address = _address(host, sock.getsockname()[1])
        print(f"qserve-lite: {what}; serving as '{name}' on http://{address}/v1", flush=True)
        if metadata is not None:
            log.warning("serving RANDOM weights (outputs are random text): %s", metadata)
        async_engine = AsyncEngine(engine)
        app = create_app(
            async_engine, name, api_key=api_key, max_request_bytes=max_request_bytes, model_metadata=metadata,
        )
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
        )
        GracefulServer(config, async_engine, shutdown_timeout).run(sockets=[sock])
