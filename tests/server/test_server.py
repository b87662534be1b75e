"""The OpenAI-compatible server, live: uvicorn on 127.0.0.1 (a free port) in a thread of this process, so the
tests can look into the engine (free pages, requests in flight). Clients: the official openai package,
httpx for raw SSE and bad input, hypothesis for a fuzz pass. CPU, tiny model."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qserve_lite import LLM, SamplingParams
from qserve_lite.cli import main as cli_main
from qserve_lite.engine.config import EngineConfig
from qserve_lite.server import missing_server_deps

try:  # the [server] extra and the test clients; without them only the CLI's message is tested
    import httpx
    import openai
    import uvicorn

    from qserve_lite.server import launch
    from qserve_lite.server.app import create_app
    from qserve_lite.server.async_engine import AsyncEngine, EngineError

    HAVE_DEPS = True
except ImportError:
    HAVE_DEPS = False

MODEL = "tiny"
ROOT = Path(__file__).resolve().parents[2]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France is"}]


class _Collect(logging.Handler):
    """ERROR records logged on the given threads (one server's, not another test's)."""

    def __init__(self, records: list, threads: list[threading.Thread]):
        super().__init__(logging.ERROR)
        self.records = records
        self.threads = threads

    def emit(self, record: logging.LogRecord) -> None:
        if any(record.thread == t.ident for t in self.threads):
            self.records.append(record)


class LiveServer:
    """uvicorn serving an LLM's engine on 127.0.0.1; `delay` slows every engine step (seconds), so a test
    can catch a request in flight."""

    def __init__(self, llm: LLM, api_key: str | None = None, shutdown_timeout: float = 5):
        if not HAVE_DEPS:
            pytest.skip("needs pip install '.[server,test]'")
        self.llm = llm
        self.delay = 0.0
        runner_run = llm.engine.runner.run

        def run(seqs, is_prefill):
            if self.delay:
                time.sleep(self.delay)
            return runner_run(seqs, is_prefill)

        llm.engine.runner.run = run
        self.errors: list[logging.LogRecord] = []  # what the server logged at ERROR or above
        self._threads: list[threading.Thread] = []
        self._log_handler = _Collect(self.errors, self._threads)
        for name in ("uvicorn.error", "qserve_lite.server"):
            logging.getLogger(name).addHandler(self._log_handler)
        self.engine = AsyncEngine(llm.engine)
        app = create_app(self.engine, MODEL, api_key=api_key)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None)
        self.server = launch.GracefulServer(config, self.engine, shutdown_timeout)  # serve()'s server
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._threads.append(self.thread)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self._threads.append(self.engine._thread)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        for name in ("uvicorn.error", "qserve_lite.server"):
            logging.getLogger(name).removeHandler(self._log_handler)
        assert not self.thread.is_alive(), "the server did not stop"
        assert not self.engine.is_running and not self.engine._thread.is_alive(), (
            "the engine thread still runs"
        )

    @property
    def free_pages(self) -> int:
        return self.llm.engine.block_manager.num_free

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until nothing is in flight and every page is back."""
        eng = self.llm.engine
        deadline = time.monotonic() + timeout
        while eng.seqs or eng.has_unfinished() or self.free_pages != eng.block_manager.num_pages:
            assert time.monotonic() < deadline, f"still in flight: {eng.seqs}, {self.free_pages} pages free"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    """A second engine on the same model: the offline reference."""
    return LLM(str(tiny_model_dir), max_num_seqs=64)


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    if not HAVE_DEPS:
        pytest.skip("needs pip install '.[server,test]'")
    srv = LiveServer(LLM(str(tiny_model_dir), max_num_seqs=64))
    yield srv
    srv.stop()
    assert not srv.errors, [r.getMessage() for r in srv.errors]


def prompts_for(n: int) -> list[str]:
    words = [
        "The capital of France is",
        "Quantization maps",
        "def forward(x):",
        "Numbers like 12345",
        "A key-value cache",
        "émigré and naïve",
        "東京",
        "1, 2, 3,",
    ]
    return [f"{words[i % len(words)]} {' '.join(words[: i % 5])}".strip() for i in range(n)]


# ---- the openai client ----


