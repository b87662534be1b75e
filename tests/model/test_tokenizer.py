"""Tokenizer wrapper: round trip, chat template, stop ids, incremental detokenization."""

from __future__ import annotations

import pytest

from qserve_lite.errors import TokenizerError
from qserve_lite.model.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "unicode: émigré naïve 東京 🚀",
    "def forward(x):\n    return x @ weight.T\n",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tiny_model_dir, text):
    tok = Tokenizer(tiny_model_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_special_tokens_and_eos(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert tok.encode("<|im_start|>user")[0] == im_start
    assert tok.eos_token_ids == (2,) and im_end == 2  # generation_config, config and eos_token agree


def test_chat_template(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3
    assert tok.decode(ids, skip_special_tokens=False) == text
    with pytest.raises(TokenizerError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])


def test_model_without_chat_template(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "x"}])


def test_incremental_detokenizer_matches_full_decode(tiny_model_dir):
    tok = Tokenizer(tiny_model_dir)
    text = "unicode: émigré naïve 東京 🚀 and more"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # partial UTF-8 sequences are held back
