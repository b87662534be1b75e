"""The CPU engine: block manager, scheduler, paged attention, batched sampler, LLMEngine and the LLM API."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import random_traffic

from qserve_lite import LLM, RequestOutput, SamplingParams
from qserve_lite.engine.batch import PackedBatch
from qserve_lite.engine.block_manager import BlockManager
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.engine.reference import generate as reference_generate
from qserve_lite.engine.sampler import Sampler, apply_penalties
from qserve_lite.engine.scheduler import Scheduler
from qserve_lite.engine.sequence import Sequence, SequenceStatus
from qserve_lite.errors import QServeLiteError, SamplingError
from qserve_lite.io.loader import load_model
from qserve_lite.kernels.kv_quant import KVFakeQuantizer
from qserve_lite.model.attention import ContiguousAttention, PagedAttention
from qserve_lite.model.kv_cache import KVCache
from qserve_lite.model.llama import causal_attention
from qserve_lite.model.paged_kv_cache import PagedKVCache


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tiny_kv4(tiny_model_dir):
    return load_model(tiny_model_dir, precision="w16a16kv4")


def make_seq(seq_id: int, n_prompt: int, params: SamplingParams | None = None, **kw) -> Sequence:
    return Sequence(
        seq_id,
        str(seq_id),
        list(range(3, 3 + n_prompt)),
        params or SamplingParams(),
        np.random.default_rng(seq_id),
        **kw,
    )


def run_all(engine: LLMEngine) -> dict[str, RequestOutput]:
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def random_prompts(rng, lengths, vocab=320):
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


# ---- block manager ----


def test_block_manager_pages_and_watermark():
    bm = BlockManager(10, watermark=0.2)  # 2 pages kept free at admission
    assert bm.watermark_pages == 2
    big, too_big = make_seq(0, 8 * 64), make_seq(1, 8 * 64 + 1)
    assert bm.can_allocate(big) and not bm.can_allocate(too_big)
    assert bm.can_allocate(too_big, use_watermark=False)
    bm.allocate(big)
    assert len(big.block_table) == 8 and bm.num_free == 2
    big.token_ids.append(7)  # token 513 starts page 9
    assert bm.can_append(big)
    bm.append(big)
    assert len(big.block_table) == 9 and bm.num_free == 1
    big.token_ids.append(7)  # still inside page 9: nothing taken
    bm.append(big)
    assert bm.num_free == 1 and len(set(big.block_table)) == 9
    big.num_cached_tokens = len(big)
    bm.free(big)
    assert bm.num_free == 10 and big.block_table == [] and big.num_cached_tokens == 0


# ---- scheduler ----


def test_admission_limits():
    sched = Scheduler(BlockManager(100, watermark=0.0), max_num_seqs=3, max_num_batched_tokens=100)
    for i, n in enumerate([40, 50, 20, 5, 5]):
        sched.add(make_seq(i, n))
    batch = sched.schedule()  # 40 + 50 fit; 20 more would exceed 100 tokens (FCFS: no skipping)
    assert batch.is_prefill and [s.seq_id for s in batch.seqs] == [0, 1] and batch.num_tokens == 90
    for s in batch.seqs:
        s.num_cached_tokens = len(s)
    batch = sched.schedule()  # the third slot of max_num_seqs
    assert batch.is_prefill and [s.seq_id for s in batch.seqs] == [2]
    batch = sched.schedule()  # max_num_seqs reached: decode everything running
    assert not batch.is_prefill and [s.seq_id for s in batch.seqs] == [0, 1, 2]
    assert len(sched.waiting) == 2


def test_admission_respects_watermark_unless_cache_is_empty():
    sched = Scheduler(BlockManager(10, watermark=0.3), max_num_seqs=8, max_num_batched_tokens=10_000)
    sched.add(make_seq(0, 9 * 64))  # 9 of 10 pages: over the watermark, but the cache is empty
    sched.add(make_seq(1, 10))
    assert [s.seq_id for s in sched.schedule().seqs] == [0]
    assert not sched.schedule().is_prefill  # seq 1 waits: 1 free page is under the 3-page watermark


def test_preemption_takes_newest_and_requeues_first():
    bm = BlockManager(4, watermark=0.0)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10_000)
    seqs = [make_seq(i, 64) for i in range(4)]  # each fills exactly one page
    for s in seqs:
        sched.add(s)
    assert len(sched.schedule().seqs) == 4 and bm.num_free == 0
    for s in seqs:
        s.num_cached_tokens = len(s)
        s.token_ids.append(5)  # every sequence now needs a second page
    batch = sched.schedule()
    # seq 0 takes seq 3's page, seq 1 takes seq 2's; 2 and 3 are preempted (newest first)
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2, 3]
    assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in seqs[2:])
    assert sched.num_preemptions == 2 and bm.num_free == 0
    sched.finish(seqs[0], "stop")
    sched.finish(seqs[1], "stop")
    batch = sched.schedule()  # the preempted sequences are recomputed: prompt + generated token
    assert batch.is_prefill and [s.seq_id for s in batch.seqs] == [2, 3] and batch.num_tokens == 130


# ---- paged cache and attention ----


@pytest.mark.parametrize("kv_bits", [16, 4, 8])
@pytest.mark.parametrize("fresh", [False, True])
def test_paged_attention_equals_contiguous(tiny, kv_bits, fresh):
    """Same q/k/v: the paged backend's attention output is bit-identical to the contiguous cache's, with
    the new tokens read back from the cache or (fresh, as prefill steps run) taken unquantized."""
    cfg = tiny.config
    rng = np.random.default_rng(kv_bits)
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    quantizer = KVFakeQuantizer(kv_bits) if kv_bits < 16 else None
    paged = PagedKVCache(cfg, 12, kv_bits)
    free = list(rng.permutation(12))
    prefix = [0, 70, 5, 0]  # tokens already cached
    new = [1, 3, 1, 130]  # tokens of this call (decode rows and prefill chunks mixed)
    tables, contexts = [], []
    for p, n in zip(prefix, new, strict=True):
        tables.append([free.pop() for _ in range(-(-(p + n) // 64))])
        contexts.append(rng.standard_normal((2, 1, p + n, KVH, D)).astype(np.float32))
    q_new = [rng.standard_normal((1, n, H, D)).astype(np.float32) for n in new]

    def slots(table, positions):
        return np.asarray(table)[positions // 64] * 64 + positions % 64

    for i, p in enumerate(prefix):  # fill the prefixes
        if p:
            paged.write(0, contexts[i][0, 0, :p], contexts[i][1, 0, :p], slots(tables[i], np.arange(p)))
    bt = np.full((4, 3), -1)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = t
    qs = np.concatenate([[0], np.cumsum(new)])
    positions = np.concatenate([np.arange(p, p + n) for p, n in zip(prefix, new, strict=True)])
    batch = PackedBatch(
        token_ids=np.zeros(len(positions), np.int64),
        positions=positions,
        query_start=qs,
        context_lens=np.asarray(prefix) + new,
        block_tables=bt,
        slot_mapping=np.concatenate([slots(t, np.arange(p, p + n))
                                     for t, p, n in zip(tables, prefix, new, strict=True)]),
        is_prefill=fresh,
    )
    backend = PagedAttention(paged, batch, fresh_new_kv=fresh)
    backend.write(
        0,
        np.concatenate([c[0, :, p:] for c, p in zip(contexts, prefix, strict=True)], axis=1),
        np.concatenate([c[1, :, p:] for c, p in zip(contexts, prefix, strict=True)], axis=1),
    )
    q = np.concatenate(q_new, axis=1)
    out = np.empty((1, q.shape[1], H * D), np.float32)
    for index, k_ctx, v_ctx, start in backend.contexts(0):
        out[index] = causal_attention(q[index], k_ctx, v_ctx, start, np)
    for i, (p, n) in enumerate(zip(prefix, new, strict=True)):
        k, v = contexts[i]  # [1, p + n, KVH, D]
        cache = KVCache(cfg, 1, p + n, quantizer=quantizer)
        if p:
            ContiguousAttention(cache, 0).write(0, k[:, :p], v[:, :p])
        contig = ContiguousAttention(cache, p, fresh_new_kv=fresh)
        contig.write(0, k[:, p:], v[:, p:])
        ((_, k_all, v_all, start),) = list(contig.contexts(0))
        ref = causal_attention(q_new[i], k_all, v_all, start, np)
        assert np.array_equal(out[:, qs[i] : qs[i + 1]], ref)
        if quantizer is not None:  # fresh: the new tokens' own K/V, the prefix dequantized from the cache
            assert np.array_equal(k_all[0, :, p:], k[0, p:].transpose(1, 0, 2)) == fresh
            assert not np.array_equal(k_all[0, :, :p], k[0, :p].transpose(1, 0, 2)) or p == 0
            stored, _ = cache.read(0, p + n)
            assert not np.array_equal(stored[0, :, p:], k[0, p:].transpose(1, 0, 2))  # cache stays quantized


def test_packed_forward_matches_contiguous_forward(tiny_kv4):
    model = tiny_kv4.model
    engine = LLMEngine(tiny_kv4, num_pages=16, max_num_seqs=8)
    prompts = random_prompts(np.random.default_rng(3), [5, 64, 1, 90])
    for p in prompts:
        engine.add_request(p)
    batch = engine.scheduler.schedule()
    assert batch.is_prefill and [s.token_ids for s in batch.seqs] == prompts
    logits = engine.runner.run(batch.seqs, True)
    for row, prompt in zip(logits, prompts, strict=True):
        cache = model.new_cache(1, len(prompt))
        ref = model.logits(model.forward(np.asarray([prompt]), cache, fresh_new_kv=True)[0, -1])
        np.testing.assert_allclose(
            row, ref, rtol=1e-5, atol=1e-5
        )  # only BLAS blocking of the linears differs
        if len(prompt) > 1:  # a prefill step attends to fresh K/V, not to the KV4 codes (QServe's prefill)
            cache = model.new_cache(1, len(prompt))
            quantized = model.logits(model.forward(np.asarray([prompt]), cache)[0, -1])
            assert np.abs(row - quantized).max() > 1e-3


# ---- sampler ----


def test_sampler_greedy_rows_are_argmax_in_mixed_batch():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 50)).astype(np.float32)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.5, top_p=0.5, seed=2),
        SamplingParams(),
    ]
    seqs = [make_seq(i, 3, p) for i, p in enumerate(params)]
    out = Sampler()(logits, seqs).token_ids
    argmax = logits.argmax(-1)
    assert [out[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_penalties_values():
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -2.0]], dtype=np.float32)
    seq = Sequence(
        0,
        "0",
        [0, 1],
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        np.random.default_rng(0),
    )
    seq.token_ids += [3, 3, 4]  # output: token 3 twice, token 4 once
    got = apply_penalties(logits.copy(), [seq], np)
    want = [2.0 / 2, -1.0 * 2, 0.5, 3.0 / 2 - 0.5 - 0.5, -2.0 * 2 - 0.5 - 0.25]
    np.testing.assert_allclose(got[0], want, rtol=1e-6)


def test_penalties_steer_greedy_choice():
    logits = np.array([[5.0, 4.9, 0.0]], dtype=np.float32)
    seq = Sequence(0, "0", [2], SamplingParams(frequency_penalty=0.2), np.random.default_rng(0))
    assert Sampler()(logits, [seq]).token_ids == [0]
    seq.token_ids.append(0)
    assert Sampler()(logits, [seq]).token_ids == [1]


def test_min_p_top_k_top_p_restrict_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    cases = [
        (SamplingParams(temperature=1.0, min_p=0.35), {0, 1}),  # p >= 0.175
        (SamplingParams(temperature=1.0, min_p=0.2), {0, 1, 2}),
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.6), {0, 1}),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.95), {0, 1, 2}),
    ]
    for params, support in cases:
        seqs = [make_seq(i, 1, params) for i in range(300)]
        got = set(Sampler()(np.repeat(logits, 300, axis=0), seqs).token_ids)
        assert got == support, params


def test_sampling_frequencies():
    logits = np.log(np.array([[0.6, 0.4]], dtype=np.float32))
    seqs = [make_seq(i, 1, SamplingParams(temperature=1.0)) for i in range(4000)]
    draws = np.array(Sampler()(np.repeat(logits, 4000, axis=0), seqs).token_ids)
    assert abs(np.mean(draws == 0) - 0.6) < 0.03


def test_logprobs_sum_to_one_and_include_the_sample():
    rng = np.random.default_rng(1)
    V = 40
    logits = (3 * rng.standard_normal((3, V))).astype(np.float32)
    logits[1] = logits[0]
    params = [
        SamplingParams(logprobs=V),
        SamplingParams(temperature=1.0, seed=4, logprobs=3),
        SamplingParams(),
    ]
    out = Sampler()(logits, [make_seq(i, 2, p) for i, p in enumerate(params)])
    full = out.logprobs[0]
    assert len(full) == V and abs(sum(np.exp(v) for v in full.values()) - 1.0) < 1e-5
    assert max(full, key=full.get) == out.token_ids[0]
    top3 = out.logprobs[1]
    assert out.token_ids[1] in top3 and len(top3) in (3, 4)
    ranked = sorted(full, key=full.get, reverse=True)[:3]
    assert all(abs(top3[t] - full[t]) < 1e-5 for t in ranked)
    assert out.logprobs[2] is None


def test_seeded_sampling_independent_of_batch(tiny):
    """A seeded request samples the same tokens alone and in a batch with other requests."""
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    alone = LLMEngine(tiny, num_pages=32)
    alone.add_request("The capital of France", p, request_id="x")
    want = run_all(alone)["x"].outputs[0].token_ids
    crowded = LLMEngine(tiny, num_pages=32, seed=5)
    crowded.add_request("Quantization", SamplingParams(max_tokens=5, temperature=0.7, ignore_eos=True))
    crowded.add_request("The capital of France", p, request_id="x")
    crowded.add_request(
        [5, 6, 7] * 9, SamplingParams(max_tokens=20, temperature=1.3, top_k=5, ignore_eos=True)
    )
    assert run_all(crowded)["x"].outputs[0].token_ids == want
    other = LLMEngine(tiny, num_pages=32)
    other.add_request(
        "The capital of France",
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=12, ignore_eos=True),
        request_id="x",
    )
    assert run_all(other)["x"].outputs[0].token_ids != want


# ---- engine ----


@pytest.mark.parametrize("precision", ["w16a16", "w16a16kv4"])
def test_engine_greedy_equals_reference(tiny_model_dir, precision):
    lm = load_model(tiny_model_dir, precision=precision)
    engine = LLMEngine(lm, max_num_seqs=6, num_pages=24)
    prompts = random_prompts(np.random.default_rng(7), [1, 4, 17, 63, 64, 65, 100, 9])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = run_all(engine)
    for rid, prompt in zip(ids, prompts, strict=True):
        ref = reference_generate(lm.model, lm.tokenizer, prompt, params)
        got = done[rid].outputs[0]
        assert got.token_ids == ref.token_ids and got.text == ref.text and got.finish_reason == "length"
    assert engine.block_manager.num_free == 24


def test_engine_greedy_equals_reference_w4a8kv4_zoo_checkpoint(tmp_path):
    """A QServe zoo W4A8KV4 checkpoint (integer GEMM emulation, paged KV4) through the engine."""
    import shutil
    from pathlib import Path

    from conftest import build_tokenizer

    src = Path(__file__).parents[1] / "data" / "qserve_zoo_tiny"
    if not src.is_dir():
        pytest.skip("zoo fixture not present")
    shutil.copytree(src, tmp_path / "zoo")
    build_tokenizer(tmp_path / "zoo")
    lm = load_model(tmp_path / "zoo")
    assert lm.precision.name == "w4a8kv4"
    engine = LLMEngine(lm, num_pages=16)
    prompts = random_prompts(np.random.default_rng(2), [1, 7, 66, 30], vocab=lm.config.vocab_size)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    done = run_all(engine)
    for rid, prompt in zip(ids, prompts, strict=True):
        assert (
            done[rid].outputs[0].token_ids
            == reference_generate(lm.model, lm.tokenizer, prompt, params).token_ids
        )


def test_preempt_and_resume_gives_same_greedy_output(tiny):
    prompts = random_prompts(np.random.default_rng(8), [50, 30, 60, 45, 20])
    params = SamplingParams(max_tokens=70, ignore_eos=True)
    roomy = LLMEngine(tiny, num_pages=40)
    tight = LLMEngine(tiny, num_pages=6, max_model_len=192)  # 5 sequences growing to 2 pages each: 10 > 6
    for p in prompts:
        roomy.add_request(p, params)
        tight.add_request(p, params)
    want, got = run_all(roomy), run_all(tight)
    assert tight.scheduler.num_preemptions > 0 and roomy.scheduler.num_preemptions == 0
    assert any(o.num_preemptions for o in got.values())
    for rid in want:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids
    assert tight.block_manager.num_free == 6


def test_abort_frees_pages(tiny):
    engine = LLMEngine(tiny, num_pages=10)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    running = engine.add_request(list(range(3, 140)), params)  # 3 pages
    engine.step()
    waiting = engine.add_request(list(range(3, 20)), params)
    assert engine.block_manager.num_free == 7
    assert engine.abort(running) and engine.block_manager.num_free == 10
    assert engine.abort(waiting) and not engine.has_unfinished()
    assert not engine.abort(waiting) and engine.step() == []


def test_unstreamed_requests_are_reported_only_when_they_finish(tiny):
    """stream=False: step() builds no per-token output for the request, only its final one, with the same
    tokens and text as a streamed request."""
    engine = LLMEngine(tiny, num_pages=16)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 6)]
    quiet = [engine.add_request([5, 6, 7, 8], p, stream=False) for p in params]
    loud = [engine.add_request([5, 6, 7, 8], p) for p in params]
    seen: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    assert [len(seen[r]) for r in quiet] == [1, 1] and [len(seen[r]) for r in loud] == [3, 6]
    for q, lo in zip(quiet, loud, strict=True):
        assert seen[q][0].finished and seen[lo][-1].finished
        assert seen[q][0].outputs[0].token_ids == seen[lo][-1].outputs[0].token_ids
        assert seen[q][0].outputs[0].text == seen[lo][-1].outputs[0].text


class FakeRunner:
    """Random logits; checks that every sequence's tokens have pages and no page is shared."""

    xp = np

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)

    def run(self, seqs, is_prefill):
        pages = [p for s in seqs for p in s.block_table]
        assert len(pages) == len(set(pages))
        assert all(len(s.block_table) * 64 >= len(s) for s in seqs)
        return self.rng.standard_normal((len(seqs), self.vocab)).astype(np.float32)


def test_no_page_leak_with_random_requests_and_aborts(tiny):
    num_pages = 12
    engine = LLMEngine(
        tiny,
        num_pages=num_pages,
        max_num_seqs=16,
        max_num_batched_tokens=400,
        max_model_len=256,
        runner=FakeRunner(tiny.config.vocab_size),
    )
    counts = random_traffic(engine, num_pages)
    assert counts["finished"] + counts["aborted"] == 1000 and counts["aborted"] > 50
    assert engine.block_manager.num_free == num_pages and not engine.seqs
    assert sorted(engine.block_manager.free_pages) == list(range(num_pages))
    assert engine.scheduler.num_preemptions > 0


def test_request_errors(tiny):
    engine = LLMEngine(tiny, num_pages=8)
    with pytest.raises(QServeLiteError, match="empty"):
        engine.add_request([])
    with pytest.raises(QServeLiteError, match="at most 255 fit"):
        engine.add_request([5] * 256)
    with pytest.raises(QServeLiteError, match="outside the vocabulary"):
        engine.add_request([5, 100_000])
    engine.add_request([5], request_id="a")
    with pytest.raises(QServeLiteError, match="already in use"):
        engine.add_request([5], request_id="a")
    with pytest.raises(QServeLiteError, match="does not fit"):
        LLMEngine(tiny, num_pages=2, max_model_len=200)
    assert LLMEngine(tiny, num_pages=2).max_model_len == 128  # implicit: capped to the pool


def test_length_cap_by_max_model_len(tiny):
    engine = LLMEngine(tiny, num_pages=8, max_model_len=40)
    engine.add_request([5] * 37, SamplingParams(max_tokens=50, ignore_eos=True), request_id="r")
    out = run_all(engine)["r"].outputs[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_stop_strings_are_trimmed(tiny):
    prompt = tiny.tokenizer.encode("The capital of France")
    free_text = reference_generate(
        tiny.model, tiny.tokenizer, prompt, SamplingParams(max_tokens=30, ignore_eos=True)
    ).text
    clean = [i for i in range(1, len(free_text) - 2) if "\ufffd" not in free_text[i : i + 2]]
    assert clean, free_text
    stop = free_text[clean[len(clean) // 2] :][:2]
    engine = LLMEngine(tiny, num_pages=16)
    engine.add_request(
        prompt, SamplingParams(max_tokens=30, ignore_eos=True, stop=["\x00never", stop]), request_id="r"
    )
    out = run_all(engine)["r"].outputs[0]
    assert out.text == free_text[: free_text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_stop_token_ids_end_generation(tiny):
    engine = LLMEngine(tiny, num_pages=16)
    engine.add_request("hello", SamplingParams(max_tokens=8, ignore_eos=True), request_id="free")
    free = run_all(engine)["free"].outputs[0].token_ids
    j = next(j for j in range(1, len(free)) if free[j] not in free[:j])  # first new token after the start
    engine.add_request("hello", SamplingParams(max_tokens=8, stop_token_ids=[free[j]]), request_id="s")
    out = run_all(engine)["s"].outputs[0]
    assert out.token_ids == free[:j] and out.finish_reason == "stop" and out.stop_reason == free[j]


# ---- LLM API ----


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_pages=64)


def test_llm_generate_end_to_end(llm, tiny):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = ["The capital of France", "Hi", [1, 5, 9, 30]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [10, 10, 10]
    assert outs[0].prompt == "The capital of France" and outs[2].prompt_token_ids == [1, 5, 9, 30]
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tiny.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        assert out.text == reference_generate(tiny.model, tiny.tokenizer, ids, params).text
    single = llm.generate("Hi", params, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    per_prompt = llm.generate(
        ["a", "b"], [params, SamplingParams(max_tokens=3, ignore_eos=True)], use_tqdm=False
    )
    assert [len(o.outputs[0].token_ids) for o in per_prompt] == [10, 3]
    with pytest.raises(QServeLiteError, match="one per prompt"):
        llm.generate(["a", "b"], [params])
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free == 64


def test_llm_chat(llm, tiny):
    conv = [{"role": "user", "content": "Hello"}]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    one = llm.chat(conv, params, use_tqdm=False)
    two = llm.chat([conv, [{"role": "system", "content": "Be brief"}, *conv]], params, use_tqdm=False)
    want = reference_generate(tiny.model, tiny.tokenizer, tiny.tokenizer.encode_chat(conv), params).text
    assert one[0].text == two[0].text == want and len(two) == 2


def test_stream_deltas_concatenate_to_final_text(llm):
    for params in (
        SamplingParams(max_tokens=25, temperature=1.0, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=1.0, seed=3, ignore_eos=True, stop=["e ", "xyz"]),
    ):
        stream = llm.stream("Paris", params)
        pieces = list(stream)
        assert "".join(pieces) == stream.output.text and stream.output.finished
        assert stream.output.text == llm.generate("Paris", params, use_tqdm=False)[0].text


def test_stream_closed_early_aborts(llm):
    stream = llm.stream("Paris", SamplingParams(max_tokens=100, ignore_eos=True))
    next(iter(stream))
    stream.close()
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_free == 64


def test_sampling_params_validation():
    for bad in [
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 3.0},
        {"frequency_penalty": float("nan")},
        {"logprobs": -1},
        {"stop": [""]},
        {"stop": [3]},
        {"seed": -1},
        {"stop_token_ids": ["x"]},
        {"temperature": float("inf")},
    ]:
        with pytest.raises(SamplingError):
            SamplingParams(**bad)
    assert SamplingParams(stop="###").stop == ("###",)


def test_cli_generate_batch_and_chat(tiny_model_dir, capsys, monkeypatch, llm):
    from qserve_lite.cli import main

    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "-p",
                "Hello",
                "-p",
                "The capital",
                "--max-tokens",
                "4",
                "--ignore-eos",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert "=== [2/2] 'The capital'" in out.out and "2 prompts, 8 generated tokens" in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHow are you\n/exit\nnot read\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-tokens", "5", "--ignore-eos"]) == 0
    answers = capsys.readouterr().out.split("\n")[:2]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    history = [{"role": "user", "content": "Hello"}]
    assert answers[0] == llm.chat(history, params, use_tqdm=False)[0].text
    history += [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "How are you"}]
    assert answers[1] == llm.chat(history, params, use_tqdm=False)[0].text