def test_models_health_and_openapi(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    schema = httpx.get(live.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_completion_equals_offline_greedy(live, offline):
    client = live.client()
    for prompt in prompts_for(3):
        want = offline.generate(prompt, SamplingParams(max_tokens=20), use_tqdm=False)[0]
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_batch_prompts_token_ids_and_echo(live, offline):
    client = live.client()
    prompts = prompts_for(3)
    want = offline.generate(prompts, SamplingParams(max_tokens=8), use_tqdm=False)
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [w.text for w in want]
    ids = offline.tokenizer.encode(prompts[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == want[0].text
    echoed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + want[0].text


def test_chat_equals_offline_greedy(live, offline):
    want = offline.chat(CHAT, SamplingParams(max_tokens=24), use_tqdm=False)[0]
    got = live.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_chat_stream_with_usage(live, offline):
    want = offline.chat(CHAT, SamplingParams(max_tokens=24), use_tqdm=False)[0]
    stream = live.client().chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_sse_format(live, offline):
    prompt = prompts_for(1)[0]
    want = offline.generate(prompt, SamplingParams(max_tokens=12), use_tqdm=False)[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == want.outputs[0].finish_reason


def test_32_concurrent_streams_equal_offline_and_share_batches(live, offline):
    prompts = prompts_for(32)
    max_tokens = 24
    want = offline.generate(prompts, SamplingParams(max_tokens=max_tokens), use_tqdm=False)
    steps0 = live.llm.engine.num_steps

    async def one(client, prompt):
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        pieces, finish = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    async def main():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    got = asyncio.run(main())
    for (text, finish), w in zip(got, want, strict=True):
        assert text == w.text and finish == w.outputs[0].finish_reason
    total = sum(len(w.outputs[0].token_ids) for w in want)
    assert live.llm.engine.num_steps - steps0 < total / 2, "the streams were not batched together"
    live.wait_idle()


def test_sampling_options_match_offline(live, offline):
    client = live.client()
    prompt = prompts_for(2)[1]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    want = offline.generate(prompt, params, use_tqdm=False)[0]
    got = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=16,
        temperature=0.8,
        top_p=0.9,
        seed=1234,
        extra_body={"top_k": 50},
    )
    assert got.choices[0].text == want.text
    free = offline.generate(prompt, SamplingParams(max_tokens=16), use_tqdm=False)[0].text
    stop = free[3:5] if len(free) >= 5 else None
    if stop:
        want = offline.generate(prompt, SamplingParams(max_tokens=16, stop=stop), use_tqdm=False)[0]
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "stop"
    two = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, n=2)
    assert len(two.choices) == 2 and two.choices[0].text == two.choices[1].text


def test_logprobs(live):
    client = live.client()
    got = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens
    for lps, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert lps <= 0 and 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(lps)  # greedy: top-1
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(
        len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content
    )


# ---- disconnects free pages ----


def test_disconnect_mid_stream_frees_pages(live):
    live.wait_idle()
    initial = live.free_pages
    aborted0 = _metric(live, 'qserve_lite_request_finished_total{finished_reason="abort"}')
    live.delay = 0.01
    try:
        body = {
            "model": MODEL,
            "prompt": "A key-value cache",
            "max_tokens": 200,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert live.free_pages < initial  # the request holds pages now
        # leaving the block closed the connection mid-stream; a non-streaming request that times out too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
        live.wait_idle()
    finally:
        live.delay = 0.0
    assert live.free_pages == initial
    assert _metric(live, 'qserve_lite_request_finished_total{finished_reason="abort"}') == aborted0 + 2


# ---- hardened input ----

LONG = "hello world " * 400  # far past the tiny model's 256-token context
BAD_INPUT = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400, None),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),  # bad UTF-8 inside a string
    ("/v1/completions", rb'{"prompt": "a\ud800"}', 400, "prompt"),  # a lone surrogate (valid JSON)
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b'{"prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": []}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": [[]]}', 400, "prompt"),
    ("/v1/completions", json.dumps({"prompt": LONG}).encode(), 400, "prompt"),
    ("/v1/completions", b'{"prompt": [999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -0.5}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "top_k": -2}', 400, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "top_k": 99999999999999999999999}', 400, "top_k"),
    ("/v1/completions", b'{"prompt": "x", "seed": -1}', 400, "seed"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 1000}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "presence_penalty": 3}', 400, "presence_penalty"),
    ("/v1/completions", b'{"prompt": "x", "stop": [""]}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "x", "stop": 7}', 400, "stop"),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 1}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    (
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 5, ' + b'"a": [' * 5000 + b"]" * 5000 + b"}",
        400,
        None,
    ),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"content": "x"}]}', 400, "messages.0.role"),
    (
        "/v1/chat/completions",
        rb'{"messages": [{"role": "user", "content": "\udfff"}]}',
        400,
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": LONG}]}).encode(),
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]}',
        400,
        "tools",
    ),
    # echo with logprobs would need the prompt tokens' logprobs, which are not computed
    ("/v1/completions", b'{"prompt": "x", "echo": true, "logprobs": 1}', 400, "echo"),
    ("/v1/completions", b'{"prompt": "x", "echo": true, "logprobs": 0, "stream": true}', 400, "echo"),
    # strict JSON types: no booleans (nor strings, nor 5.0 for an integer) where numbers go, no numbers
    # or strings where booleans go
    *[
        ("/v1/completions", b'{"prompt": "x", "%s": %s}' % (field.encode(), value), 400, field)
        for field, value in (
            ("max_tokens", b"true"), ("max_tokens", b"false"), ("max_tokens", b'"5"'), ("max_tokens", b"5.0"),
            ("n", b"true"), ("top_k", b"true"), ("seed", b"false"), ("logprobs", b"true"),
            ("best_of", b"true"), ("temperature", b"true"), ("temperature", b'"0.5"'), ("top_p", b"true"),
            ("min_p", b"false"), ("presence_penalty", b"true"), ("frequency_penalty", b"false"),
            ("repetition_penalty", b"true"), ("stream", b"1"), ("echo", b'"true"'), ("ignore_eos", b"0"),
            ("logit_bias", b'{"5": true}'),
        )
    ],
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [3, true]}', 400, "stop_token_ids.1"),
    ("/v1/completions", b'{"prompt": [true, false]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": 1}}', 400,
     "stream_options.include_usage"),
    *[
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "%s": %s}'
         % (field.encode(), value), 400, field)
        for field, value in (
            ("max_completion_tokens", b"true"), ("max_tokens", b"true"), ("top_logprobs", b"true"),
            ("logprobs", b"1"), ("temperature", b"false"), ("add_generation_prompt", b'"no"'),
        )
    ],
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUT, ids=[f"{i}" for i in range(len(BAD_INPUT))])
def test_bad_input_is_a_4xx_openai_error(live, path, body, status, param):
    r = httpx.post(live.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_strict_types_say_what_was_expected(live):
    """A value of the wrong JSON type is named with its field; integers still go where numbers do."""
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": True})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "max_tokens: expected an integer, got a boolean",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": None,
    }
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "temperature": "0.5"})
    assert r.json()["error"]["message"] == "temperature: expected a number, got a string"
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "stream": 1})
    assert r.json()["error"]["message"] == "stream: expected a boolean, got an integer"
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2.0})
    assert r.json()["error"]["message"] == "max_tokens: expected an integer, got a decimal number"
    with pytest.raises(openai.BadRequestError, match="max_tokens: expected an integer, got a boolean"):
        live.client().completions.create(model=MODEL, prompt="x", max_tokens=True)
    ints = {"temperature": 1, "top_p": 1, "min_p": 0, "presence_penalty": 0, "frequency_penalty": -1,
            "repetition_penalty": 2, "max_tokens": 3, "seed": 0}
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", **ints})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def test_echo_with_logprobs_is_refused_each_alone_works(live):
    """echo + logprobs would return the prompt tokens' logprobs, which the engine does not compute: a 400
    that says so (README: Serving); echo alone and logprobs alone work."""
    client = live.client()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="prompt tokens' log-probabilities") as err:
            client.completions.create(
                model=MODEL, prompt="1, 2, 3,", max_tokens=3, echo=True, logprobs=2, stream=stream
            )
        assert err.value.body["param"] == "echo"
    echoed = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2)
    assert echoed.choices[0].text == "1, 2, 3," + plain.choices[0].text
    assert echoed.choices[0].logprobs is None and len(plain.choices[0].logprobs.tokens) == 3


