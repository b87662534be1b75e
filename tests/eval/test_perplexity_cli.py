"""Perplexity protocol and the command line."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qserve_lite.cli import main
from qserve_lite.errors import QServeLiteError
from qserve_lite.eval.corpus import python_doc_files, read_texts
from qserve_lite.eval.perplexity import perplexity
from qserve_lite.io.loader import load_model

FIXTURE_TEXT = (
    "Python is a programming language that lets you work quickly and integrate systems more effectively.\n"
    "The interpreter reads a line, evaluates it and prints the result. Numbers like 12345 work too.\n"
) * 8


def test_ppl_is_exp_of_mean_chunk_loss(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    ids = np.random.default_rng(0).integers(0, lm.config.vocab_size, 70)
    res = perplexity(lm.model, ids, seq_len=32, progress=False)
    assert res.chunks == 2 and res.tokens == 64  # the 6 leftover tokens are dropped
    losses = []
    for c in range(2):
        chunk = ids[c * 32 : (c + 1) * 32]
        logits = lm.model.logits(lm.model.forward(chunk[None], lm.model.new_cache(1, 32)))[0].astype(
            np.float64
        )
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        losses.append(-np.mean(logp[np.arange(31), chunk[1:]]))
    assert res.ppl == pytest.approx(math.exp(np.mean(losses)), rel=1e-9)
    assert perplexity(lm.model, ids, seq_len=32, max_tokens=40, progress=False).chunks == 1


def test_ppl_errors(tiny_model_dir):
    lm = load_model(tiny_model_dir)
    with pytest.raises(QServeLiteError, match="fewer than one chunk"):
        perplexity(lm.model, [1, 2, 3], seq_len=32, progress=False)
    with pytest.raises(QServeLiteError, match="exceeds the model's context"):
        perplexity(lm.model, [1] * 600, seq_len=512, progress=False)


def test_corpus_helpers(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.rst.txt").write_text("first")
    (tmp_path / "b.rst.txt").write_text("second")
    (tmp_path / "skip.txt").write_text("not rst")
    files = python_doc_files(tmp_path)
    assert [f.name for f in files] == ["x.rst.txt", "b.rst.txt"]  # sorted by path: a/x before b
    assert read_texts(files) == "first\n\nsecond"
    with pytest.raises(QServeLiteError, match="apt-get install python3.11-doc"):
        python_doc_files(tmp_path / "nothing")
    with pytest.raises(QServeLiteError, match="not found"):
        read_texts([tmp_path / "missing.txt"])


def test_cli_generate_chat(tiny_model_dir, capsys):
    rc = main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "Hello",
            "--chat",
            "--max-tokens",
            "5",
            "--ignore-eos",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    assert "5 generated tokens" in out.err and "finish=length" in out.err
    lm = load_model(tiny_model_dir)
    from qserve_lite.engine.reference import generate
    from qserve_lite.sampling_params import SamplingParams

    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    want = generate(lm.model, lm.tokenizer, ids, SamplingParams(max_tokens=5, ignore_eos=True)).text
    assert out.out == want + "\n"


def test_cli_gpu_unavailable_is_a_clear_error(tiny_model_dir, capsys, monkeypatch):
    from qserve_lite.core import backend as device

    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: "cupy is not installed")
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--device", "gpu"])
    assert rc == 2
    assert "--device gpu needs cupy and a CUDA device: cupy is not installed" in capsys.readouterr().err


def test_cli_bad_inputs_exit_cleanly(tmp_path, tiny_model_dir, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "   "]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_ppl(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "doc.rst.txt"
    f.write_text(FIXTURE_TEXT)
    rc = main(["ppl", "--model", str(tiny_model_dir), "--text", str(f), "--seq-len", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    ppl = float(out.split()[1])
    lm = load_model(tiny_model_dir)
    ids = lm.tokenizer.encode(read_texts([f]), add_special_tokens=False)
    assert ppl == pytest.approx(perplexity(lm.model, ids, seq_len=64, progress=False).ppl, rel=1e-4)
