"""Tokenizer wrapper: round trip, chat template, stop ids, incremental detokenization."""

from __future__ import annotations

import numpy as np
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


def _full_decode_pieces(tok, ids):
    """The pieces of the straightforward spec: decode every id so far, give out what the text gained."""
    text, pieces = "", []
    for n in range(1, len(ids) + 1):
        full = tok.decode(ids[:n])
        piece = "" if full.endswith("\ufffd") else full[len(text):]
        text = full if piece else text
        pieces.append(piece)
    return pieces


@pytest.mark.parametrize("seed", range(6))
def test_incremental_detokenizer_windows_match_the_full_decode_spec(tiny_model_dir, seed):
    """Random ids (byte tokens that split UTF-8 characters, special tokens, spaces) give the same pieces as
    decoding everything every step."""
    tok = Tokenizer(tiny_model_dir)
    rng = np.random.default_rng(seed)
    text = "unicode: émigré naïve 東京 🚀 <|im_start|>user\n  def f(x):\n\treturn x ** 2  # done"
    ids = tok.encode(text) + [int(i) for i in rng.integers(0, tok.vocab_size, 200)]
    ids = [ids[i] for i in rng.permutation(len(ids))] if seed % 2 else ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert pieces == _full_decode_pieces(tok, ids)
    assert detok.text == "".join(pieces)


def test_incremental_detokenizer_decodes_a_short_window(tiny_model_dir):
    """Each step decodes a few ids, not the whole list (decoding everything was O(n) per token)."""
    tok = Tokenizer(tiny_model_dir)
    lengths = []
    real = tok.decode

    def spy(ids, skip_special_tokens=True):
        lengths.append(len(ids))
        return real(ids, skip_special_tokens)

    tok.decode = spy
    ids = tok.encode("The capital of France is Paris. " * 40)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids)
    assert text == real(ids) and len(ids) > 200
    assert max(lengths) <= 8, max(lengths)
