"""Hugging Face safetensors checkpoints (single file or sharded with an index) -> LlamaWeights.

TensorIndex maps tensor names to the safetensors files holding them (and shape-checks what it reads);
load_llama_weights reads a whole float model, LayerReader one decoder layer at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.errors import WeightsError
from qserve_lite.io.safetensors_reader import SafetensorsFile
from qserve_lite.model.linear import Linear
from qserve_lite.model.weights import LayerWeights, LlamaWeights


class TensorIndex:
    """Maps tensor names to the safetensors file holding them."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError, AttributeError):
                raise WeightsError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.model_dir / shard).is_file():
                    raise WeightsError(
                        f"{index} names shard '{shard}', which is missing from {self.model_dir}"
                    )
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            if not files:
                raise WeightsError(
                    f"no *.safetensors weights in {self.model_dir}; convert the checkpoint to safetensors "
                    "(or use `qserve-lite import-gguf` for a GGUF file)"
                )
        for fname in files:
            f = SafetensorsFile(self.model_dir / fname)
            self._files[fname] = f
            for name in f.keys():
                self._where[name] = fname

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._where[name]].shape(name)

    def get(self, name: str, shape: tuple[int, ...] | None = None, dtype=np.float32) -> np.ndarray:
        if name not in self._where:
            raise WeightsError(f"tensor '{name}' is missing from the checkpoint in {self.model_dir}")
        f = self._files[self._where[name]]
        if shape is not None and f.shape(name) != tuple(shape):
            raise WeightsError(
                f"tensor '{name}' in {f.path.name} has shape {list(f.shape(name))}, expected {list(shape)} "
                "from config.json"
            )
        return f.get(name, dtype=dtype)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _read_layer(idx: TensorIndex, cfg: ModelConfig, i: int, dtype) -> LayerWeights:
    h, inter = cfg.hidden_size, cfg.intermediate_size

    def linear(prefix: str, out_f: int, in_f: int, bias: bool = False) -> Linear:
        w = idx.get(prefix + ".weight", (out_f, in_f), dtype)
        b = idx.get(prefix + ".bias", (out_f,), dtype) if bias else None
        return Linear(w, b)

    p = f"model.layers.{i}"
    return LayerWeights(
        input_norm=idx.get(f"{p}.input_layernorm.weight", (h,), dtype),
        q_proj=linear(f"{p}.self_attn.q_proj", cfg.q_size, h, cfg.qkv_bias),
        k_proj=linear(f"{p}.self_attn.k_proj", cfg.kv_size, h, cfg.qkv_bias),
        v_proj=linear(f"{p}.self_attn.v_proj", cfg.kv_size, h, cfg.qkv_bias),
        o_proj=linear(f"{p}.self_attn.o_proj", h, cfg.q_size),
        post_attn_norm=idx.get(f"{p}.post_attention_layernorm.weight", (h,), dtype),
        gate_proj=linear(f"{p}.mlp.gate_proj", inter, h),
        up_proj=linear(f"{p}.mlp.up_proj", inter, h),
        down_proj=linear(f"{p}.mlp.down_proj", h, inter),
    )


def load_llama_weights(cfg: ModelConfig, model_dir: str | Path, dtype=np.float32,
                       layers: bool = True) -> LlamaWeights:
    """Load and shape-check every tensor the forward needs. layers=False reads only the embeddings, the
    final norm and lm_head and leaves every decoder layer None (read them one at a time with LayerReader)."""
    idx = TensorIndex(model_dir)
    try:
        h = cfg.hidden_size
        embed = idx.get("model.embed_tokens.weight", (cfg.vocab_size, h), dtype)
        blocks = [_read_layer(idx, cfg, i, dtype) if layers else None for i in range(cfg.num_layers)]
        final_norm = idx.get("model.norm.weight", (h,), dtype)
        if cfg.tie_word_embeddings or "lm_head.weight" not in idx:
            if not cfg.tie_word_embeddings:
                raise WeightsError(
                    f"tensor 'lm_head.weight' is missing from {model_dir} and config.json does not set "
                    "tie_word_embeddings"
                )
            lm_head = Linear(embed)
        else:
            lm_head = Linear(idx.get("lm_head.weight", (cfg.vocab_size, h), dtype))
    finally:
        idx.close()
    return LlamaWeights(embed_tokens=embed, layers=blocks, final_norm=final_norm, lm_head=lm_head)


class LayerReader:
    """Reads one decoder layer at a time (`reader(i)`), so that a pass over the layers (the quantizer) holds
    a single float layer in memory. A context manager: the checkpoint files stay open until it exits."""

    def __init__(self, cfg: ModelConfig, model_dir: str | Path, dtype=np.float32):
        self.cfg, self.dtype = cfg, dtype
        self._idx = TensorIndex(model_dir)

    def __call__(self, i: int) -> LayerWeights:
        if not 0 <= i < self.cfg.num_layers:
            raise IndexError(f"layer {i} out of range (the model has {self.cfg.num_layers})")
        return _read_layer(self._idx, self.cfg, i, self.dtype)

    def close(self) -> None:
        self._idx.close()

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
