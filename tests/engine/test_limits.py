"""Limits every front shares (max_tokens vs max_model_len, the too-long prompt) and abort_all, which leaves a
clean engine even after a step cut short by Ctrl-C."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.engine.block_manager import BlockManager
from qserve_lite.engine.llm_engine import LLMEngine, check_max_tokens
from qserve_lite.errors import QServeLiteError, SamplingError
from qserve_lite.io.loader import load_model
from qserve_lite.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def greedy(engine: LLMEngine, prompt: list[int], n: int = 6) -> list[int]:
    rid = engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                result = out.outputs[0].token_ids
    return result


def test_check_max_tokens_is_the_servers_rule():
    check_max_tokens(None, 128)  # not given: the engine stops at max_model_len
    check_max_tokens(128, 128)
    with pytest.raises(SamplingError, match=r"^max_tokens is 129, but this model's maximum context length is "
                       r"128 tokens \(prompt \+ output\)$"):
        check_max_tokens(129, 128)


def test_prompt_too_long_names_the_flags(tiny):
    capped = LLMEngine(tiny, num_pages=8, max_model_len=64)  # the tiny model's context is 256
    with pytest.raises(QServeLiteError) as e:
        capped.add_request([5] * 64)
    msg = str(e.value)
    assert "\n" not in msg and "at most 63 fit" in msg
    assert "--max-model-len" in msg and "--num-pages" in msg and "context of 256 tokens" in msg
    full = LLMEngine(tiny, num_pages=8)  # max_model_len = the context
    with pytest.raises(QServeLiteError) as e:
        full.add_request([5] * 300)
    msg = str(e.value)
    assert "\n" not in msg and "at most 255 fit" in msg and "the model's context" in msg
    assert "--max-model-len" not in msg  # raising it cannot help


def interrupted_admission(tiny, monkeypatch) -> tuple[LLMEngine, str]:
    """An engine whose step() was cut by Ctrl-C while admitting a request: a page taken off the free list
    but not yet in the sequence's block table."""
    engine = LLMEngine(tiny, num_pages=8)
    engine.add_request(list(range(3, 70)), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # prefilled, running
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))

    def interrupted(self, seq, n):
        self.free_pages.popleft()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(BlockManager, "_take", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.step()
    return engine, rid


def test_abort_all_after_an_interrupted_step(tiny, monkeypatch):
    """abort() would leak the page in flight; abort_all gives back the whole pool and the engine answers
    exactly as a fresh one does."""
    prompt = list(range(3, 70))
    want = greedy(LLMEngine(tiny, num_pages=8), prompt)
    leaky, _ = interrupted_admission(tiny, monkeypatch)
    for rid in list(leaky.seqs):
        leaky.abort(rid)
    assert leaky.block_manager.num_free == 7  # one page lost

    engine, _ = interrupted_admission(tiny, monkeypatch)
    engine.abort_all()
    assert not engine.seqs and not engine.has_unfinished()
    assert sorted(engine.block_manager.free_pages) == list(range(8))
    assert sorted(engine.scheduler.free_slots) == list(range(engine.engine_config.max_num_seqs))
    assert engine.step() == []
    assert greedy(engine, prompt) == want


def test_abort_all_mid_forward(tiny, monkeypatch):
    """The usual case: Ctrl-C inside the model's forward."""
    engine = LLMEngine(tiny, num_pages=8)
    prompt = [5, 9, 11, 40]
    want = greedy(LLMEngine(tiny, num_pages=8), prompt)
    run = engine.runner.run
    calls = []

    def run_then_interrupt(seqs, is_prefill):
        calls.append(is_prefill)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(seqs, is_prefill)

    monkeypatch.setattr(engine.runner, "run", run_then_interrupt)
    engine.add_request(prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    with pytest.raises(KeyboardInterrupt):
        while engine.has_unfinished():
            engine.step()
    engine.abort_all()
    assert engine.block_manager.num_free == 8 and not engine.has_unfinished()
    assert np.array_equal(greedy(engine, prompt), want)
