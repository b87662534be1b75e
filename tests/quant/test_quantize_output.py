"""`qserve-lite quantize` output safety (issue 20, item 2): every --out problem is refused before any work
with one clear line; --overwrite replaces only the checkpoint's files; an interrupted save leaves nothing
behind; files get the umask's permissions."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import random_weights, tiny_config, write_model

from qserve_lite import cli
from qserve_lite.io import atomic_dir
from qserve_lite.quant import calib_source

FIXTURE_TEXT = Path(__file__).parents[1] / "data" / "python_doc_sample.rst.txt"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=512)
    return write_model(tmp_path_factory.mktemp("out-safety") / "model", cfg, random_weights(cfg, seed=3))


def _args(model, out, *extra):
    return ["quantize", "--model", str(model), "--out", str(out), "--device", "cpu", "--calib-text",
            str(FIXTURE_TEXT), "--calib-tokens", "128", "--calib-seq-len", "64", *extra]


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the quantizer gets as far as reading calibration text."""
    def work(*a, **k):
        raise AssertionError("calibration started before the output was checked")

    monkeypatch.setattr(calib_source, "calibration_samples", work)


def _refused(capsys, argv) -> str:
    t0 = time.perf_counter()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 5.0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qserve-lite: error: ") and "Traceback" not in err, err
    return lines[0]


def test_non_empty_out_is_refused_naming_the_flag(model_dir, tmp_path, capsys, no_work):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    msg = _refused(capsys, _args(model_dir, out))
    assert "--overwrite" in msg and "overwrite=True" not in msg and "not empty" in msg
    assert (out / "notes.txt").read_text() == "mine"


def test_existing_file_is_refused(model_dir, tmp_path, capsys, no_work):
    out = tmp_path / "q"
    out.write_text("a file")
    assert "is not a directory" in _refused(capsys, _args(model_dir, out, "--overwrite"))
    assert out.read_text() == "a file"


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_and_model_may_not_overlap_even_with_overwrite(model_dir, capsys, no_work, where):
    before = _digest(model_dir)
    out = {"same": model_dir, "inside": model_dir / "q", "contains": model_dir.parent}[where]
    msg = _refused(capsys, _args(model_dir, out, "--overwrite"))
    assert "source model directory" in msg
    assert _digest(model_dir) == before and not (model_dir / "q").exists()


def test_unwritable_out_is_a_clear_error(model_dir, tmp_path, capsys, no_work):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "not a directory" in _refused(capsys, _args(model_dir, blocker / "q"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: a refusing mkdir stands in for a read-only place
            real = atomic_dir.tempfile.mkdtemp

            def refuse(*a, **k):
                if Path(k.get("dir", "")) == ro:
                    raise PermissionError(13, "Permission denied")
                return real(*a, **k)

            atomic_dir.tempfile.mkdtemp, restore = refuse, real
        else:
            restore = None
        try:
            msg = _refused(capsys, _args(model_dir, ro / "q"))
        finally:
            if restore is not None:
                atomic_dir.tempfile.mkdtemp = restore
        assert "cannot write to" in msg and "Permission denied" in msg
    finally:
        ro.chmod(0o755)


def test_overwrite_replaces_only_checkpoint_files(model_dir, tmp_path, capsys):
    src_before = _digest(model_dir)
    out = tmp_path / "q"
    assert cli.main(_args(model_dir, out)) == 0
    first = _digest(out)
    unrelated = {"notes.txt": "keep me", "sub/data.bin": "keep me too", "adapter.json": "{}"}
    for name, text in unrelated.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    (out / "model-00001-of-00009.safetensors").write_text("stale shard of an older checkpoint")
    assert cli.main(_args(model_dir, out, "--overwrite", "--group-size", "-1")) == 0
    for name, text in unrelated.items():
        assert (out / name).read_text() == text
    assert not (out / "model-00001-of-00009.safetensors").exists()
    now = _digest(out)
    assert now["model.safetensors"] != first["model.safetensors"]  # per-channel replaced g128
    assert set(now) == set(first) | set(unrelated)
    assert _digest(model_dir) == src_before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_files_follow_the_umask(model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli.main(_args(model_dir, tmp_path / "q")) == 0
    finally:
        os.umask(old)
    out = tmp_path / "q"
    assert (out.stat().st_mode & 0o777) == 0o755
    for p in out.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o644, p


def test_stale_temp_dirs_of_dead_processes_are_removed(model_dir, tmp_path):
    dead = tmp_path / ".q.writing-999999999-abc"
    alive = tmp_path / f".q.writing-{os.getpid()}-abc"
    other = tmp_path / ".unrelated.writing-999999999-abc"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "part").write_text("x")
    assert cli.main(_args(model_dir, tmp_path / "q")) == 0
    assert not dead.exists() and alive.exists() and other.exists()


SAVE_THEN_HANG = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qserve_lite import cli
    from qserve_lite.io.checkpoint import write

    real = write._ShardWriter.flush
    def flush(self):
        real(self)
        Path(sys.argv[1]).write_text("saving")
        time.sleep(120)
    write._ShardWriter.flush = flush
    sys.exit(cli.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_save_leaves_nothing_behind(model_dir, tmp_path, sig):
    out = tmp_path / "work" / "q"
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG, str(marker), *_args(model_dir, out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        assert any(p.name.startswith(".q.writing-") for p in out.parent.iterdir())  # mid-save
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert list(out.parent.iterdir()) == []
