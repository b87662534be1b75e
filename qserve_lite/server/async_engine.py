"""AsyncEngine: the LLMEngine's step loop on its own thread, fed by and feeding the asyncio HTTP layer.

- One thread owns the engine: it alone calls add_request / abort / step, so the engine needs no locks and
  the event loop never waits for a step. Handlers hand it commands (add, abort) through an inbox; the thread
  applies them between steps, so new requests join the running batch at the next step (in-flight batching).
- Each HTTP request is a Submission (one engine request per choice) with one asyncio.Queue. After every
  step the thread computes each request's new text / tokens (a Delta) and hands them to the event loop in
  one call_soon_threadsafe.
- A client that goes away aborts its requests (Submission.abort): the engine frees their pages at once.
- stop() aborts what is still in flight (each choice's last delta has finish_reason "abort": a stream ends
  with a final chunk, a whole response is answered 503) and ends the thread.
- An exception in a step fails every request in flight (HTTP 500 to each) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.errors import QServeLiteError
from qserve_lite.outputs import RequestOutput
from qserve_lite.sampling_params import SamplingParams
from qserve_lite.server.metrics import ServerMetrics

log = logging.getLogger("qserve_lite.server")


class EngineError(Exception):
    """A request could not be completed: status is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class Delta:
    """What one choice gained in one step (text may lag tokens: incomplete characters and possible stop
    strings are held back until they resolve)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop", "length" or "abort" on the last delta
    stop_reason: int | str | None
    num_output_tokens: int  # generated so far


class Submission:
    """The engine requests of one HTTP request (one per choice) and the queue their deltas arrive on."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], prompts: list[list[int]]):
        self.engine = engine
        self.request_ids = request_ids
        self.prompts = prompts
        self.queue: asyncio.Queue[Delta | EngineError] = asyncio.Queue()
        self.unfinished = set(range(len(request_ids)))
        self.num_output_tokens = [0] * len(request_ids)

    async def deltas(self) -> AsyncIterator[Delta]:
        """Deltas of every choice in arrival order, until all have finished. A choice the engine aborted
        (shutdown: AsyncEngine.stop) ends with finish_reason "abort", like any other finish. Raises
        EngineError if the engine failed the request."""
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, EngineError):
                self.abort()  # the other choices, if any are still running
                raise item
            self.num_output_tokens[item.index] = item.num_output_tokens
            if item.finish_reason is not None:
                self.unfinished.discard(item.index)
            yield item

    def abort(self) -> None:
        """Abort the choices that have not finished (no-op once all have)."""
        pending = [self.request_ids[i] for i in self.unfinished]
        self.unfinished.clear()
        if pending:
            self.engine.abort(pending)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class _Tracked:
    """Engine-thread state of one request: where its stream stands, for deltas and latencies."""

    __slots__ = ("submission", "index", "arrival", "sent_chars", "sent_tokens", "last_token_time")

    def __init__(self, submission: Submission, index: int, arrival: float):
        self.submission = submission
        self.index = index
        self.arrival = arrival
        self.sent_chars = 0
        self.sent_tokens = 0
        self.last_token_time: float | None = None


