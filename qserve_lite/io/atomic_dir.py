"""Write a model directory all-or-nothing: fill a temporary directory beside the target, then swap it in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output_dir(out_dir: Path, error_cls: type[Exception], what: str) -> Iterator[Path]:
    """Yield an empty directory; when the block succeeds it replaces `out_dir` (old contents dropped).

    On any failure the temporary directory is removed and `out_dir` is left as it was; OS errors are
    re-raised as `error_cls` naming `what` was being written.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error_cls(f"cannot create the parent directory of {out_dir}: {e}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary model directory
        yield tmp
        backup = None
        if out_dir.exists():
            if any(out_dir.iterdir()):
                backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
                backup.rmdir()
                os.replace(out_dir, backup)
            else:
                out_dir.rmdir()
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if backup is not None:
                os.replace(backup, out_dir)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise error_cls(f"writing {what} to {out_dir} failed: {e}") from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file all-or-nothing: a temporary file beside it, flushed to disk, then renamed over it (a
    reader, or a run killed midway, sees the old file or the new one, never a torn one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