def test_oversized_bodies_and_unknown_routes(live):
    big = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
    r = httpx.post(live.url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b"x" * 100_000

    r = httpx.post(
        live.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert httpx.get(live.url + "/v1/nothing").status_code == 404
    assert httpx.get(live.url + "/v1/completions").status_code == 405
    assert "error" in httpx.get(live.url + "/v1/nothing").json()
    with pytest.raises(openai.NotFoundError):
        live.client().models.retrieve("other-model")
    with pytest.raises(openai.BadRequestError):
        live.client().completions.create(model=MODEL, prompt="x", max_tokens=0)


def test_fuzz_never_5xx(live):
    """Hypothesis bodies never get a 5xx (nor a 200 stream that carries an error): valid requests over the
    whole parameter space, valid ones with some fields turned to junk, arbitrary JSON, arbitrary bytes.
    Afterwards the server still answers and no page is lost."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
    junk = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    edge = {  # values at and past the edges of each field's range
        "max_tokens": st.sampled_from([-1, 0, 255, 256, 257, 2**31, 2**64]),
        "temperature": st.sampled_from([-1e-9, 1e-9, 1e30, float("inf"), float("nan")]),
        "top_p": st.sampled_from([0.0, -0.1, 1.0 + 1e-9, 1e-300]),
        "top_k": st.sampled_from([-2, 0, 319, 320, 2**31, 2**63]),
        "seed": st.sampled_from([-1, 2**63 - 1, 2**63, 2**64]),
        "n": st.sampled_from([0, 129, 10**6]),
        "repetition_penalty": st.sampled_from([0.0, 1e-300, 100.0, 101.0]),
        "logprobs": st.sampled_from([-1, 20, 21, True]),
        "stop": st.lists(st.text(max_size=2), min_size=15, max_size=20),
        "stop_token_ids": st.lists(st.integers(-2, 2**40), max_size=3),
    }
    text = st.text(min_size=1, max_size=30) | st.builds(  # lone surrogates are valid JSON, invalid text
        lambda a, b: a + b, st.text(max_size=5), st.sampled_from(["\ud800", "\udfff"])
    )
    valid = {
        "model": st.just(MODEL),
        "max_tokens": st.integers(1, 8),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(-1, 400),
        "min_p": st.floats(0, 1),
        "seed": st.integers(0, 2**63 - 1),
        "n": st.integers(1, 3),
        "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
        "stop_token_ids": st.lists(st.integers(0, 319), max_size=3),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.01, 100),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "ignore_eos": st.booleans(),
    }
    completion_only = {"logprobs": st.integers(0, 20), "echo": st.booleans()}
    chat_only = {
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20),
        "max_completion_tokens": st.integers(1, 8),
    }
    prompt = (
        text
        | st.lists(st.integers(0, 319), min_size=1, max_size=6)
        | st.lists(text, min_size=1, max_size=3)
        | st.lists(st.lists(st.integers(0, 319), min_size=1, max_size=4), min_size=1, max_size=2)
    )
    role = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
    content = text | st.lists(
        st.fixed_dictionaries({"type": st.just("text"), "text": text}), min_size=1, max_size=2
    )
    messages = st.lists(st.fixed_dictionaries({"role": role, "content": content}), min_size=1, max_size=3)

    def mixed(fields: dict) -> dict:  # each field valid, at an edge, or junk
        return {k: v | edge.get(k, junk) | junk for k, v in fields.items()}

    completion = st.fixed_dictionaries({"prompt": prompt}, optional=valid | completion_only)
    chat = st.fixed_dictionaries({"messages": messages}, optional=valid | chat_only)
    completion_mixed = st.fixed_dictionaries(
        {"prompt": prompt | junk}, optional=mixed(valid | completion_only)
    )
    chat_mixed = st.fixed_dictionaries(
        {
            "messages": messages
            | st.lists(st.fixed_dictionaries({"role": role | junk, "content": content | junk}), max_size=2)
            | junk
        },
        optional=mixed(valid | chat_only),
    )
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
    case = (
        st.tuples(st.just("/v1/completions"), completion | completion_mixed)
        | st.tuples(st.just("/v1/chat/completions"), chat | chat_mixed)
        | st.tuples(paths, junk)
        | st.tuples(paths, st.binary(max_size=64))
    )
    statuses = []

    with httpx.Client(base_url=live.url, timeout=30) as http:

        @hypothesis.settings(
            max_examples=250, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
        )
        @hypothesis.given(case=case)
        def check(case):
            path, payload = case
            if isinstance(payload, bytes):
                content = payload
            else:
                content = json.dumps(payload, allow_nan=True).encode()
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (content[:300], r.text[:300])
            assert b'data: {"error"' not in r.content, (content[:300], r.text[:300])
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert statuses.count(200) >= 20 and any(400 <= s < 500 for s in statuses), statuses
    got = live.client().completions.create(model=MODEL, prompt="still alive", max_tokens=3, temperature=0)
    assert got.usage.completion_tokens >= 1
    live.wait_idle()


def test_fuzz_wrong_json_types_are_400(live):
    """Hypothesis: a valid request with some numeric fields turned to booleans or numeric strings (or some
    boolean fields to 0 / 1 / "true") is a 400 naming one of those fields, never accepted as 1 or 0."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    numbers = {
        "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
        "top_k": st.integers(-1, 400), "min_p": st.floats(0, 1), "seed": st.integers(0, 2**63 - 1),
        "n": st.integers(1, 3), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "repetition_penalty": st.floats(0.01, 100),
    }
    booleans = {"stream": st.booleans(), "ignore_eos": st.booleans()}
    completion_fields = numbers | booleans | {
        "logprobs": st.integers(0, 5), "best_of": st.just(1), "echo": st.booleans()
    }
    chat_fields = numbers | booleans | {
        "max_completion_tokens": st.integers(1, 8), "top_logprobs": st.integers(0, 5),
        "logprobs": st.just(True), "add_generation_prompt": st.booleans(),
    }
    bool_fields = {"stream", "ignore_eos", "echo", "add_generation_prompt"}
    not_a_number = st.booleans() | st.sampled_from(["1", "0.5", "true"])
    not_a_boolean = st.sampled_from([0, 1, 1.0, "true", "false", None, [True]])  # these have no null

    @st.composite
    def case(draw):
        chat = draw(st.booleans())
        fields = chat_fields if chat else completion_fields
        body = draw(st.fixed_dictionaries({}, optional=fields))
        if chat:
            body["messages"] = CHAT
        else:
            body["prompt"] = draw(st.sampled_from(["Hello", [5, 6, 7]]))
        bad = draw(st.sets(st.sampled_from(sorted(fields)), min_size=1, max_size=3))
        for name in bad:
            is_bool = name in bool_fields or (chat and name == "logprobs")  # chat's logprobs: a boolean
            body[name] = draw(not_a_boolean if is_bool else not_a_number)
        return ("/v1/chat/completions" if chat else "/v1/completions"), body, bad

    with httpx.Client(base_url=live.url, timeout=30) as http:

        @hypothesis.settings(
            max_examples=100, deadline=None, database=None, suppress_health_check=list(hypothesis.HealthCheck)
        )
        @hypothesis.given(c=case())
        def check(c):
            path, body, bad = c
            r = http.post(path, json=body)
            assert r.status_code == 400, (body, r.text[:300])
            error = r.json()["error"]
            assert error["param"] in bad and "expected" in error["message"], (body, error)

        check()
    live.wait_idle()


# ---- metrics ----


def _metric(live, name: str) -> float:
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics(live):
    live.client().completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0)
    r = httpx.get(live.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_count",
    ):
        assert f"qserve_lite_{name}" in text
    assert _metric(live, "qserve_lite_prompt_tokens_total") > 0
    assert _metric(live, "qserve_lite_generation_tokens_total") >= 4
    assert _metric(live, "qserve_lite_time_to_first_token_seconds_count") >= 1
    assert _metric(live, 'qserve_lite_time_to_first_token_seconds_bucket{le="+Inf"}') == _metric(
        live, "qserve_lite_time_to_first_token_seconds_count"
    )
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# ---- auth, shutdown ----


