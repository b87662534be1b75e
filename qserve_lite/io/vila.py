"""Load a VILA1.5 checkpoint (the root VILA's save_pretrained writes) without torch:

    <root>/config.json      model_type llava_llama: mm_vision_select_layer / _feature, image_aspect_ratio,
                            the nested llm_cfg / vision_tower_cfg / mm_projector_cfg
    <root>/llm/             a Hugging Face Llama (config.json, weights, tokenizer), loaded by io/loader.py at
                            any precision it serves (float at w16a16*, or a quantized checkpoint: ours, or
                            QServe's W8A8 folder of int8 `weight` + fp16 `dequant_scale`)
    <root>/vision_tower/    SiglipVisionModel: config.json, weights, preprocessor_config.json
    <root>/mm_projector/    mlp_downsample: weights `layers.1` (LayerNorm), `layers.2`, `layers.4` (Linears)

Weights are *.safetensors (sharded with an index or not) or torch zip checkpoints (pytorch_model.bin, *.pt;
read by io/torch_pickle.py). The LLM may come from another folder (llm=..., e.g. QServe's
`VILA1.5-13B-QServe-W8A8/llm`, or the output of `qserve-lite quantize` run on <root>/llm).

Shipped shapes (no weights): io/configs/vlm/<name>.json, VILA root configs of VILA1.5-3B, Llama-3-VILA1.5-8B
and VILA1.5-13B (their llm_cfg is the LLM's config.json), for random-weight benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.core.vision_config import VisionConfig, VLMConfig
from qserve_lite.errors import ConfigError, ModelNotFoundError, WeightsError
from qserve_lite.io.checkpoint.zoo import open_torch_index
from qserve_lite.io.hf_weights import TensorIndex
from qserve_lite.io.loader import LoadedModel, load_model

VLM_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "vlm"
VILA_MODEL_TYPES = ("llava_llama", "vila")
# prefixes a vision tower / projector state dict may carry (VILA's save_pretrained strips them)
VISION_PREFIXES = ("model.vision_tower.vision_tower.", "vision_tower.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.mm_projector.", "mm_projector.")


def template_for(llm: ModelConfig, root_name: str = "") -> str:
    """VILA's conversation template of a VILA1.5 model: llama_3 for Llama-3 LLMs (Llama-3-VILA1.5-8B),
    hermes-2 for the 40B (Yi-34B), vicuna_v1 otherwise (VILA1.5-3B / 13B)."""
    if llm.vocab_size >= 128000:
        return "llama_3"
    if "40b" in root_name.lower() or llm.vocab_size == 64000:
        return "hermes-2"
    return "vicuna_v1"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} is not a JSON object")
    return data


def check_vila_config(cfg: dict, source: str) -> None:
    model_type = cfg.get("model_type")
    arch = cfg.get("architectures") or []
    if model_type in VILA_MODEL_TYPES or "LlavaLlamaModel" in arch:
        return
    hint = (" (it is a plain language model: use generate/serve, or give the VILA root above its llm/)"
            if model_type in ("llama", "mistral", "qwen2") else "")
    raise ConfigError(f"{source}: model_type {model_type!r} is not a VILA1.5 checkpoint (llava_llama with "
                      f"llm/, vision_tower/ and mm_projector/){hint}")


def vlm_config_from(root_cfg: dict, llm: ModelConfig, source: str, vision_cfg: dict | None = None,
                    preprocessor: dict | None = None, root_name: str = "", **overrides) -> VLMConfig:
    """The VLMConfig of a VILA root config (vision_cfg: vision_tower/config.json, else vision_tower_cfg)."""
    check_vila_config(root_cfg, source)
    vision_cfg = vision_cfg if vision_cfg is not None else root_cfg.get("vision_tower_cfg")
    if not isinstance(vision_cfg, dict):
        raise ConfigError(f"{source}: no vision tower config (vision_tower/config.json or vision_tower_cfg)")
    vision = VisionConfig.from_dict(vision_cfg, source=f"{source} vision tower")
    overrides.setdefault("conv_template", template_for(llm, root_name))
    return VLMConfig.from_vila(root_cfg, vision, llm.hidden_size, preprocessor, source=source, **overrides)


def _open_weights(folder: Path):
    if not folder.is_dir():
        raise WeightsError(f"{folder} is missing: a VILA1.5 checkpoint has llm/, vision_tower/ and "
                           "mm_projector/")
    if (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors")):
        return TensorIndex(folder)
    idx = open_torch_index(folder)
    if idx is None:
        others = sorted(p.name for p in folder.iterdir() if p.suffix not in (".json", ".txt", ".md"))
        found = f" (found {', '.join(others[:5])})" if others else ""
        raise WeightsError(f"no weights in {folder}: expected *.safetensors or pytorch_model.bin / "
                           f"*.pt{found}")
    return idx


def read_vision_tensors(root: Path) -> dict[str, np.ndarray]:
    """The vision tower's and projector's tensors as fp16 numpy arrays, under the names VisionWeights reads
    (`vision_model.*`, `layers.*`); the tower's unused post_layernorm and head are skipped."""
    tensors: dict[str, np.ndarray] = {}
    for sub, prefixes, keep in (("vision_tower", VISION_PREFIXES, "vision_model."),
                                ("mm_projector", PROJECTOR_PREFIXES, "layers.")):
        idx = _open_weights(root / sub)
        try:
            for name in idx.names():
                short = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
                if not short.startswith(keep) or ".post_layernorm." in short or ".head." in short:
                    continue
                tensors[short] = idx.get(name, dtype=np.float32).astype(np.float16)
        finally:
            idx.close()
    return tensors


