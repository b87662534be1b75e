"""Tests for qserve_lite.io.gguf: tiny llama GGUFs written with gguf.GGUFWriter."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from gguf import GGMLQuantizationType as QT  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from qserve_lite.errors import GGUFImportError, QServeLiteError  # noqa: E402
from qserve_lite.io.gguf import (  # noqa: E402
    import_gguf,
    infer_llama3_rope_scaling,
    permute_qk,
    read_gguf_summary,
    unpermute_qk,
)
from qserve_lite.io.gguf import tensors as gi  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 2, 4, 2, 16, 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! The capital of France is Paris, and 12345 is a number.",
    "Tokenizers split text into pieces; byte-level BPE never needs an unknown token.",
    "Small models are fast. Large models are slow, but they know more things.",
    "def main():\n    return 42  # the answer\n",
] * 3
TEST_STRINGS = [
    "Hello world! 12345 The capital of France is Paris.",
    "The lazy dog jumps.\n\n  indented  text\twith tabs",
    "héllo wörld — ünïcode ✓ 日本語",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a <custom> token and 2024-01-02",
    "",
]


# --------------------------------------------------------------------------------------------------
# fixtures: a trained byte-level BPE tokenizer and tiny GGUF files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.add_tokens([AddedToken("<custom>", special=False, normalized=False)])
    return tok


def _vocab_of(tok: Tokenizer):
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert None not in tokens
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]
    types = [3 if t in SPECIALS else 4 if t == "<custom>" else 1 for t in tokens]
    return tokens, merges, types


def _rand(rng, *shape, scale=0.05):
    # values exactly representable in float16, so F16 round trips are exact
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def make_weights(vocab_size: int, seed=0, tied=False) -> dict[str, np.ndarray]:
    """HF-named, HF-layout float32 weights of a tiny llama model."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": _rand(rng, vocab_size, HIDDEN),
         "model.norm.weight": 1.0 + _rand(rng, HIDDEN)}
    if not tied:
        w["lm_head.weight"] = _rand(rng, vocab_size, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + _rand(rng, HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1.0 + _rand(rng, HIDDEN)
        w[p + "self_attn.q_proj.weight"] = _rand(rng, HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = _rand(rng, KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = _rand(rng, KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = _rand(rng, HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = _rand(rng, INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = _rand(rng, INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = _rand(rng, HIDDEN, INTER)
    return w


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_TO_GGUF[rest]}"


def _add_tokenizer_kv(w, tok_fields: dict, bos_id: int, eos_id: int) -> None:
    """The tokenizer's GGUF keys: vocab size, model, pre, tokens, types, merges / scores, bos / eos,
    add_bos and the chat template."""
    w.add_vocab_size(len(tok_fields["tokens"]))
    w.add_tokenizer_model(tok_fields["model"])
    if tok_fields.get("pre"):
        w.add_tokenizer_pre(tok_fields["pre"])
    w.add_token_list(tok_fields["tokens"])
    w.add_token_types(tok_fields["types"])
    if "merges" in tok_fields:
        w.add_token_merges(tok_fields["merges"])
    if "scores" in tok_fields:
        w.add_token_scores(tok_fields["scores"])
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(tok_fields.get("add_bos", False))
    w.add_chat_template(CHAT_TEMPLATE)


def _add_model_tensor(w, name: str, arr: np.ndarray, qtype) -> None:
    """One weight as llama.cpp stores it: q/k permuted, vectors F32, matrices as ``qtype``."""
    if name.endswith("attn_q.weight"):
        arr = permute_qk(arr, HEADS)
    elif name.endswith("attn_k.weight"):
        arr = permute_qk(arr, KV_HEADS)
    if arr.ndim == 1:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == QT.F16:
        w.add_tensor(name, arr.astype(np.float16))
    elif qtype == QT.F32:
        w.add_tensor(name, arr.astype(np.float32))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)


def write_gguf(path: Path, weights: dict, tok_fields: dict, *, arch="llama", qtype=QT.F16,
               eos_id=0, bos_id=1, extra_kv=None, extra_tensors=None, skip=()) -> Path:
    """Write a llama.cpp-style GGUF: q/k permuted, matrices as ``qtype``, norms as F32."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    _add_tokenizer_kv(w, tok_fields, bos_id, eos_id)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_float32(k, v)
    for hf, arr in weights.items():
        name = gguf_name(hf)
        if name in skip:
            continue
        _add_model_tensor(w, name, arr, qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bpe_fields(ref_tokenizer):
    tokens, merges, types = _vocab_of(ref_tokenizer)
    return {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": merges, "types": types}


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory, bpe_fields):
    d = tmp_path_factory.mktemp("f16")
    weights = make_weights(len(bpe_fields["tokens"]), seed=1)
    src = write_gguf(d / "tiny-f16.gguf", weights, bpe_fields, qtype=QT.F16)
    out = import_gguf(src, d / "hf", progress=False)
    return weights, out


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory, bpe_fields):
    d = tmp_path_factory.mktemp("q8")
    weights = make_weights(len(bpe_fields["tokens"]), seed=2, tied=True)
    src = write_gguf(d / "tiny-q8_0.gguf", weights, bpe_fields, qtype=QT.Q8_0)
    return weights, src


def read_json(p: Path):
    return json.loads(p.read_text())


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


def test_permute_roundtrip():
    x = np.arange(HEADS * HEAD_DIM * 3, dtype=np.float32).reshape(HEADS * HEAD_DIM, 3)
    p = permute_qk(x, HEADS)
    assert not np.array_equal(p, x)
    np.testing.assert_array_equal(unpermute_qk(p, HEADS), x)
    # llama.cpp rotates interleaved row pairs (2i, 2i+1); HF rotates halves (i, i + head_dim/2):
    # HF rows 0..7 of head 0 are llama.cpp rows 0, 2, 4, ..., and HF rows 8..15 are rows 1, 3, 5, ...
    u = unpermute_qk(x, HEADS)[:, 0] / 3
    np.testing.assert_array_equal(u[:HEAD_DIM], [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15])


def test_f16_import_exact(f16_model):
    weights, out = f16_model
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(weights)
    for name, ref in weights.items():
        assert got[name].dtype == np.float32, name
        assert got[name].shape == ref.shape, name
        np.testing.assert_array_equal(got[name], ref, err_msg=name)


def test_config(f16_model, bpe_fields):
    _, out = f16_model
    cfg = read_json(out / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, INTER, LAYERS)
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
    assert heads == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 50000.0
    assert cfg["max_position_embeddings"] == 512
    assert cfg["vocab_size"] == len(bpe_fields["tokens"])
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 0)
    assert cfg["torch_dtype"] == "float32" and cfg["hidden_act"] == "silu"
    assert cfg["rope_scaling"] is None


def test_tokenizer_config_and_generation_config(f16_model):
    _, out = f16_model
    tc = read_json(out / "tokenizer_config.json")
    assert tc["chat_template"] == CHAT_TEMPLATE
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tc["bos_token"], tc["eos_token"]) == ("<|im_start|>", "<|endoftext|>")
    assert tc["add_bos_token"] is False and tc["model_max_length"] == 512
    gc = read_json(out / "generation_config.json")
    # eos from the GGUF (0) plus <|im_end|> (2) because the chat template uses it
    assert gc == {"bos_token_id": 1, "eos_token_id": [0, 2]}


def test_tokenizer_matches_trained(f16_model, ref_tokenizer):
    _, out = f16_model
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == ref_tokenizer.get_vocab_size()
    for s in TEST_STRINGS:
        ref = ref_tokenizer.encode(s).ids
        got = tok.encode(s).ids
        assert got == ref, s
        assert tok.decode(got) == ref_tokenizer.decode(ref) == s.replace("<|im_start|>", "").replace(
            "<|im_end|>", ""), s
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode("<custom>").ids == [ref_tokenizer.token_to_id("<custom>")]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_q8_0_tied_float16(q8_model, tmp_path):
    weights, src = q8_model
    out = import_gguf(src, tmp_path / "hf", dtype="float16", progress=False)
    cfg = read_json(out / "config.json")
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float16"
    got = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in got and set(got) == set(weights)
    for name, ref in weights.items():
        if ref.ndim == 2:  # quantized: equal to quantize->dequantize of the un-permuted original
            ref = gguf.quants.dequantize(gguf.quants.quantize(ref, QT.Q8_0), QT.Q8_0).reshape(ref.shape)
        assert got[name].dtype == np.float16
        np.testing.assert_array_equal(got[name], ref.astype(np.float16), err_msg=name)


def test_q8_0_float32_exact_dequant(q8_model, tmp_path):
    weights, src = q8_model
    got = load_file(str(import_gguf(src, tmp_path / "hf", progress=False) / "model.safetensors"))
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    expected = gguf.quants.dequantize(gguf.quants.quantize(q, QT.Q8_0), QT.Q8_0)
    np.testing.assert_array_equal(got["model.layers.1.self_attn.q_proj.weight"], expected)
    assert float(np.abs(expected - q).max()) < 2e-3  # Q8_0 is close to the original


def _read_bf16_safetensors(p: Path) -> dict[str, np.ndarray]:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "BF16"
        a, b = v["data_offsets"]
        bits = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=np.uint16).astype(np.uint32) << 16
        out[k] = bits.view(np.float32).reshape(v["shape"])
    return out


def test_bfloat16_output(f16_model, bpe_fields, tmp_path):
    weights, _ = f16_model
    src = write_gguf(tmp_path / "m.gguf", weights, bpe_fields, qtype=QT.F16)
    out = import_gguf(src, tmp_path / "hf", dtype="bf16", progress=False)
    assert read_json(out / "config.json")["torch_dtype"] == "bfloat16"
    got = _read_bf16_safetensors(out / "model.safetensors")
    assert set(got) == set(weights)
    for name, ref in weights.items():
        np.testing.assert_allclose(got[name], ref, rtol=2.0 ** -8, atol=0, err_msg=name)


def test_bf16_rounding():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -2.5, np.inf, np.nan], dtype=np.float32)
    bits = gi._to_bf16_bits(x)
    # ties round to even: 1 + 2^-8 -> 1.0, 1 + 3*2^-8 -> 1 + 2^-6
    assert bits[:5].tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F80]
    assert math.isnan((bits[5:].astype(np.uint32) << 16).view(np.float32)[0])


# --------------------------------------------------------------------------------------------------
# tokenizer variants
# --------------------------------------------------------------------------------------------------


def test_add_bos_and_llama3_pretokenizer(tmp_path, bpe_fields, ref_tokenizer):
    fields = dict(bpe_fields, pre="llama-bpe", add_bos=True)
    weights = make_weights(len(fields["tokens"]), seed=3, tied=True)
    out = import_gguf(write_gguf(tmp_path / "m.gguf", weights, fields), tmp_path / "hf", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("12345 abc's")]
    assert pieces == ["123", "45", "Ġabc", "'s"]
    ids = tok.encode("hello").ids
    assert ids[0] == 1 and tok.decode(ids) == "hello"
    assert read_json(out / "tokenizer_config.json")["add_bos_token"] is True


SPM_PIECES = {  # piece -> score (higher merges first)
    "\u2581": -1.0, "a": -2.0, "b": -3.0, "c": -4.0, "h": -5.0, "e": -6.0, "l": -7.0, "o": -8.0,
    "ll": -9.0, "he": -10.0, "\u2581h": -11.0, "llo": -12.0, "hello": -13.0, "\u2581hello": -14.0,
    "ab": -15.0, "abc": -16.0, "\u2581a": -17.0, "\u2581ab": -18.0, "lo": -19.0, "\u2581he": -20.0,
}


def _spm_fields():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES)
    scores = [0.0] * (3 + 256) + list(SPM_PIECES.values())
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "scores": scores,
            "add_bos": True}


def _spm_reference_encode(text: str, fields) -> list[int]:
    """Score-driven SentencePiece BPE: merge the adjacent pair whose concatenation scores highest."""
    ids = {t: i for i, t in enumerate(fields["tokens"])}
    syms = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            m = syms[i] + syms[i + 1]
            if m in SPM_PIECES and (best is None or SPM_PIECES[m] > best[0]):
                best = (SPM_PIECES[m], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = [ids["<s>"]]
    for s in syms:
        out.extend([ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode("utf-8")])
    return out


def test_sentencepiece_tokenizer(tmp_path):
    fields = _spm_fields()
    weights = make_weights(len(fields["tokens"]), seed=4, tied=True)
    out = import_gguf(write_gguf(tmp_path / "spm.gguf", weights, fields), tmp_path / "hf", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for s in ["hello", "hello abc", "hel lo", "abé", "a b c", "zz hello"]:
        ids = tok.encode(s).ids
        assert ids == _spm_reference_encode(s, fields), s
        assert tok.decode(ids) == s
    assert tok.encode("hello").tokens == ["<s>", "\u2581hello"]
    tc = read_json(out / "tokenizer_config.json")
    assert (tc["bos_token"], tc["unk_token"], tc["add_bos_token"]) == ("<s>", "<unk>", True)


# --------------------------------------------------------------------------------------------------
# rope scaling
# --------------------------------------------------------------------------------------------------


def _llama3_factors(factor, low, high, orig, theta=500000.0, dim=128):
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < orig / high:
            out.append(1.0)
        elif wl > orig / low:
            out.append(factor)
        else:
            s = (orig / wl - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("params", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 2.5, 4096)])
def test_infer_llama3_rope_scaling(params):
    factor, low, high, orig = params
    got = infer_llama3_rope_scaling(_llama3_factors(*params), 500000.0, 128)
    assert got is not None and got["rope_type"] == "llama3"
    assert got["factor"] == pytest.approx(factor, rel=1e-6)
    assert got["original_max_position_embeddings"] == orig
    assert got["low_freq_factor"] == pytest.approx(low, rel=1e-3)
    assert got["high_freq_factor"] == pytest.approx(high, rel=1e-3)
    assert infer_llama3_rope_scaling(np.ones(64, np.float32), 500000.0, 128) is None


def test_rope_freqs_tensor_and_linear_scaling(tmp_path, bpe_fields):
    weights = make_weights(len(bpe_fields["tokens"]), seed=5, tied=True)
    freqs = _llama3_factors(8.0, 1.0, 4.0, 8192, theta=50000.0, dim=HEAD_DIM)
    assert len(set(freqs.tolist())) > 1  # the tiny head_dim still spans the scaled region
    src = write_gguf(tmp_path / "a.gguf", weights, bpe_fields, extra_tensors={"rope_freqs.weight": freqs})
    out = import_gguf(src, tmp_path / "a", progress=False)
    assert read_json(out / "config.json")["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in load_file(str(out / "model.safetensors"))

    kv = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    src = write_gguf(tmp_path / "b.gguf", weights, bpe_fields, extra_kv=kv)
    out = import_gguf(src, tmp_path / "b", progress=False)
    assert read_json(out / "config.json")["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


# --------------------------------------------------------------------------------------------------
# errors and atomicity
# --------------------------------------------------------------------------------------------------


def _no_leftovers(parent: Path, allowed=()):
    return sorted(p.name for p in parent.iterdir() if p.name not in allowed) == []


def test_missing_file(tmp_path):
    with pytest.raises(GGUFImportError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_not_llama(tmp_path, bpe_fields):
    weights = make_weights(len(bpe_fields["tokens"]), tied=True)
    src = write_gguf(tmp_path / "q.gguf", weights, bpe_fields, arch="qwen2")
    with pytest.raises(GGUFImportError, match="qwen2"):
        import_gguf(src, tmp_path / "out", progress=False)
    assert _no_leftovers(tmp_path, {"q.gguf"})


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty", "header_only"])
def test_corrupt_files(tmp_path, f16_model, bpe_fields, how):
    weights, _ = f16_model
    src = write_gguf(tmp_path / "m.gguf", weights, bpe_fields)
    raw = src.read_bytes()
    if how == "truncate":
        src.write_bytes(raw[: int(len(raw) * 0.6)])
    elif how == "garbage":
        src.write_bytes(b"not a gguf file at all" * 10)
    elif how == "empty":
        src.write_bytes(b"")
    else:
        src.write_bytes(raw[:200])
    with pytest.raises(GGUFImportError) as ei:
        import_gguf(src, tmp_path / "out", progress=False)
    assert "m.gguf" in str(ei.value)
    assert isinstance(ei.value, QServeLiteError)
    assert _no_leftovers(tmp_path, {"m.gguf"})


def test_missing_tensor_and_bad_type(tmp_path, bpe_fields):
    weights = make_weights(len(bpe_fields["tokens"]), tied=True)
    src = write_gguf(tmp_path / "m.gguf", weights, bpe_fields, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFImportError, match=r"blk\.1\.ffn_up\.weight"):
        import_gguf(src, tmp_path / "out", progress=False)

    raw = np.zeros((len(bpe_fields["tokens"]), HIDDEN // 32 * 18), dtype=np.uint8)  # IQ4_NL bytes
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    w.add_block_count(LAYERS)
    w.add_tensor("token_embd.weight", raw, raw_dtype=QT.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFImportError, match="IQ4_NL"):
        import_gguf(tmp_path / "n.gguf", tmp_path / "out", progress=False)
    assert _no_leftovers(tmp_path, {"m.gguf", "n.gguf"})


def test_failure_midway_leaves_nothing(tmp_path, bpe_fields):
    weights = make_weights(len(bpe_fields["tokens"]), tied=True)
    weights["model.layers.1.input_layernorm.weight"][3] = 1e6  # beyond float16 range
    src = write_gguf(tmp_path / "m.gguf", weights, bpe_fields)
    with pytest.raises(GGUFImportError, match="float16 range"):
        import_gguf(src, tmp_path / "out", dtype="float16", progress=False)
    assert _no_leftovers(tmp_path, {"m.gguf"})
    # the same file imports fine as float32
    import_gguf(src, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_existing_out_dir(tmp_path, f16_model, bpe_fields):
    weights, _ = f16_model
    src = write_gguf(tmp_path / "m.gguf", weights, bpe_fields)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(GGUFImportError, match="not empty"):
        import_gguf(src, out, progress=False)
    assert (out / "keep.txt").exists()
    import_gguf(src, out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert _no_leftovers(tmp_path, {"m.gguf", "out"})
    with pytest.raises(GGUFImportError, match="dtype"):
        import_gguf(src, tmp_path / "o2", dtype="int8", progress=False)
    with pytest.raises(GGUFImportError, match="inside the output directory"):
        import_gguf(src, tmp_path, progress=False, overwrite=True)
    assert src.exists()


def test_read_gguf_summary(q8_model):
    _, src = q8_model
    s = read_gguf_summary(src)
    assert s["architecture"] == "llama" and s["layers"] == LAYERS and s["hidden_size"] == HIDDEN
    assert s["tensor_types"] == {"F32": 2 * LAYERS + 1, "Q8_0": 7 * LAYERS + 1}
    assert s["tokenizer_model"] == "gpt2" and s["tokenizer_pre"] == "smollm"
    with pytest.raises(GGUFImportError):
        read_gguf_summary(src.parent / "missing.gguf")