def test_api_key(tiny_model_dir):
    srv = LiveServer(LLM(str(tiny_model_dir), max_num_seqs=4), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(
            srv.url + "/v1/completions", content=b"{bad json", headers={"authorization": "Bearer no"}
        )
        assert r.status_code == 401  # the key is checked before the body is read
        got = srv.client(api_key="s3cret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert got.usage.completion_tokens >= 1
        assert httpx.get(srv.url + "/health").status_code == 200  # health and metrics stay open
        assert httpx.get(srv.url + "/metrics").status_code == 200
    finally:
        srv.stop()


def _sse_lines(url: str, path: str, body: dict, results: dict, name: str) -> None:
    """POST a streaming request; results[name]: its non-empty lines (and how it failed, if it did)."""
    lines = results.setdefault(name, [])
    try:
        with httpx.stream("POST", url + path, json=body, timeout=60) as r:
            lines.append(f"status {r.status_code}")
            for line in r.iter_lines():
                if line:
                    lines.append(line)
    except httpx.HTTPError as e:
        lines.append(f"error: {type(e).__name__}: {e}")


def _assert_ended(lines: list[str], finish_reason: str | None = None) -> dict:
    """A whole event stream: 200, chunks, a last chunk with a finish_reason, then data: [DONE]."""
    assert lines[0] == "status 200" and lines[-1] == "data: [DONE]", lines[:2] + lines[-3:]
    last = json.loads(lines[-2][6:])
    assert "error" not in last and last["choices"][0]["finish_reason"], last
    if finish_reason is not None:
        assert last["choices"][0]["finish_reason"] == finish_reason, last
    return last


def test_graceful_shutdown(tiny_model_dir):
    """On shutdown (serve()'s GracefulServer) a short in-flight stream finishes whole; the long ones are
    aborted at the grace timeout and still end properly (a last chunk with finish_reason "abort", then
    data: [DONE]); a non-streaming request in flight gets a 503; nothing is logged at ERROR (no "Exception
    in ASGI application"); the engine thread ends with every page free."""
    srv = LiveServer(LLM(str(tiny_model_dir), max_num_seqs=8), shutdown_timeout=1)
    srv.delay = 0.01
    results = {}
    base = {"model": MODEL, "ignore_eos": True, "temperature": 0, "stream": True}
    completion = base | {"prompt": "Quantization maps"}
    chat = base | {"messages": CHAT, "stream_options": {"include_usage": True}}
    jobs = {
        "short": ("/v1/completions", completion | {"max_tokens": 30}),
        "long": ("/v1/completions", completion | {"max_tokens": 250}),
        "long-n2": ("/v1/completions", completion | {"max_tokens": 250, "n": 2}),
        "long-chat": ("/v1/chat/completions", chat | {"max_tokens": 200}),
    }
    threads = [
        threading.Thread(target=_sse_lines, args=(srv.url, path, body, results, name))
        for name, (path, body) in jobs.items()
    ]

    def whole():
        body = completion | {"max_tokens": 250, "stream": False}
        results["whole"] = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)

    threads.append(threading.Thread(target=whole))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while srv.llm.engine.num_generated_tokens < 12 or srv.engine.num_in_flight < 6:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 5  # the grace period (1 s) and a step or two, not uvicorn's backstop
    for t in threads:
        t.join(10)
    assert _assert_ended(results["short"], "length")
    assert _assert_ended(results["long"], "abort")
    chunks = [json.loads(line[6:]) for line in results["long-n2"][1:-1]]
    assert {c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] == "abort"} == {0, 1}
    assert _assert_ended(results["long-n2"], "abort")
    usage = json.loads(results["long-chat"][-2][6:])  # include_usage: the usage chunk comes last
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    chat_chunks = [json.loads(line[6:]) for line in results["long-chat"][1:-2]]
    assert chat_chunks[-1]["choices"][0]["finish_reason"] == "abort"
    r = results["whole"]
    assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    assert not srv.errors, [rec.getMessage() for rec in srv.errors]
    assert not srv.llm.engine.seqs and srv.free_pages == srv.llm.engine.block_manager.num_pages


