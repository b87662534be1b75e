"""Shipped model shapes: io/configs/<name>.json, Hugging Face config.json files with the public values of
the models QServe benchmarks (llama-3-8b, llama-2-7b, mistral-7b, llama-2-13b, llama-30b, yi-34b,
llama-2-70b, qwen1.5-72b). No weights and no tokenizer: the throughput benchmark builds random weights of
these shapes on the device (model/random_weights.py)."""

from __future__ import annotations

from pathlib import Path

from qserve_lite.core.model_config import ModelConfig
from qserve_lite.errors import ModelNotFoundError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config_path(ref: str | Path) -> Path:
    """A shipped name (case-insensitive, '.json' optional), a config.json file, or a directory holding one
    -> the path of the config.json."""
    ref_s = str(ref)
    name = ref_s.lower().removesuffix(".json")
    shipped = CONFIG_DIR / f"{name}.json"
    if "/" not in ref_s and shipped.is_file():
        return shipped
    path = Path(ref_s).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file():
        return path
    raise ModelNotFoundError(
        f"'{ref_s}' is neither a shipped model config ({', '.join(shipped_config_names())}) nor a "
        "config.json file or a directory holding one"
    )


def load_config(ref: str | Path) -> ModelConfig:
    """The ModelConfig of a shipped name or a config.json path (see resolve_config_path)."""
    return ModelConfig.from_file(resolve_config_path(ref))
