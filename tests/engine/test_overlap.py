"""Overlapped engine steps (EngineConfig.async_scheduling): the GPU runner's loop on its numpy twin must give
exactly what the synchronous loop gives, end requests exactly where it does, and never leak a page."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_traffic, random_weights, tiny_config, write_model

from qserve_lite.engine.gpu_model_runner import GPUModelRunner
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.io.loader import load_model
from qserve_lite.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def twin_model(tmp_path_factory):
    """A tiny Llama the GPU runner takes (head_dim 64), with a real BPE tokenizer."""
    cfg = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=64, num_hidden_layers=2, max_position_embeddings=512)
    tensors = random_weights(cfg, seed=3)
    tensors["embed_tokens.weight" if "embed_tokens.weight" in tensors else "model.embed_tokens.weight"] *= 3
    return load_model(write_model(tmp_path_factory.mktemp("overlap"), cfg, tensors))


def engine_of(model, overlap: bool, **options) -> LLMEngine:
    options = {"max_num_seqs": 8, "num_pages": 24, "max_model_len": 256, **options}
    runner = GPUModelRunner(model, max_num_batched_tokens=512, xp=np, **options)
    return LLMEngine(model, runner=runner, async_scheduling=overlap, **options)


def run_all(engine: LLMEngine, requests) -> tuple[dict, dict]:
    """Queue (prompt, params) pairs, step to the end; (final output by index, steps seen per index)."""
    ids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(requests)}
    final, per_step = {}, {i: 0 for i in ids.values()}
    while engine.has_unfinished():
        for out in engine.step():
            i = ids[out.request_id]
            per_step[i] += 1
            assert i not in final, "a request reported after it finished"
            if out.finished:
                final[i] = out
    return final, per_step


def summary(out) -> tuple:
    c = out.outputs[0]
    return c.token_ids, c.text, c.finish_reason, c.stop_reason


def requests_mix(model) -> list:
    """Six requests; two of them stop on a token and on a string that their own greedy run produces."""
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, 320, size=n).tolist() for n in (5, 40, 70, 9, 130, 20)]
    free, _ = run_all(engine_of(model, overlap=False),
                      [(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in prompts])
    stop_token = free[2].outputs[0].token_ids[6]
    text = free[3].outputs[0].text
    stop_text = text[len(text) // 2 : len(text) // 2 + 2]
    params = [
        SamplingParams(max_tokens=17, ignore_eos=True),
        SamplingParams(max_tokens=40),  # ends on EOS or length
        SamplingParams(max_tokens=33, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=25, stop=[stop_text]),
        SamplingParams(max_tokens=1, ignore_eos=True),
        SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, top_k=50, seed=5, ignore_eos=True),
    ]
    return list(zip(prompts, params, strict=True))


def test_overlap_is_token_identical_to_the_synchronous_loop(twin_model):
    reqs = requests_mix(twin_model)
    want, want_steps = run_all(engine_of(twin_model, overlap=False), reqs)
    got, got_steps = run_all(engine_of(twin_model, overlap=True), reqs)
    assert {i: summary(o) for i, o in got.items()} == {i: summary(o) for i, o in want.items()}
    assert got_steps == want_steps  # streamed: one output per token, none past the end
    assert want[2].outputs[0].finish_reason == "stop" and len(want[2].outputs[0].token_ids) <= 6
    assert want[3].outputs[0].finish_reason == "stop" and want[0].outputs[0].finish_reason == "length"


def test_overlap_really_leaves_decode_steps_in_flight(twin_model):
    engine = engine_of(twin_model, overlap=True)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True))
    assert engine.step()[0].outputs[0].token_ids  # the prefill step: collected at once
    assert engine.step() == [] and engine._in_flight is not None  # first decode: its token still in flight
    seq = next(iter(engine.seqs.values()))
    assert seq.num_pending == 1 and len(seq) == len(seq.token_ids) + 1
    out = engine.step()  # queues the next decode, then collects the one before
    assert len(out[0].outputs[0].token_ids) == 2 and seq.num_pending == 1


def test_seeded_sampling_does_not_depend_on_neighbours_or_overlap(twin_model):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_k=40, seed=11, ignore_eos=True)
    alone, _ = run_all(engine_of(twin_model, overlap=True), [([9, 8, 7, 6], params)])
    crowd = [([9, 8, 7, 6], params)] + [([i, i + 1], SamplingParams(max_tokens=9, temperature=0.7, seed=i,
                                                                    ignore_eos=True)) for i in range(3, 9)]
    crowded, _ = run_all(engine_of(twin_model, overlap=True), crowd)
    synced, _ = run_all(engine_of(twin_model, overlap=False), crowd)
    assert summary(crowded[0]) == summary(alone[0]) == summary(synced[0])


def test_penalties_and_logprobs_wait_for_the_tokens_in_flight(twin_model):
    reqs = [([4, 5, 6], SamplingParams(max_tokens=12, repetition_penalty=1.3, presence_penalty=0.5,
                                       ignore_eos=True)),
            ([7, 8], SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True)),
            ([9, 10, 11, 12], SamplingParams(max_tokens=14, ignore_eos=True))]
    want, _ = run_all(engine_of(twin_model, overlap=False), reqs)
    got, _ = run_all(engine_of(twin_model, overlap=True), reqs)
    assert {i: summary(o) for i, o in got.items()} == {i: summary(o) for i, o in want.items()}
    assert got[1].outputs[0].logprobs == want[1].outputs[0].logprobs


class FakeDeviceRunner:
    """Random logits, device-style token feedback (store_tokens): checks that every scheduled sequence has
    the pages for all its tokens (pending ones included) and that no page or slot is shared."""

    xp = np

    def __init__(self, vocab: int, num_pages: int, max_num_seqs: int, seed: int = 0):
        self.vocab, self.num_pages = vocab, num_pages
        self.rng = np.random.default_rng(seed)
        self.last_tokens = np.zeros(max_num_seqs, np.int64)

    def run(self, seqs, is_prefill):
        pages = [p for s in seqs for p in s.block_table]
        assert len(pages) == len(set(pages))
        slots = [s.slot for s in seqs]
        assert None not in slots and len(slots) == len(set(slots))
        assert all(len(s.block_table) * 64 >= len(s) for s in seqs)
        return self.rng.standard_normal((len(seqs), self.vocab)).astype(np.float32)

    def store_tokens(self, seqs, token_ids):
        self.last_tokens[[s.slot for s in seqs]] = token_ids


def test_no_page_or_slot_leak_with_overlap_aborts_and_preemption(twin_model):
    """1,000 random requests with random aborts on a small pool (preemptions happen), overlapped steps."""
    num_pages, max_num_seqs = 12, 16
    runner = FakeDeviceRunner(twin_model.config.vocab_size, num_pages, max_num_seqs)
    engine = LLMEngine(twin_model, runner=runner, num_pages=num_pages, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=400, max_model_len=256)
    counts = random_traffic(engine, num_pages)
    assert counts["finished"] + counts["aborted"] == 1000 and counts["aborted"] > 50
    assert counts["in_flight_steps"] > 100
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free == num_pages and not engine.seqs
    assert sorted(engine.block_manager.free_pages) == list(range(num_pages))
    assert sorted(engine.scheduler.free_slots) == list(range(max_num_seqs))