@dataclass
class LoadedVLM:
    """A VILA1.5 model as loaded: the LLM (a LoadedModel at its precision), the vision side's config and
    host tensors (fp16), and the name its captions are stored under."""

    path: Path
    name: str
    config: VLMConfig
    llm: LoadedModel
    vision_tensors: dict[str, np.ndarray]

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A vision-side tensor as float32, shape-checked (VisionWeights.from_tensors' `get`)."""
        t = self.vision_tensors.get(name)
        sub = "mm_projector" if name.startswith("layers.") else "vision_tower"
        if t is None:
            raise WeightsError(f"tensor '{name}' is missing from {self.path / sub}")
        if tuple(t.shape) != tuple(shape):
            raise WeightsError(f"tensor '{name}' in {self.path / sub} has shape {list(t.shape)}, expected "
                               f"{list(shape)} from the config")
        return t.astype(np.float32)


def vila_root(root: str | Path) -> Path:
    """The checkpoint root `root` names (a directory with a config.json; nothing is read), or
    ModelNotFoundError."""
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "a file" if root.is_file() else "not found"
        raise ModelNotFoundError(f"{root}: {what}; give the directory of a VILA1.5 checkpoint (config.json, "
                                 "llm/, vision_tower/, mm_projector/)")
    if not (root / "config.json").is_file():
        raise ModelNotFoundError(f"{root} has no config.json; it is not a VILA1.5 checkpoint")
    return root


def load_vila(root: str | Path, precision: str | None = None, llm: str | Path | None = None,
              token_order: str | None = None, conv_template: str | None = None) -> LoadedVLM:
    """Load a VILA1.5 checkpoint root; the LLM from `llm` (default <root>/llm) at `precision` (io/loader's
    rules). token_order / conv_template override the VILA1.5 defaults (column-major merge, the model's
    template)."""
    root = vila_root(root)
    root_cfg = _read_json(root / "config.json", "VILA config")
    check_vila_config(root_cfg, str(root / "config.json"))
    llm_dir = Path(llm).expanduser() if llm is not None else root / "llm"
    if not llm_dir.is_dir():
        raise ModelNotFoundError(f"{llm_dir} is missing: a VILA1.5 checkpoint keeps its LLM in llm/")
    loaded = load_model(llm_dir, precision=precision)
    vt = root / "vision_tower"
    vision_cfg = None
    if (vt / "config.json").is_file():
        vision_cfg = _read_json(vt / "config.json", "vision tower config")
    pre = vt / "preprocessor_config.json"
    preprocessor = _read_json(pre, "image preprocessor config") if pre.is_file() else None
    overrides = {k: v for k, v in (("token_order", token_order), ("conv_template", conv_template)) if v}
    config = vlm_config_from(root_cfg, loaded.config, str(root / "config.json"), vision_cfg, preprocessor,
                             root.name, **overrides)
    return LoadedVLM(root, root.name, config, loaded, read_vision_tensors(root))


def shipped_vlm_names() -> list[str]:
    return sorted(p.stem for p in VLM_CONFIG_DIR.glob("*.json"))


def load_vlm_shape(ref: str | Path) -> tuple[VLMConfig, ModelConfig, str]:
    """(VLMConfig, the LLM's ModelConfig, label) of a shipped VILA shape name (vila1.5-3b, vila1.5-8b,
    vila1.5-13b) or a VILA root config.json (whose llm_cfg holds the LLM's config)."""
    name = str(ref).lower().removesuffix(".json")
    path = VLM_CONFIG_DIR / f"{name}.json"
    label = name
    if "/" in str(ref) or not path.is_file():
        path = Path(str(ref)).expanduser()
        path = path / "config.json" if path.is_dir() else path
        label = str(ref)
        if not path.is_file():
            raise ModelNotFoundError(f"'{ref}' is neither a shipped VLM shape "
                                     f"({', '.join(shipped_vlm_names())}) nor a VILA config.json")
    cfg = _read_json(path, "VILA config")
    llm = ModelConfig.from_dict(cfg.get("llm_cfg"), source=f"{path} llm_cfg")
    return vlm_config_from(cfg, llm, str(path), root_name=label), llm, label
