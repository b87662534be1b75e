"""Claiming a shard with a lock file that expires, so that any number of workers (processes on one machine,
Slurm array tasks on many, a rerun beside a running job) share a pool of shards on a shared file system and a
claim of a worker that died is taken over.

    lock = ShardLock(shard.lock, ttl=300)
    if lock.acquire():          # or acquire(wait=True): wait until the holder finishes or its claim expires
        try: ... finally: lock.release()

The lock file is created with O_CREAT | O_EXCL and holds its owner (host, pid, a random token). While held,
a heartbeat thread touches it every ttl/4 seconds. A claim is expired when the file was not touched for ttl
seconds, or at once when its owner is a process of this host that no longer runs. Taking over an expired
claim is serialized by a second file, `<lock>.break` (also O_EXCL): under it the claim is checked again
(same file, still expired), removed, and created anew; a `.break` older than BREAK_TTL_S (its taker died in
those few lines) is removed. The lock counts attempts: a claim taken over from a worker that died is
attempt n + 1 of the shard (`ShardLock.attempt`), so a shard that kills its workers every time can be given
up after a few attempts instead of forever.

The shard's results stay correct even if two workers did run it at once (the partial log keys records; the
result is renamed into place whole), so a lock only avoids doing work twice.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

BREAK_TTL_S = 30.0
DEFAULT_TTL_S = 300.0


def read_holder(path: str | Path) -> dict | None:
    """Who holds the lock at `path` ({host, pid, token, ...}), or None when it is free or unreadable."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_expired(path: str | Path, ttl: float, now: float | None = None) -> bool:
    """Whether the claim at `path` may be taken over (module docstring). A missing file is not expired."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    if (now if now is not None else time.time()) - mtime > ttl:
        return True
    holder = read_holder(path)
    if holder is not None and holder.get("host") == socket.gethostname():
        try:
            return not _pid_alive(int(holder["pid"]))
        except (KeyError, TypeError, ValueError):
            return False
    return False


def _create_exclusive(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


class ShardLock:
    """An expiring claim on one shard (module docstring). ttl: seconds without a heartbeat after which
    others may take it over."""

    def __init__(self, path: str | Path, ttl: float = DEFAULT_TTL_S):
        if not ttl > 0:
            raise ValueError(f"lock ttl must be > 0 seconds, got {ttl!r}")
        self.path, self.ttl = Path(path), float(ttl)
        self.token = uuid.uuid4().hex
        self.held = False
        self.attempt = 1  # 1 + the attempts of the dead workers this claim was taken over from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "claimed_at": time.time(), "ttl": self.ttl, "attempt": self.attempt})

    def acquire(self, wait: bool = False, poll_s: float | None = None) -> bool:
        """Claim the shard: True when it is now ours. wait: keep trying until the claim is free or expired
        (otherwise one try)."""
        poll_s = poll_s if poll_s is not None else min(5.0, self.ttl / 4)
        while True:
            if self._try_acquire():
                self.held = True
                self._stop.clear()
                self._thread = threading.Thread(target=self._heartbeat, name="shard-lock", daemon=True)
                self._thread.start()
                return True
            if not wait:
                return False
            time.sleep(poll_s)

    def _try_acquire(self) -> bool:
        self.attempt = 1
        if _create_exclusive(self.path, self._content()):
            return True
        if not is_expired(self.path, self.ttl):
            return False
        return self._take_over()

    def _take_over(self) -> bool:
        brk = self.path.with_name(self.path.name + ".break")
        try:
            if time.time() - brk.stat().st_mtime > BREAK_TTL_S:
                brk.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if not _create_exclusive(brk, self.token):
            return False
        try:
            if not is_expired(self.path, self.ttl):  # renewed, or taken over, since we looked
                return _create_exclusive(self.path, self._content())
            dead = read_holder(self.path) or {}
            attempt = dead.get("attempt", 1)
            self.attempt = (attempt if isinstance(attempt, int) else 1) + 1
            self.path.unlink(missing_ok=True)
            return _create_exclusive(self.path, self._content())
        finally:
            brk.unlink(missing_ok=True)

    def still_ours(self) -> bool:
        holder = read_holder(self.path)
        return holder is not None and holder.get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if self.still_ours():
                    os.utime(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise

    def release(self) -> None:
        """Give the claim up (removes the file if it is still ours)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.still_ours():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> ShardLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
