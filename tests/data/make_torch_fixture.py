"""Generate the torch-written test fixtures. NOT run in CI (qserve-lite never imports torch); the outputs are
committed. Re-run by hand after `pip install torch` (any CPU build >= 1.6):

    python tests/data/make_torch_fixture.py

Writes, next to this script:

- tiny_state_dict.pt            torch.save of a small OrderedDict state dict: fp16, fp32, int8, uint8,
                                int64, bool, bf16, a Parameter, a non-contiguous view with a storage offset,
                                two tensors sharing one storage, a 0-d tensor, an empty tensor, a nested dict.
- tiny_state_dict_expected.npz  the same arrays as numpy (bf16 as float32; nested names joined with '.').
- qserve_zoo_tiny/              a fake QServe model-zoo W4A8 per-channel checkpoint for a 1-layer Llama
                                (config.json without quantization_config + pytorch_model.bin), packed with an
                                independent torch implementation of the layout described for DeepCompressor's
                                QServe packer (view (n/32,2,2,8,1,k/32,1,2,4,4) -> permute -> two nibbles).
- qserve_zoo_tiny_expected.npz  unpacked codes, scales, szeros, biases and float tensors of that checkpoint.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

ZOO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 48,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "attention_bias": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}


def make_state_dict_fixture() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    shared = torch.arange(24, dtype=torch.int16)
    sd = collections.OrderedDict()
    sd["fp16"] = torch.randn(3, 5, generator=g).half()
    sd["fp32"] = torch.randn(4, generator=g)
    sd["int8"] = torch.randint(-128, 128, (2, 7), generator=g, dtype=torch.int8)
    sd["uint8"] = torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8)
    sd["int64"] = torch.tensor([-(2**40), 0, 7])
    sd["bool"] = torch.tensor([True, False, True])
    sd["bf16"] = torch.randn(2, 3, generator=g).to(torch.bfloat16)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    sd["view"] = base[1:5:2, 3:9:2]  # storage offset 13, strides (20, 2)
    sd["transposed"] = base.t()[2:4]  # a non-contiguous view of the same storage
    sd["shared_a"] = shared[4:10]
    sd["shared_b"] = shared.view(4, 6)[2:]
    sd["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    sd["empty"] = torch.zeros(0, 3)
    sd["nested"] = {"inner": torch.tensor([1, 2, 3], dtype=torch.int32)}
    torch.save(sd, HERE / "tiny_state_dict.pt")

    expected = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                expected[f"{k}.{k2}"] = v2.numpy()
        else:
            t = v.detach()
            expected[k] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy().copy()
    np.savez_compressed(HERE / "tiny_state_dict_expected.npz", **expected)


def qserve_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint4 codes [n, k] (int) -> int8 [n, k/2], following the DeepCompressor description."""
    n, k = codes.shape
    t = codes.to(torch.int32).view(n // 32, 2, 2, 8, 1, k // 32, 1, 2, 4, 4)
    t = t.permute(1, 0, 5, 4, 3, 8, 7, 2, 6, 9).contiguous()  # (2, n/32, k/32, 1, 8, 4, 2, 2, 1, 4)
    t = t.view(2, -1)
    packed = (t[1] << 4) | t[0]
    return packed.to(torch.uint8).view(torch.int8).view(n, k // 2)


def make_zoo_fixture() -> None:
    cfg = ZOO_CONFIG
    g = torch.Generator().manual_seed(1)
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    qs, kvs = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (qs, h), "self_attn.k_proj": (kvs, h), "self_attn.v_proj": (kvs, h),
              "self_attn.o_proj": (h, qs), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    sd = collections.OrderedDict()
    expected = {}
    sd["model.embed_tokens.weight"] = (0.1 * torch.randn(cfg["vocab_size"], h, generator=g)).half()
    p = "model.layers.0"
    sd[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    sd[f"{p}.post_attention_layernorm.weight"] = (1 + 0.1 * torch.randn(h, generator=g)).half()  # not folded
    for name, (n, k) in shapes.items():
        full = f"{p}.{name}"
        codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        scales = (0.01 + 0.01 * torch.rand(n, generator=g)).half()
        szeros = (scales.float() * torch.randint(0, 16, (n,), generator=g)).half()
        sd[f"{full}.qweight"] = qserve_pack(codes)
        sd[f"{full}.s1_scales"] = scales
        sd[f"{full}.s1_szeros"] = szeros
        expected[f"{full}.codes"] = codes.to(torch.uint8).numpy()
        expected[f"{full}.s1_scales"] = scales.numpy()
        expected[f"{full}.s1_szeros"] = szeros.numpy()
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            sd[f"{full}.bias"] = (0.1 * torch.randn(n, generator=g)).half()
            expected[f"{full}.bias"] = sd[f"{full}.bias"].numpy()
    sd[f"{p}.self_attn.rotary_emb.inv_freq"] = torch.ones(d // 2)  # old HF buffer: must be ignored
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    sd["lm_head.weight"] = (0.1 * torch.randn(cfg["vocab_size"], h, generator=g)).half()
    for key in ("model.embed_tokens.weight", "lm_head.weight", f"{p}.post_attention_layernorm.weight"):
        expected[key] = sd[key].numpy()

    out = HERE / "qserve_zoo_tiny"
    out.mkdir(exist_ok=True)
    torch.save(sd, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    np.savez_compressed(HERE / "qserve_zoo_tiny_expected.npz", **expected)


if __name__ == "__main__":
    make_state_dict_fixture()
    make_zoo_fixture()
    for f in sorted(HERE.glob("tiny_state_dict*")) + sorted(HERE.glob("qserve_zoo_tiny*")):
        size = sum(x.stat().st_size for x in f.rglob("*")) if f.is_dir() else f.stat().st_size
        print(f"{f.name}: {size} bytes")
