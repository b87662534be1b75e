"""Shared fixtures: a tiny random Llama-family model in Hugging Face layout, built per test session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def cupy_or_skip():
    """cupy with a usable CUDA device, else skip the calling test module (GPU tests, pytest -m gpu)."""
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:  # noqa: BLE001 - any CUDA failure means: no usable GPU here
        pytest.skip(f"no CUDA device: {e}", allow_module_level=True)
    return cp


def teacher_forced(engine, prompts, forced: list[list[int]] | None, num_tokens: int):
    """Greedy-decode `prompts` on `engine` for num_tokens tokens, but feed back the tokens of `forced` (per
    prompt) instead of its own, so every engine sees the same histories. Returns ({(prompt, step): logits
    row (host, fp32)}, {(prompt, step): own greedy token})."""
    from qserve_lite.engine.sampler import SamplerOutput
    from qserve_lite.sampling_params import SamplingParams

    sampler = engine.sampler
    rows, own, index = {}, {}, {}

    def forcing(logits, seqs):
        out = sampler(logits, seqs)
        host = logits.get() if hasattr(logits, "get") else np.asarray(logits)
        tokens = []
        for r, (seq, tok) in enumerate(zip(seqs, out.token_ids, strict=True)):
            key = (index[seq.request_id], seq.num_output_tokens)
            rows[key], own[key] = np.array(host[r], dtype=np.float32), tok
            tokens.append(tok if forced is None else forced[key[0]][key[1]])
        return SamplerOutput(tokens, out.logprobs)

    engine.sampler = forcing
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True)
    try:
        for i, p in enumerate(prompts):
            index[engine.add_request(p, params)] = i
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.sampler = sampler
    return rows, own


def compare_logits(a, b) -> tuple[float, float]:
    """(argmax agreement, max over rows of max|a - b| / max|b|) of two {key: logits row} dicts."""
    keys = sorted(b)
    agree = np.mean([int(np.argmax(a[k])) == int(np.argmax(b[k])) for k in keys])
    err = max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in keys)
    return float(agree), err


CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAIN_TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Quantization maps floating point weights to small integers with a scale and a zero point.",
    "def forward(x):\n    return x @ weight.T + bias\n",
    "Numbers like 12345 and 3.14159 appear in text; so do émigré, naïve and 東京.",
    "A key-value cache stores keys and values of earlier tokens so decoding is incremental.",
] * 4


def build_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }))


def tiny_config(arch: str = "LlamaForCausalLM", **over) -> dict:
    cfg = {
        "architectures": [arch],
        "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                       "Qwen2ForCausalLM": "qwen2"}.get(arch, "llama"),
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 12,  # != hidden/heads on purpose: head_dim must be read, not derived
        "vocab_size": 320,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(over)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg["head_dim"]
    qs, kvs = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    bias = cfg["architectures"][0] == "Qwen2ForCausalLM" or cfg.get("attention_bias", False)

    def mat(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    t = {"model.embed_tokens.weight": (0.15 * rng.standard_normal((cfg["vocab_size"], h))).astype(np.float32),
         "model.norm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        t[f"{p}.post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        shapes = {"q_proj": (qs, h), "k_proj": (kvs, h), "v_proj": (kvs, h), "o_proj": (h, qs)}
        for name, (o, i_) in shapes.items():
            t[f"{p}.self_attn.{name}.weight"] = mat(o, i_)
            if bias and name != "o_proj":
                t[f"{p}.self_attn.{name}.bias"] = (0.1 * rng.standard_normal(o)).astype(np.float32)
        t[f"{p}.mlp.gate_proj.weight"] = mat(inter, h)
        t[f"{p}.mlp.up_proj.weight"] = mat(inter, h)
        t[f"{p}.mlp.down_proj.weight"] = mat(h, inter)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(cfg["vocab_size"], h)
    return t


def write_model(out_dir: Path, cfg: dict, tensors: dict[str, np.ndarray], tokenizer_from: Path | None = None,
                shards: int = 1) -> Path:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(out_dir / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(out_dir / fname))
            weight_map.update({n: fname for n in part})
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out_dir / f).write_bytes((tokenizer_from / f).read_bytes())
    else:
        build_tokenizer(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA 6/2, head_dim 12, tied embeddings) with a trained byte-level BPE tokenizer."""
    cfg = tiny_config()
    return write_model(tmp_path_factory.mktemp("tiny-llama"), cfg, random_weights(cfg))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's real cache from tests (the slow real-model test opts back in)."""
    monkeypatch.setenv("QSERVE_LITE_CACHE", str(tmp_path / "qserve-lite-cache"))


def random_traffic(engine, num_pages: int, num_requests: int = 1000, seed: int = 0) -> dict:
    """Drive `engine` with num_requests random requests (random lengths, greedy or sampled, some with a stop
    string) arriving a few per step, aborting a random live one on ~15% of steps, until all are done; after
    every step no page is held twice and held + free pages add up. Returns the counts (finished, aborted,
    steps with a batch in flight)."""
    from qserve_lite.sampling_params import SamplingParams

    rng = np.random.default_rng(seed)
    added = finished = aborted = in_flight_steps = 0
    live: list[str] = []
    while added < num_requests or engine.has_unfinished():
        for _ in range(min(int(rng.integers(0, 4)), num_requests - added)):
            params = SamplingParams(max_tokens=int(rng.integers(1, 80)),
                                    temperature=float(rng.choice([0, 1])), ignore_eos=bool(rng.integers(2)),
                                    stop=("ab",) if rng.random() < 0.2 else ())
            live.append(engine.add_request(rng.integers(0, 320, int(rng.integers(1, 150))).tolist(), params))
            added += 1
        if live and rng.random() < 0.15:
            aborted += engine.abort(live.pop(int(rng.integers(len(live)))))
        for out in engine.step():
            if out.finished:
                finished += 1
                live.remove(out.request_id)
                assert len(out.outputs[0].token_ids) <= 80
        in_flight_steps += getattr(engine, "_in_flight", None) is not None
        held = [p for s in engine.scheduler.running for p in s.block_table]
        assert len(held) == len(set(held)) and len(held) + engine.block_manager.num_free == num_pages
    return {"finished": finished, "aborted": aborted, "in_flight_steps": in_flight_steps}