def test_forced_quit_still_ends_streams(tiny_model_dir):
    """A second Ctrl-C (uvicorn's force_exit) during the grace period: what runs is aborted at once and every
    stream still ends with finish_reason "abort" and data: [DONE]; nothing is logged at ERROR."""
    srv = LiveServer(LLM(str(tiny_model_dir), max_num_seqs=4), shutdown_timeout=30)
    srv.delay = 0.01
    results = {}
    body = {"model": MODEL, "prompt": "Quantization maps", "max_tokens": 250, "ignore_eos": True}
    body["stream"] = True
    threads = [
        threading.Thread(target=_sse_lines, args=(srv.url, "/v1/completions", body, results, name))
        for name in ("a", "b")
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while srv.engine.num_in_flight < 2 or srv.llm.engine.num_generated_tokens < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.server.should_exit = True  # the first Ctrl-C ...
    time.sleep(0.3)
    srv.server.force_exit = True  # ... and the second
    srv.stop()
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(10)
    for name in ("a", "b"):
        _assert_ended(results[name], "abort")
    assert not srv.errors, [rec.getMessage() for rec in srv.errors]
    assert not srv.llm.engine.seqs and srv.free_pages == srv.llm.engine.block_manager.num_pages


# ---- the engine loop alone ----


def test_async_engine_stop_aborts_in_flight_and_a_failed_step_fails_only_its_batch(tiny_model_dir):
    if not HAVE_DEPS:
        pytest.skip("needs pip install '.[server,test]'")
    llm = LLM(str(tiny_model_dir), max_num_seqs=8)
    num_pages = llm.engine.block_manager.num_pages
    run = llm.engine.runner.run
    fail = {"next": False}

    def flaky_run(seqs, is_prefill):
        time.sleep(0.002)
        if fail["next"]:
            fail["next"] = False
            raise RuntimeError("injected step failure")
        return run(seqs, is_prefill)

    llm.engine.runner.run = flaky_run
    ids = llm.tokenizer.encode("Quantization maps")
    params = [SamplingParams(max_tokens=200, ignore_eos=True)]

    async def first_then_rest(sub):
        agen = sub.deltas()
        last = await agen.__anext__()
        async for last in agen:  # noqa: B007 - the last delta is the result
            pass
        return last

    async def main():
        engine = AsyncEngine(llm.engine)
        engine.start()
        sub = engine.submit([ids], params)
        fail["next"] = True  # the next step raises: the request in it fails with a 500 ...
        with pytest.raises(EngineError) as err:
            await first_then_rest(sub)
        assert err.value.status == 500
        await asyncio.sleep(0.05)
        assert not llm.engine.seqs and llm.engine.block_manager.num_free == num_pages
        ok = engine.submit([ids], [SamplingParams(max_tokens=5, ignore_eos=True)])  # ... the engine goes on
        assert sum([len(d.token_ids) async for d in ok.deltas()]) == 5
        long = engine.submit([ids], params)
        task = asyncio.create_task(first_then_rest(long))
        await asyncio.sleep(0.05)
        await engine.stop()  # shutdown: what is in flight ends with finish_reason "abort", the thread ends
        last = await task
        assert last.finish_reason == "abort" and last.num_output_tokens >= 1
        assert not engine._thread.is_alive() and not engine.is_running
        with pytest.raises(EngineError):
            engine.submit([ids], params)
        assert engine.metrics.finished.get("error") == 1 and engine.metrics.finished.get("abort") == 1

    asyncio.run(main())
    assert not llm.engine.seqs and llm.engine.block_manager.num_free == num_pages


# ---- the command line ----


def test_cli_serve_without_the_extra(monkeypatch, capsys):
    monkeypatch.setattr("qserve_lite.server.missing_server_deps", lambda: ["fastapi", "uvicorn"])
    assert cli_main(["serve", "--model", "whatever"]) == 2
    err = capsys.readouterr().err
    assert "fastapi and uvicorn" in err and "qserve-lite[server]" in err


def test_cli_serve_starts_uvicorn(tiny_model_dir, monkeypatch, capsys):
    if missing_server_deps():
        pytest.skip("needs pip install '.[server]'")
    import uvicorn

    seen = {}

    def run(self, sockets=None):
        seen.update(config=self.config, server=self, port=sockets[0].getsockname()[1])

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setenv("QSERVE_LITE_API_KEY", "from-env")
    argv = [
        "serve",
        "--model",
        str(tiny_model_dir),
        "--port",
        "0",  # a free port, bound before the model is loaded; the startup line names it
        "--served-model-name",
        "tiny",
        "--max-num-seqs",
        "4",
        "--shutdown-timeout",
        "3",
        "--no-access-log",
    ]
    assert cli_main(argv) == 0
    config, server = seen["config"], seen["server"]
    assert (config.host, config.access_log) == ("127.0.0.1", False)
    assert isinstance(server, launch.GracefulServer) and server.shutdown_timeout == 3
    assert config.timeout_graceful_shutdown == 3 + launch.SHUTDOWN_BACKSTOP_S  # uvicorn's: a backstop
    guard = config.app.user_middleware[0]
    assert guard.kwargs["api_key"] == "from-env"
    assert seen["port"] > 0
    assert f"serving as 'tiny' on http://127.0.0.1:{seen['port']}/v1" in capsys.readouterr().out


def test_cli_serve_engine_flags_reach_the_engine(tiny_model_dir, monkeypatch, capsys):
    """Every engine flag (EngineConfig.add_cli_arguments) reaches LLM as one EngineConfig, and the engine runs
    with it: --max-num-batched-tokens is the scheduler's prefill budget (and caps max_model_len)."""
    if missing_server_deps():
        pytest.skip("needs pip install '.[server]'")
    seen = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets=None: seen.setdefault("config", self.config)
    )
    real_llm = launch.LLM

    def llm(model, precision=None, *, config: EngineConfig):
        seen["engine_config"] = config
        return real_llm(model, precision, config=config)

    monkeypatch.setattr(launch, "LLM", llm)
    argv = ["serve", "--model", str(tiny_model_dir), "--port", "0", "--device", "cpu", "--max-num-seqs", "3",
            "--max-num-batched-tokens", "100", "--gpu-memory-utilization", "0.5", "--num-pages", "40",
            "--seed", "7", "--no-cuda-graphs"]
    assert cli_main(argv) == 0
    config = seen["engine_config"]
    assert config == EngineConfig(device="cpu", max_num_seqs=3, max_num_batched_tokens=100, num_pages=40,
                                  gpu_memory_utilization=0.5, seed=7, cuda_graphs=False)
    engine = seen["config"].app.state.server.engine.engine
    assert engine.scheduler.max_num_batched_tokens == 100 and engine.scheduler.max_num_seqs == 3
    assert engine.max_model_len == 100 and engine.block_manager.num_pages == 40
    assert "max_model_len 100, 40 KV pages" in capsys.readouterr().out


