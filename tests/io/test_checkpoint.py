"""Quantized checkpoints (io/checkpoint/) and the torch-free reader of torch files (torch_pickle.py)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import random_weights, tiny_config, write_model
from safetensors.numpy import load_file, save_file

from qserve_lite.core.formats import W4Group, W4PerChannel
from qserve_lite.core.model_config import ModelConfig
from qserve_lite.errors import QServeLiteError, WeightsError
from qserve_lite.io.checkpoint import (
    is_quantized_checkpoint,
    read_quant_config,
    read_quantized_weights,
    save_quantized,
)
from qserve_lite.io.hf_weights import load_llama_weights
from qserve_lite.io.torch_pickle import TorchCheckpoint, UnsafeCheckpointError, load_torch_state_dict
from qserve_lite.model.linear import Linear
from qserve_lite.model.quant_linear import W4A8Linear, W8A8Linear
from qserve_lite.quant.quantizers import quantize_w4_group, quantize_w4_per_channel, quantize_w8_per_channel

DATA = Path(__file__).parents[1] / "data"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANT = {
    "w4_chn": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": -1, "kv_bit": 4},
    "w4_g128": {"quant_method": "qoq", "w_bit": 4, "a_bit": 8, "group_size": 128, "kv_bit": 4},
    "w8": {"quant_method": "qoq", "w_bit": 8, "a_bit": 8, "group_size": -1, "kv_bit": 8},
}


def qwen_config(**over) -> dict:
    # dims are multiples of 32 (packed layout); K = 64 and 160 are padded to 128 / 256 in g128
    return tiny_config("Qwen2ForCausalLM", hidden_size=64, intermediate_size=160, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=True, **over)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    cfg = qwen_config()
    return write_model(tmp_path_factory.mktemp("tiny-qwen"), cfg, random_weights(cfg, seed=5))


def quantize(weights, mode: str):
    """Replace every decoder linear of float LlamaWeights by a quantized one (biases rounded to fp16)."""
    for layer in weights.layers:
        for name in LINEARS:
            lin = getattr(layer, name)
            w = np.asarray(lin.weight, np.float64)
            bias = None if lin.bias is None else lin.bias.astype(np.float16).astype(np.float32)
            if mode == "w4_chn":
                q = W4A8Linear(quantize_w4_per_channel(w), bias)
            elif mode == "w4_g128":
                q = W4A8Linear(quantize_w4_group(w, 128), bias)
            else:
                q = W8A8Linear(quantize_w8_per_channel(w), bias)
            setattr(layer, name, q)
    return weights


def quantized_model(src: Path, mode: str):
    cfg_dict = json.loads((src / "config.json").read_text())
    cfg = ModelConfig.from_dict(cfg_dict)
    return cfg_dict, cfg, quantize(load_llama_weights(cfg, src), mode)


def assert_same_qweight(a, b):
    assert type(a) is type(b)
    assert a.in_features == b.in_features
    np.testing.assert_array_equal(a.codes, b.codes)
    if isinstance(a, W4PerChannel):
        np.testing.assert_array_equal(a.scales, b.scales)
        np.testing.assert_array_equal(a.szeros, b.szeros)
    elif isinstance(a, W4Group):
        assert a.group_size == b.group_size
        for f in ("s1", "s2", "zeros"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
            assert getattr(a, f).dtype == getattr(b, f).dtype
    else:
        np.testing.assert_array_equal(a.scales, b.scales)


def assert_same_weights(orig, back):
    f16 = lambda x: np.asarray(x).astype(np.float16).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(back.embed_tokens, f16(orig.embed_tokens))
    np.testing.assert_array_equal(back.lm_head.weight, f16(orig.lm_head.weight))
    np.testing.assert_array_equal(back.final_norm, f16(orig.final_norm))
    for lo, lb in zip(orig.layers, back.layers, strict=True):
        np.testing.assert_array_equal(lb.input_norm, f16(lo.input_norm))
        np.testing.assert_array_equal(lb.post_attn_norm, f16(lo.post_attn_norm))
        for name in LINEARS:
            a, b = getattr(lo, name), getattr(lb, name)
            assert type(a) is type(b)
            assert_same_qweight(a.qweight, b.qweight)
            if a.bias is None:
                assert b.bias is None
            else:
                assert b.bias.dtype == np.float32
                np.testing.assert_array_equal(b.bias, a.bias)


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("mode", ["w4_chn", "w4_g128", "w8"])
def test_roundtrip_exact(qwen_dir, tmp_path, mode):
    cfg_dict, cfg, weights = quantized_model(qwen_dir, mode)
    out = save_quantized(tmp_path / "q", cfg_dict, weights, QUANT[mode], qwen_dir)
    assert out == tmp_path / "q"
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (qwen_dir / f).read_bytes()

    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["torch_dtype"] == "float16"
    qc = written["quantization_config"]
    for k, v in QUANT[mode].items():
        assert qc[k] == v
    assert qc["producer"] == "qserve-lite" and "k_padding" in qc
    if mode == "w4_g128":
        assert qc["padded_in_features"] == {
            f"model.layers.*.{n}": {"in_features": k, "padded_in_features": kp}
            for n, k, kp in [("self_attn.q_proj", 64, 128), ("self_attn.k_proj", 64, 128),
                             ("self_attn.v_proj", 64, 128), ("self_attn.o_proj", 64, 128),
                             ("mlp.gate_proj", 64, 128), ("mlp.up_proj", 64, 128),
                             ("mlp.down_proj", 160, 256)]
        }
    else:
        assert qc["padded_in_features"] == {}

    tensors = load_file(str(out / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj"
    if mode == "w8":
        assert tensors[f"{p}.weight"].dtype == np.int8 and tensors[f"{p}.weight"].shape == (64, 160)
        assert tensors[f"{p}.dequant_scale"].dtype == np.float16
        assert f"{p}.qweight" not in tensors
    else:
        kp = 256 if mode == "w4_g128" else 160
        assert tensors[f"{p}.qweight"].dtype == np.int8 and tensors[f"{p}.qweight"].shape == (64, kp // 2)
        assert tensors[f"{p}.s1_scales"].dtype == np.float16 and tensors[f"{p}.s1_scales"].shape == (64,)
        if mode == "w4_g128":
            assert tensors[f"{p}.s2_scales"].dtype == np.int8 and tensors[f"{p}.s2_scales"].shape == (2, 64)
            assert tensors[f"{p}.s2_zeros"].shape == (2, 64) and f"{p}.s1_szeros" not in tensors
        else:
            assert tensors[f"{p}.s1_szeros"].shape == (64,) and f"{p}.s2_scales" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == np.float16
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors
    assert tensors["lm_head.weight"].dtype == np.float16  # written although the source ties embeddings

    cfg2 = ModelConfig.from_file(out / "config.json")
    back = read_quantized_weights(cfg2, out, group_size=QUANT[mode]["group_size"] if mode != "w8" else None)
    assert_same_weights(weights, back)
    assert back.extra["quantization_config"]["w_bit"] == QUANT[mode]["w_bit"]
    rq = read_quant_config(out)
    assert {k: rq[k] for k in QUANT[mode]} == QUANT[mode] and not rq.get("inferred")
    if mode == "w4_g128":
        q = back.layers[0].down_proj.qweight
        assert q.codes.shape == (64, 256) and q.in_features == 160  # padded columns are carried, not dropped


def test_sharded_write(qwen_dir, tmp_path):
    cfg_dict, cfg, weights = quantized_model(qwen_dir, "w4_g128")
    out = save_quantized(tmp_path / "q", cfg_dict, weights, QUANT["w4_g128"], qwen_dir,
                         max_shard_bytes=20_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    total = sum(a.nbytes for s in shards for a in load_file(str(s)).values())
    assert index["metadata"]["total_size"] == total
    assert_same_weights(weights, read_quantized_weights(ModelConfig.from_file(out / "config.json"), out))


def test_overwrite_and_atomicity(qwen_dir, tmp_path):
    cfg_dict, cfg, weights = quantized_model(qwen_dir, "w8")
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(WeightsError, match="not empty"):
        save_quantized(out, cfg_dict, weights, QUANT["w8"], qwen_dir)
    assert (out / "old.txt").read_text() == "keep"
    (out / "model-00001-of-00002.safetensors").write_text("an older checkpoint's shard")
    save_quantized(out, cfg_dict, weights, QUANT["w8"], qwen_dir, overwrite=True)
    # overwrite replaces the checkpoint's files only: the unrelated file stays, the stale shard goes
    assert (out / "old.txt").read_text() == "keep" and (out / "model.safetensors").is_file()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    # a failure while writing leaves neither a partial directory nor temp files
    weights.layers[1].down_proj = Linear(np.zeros((64, 160), np.float32))
    with pytest.raises(WeightsError, match="model.layers.1.mlp.down_proj is not quantized"):
        save_quantized(tmp_path / "q2", cfg_dict, weights, QUANT["w8"], qwen_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_save_validation(qwen_dir, tmp_path, tiny_model_dir):
    cfg_dict, cfg, weights = quantized_model(qwen_dir, "w4_g128")
    with pytest.raises(QServeLiteError, match="group_size=-1"):
        save_quantized(tmp_path / "a", cfg_dict, weights, QUANT["w4_chn"], qwen_dir)
    with pytest.raises(QServeLiteError, match="w_bit=8"):
        save_quantized(tmp_path / "a", cfg_dict, weights, dict(QUANT["w4_g128"], w_bit=8, group_size=-1),
                       qwen_dir)
    no_kv = {k: v for k, v in QUANT["w4_g128"].items() if k != "kv_bit"}
    with pytest.raises(QServeLiteError, match="lacks kv_bit"):
        save_quantized(tmp_path / "a", cfg_dict, weights, no_kv, qwen_dir)
    with pytest.raises(QServeLiteError, match="group_size = 64"):
        save_quantized(tmp_path / "a", cfg_dict, weights, dict(QUANT["w4_g128"], group_size=64), qwen_dir)
    # the conftest tiny Llama has 72 q and 24 k/v channels: not packable as W4 (but fine as W8)
    tcfg_dict, tcfg, tweights = quantized_model(tiny_model_dir, "w4_chn")
    with pytest.raises(WeightsError, match="q_proj has 72 output channels; .* needs a multiple of 32"):
        save_quantized(tmp_path / "b", tcfg_dict, tweights, QUANT["w4_chn"], tiny_model_dir)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    tcfg_dict, tcfg, tweights = quantized_model(tiny_model_dir, "w8")
    out = save_quantized(tmp_path / "c", tcfg_dict, tweights, QUANT["w8"], tiny_model_dir)
    assert_same_weights(tweights, read_quantized_weights(_cfg(out), out, group_size=-1))
    with pytest.raises(WeightsError, match=r"is W8A8 \(per-channel int8\) but group_size=128 was requested"):
        read_quantized_weights(_cfg(out), out, group_size=128)


# ------------------------------------------------------------------------------------------ read errors


@pytest.fixture(scope="module")
def saved(qwen_dir, tmp_path_factory):
    out = {}
    for mode in ("w4_chn", "w4_g128"):
        cfg_dict, cfg, weights = quantized_model(qwen_dir, mode)
        out[mode] = save_quantized(tmp_path_factory.mktemp(mode) / "ckpt", cfg_dict, weights, QUANT[mode],
                                   qwen_dir)
    return out


def _cfg(d: Path) -> ModelConfig:
    return ModelConfig.from_file(d / "config.json")


def test_granularity_mismatch(saved):
    g128, chn = saved["w4_g128"], saved["w4_chn"]
    with pytest.raises(WeightsError, match=r"is per-group \(g128\) but group_size=-1 was requested"):
        read_quantized_weights(_cfg(g128), g128, group_size=-1)
    with pytest.raises(WeightsError, match="is per-channel but group_size=128 was requested"):
        read_quantized_weights(_cfg(chn), chn, group_size=128)
    w = read_quantized_weights(_cfg(chn), chn, group_size=-1)
    assert isinstance(w.layers[0].q_proj.qweight, W4PerChannel)


def _copy_ckpt(src: Path, dst: Path, edit=None, cfg_edit=None) -> Path:
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if cfg_edit:
        cfg_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_tensor_named(saved, tmp_path):
    name = "model.layers.1.mlp.down_proj.s2_zeros"
    d = _copy_ckpt(saved["w4_g128"], tmp_path / "m", edit=lambda t: t.pop(name))
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        read_quantized_weights(_cfg(d), d)
    name = "model.layers.0.self_attn.k_proj.bias"
    d = _copy_ckpt(saved["w4_chn"], tmp_path / "b", edit=lambda t: t.pop(name))
    with pytest.raises(WeightsError, match=f"tensor '{name}' is missing"):
        read_quantized_weights(_cfg(d), d)


def test_wrong_shape_named(saved, tmp_path):
    name = "model.layers.0.mlp.up_proj.s1_scales"

    def edit(t):
        t[name] = t[name][:32]

    d = _copy_ckpt(saved["w4_chn"], tmp_path / "s", edit=edit)
    with pytest.raises(WeightsError, match=rf"'{name}' .* has shape \[32\], expected \[160\]"):
        read_quantized_weights(_cfg(d), d)
    # qweight not covering the padded K
    qname = "model.layers.1.mlp.down_proj.qweight"

    def edit_q(t):
        t[qname] = t[qname][:, :80]

    d = _copy_ckpt(saved["w4_g128"], tmp_path / "q", edit=edit_q)
    with pytest.raises(WeightsError, match=rf"'{qname}' .* has shape \[64, 80\], expected \[64, 128\]"):
        read_quantized_weights(_cfg(d), d)
    # float where int8 is expected
    d = _copy_ckpt(saved["w4_chn"], tmp_path / "f",
                   edit=lambda t: t.update({qname: t[qname].astype(np.float16)}))
    with pytest.raises(WeightsError, match="expected int8"):
        read_quantized_weights(_cfg(d), d)


def test_config_and_tensors_disagree(saved, tmp_path):
    def edit(cfg):
        cfg["quantization_config"]["group_size"] = -1

    d = _copy_ckpt(saved["w4_g128"], tmp_path / "c", cfg_edit=edit)
    msg = r"says per-channel weights but the tensors are per-group \(g128\)"
    with pytest.raises(WeightsError, match=msg):
        read_quantized_weights(_cfg(d), d)


def test_float_checkpoint_rejected(qwen_dir):
    assert not is_quantized_checkpoint(qwen_dir)
    with pytest.raises(WeightsError, match="unquantized weights"):
        read_quantized_weights(_cfg(qwen_dir), qwen_dir)
    with pytest.raises(WeightsError, match="directory not found"):
        read_quantized_weights(_cfg(qwen_dir), qwen_dir.parent / "nonexistent")


def test_no_quantization_config_inferred(saved, tmp_path):
    d = _copy_ckpt(saved["w4_g128"], tmp_path / "n", cfg_edit=lambda c: c.pop("quantization_config"))
    qc = read_quant_config(d)
    assert (qc["w_bit"], qc["group_size"], qc["kv_bit"], qc["inferred"]) == (4, 128, 4, True)
    assert is_quantized_checkpoint(d) and is_quantized_checkpoint(saved["w4_chn"])
    w = read_quantized_weights(_cfg(d), d)
    assert isinstance(w.layers[1].down_proj.qweight, W4Group)


# ------------------------------------------------------------------------------------------ torch pickle


def test_torch_state_dict_fixture():
    expected = np.load(DATA / "tiny_state_dict_expected.npz")
    got = load_torch_state_dict(DATA / "tiny_state_dict.pt")
    assert sorted(got) == sorted(expected.files)
    for k in expected.files:
        assert got[k].dtype == expected[k].dtype, k
        assert got[k].shape == expected[k].shape, k
        np.testing.assert_array_equal(got[k], expected[k])
        assert got[k].flags.c_contiguous and got[k].flags.writeable
    assert got["bf16"].dtype == np.float32 and got["view"].shape == (2, 3)
    with TorchCheckpoint(DATA / "tiny_state_dict.pt") as ck:
        assert ck.shape("transposed") == (2, 6) and ck.dtype("bf16") == np.float32
        np.testing.assert_array_equal(ck.get("fp16", dtype=np.float32), expected["fp16"].astype(np.float32))


def _zip_with_pickle(path: Path, payload: bytes, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = _zip_with_pickle(tmp_path / "evil.bin", pickle.dumps({"w": _Evil(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle global '(os|posix)\.system'"):
        load_torch_state_dict(path)
    assert not marker.exists()
    # torch's own byte-blob loader (which calls torch.load on nested data) is not allowed either
    payload = b"\x80\x02ctorch.storage\n_load_from_bytes\n)R."
    path = _zip_with_pickle(tmp_path / "blob.bin", payload)
    with pytest.raises(UnsafeCheckpointError, match="torch.storage._load_from_bytes"):
        load_torch_state_dict(path)
    # builtins are not special
    path = _zip_with_pickle(tmp_path / "eval.bin", b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_torch_state_dict(path)


def test_bad_torch_files(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps(119547037146038801333356, protocol=2))  # torch's legacy magic number
    with pytest.raises(WeightsError, match="legacy"):
        load_torch_state_dict(legacy)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(WeightsError, match="not a torch zip checkpoint"):
        load_torch_state_dict(junk)
    # storage shorter than the tensor needs (truncated)
    src = zipfile.ZipFile(DATA / "tiny_state_dict.pt")
    prefix = next(n for n in src.namelist() if n.endswith("data.pkl"))[: -len("data.pkl")]
    trunc = tmp_path / "trunc.bin"
    with zipfile.ZipFile(trunc, "w") as z:
        for n in src.namelist():
            data = src.read(n)
            z.writestr(n, data[:1] if n == prefix + "data/0" else data)
    src.close()
    with pytest.raises(WeightsError, match="storage '0'"):
        load_torch_state_dict(trunc)
    # a pickle that is not a dict of tensors
    path = _zip_with_pickle(tmp_path / "list.bin", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(WeightsError, match="not a state dict"):
        load_torch_state_dict(path)


# ------------------------------------------------------------------------------------------ QServe zoo .bin


def test_zoo_checkpoint(tmp_path, caplog):
    zoo = DATA / "qserve_zoo_tiny"
    exp = np.load(DATA / "qserve_zoo_tiny_expected.npz")
    cfg = _cfg(zoo)
    assert is_quantized_checkpoint(zoo)
    qc = read_quant_config(zoo)
    assert (qc["w_bit"], qc["group_size"], qc["kv_bit"], qc["inferred"]) == (4, -1, 4, True)
    with caplog.at_level(logging.WARNING, logger="qserve_lite.io.checkpoint.zoo"):
        w = read_quantized_weights(cfg, zoo, group_size=-1)
    assert "post_attention_layernorm" in caplog.text and "ignores norm weights" in caplog.text
    layer = w.layers[0]
    for name in LINEARS:
        block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        full = f"model.layers.0.{block}.{name}"
        lin = getattr(layer, name)
        assert isinstance(lin, W4A8Linear) and isinstance(lin.qweight, W4PerChannel)
        np.testing.assert_array_equal(lin.qweight.codes, exp[f"{full}.codes"])
        np.testing.assert_array_equal(lin.qweight.scales, exp[f"{full}.s1_scales"])
        np.testing.assert_array_equal(lin.qweight.szeros, exp[f"{full}.s1_szeros"])
        if f"{full}.bias" in exp.files:
            np.testing.assert_array_equal(lin.bias, exp[f"{full}.bias"].astype(np.float32))
        else:
            assert lin.bias is None
    assert layer.q_proj.in_features == 64 and layer.down_proj.in_features == 96
    # norms are ones (QServe's W4A8 runtime ignores the stored, unfolded ones)
    assert np.all(layer.post_attn_norm == 1) and np.all(layer.input_norm == 1) and np.all(w.final_norm == 1)
    np.testing.assert_array_equal(w.embed_tokens, exp["model.embed_tokens.weight"].astype(np.float32))
    np.testing.assert_array_equal(w.lm_head.weight, exp["lm_head.weight"].astype(np.float32))
    assert w.embed_tokens.dtype == np.float32

    with pytest.raises(WeightsError, match="is per-channel but group_size=128 was requested"):
        read_quantized_weights(cfg, zoo, group_size=128)

    # zoo -> our safetensors format -> read: identical
    out = save_quantized(tmp_path / "ours", json.loads((zoo / "config.json").read_text()), w,
                         dict(QUANT["w4_chn"]), None)
    back = read_quantized_weights(_cfg(out), out)
    assert_same_weights(w, back)


def test_zoo_pickle_rejects_missing_shard(tmp_path):
    d = tmp_path / "zoo"
    d.mkdir()
    (d / "config.json").write_bytes((DATA / "qserve_zoo_tiny" / "config.json").read_bytes())
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "pytorch_model-1.bin"}}))
    with pytest.raises(WeightsError, match="pytorch_model-1.bin"):
        read_quantized_weights(_cfg(d), d)
