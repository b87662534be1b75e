"""The weight containers of a Llama-family model: LayerWeights (one decoder layer) and LlamaWeights.

Plain dataclasses of numpy (or CuPy) arrays and linears; reading them from files is io/hf_weights.py (Hugging
Face safetensors) and io/checkpoint/ (quantized checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qserve_lite.model.linear import Linear


@dataclass
class LayerWeights:
    input_norm: np.ndarray
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    post_attn_norm: np.ndarray
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


@dataclass
class LlamaWeights:
    embed_tokens: np.ndarray  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: Linear  # shares embed_tokens' array when tied
    extra: dict = field(default_factory=dict)