def test_cli_serve_engine_flag_defaults_and_errors(tiny_model_dir, monkeypatch, capsys):
    if missing_server_deps():
        pytest.skip("needs pip install '.[server]'")
    seen = []
    monkeypatch.setattr(launch, "serve", lambda model, **kw: seen.append(kw["engine_config"]))
    assert cli_main(["serve", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    assert seen[-1] == EngineConfig(device="cpu", cuda_graphs=seen[-1].cuda_graphs)
    assert seen[-1].max_num_seqs == 256 and seen[-1].max_num_batched_tokens is None
    assert seen[-1].gpu_memory_utilization == 0.9 and seen[-1].seed == 0
    for flag, value, message in (
        ("--gpu-memory-utilization", "1.5", "gpu_memory_utilization must be in (0, 1]"),
        ("--max-num-batched-tokens", "1", "max_num_batched_tokens must be an integer >= 2"),
        ("--max-num-seqs", "0", "max_num_seqs must be an integer >= 1"),
    ):
        assert cli_main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", flag, value]) == 2
        assert message in capsys.readouterr().err
    assert len(seen) == 1  # a bad value fails before anything is loaded


def test_cli_serve_busy_port_is_a_user_error(tiny_model_dir, monkeypatch, capsys):
    """A port another server listens on: one line naming it, exit status 2, before anything is loaded or
    announced; the same for an address that is not this machine's."""
    if missing_server_deps():
        pytest.skip("needs pip install '.[server]'")

    def not_reached(*args, **kw):
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(launch, "LLM", not_reached)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        argv = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port)]
        assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing announced
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"qserve-lite: error: cannot listen on 127.0.0.1:{port}: the port is already in ")
    argv = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--host", "192.0.2.1", "--port", "0"]
    assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "cannot listen on 192.0.2.1:0: " in err, err


