"""The QServe checkpoint layout shared by the writer (write.py) and the reader (read.py): tensor names, K
padding and the quantization_config keys.

Tensor names (per decoder layer i, linear L in self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj):

- W4A8 per-channel:  model.layers.i.L.qweight (int8 [n, k_pad / 2], packed, see core/pack.py),
                     .s1_scales fp16 [n], .s1_szeros fp16 [n] (= zero * scale)
- W4A8 g128:         .qweight, .s1_scales fp16 [n],
                     .s2_scales int8 [k_pad / 128, n], .s2_zeros int8 [k_pad / 128, n]
- W8A8:              .weight int8 [n, k], .dequant_scale fp16 [n]
- all:               .bias fp16 [n] when the linear has one

plus model.embed_tokens.weight, lm_head.weight (always written, fp16) and the norm weights (fp16).

K padding: the packed layout needs K to be a multiple of 32 (per-channel) or of the group size (g128, so
K = 576 becomes 640); padded code columns meet zero activations. The true K always comes from the model
config (hidden_size, intermediate_size, num_heads * head_dim); quantization_config["padded_in_features"]
records the padded widths for readers that do not know this rule.

quantization_config["k_hadamard"] (ours, written true by default by `qserve-lite quantize`): the runtime
multiplies q and k per head by the normalized Hadamard matrix after RoPE, before the KV cache (model/llama.py,
cuda/kv_writer.cu), which makes the KV4 K cache much more accurate. Such checkpoints are meant for
qserve-lite: QServe's own runtime does not know this key and never rotates (it would run the weights with the
less accurate K cache it was not calibrated for); `quantize --no-k-hadamard` writes false, for strict
QServe-runtime compatibility. Absent (QServe zoo checkpoints, older ones): false.
"""

from __future__ import annotations

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.pack import TILE
from qserve_lite.errors import ConfigError

PRODUCER = "qserve-lite"
LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_REQUIRED_QC = ("quant_method", "w_bit", "a_bit", "group_size", "kv_bit")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, true in_features) of every decoder linear, keyed by 'self_attn.q_proj' etc."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    return {
        "self_attn.q_proj": (cfg.q_size, h), "self_attn.k_proj": (cfg.kv_size, h),
        "self_attn.v_proj": (cfg.kv_size, h), "self_attn.o_proj": (h, cfg.q_size),
        "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter),
    }


def padded_k(in_features: int, group_size: int) -> int:
    """Width of the stored W4 codes: K rounded up to the group size (g128) or to 32 (per-channel)."""
    return _round_up(in_features, group_size if group_size > 0 else TILE)


def validate_quant_config(qc, source: str = "quantization_config") -> dict:
    """Check the keys every reader relies on; returns a copy with ints normalized."""
    if not isinstance(qc, dict):
        raise ConfigError(f"{source} must be a JSON object, got {type(qc).__name__}")
    missing = [k for k in _REQUIRED_QC if k not in qc]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}; it needs {', '.join(_REQUIRED_QC)}")
    out = dict(qc)
    if out["quant_method"] != "qoq":
        raise ConfigError(f"{source}: quant_method {out['quant_method']!r} is not supported (only 'qoq')")
    allowed = {"w_bit": (4, 8), "a_bit": (8,), "group_size": (-1, 128), "kv_bit": (4, 8)}
    for key, values in allowed.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v not in values:
            raise ConfigError(f"{source}: {key} = {v!r} is not supported; use one of {list(values)}")
    if out["w_bit"] == 8 and out["group_size"] != -1:
        raise ConfigError(
            f"{source}: W8A8 weights are per-channel; group_size must be -1, got {out['group_size']}"
        )
    if "k_hadamard" in out and not isinstance(out["k_hadamard"], bool):
        raise ConfigError(f"{source}: k_hadamard must be true or false, got {out['k_hadamard']!r}")
    return out


def granularity_name(w_bit: int, group_size: int) -> str:
    """How the weights are quantized, in words (for error messages)."""
    if w_bit == 8:
        return "W8A8 (per-channel int8)"
    return "per-group (g128)" if group_size > 0 else "per-channel"