class AsyncEngine:
    """Runs `engine` on a background thread; start() and submit() are called from the event loop."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics(self.gauges)
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", request_id, prompt, params, tracked) | ("abort", ids)
        self._num_pending_adds = 0
        self._stopping = False
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    # ---- event-loop side ----

    def start(self) -> None:
        """Start the engine thread (idempotent); deltas are delivered to the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="qserve-lite-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(
        self, prompts: list[list[int]], params: list[SamplingParams], prefix: str = "req"
    ) -> Submission:
        """Queue one engine request per (prompt token ids, params); they join the batch at the next step.
        The caller has validated them (app.py), so add_request does not fail in practice."""
        n = next(self._ids)
        request_ids = [f"{prefix}-{n}-{i}" for i in range(len(prompts))]
        sub = Submission(self, request_ids, prompts)
        arrival = time.monotonic()
        with self._cond:  # checked under the lock: an add queued here is seen by the thread before it stops
            if not self.is_running:
                raise EngineError("the engine is not running (the server is starting or shutting down)", 503)
            for i, (rid, prompt, p) in enumerate(zip(request_ids, prompts, params, strict=True)):
                self._inbox.append(("add", rid, prompt, p, _Tracked(sub, i, arrival)))
            self._num_pending_adds += len(prompts)
            self._cond.notify()
        return sub

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._inbox.append(("abort", list(request_ids)))
            self._cond.notify()

    async def stop(self, timeout: float = 30.0) -> None:
        """Abort everything in flight and end the engine thread."""
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout)

    @property
    def num_in_flight(self) -> int:
        """Engine requests queued or running (read while the engine thread runs)."""
        return len(self._tracked) + self._num_pending_adds

    def gauges(self) -> tuple[int, int, float]:
        """(running, waiting, KV cache usage): read while the engine thread runs (len() is atomic)."""
        sched, bm = self.engine.scheduler, self.engine.block_manager
        return (
            len(sched.running),
            len(sched.waiting) + self._num_pending_adds,
            1.0 - bm.num_free / bm.num_pages,
        )

    # ---- engine thread ----

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not engine.has_unfinished():
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                stopping = self._stopping
            deliveries: list[tuple[Submission, Delta | EngineError]] = []
            try:
                for command in commands:
                    self._apply(command, deliveries)
                if stopping:
                    self._abort_all(deliveries)
                elif engine.has_unfinished():
                    outputs = engine.step()
                    now = time.monotonic()
                    for out in outputs:
                        self._on_output(out, now, deliveries)
            except Exception:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(deliveries, "internal error in the engine step (see the server log)")
            self._deliver(deliveries)
            if stopping:
                return

    def _apply(self, command: tuple, deliveries: list) -> None:
        if command[0] == "add":
            _, rid, prompt, params, tracked = command
            with self._cond:
                self._num_pending_adds -= 1
            try:
                self.engine.add_request(prompt, params, request_id=rid)
            except QServeLiteError as e:
                deliveries.append((tracked.submission, EngineError(str(e), 400)))
                return
            self._tracked[rid] = tracked
            self.metrics.on_admit(len(prompt))
        else:
            now = time.monotonic()
            for rid in command[1]:
                tracked = self._tracked.pop(rid, None)
                if self.engine.abort(rid) and tracked is not None:
                    self.metrics.on_finish("abort", now - tracked.arrival)

    def _on_output(self, out: RequestOutput, now: float, deliveries: list) -> None:
        t = self._tracked.get(out.request_id)
        if t is None:
            return
        c = out.outputs[0]
        n_new = len(c.token_ids) - t.sent_tokens
        if n_new > 0:
            ttft = now - t.arrival if t.last_token_time is None else None
            itl = (now - t.last_token_time) / n_new if t.last_token_time is not None else None
            self.metrics.on_tokens(n_new, ttft, itl)
            t.last_token_time = now
        text = c.text[t.sent_chars :]
        if not text and n_new <= 0 and not out.finished:
            return
        delta = Delta(
            index=t.index,
            text=text,
            token_ids=c.token_ids[t.sent_tokens :],
            logprobs=c.logprobs[t.sent_tokens :] if c.logprobs is not None else None,
            finish_reason=c.finish_reason if out.finished else None,
            stop_reason=c.stop_reason if out.finished else None,
            num_output_tokens=len(c.token_ids),
        )
        t.sent_chars, t.sent_tokens = len(c.text), len(c.token_ids)
        if out.finished:
            del self._tracked[out.request_id]
            self.metrics.on_finish(c.finish_reason or "stop", now - t.arrival)
        deliveries.append((t.submission, delta))

    def _abort_all(self, deliveries: list) -> None:
        now = time.monotonic()
        for rid, t in list(self._tracked.items()):
            self.engine.abort(rid)
            self.metrics.on_finish("abort", now - t.arrival)
            deliveries.append((t.submission, Delta(t.index, "", [], None, "abort", None, t.sent_tokens)))
        self._tracked.clear()

    def _fail_all(self, deliveries: list, message: str) -> None:
        now = time.monotonic()
        failed = set()
        for rid, t in list(self._tracked.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - keep freeing the others
                log.exception("abort of %s failed", rid)
            self.metrics.on_finish("error", now - t.arrival)
            if id(t.submission) not in failed:
                failed.add(id(t.submission))
                deliveries.append((t.submission, EngineError(message, 500)))
        self._tracked.clear()

    def _deliver(self, deliveries: list) -> None:
        if not deliveries:
            return

        def put_all():
            for sub, item in deliveries:
                sub.queue.put_nowait(item)

        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass
