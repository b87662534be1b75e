"""Write a model directory all-or-nothing: fill a temporary directory beside the target, then move it in.

`check_output_dir` refuses a bad target before any work (an existing file, a non-empty directory without
overwrite, a target that is, holds or lies inside a source directory, a place that cannot be written).
`atomic_output_dir` fills `.NAME.writing-PID-*` beside the target. On success the result is renamed into
place; over an existing non-empty directory (overwrite) only the entries the writer owns are replaced and
every other file there is kept. On failure, Ctrl-C or SIGTERM the temporary directory is removed; one left by
a killed process (SIGKILL) is removed by the next write to the same target. Files and directories get the
permissions of the process umask, like any file the user creates.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(out_dir: Path, kind: str) -> str:
    return f".{out_dir.name}.{kind}-"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _probe_writable(directory: Path) -> str | None:
    """None when a directory can be created (and removed) in `directory`, else why not."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".qserve-lite-probe-", dir=directory))
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_output_dir(out_dir: str | Path, error_cls: type[Exception], *, overwrite: bool = False,
                     sources: tuple[str | Path, ...] = (), overwrite_flag: str = "overwrite=True",
                     out_flag: str = "the output directory") -> Path:
    """Refuse a bad output target before any work; returns the target as an absolute path.

    `sources` (the input model, ...) may be neither the target nor inside it nor contain it.
    `overwrite_flag` / `out_flag` name the option in the messages ("--overwrite" / "--out" from the CLI).
    """
    out = Path(out_dir).expanduser().absolute()
    real = Path(os.path.realpath(out))
    for src in sources:
        s = Path(os.path.realpath(Path(src).expanduser()))
        if real == s or s in real.parents or real in s.parents:
            how = "is" if real == s else ("lies inside" if s in real.parents else "contains")
            raise error_cls(f"{out_flag} {out} {how} the source model directory {s}; choose a directory "
                            "outside it")
    if out.exists() and not out.is_dir():
        raise error_cls(f"{out_flag} {out} exists and is not a directory; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error_cls(f"{out_flag} {out} already exists and is not empty; choose another directory or pass "
                        f"{overwrite_flag} to replace the checkpoint files in it (other files are kept)")
    base = _nearest_existing(out.parent)
    if not base.is_dir():
        raise error_cls(f"cannot write {out}: {base} is not a directory")
    targets = [base] + ([out] if out.is_dir() else [])
    for d in targets:
        why = _probe_writable(d)
        if why is not None:
            raise error_cls(f"cannot write to {d} ({why}); choose a writable location for {out_flag}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Remove `.NAME.writing-PID-*` / `.NAME.old-PID-*` directories beside out_dir whose process is gone
    (left by a SIGKILL). Returns what was removed."""
    pattern = re.compile(re.escape(f".{out_dir.name}.") + r"(writing|old)-(\d+)-")
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs (in the main thread), SIGTERM raises KeyboardInterrupt like Ctrl-C, so that
    cleanup code runs; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fix_permissions(root: Path) -> None:
    """Directories 0777 and files 0666, less the umask (mkdtemp and some writers make them private)."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _backup_dir(out_dir: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir, f"old-{os.getpid()}"), dir=out_dir.parent))


def _merge_into(tmp: Path, out_dir: Path, owned: Callable[[str], bool]) -> None:
    """Move the new entries of tmp into the existing out_dir; entries of out_dir the writer owns are
    replaced (moved aside first, put back if the move fails), every other entry is kept."""
    backup = _backup_dir(out_dir)
    moved_old, moved_new = [], []
    try:
        for p in out_dir.iterdir():
            if owned(p.name):
                os.replace(p, backup / p.name)
                moved_old.append(p.name)
        for p in tmp.iterdir():
            os.replace(p, out_dir / p.name)
            moved_new.append(p.name)
    except BaseException:
        for name in moved_new:
            os.replace(out_dir / name, tmp / name)
        for name in moved_old:
            os.replace(backup / name, out_dir / name)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    tmp.rmdir()


def _move_into_place(tmp: Path, out_dir: Path, owned: Callable[[str], bool] | None) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if owned is not None:
            _merge_into(tmp, out_dir, owned)
            return
        backup = _backup_dir(out_dir)
        backup.rmdir()
        os.replace(out_dir, backup)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            os.replace(backup, out_dir)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return
    if out_dir.is_dir():
        out_dir.rmdir()
    os.replace(tmp, out_dir)


@contextmanager
def atomic_output_dir(out_dir: Path, error_cls: type[Exception], what: str,
                      owned: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty directory; when the block succeeds its contents become `out_dir`.

    An existing non-empty `out_dir` is replaced as a whole when `owned` is None; with `owned` (a test on
    entry names) only its entries that `owned` accepts are replaced and the others are kept. On any failure,
    Ctrl-C or SIGTERM the temporary directory is removed and `out_dir` is left as it was; OS errors are
    re-raised as `error_cls` naming `what` was being written.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out_dir)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir, f"writing-{os.getpid()}"), dir=parent))
    except OSError as e:
        raise error_cls(f"cannot write {what} to {out_dir}: {e.strerror or e}") from None
    with sigterm_as_interrupt():
        try:
            yield tmp
            _fix_permissions(tmp)
            _move_into_place(tmp, out_dir, owned)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise error_cls(f"writing {what} to {out_dir} failed: {e.strerror or e}") from None
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