SLOW_SERVE = """
import sys, time
from qserve_lite.cli import main
from qserve_lite.engine.model_runner import ModelRunner

run = ModelRunner.run


def slow(self, seqs, is_prefill):  # every engine step takes 20 ms more: the streams are still running
    time.sleep(0.02)
    return run(self, seqs, is_prefill)


ModelRunner.run = slow
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_ends_every_stream_and_prints_no_traceback(tiny_model_dir):
    """`qserve-lite serve` in a process of its own, Ctrl-C (SIGINT) while streams run: each client stream
    ends with a final chunk (finish_reason "abort" past --shutdown-timeout) and data: [DONE], the server's
    output holds no traceback, and it exits as interrupted (130)."""
    if not HAVE_DEPS:
        pytest.skip("needs pip install '.[server,test]'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    argv = ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", "0",
            "--shutdown-timeout", "1", "--served-model-name", MODEL]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVE, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    try:
        match = None
        while match is None:  # the startup line, once the port is bound and the model loaded
            line = proc.stdout.readline()
            assert line, "".join(output)  # the server ended
            output.append(line)
            match = re.search(r"serving as 'tiny' on (http://127\.0\.0\.1:\d+)/v1", line)
        url = match.group(1)
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "".join(output)
            time.sleep(0.05)
        results = {}
        body = {"model": MODEL, "prompt": "A key-value cache", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        chat = {"model": MODEL, "messages": CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
        jobs = [("/v1/completions", body, "a"), ("/v1/completions", body | {"n": 2}, "b"),
                ("/v1/chat/completions", chat, "c")]
        threads = [
            threading.Thread(target=_sse_lines, args=(url, path, b, results, name)) for path, b, name in jobs
        ]
        for t in threads:
            t.start()
        while sum(len(v) for v in results.values()) < 12:  # every stream is under way
            assert time.monotonic() < deadline, results
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 130
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(output)
    for name in "abc":
        _assert_ended(results[name], "abort")
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text
    assert "aborting 4 generation(s) still running after the 1s shutdown timeout" in text, text
