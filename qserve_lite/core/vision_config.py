"""VisionConfig and VLMConfig: the shape of a VILA1.5-style vision-language model's vision side (a SigLIP
tower and the mlp_downsample projector) and how images enter the LLM, from VILA's config files, validated.

A VILA1.5 checkpoint is a root with config.json (model_type llava_llama: mm_vision_select_layer,
mm_vision_select_feature, image_aspect_ratio, and the nested llm_cfg / vision_tower_cfg / mm_projector_cfg)
and the sub-folders llm/ (a Hugging Face Llama), vision_tower/ (SiglipVisionModel + preprocessor_config.json)
and mm_projector/ (mlp_downsample). The LLM's own shape is a ModelConfig read from llm/config.json.

The vision tower keeps the hidden state after encoder layer `num_layers + 1 + select_layer` (select_layer -2:
all but the last layer run; no post-layernorm), all `grid**2` patch tokens (select_feature cls_patch; SigLIP
has no CLS token). The projector zero-pads the grid to an even size, merges 2x2 neighbours into 4x the
channels ([x(2i,2j) | x(2i,2j+1) | x(2i+1,2j) | x(2i+1,2j+1)]) and emits the merged grid column-major
(token j * m + i, VILA1.5's single permute; `token_order` "row" gives NVILA / TensorRT-LLM's i * m + j).
"""

from __future__ import annotations

from dataclasses import dataclass

from qserve_lite.errors import ConfigError

TOKEN_ORDERS = ("column", "row")
VISION_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class VisionConfig:
    """A SigLIP vision tower (Hugging Face SiglipVisionConfig fields)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size",
                     "image_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"vision tower config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision tower config: hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision tower config: image_size {self.image_size} is smaller than one patch "
                              f"({self.patch_size})")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"vision tower config: hidden_act {self.hidden_act!r} is not supported "
                              f"({', '.join(VISION_ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side (a 'valid' convolution: the last image_size % patch_size pixels are unseen)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_features(self) -> int:
        """Inputs of the patch embedding: channels x patch x patch, in (c, kh, kw) order."""
        return self.num_channels * self.patch_size * self.patch_size

    def num_parameters(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        return self.patch_features * h + h + self.num_patches * h + self.num_layers * layer

    @classmethod
    def from_dict(cls, d: dict, source: str = "vision_tower/config.json") -> VisionConfig:
        """A SiglipVisionConfig dict (or a SiglipConfig with a nested vision_config)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        d = d.get("vision_config", d) if isinstance(d.get("vision_config"), dict) else d
        model_type = d.get("model_type", "siglip_vision_model")
        if "siglip" not in str(model_type):
            raise ConfigError(f"{source}: model_type {model_type!r}; only SigLIP vision towers are supported")
        try:
            return cls(
                hidden_size=d.get("hidden_size", 768),
                intermediate_size=d.get("intermediate_size", 3072),
                num_layers=d.get("num_hidden_layers", 12),
                num_heads=d.get("num_attention_heads", 12),
                patch_size=d.get("patch_size", 16),
                image_size=d.get("image_size", 224),
                num_channels=d.get("num_channels", 3),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


@dataclass(frozen=True)
class VLMConfig:
    """The vision side of a VILA1.5 model and how its image tokens enter an LLM of hidden size llm_hidden."""

    vision: VisionConfig
    llm_hidden: int
    select_layer: int = -2  # hidden_states index: -2 = the output of the last layer but one
    select_feature: str = "cls_patch"
    token_order: str = "column"  # the merged grid's order: VILA1.5 column-major, or "row" (NVILA)
    projector_eps: float = 1e-5  # the projector's LayerNorm (torch's default)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    conv_template: str = "vicuna_v1"  # engine/vlm_prompt.py

    def __post_init__(self):
        n = self.vision.num_layers
        if not -(n + 1) <= self.select_layer <= n or self.select_layer == 0:
            raise ConfigError(f"mm_vision_select_layer {self.select_layer} is out of range for a "
                              f"{n}-layer vision tower (use -1..-{n} or 1..{n})")
        if self.select_feature != "cls_patch":
            raise ConfigError(
                f"mm_vision_select_feature {self.select_feature!r} is not supported: SigLIP has no CLS "
                "token, so VILA1.5 keeps every patch ('cls_patch'); 'patch' would break the 2x2 merge"
            )
        if self.token_order not in TOKEN_ORDERS:
            raise ConfigError(f"token order must be one of {', '.join(TOKEN_ORDERS)}, got "
                              f"{self.token_order!r}")
        if not isinstance(self.llm_hidden, int) or self.llm_hidden < 1:
            raise ConfigError(f"the LLM hidden size must be a positive integer, got {self.llm_hidden!r}")

    @property
    def layers_run(self) -> int:
        """Encoder layers whose output is the selected feature (hidden_states[select_layer])."""
        n = self.vision.num_layers
        return self.select_layer if self.select_layer > 0 else n + 1 + self.select_layer

    @property
    def merged_grid(self) -> int:
        return -(-self.vision.grid // 2)

    @property
    def tokens_per_image(self) -> int:
        """196 for SigLIP 384/14 (27x27 -> 28x28 -> 14x14)."""
        return self.merged_grid**2

    @property
    def mm_hidden(self) -> int:
        """The projector's input width: 4 merged patches."""
        return 4 * self.vision.hidden_size

    def projector_parameters(self) -> int:
        m, h = self.mm_hidden, self.llm_hidden
        return 2 * m + m * h + h + h * h + h

    @classmethod
    def from_vila(cls, root_cfg: dict, vision: VisionConfig, llm_hidden: int,
                  preprocessor: dict | None = None, source: str = "config.json", **overrides) -> VLMConfig:
        """From a VILA root config.json (+ vision_tower/preprocessor_config.json when present)."""
        if not isinstance(root_cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        projector = root_cfg.get("mm_projector_cfg") or {}
        ptype = projector.get("mm_projector_type", root_cfg.get("mm_projector_type", "mlp_downsample"))
        if ptype != "mlp_downsample":
            raise ConfigError(f"{source}: mm_projector_type {ptype!r} is not supported (only mlp_downsample, "
                              "VILA1.5's)")
        aspect = root_cfg.get("image_aspect_ratio", "resize")
        if aspect != "resize":
            raise ConfigError(f"{source}: image_aspect_ratio {aspect!r} is not supported (only 'resize', "
                              "VILA1.5's)")
        if root_cfg.get("s2"):
            raise ConfigError(f"{source}: S2 multi-scale vision features (s2: true) are not supported")
        values = dict(
            vision=vision,
            llm_hidden=int(llm_hidden),
            select_layer=int(root_cfg.get("mm_vision_select_layer", -2)),
            select_feature=root_cfg.get("mm_vision_select_feature", "cls_patch"),
        )
        pre = preprocessor or {}
        for key, name in (("image_mean", "image_mean"), ("image_std", "image_std")):
            if key in pre:
                values[name] = _triple(pre[key], f"preprocessor_config.json {key}")
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _triple(value, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    raise ConfigError(f"{what}: expected a number or three numbers, got {value!r}")
