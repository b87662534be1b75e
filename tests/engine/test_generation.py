"""Sampling and the reference generation loop."""

from __future__ import annotations

import numpy as np
import pytest

from qserve_lite.engine.reference import generate, generate_tokens
from qserve_lite.engine.sampler import sample_next
from qserve_lite.errors import QServeLiteError, SamplingError
from qserve_lite.io.loader import load_model
from qserve_lite.sampling_params import SamplingParams


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal(1000)
    rng = np.random.default_rng(0)
    assert sample_next(logits, SamplingParams(), rng) == int(np.argmax(logits))
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), rng) == int(np.argmax(logits))


def test_top_k_and_top_p_restrict_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(1)
    k2 = {sample_next(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(300)}
    assert k2 == {0, 1}
    p = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.6), rng) for _ in range(300)}
    assert p == {0, 1}  # 0.5 < 0.6, so token 1 is needed to reach the mass; token 2 is not
    p_small = {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.1), rng) for _ in range(50)}
    assert p_small == {0}


def test_sampling_frequencies_follow_temperature():
    logits = np.log(np.array([0.6, 0.4]))
    rng = np.random.default_rng(2)
    draws = [sample_next(logits, SamplingParams(temperature=1.0), rng) for _ in range(4000)]
    assert abs(np.mean(np.array(draws) == 0) - 0.6) < 0.03
    hot = [sample_next(logits, SamplingParams(temperature=100.0), rng) for _ in range(4000)]
    assert abs(np.mean(np.array(hot) == 0) - 0.5) < 0.03


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5},
    {"temperature": float("nan")},
])
def test_invalid_sampling_params(bad):
    with pytest.raises(SamplingError):
        SamplingParams(**bad)


def test_greedy_generation_equals_full_recompute(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    prompt = lm.tokenizer.encode("The capital of France")
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    got = [t for t, _ in generate_tokens(lm.model, prompt, params)]
    ids = list(prompt)
    for _ in range(12):  # no cache: recompute the whole sequence each step
        h = lm.model.forward(np.array([ids]), lm.model.new_cache(1, len(ids)))
        ids.append(int(np.argmax(lm.model.logits(h[0, -1]))))
    assert got == ids[len(prompt):]


def test_stops_on_eos_and_max_tokens(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    prompt = lm.tokenizer.encode("hello")
    free = generate(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(free.token_ids) == 6 and free.finish_reason == "length"
    # make the 3rd greedy token a stop token: generation ends before it
    stop = free.token_ids[2]
    if stop in free.token_ids[:2]:
        pytest.skip("random model repeats tokens")
    out = generate(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=6, stop_token_ids=(stop,)))
    assert out.token_ids == free.token_ids[:2] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    prompt = lm.tokenizer.encode("Quantization")
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    a = generate(lm.model, lm.tokenizer, prompt, p)
    b = generate(lm.model, lm.tokenizer, prompt, p)
    c = generate(lm.model, lm.tokenizer, prompt, SamplingParams(max_tokens=10, temperature=1.0, seed=7,
                                                                 ignore_eos=True))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_streaming_pieces_concatenate_to_text(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    pieces = []
    out = generate(lm.model, lm.tokenizer, lm.tokenizer.encode("Paris"), SamplingParams(max_tokens=15,
                   temperature=1.0, seed=3, ignore_eos=True), on_text=pieces.append)
    assert "".join(pieces) == out.text


def test_empty_and_too_long_prompts(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    with pytest.raises(QServeLiteError, match="empty"):
        next(generate_tokens(lm.model, [], SamplingParams()))
    with pytest.raises(QServeLiteError, match="context"):
        next(generate_tokens(lm.model, [5] * lm.config.max_position_embeddings, SamplingParams()))


def test_generation_capped_by_context(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    n = lm.config.max_position_embeddings
    toks = list(generate_tokens(lm.model, [5] * (n - 3), SamplingParams(max_tokens=50, ignore_eos=True)))
    assert len(toks) == 3 and toks[-1][1] == "length"
