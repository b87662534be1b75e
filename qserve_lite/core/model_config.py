"""ModelConfig: the fields of a Hugging Face config.json that the forward needs, validated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qserve_lite.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Weights of the model this config describes (embeddings, lm_head unless tied, linears, qkv biases,
        norms): the figure model cards quote, e.g. 8.03e9 for Llama-3-8B."""
        h = self.hidden_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {json_kind(cfg)}")
        arch = _architecture(cfg, source)
        heads, kv_heads, head_dim = _head_geometry(cfg, source)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(
                f"{source}: hidden_act '{cfg.get('hidden_act')}' is not supported (only 'silu')"
            )
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            hidden_size=_need(cfg, source, "hidden_size"),
            intermediate_size=_need(cfg, source, "intermediate_size"),
            num_layers=_need(cfg, source, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=_need(cfg, source, "vocab_size"),
            rms_norm_eps=_optional(cfg, source, "rms_norm_eps", float, 1e-6),
            rope_theta=_optional(cfg, source, "rope_theta", float, 10000.0),
            max_position_embeddings=_optional(cfg, source, "max_position_embeddings", int, 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            rope_scaling=_rope_scaling(cfg, source),
            bos_token_id=_token_id(cfg.get("bos_token_id"), source, "bos_token_id"),
            eos_token_ids=_eos_token_ids(cfg.get("eos_token_id"), source),
            extra=cfg,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
        return cls.from_dict(cfg, source=str(path))


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words (for messages): 'an array', 'a string', 'null', ..."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _architecture(cfg: dict, source: str) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(
            f"{source}: field 'architectures' must be a list of names (e.g. [\"LlamaForCausalLM\"]), "
            f"got {archs!r:.80}"
        )
    if not archs:
        raise ConfigError(
            f"{source}: field 'architectures' is missing; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: architecture '{arch}' is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _need(cfg: dict, source: str, name: str, typ=int):
    """A required field, converted to typ (ints must be positive)."""
    if name not in cfg or cfg[name] is None:
        raise ConfigError(f"{source}: required field '{name}' is missing")
    return _convert(cfg[name], source, name, typ)


def _optional(cfg: dict, source: str, name: str, typ, default):
    """An optional field (absent or null: default), converted to typ (ints must be positive)."""
    value = cfg.get(name)
    return default if value is None else _convert(value, source, name, typ)


def _convert(raw, source: str, name: str, typ):
    if isinstance(raw, (list, dict, bool)):  # int([1]) fails anyway; int(True) would pass silently
        raise ConfigError(f"{source}: field '{name}' = {raw!r:.80} is not a valid {typ.__name__}")
    try:
        value = typ(raw)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: field '{name}' = {raw!r:.80} is not a valid {typ.__name__}") from None
    if typ is int and value <= 0:
        raise ConfigError(f"{source}: field '{name}' must be positive, got {value}")
    return value


def _token_id(raw, source: str, name: str) -> int | None:
    """A token id field: null or an integer."""
    if raw is None:
        return None
    try:
        if isinstance(raw, (list, dict)):
            raise TypeError
        return int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"{source}: field '{name}' must be a token id (an integer), got {raw!r:.80}"
        ) from None


def _eos_token_ids(raw, source: str) -> tuple[int, ...]:
    """eos_token_id: null, one token id or a list of them."""
    ids = raw if isinstance(raw, list) else ([] if raw is None else [raw])
    return tuple(_token_id(e, source, "eos_token_id") for e in ids)


def _head_geometry(cfg: dict, source: str) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim), checked."""
    hidden = _need(cfg, source, "hidden_size")
    heads = _need(cfg, source, "num_attention_heads")
    kv_heads = _convert(cfg.get("num_key_value_heads") or heads, source, "num_key_value_heads", int)
    if heads % kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    head_dim = _convert(head_dim, source, "head_dim", int)
    if head_dim % 2:
        raise ConfigError(f"{source}: head_dim must be even for RoPE, got {head_dim}")
    return heads, kv_heads, head_dim


def _rope_scaling(cfg: dict, source: str) -> dict | None:
    """rope_scaling with its type under 'rope_type' (None for the default RoPE)."""
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be null or a JSON object, got {rope_scaling!r:.80}")
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type not in ("default", "llama3", "linear"):
        raise ConfigError(
            f"{source}: rope_scaling type '{rope_type}' is not supported (default, linear, llama3)"
        )
    return None if rope_type == "default" else dict(rope_scaling, rope_type=rope_type)
