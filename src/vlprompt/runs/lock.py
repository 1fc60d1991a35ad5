"""One process per directory: an exclusive lock held for the whole of a run (and of a grid cell).

The lock is ``fcntl.flock`` on a lock file: the kernel releases it when its holder exits, however it exits
(SIGKILL included), so a killed run never blocks ``--resume``. The file also records the holder (pid, host, since
when, command line), which the refusal of a second process names, and which tells a process that takes a free
lock whether the previous holder died holding it (the record is emptied on a normal release). On a filesystem
without ``flock`` the record alone is the lock: it is taken when it is empty, or when its process is no longer
running on this host (a best-effort fallback: two processes starting within the same instant may both pass).

The lock is reentrant within a process (a grid cell's run inside the cell's own lock is another file; a run's
evaluation inside its run is the same one), and never deleted: removing a lock file that another process has
open would let a third one lock a new file beside it.
"""
from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Optional

from ..errors import VLPromptError

log = logging.getLogger("vlprompt")

#: the lock file of a run directory
LOCK_NAME = ".vlprompt.lock"

# flock is refused by the filesystem, not held by another process: fall back to the record alone
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}

_held: dict[str, "DirLock"] = {}  # path -> the lock this process holds on it
_held_guard = threading.Lock()


class BusyError(VLPromptError):
    """Another process holds the lock of a run directory (or of a grid cell); the message names it."""


def describe(holder: Optional[dict]) -> str:
    """``pid 123 on host h since 2026-12-07 10:31:05 (vlprompt train ...)`` of a holder record."""
    if not holder:
        return "another process (it did not record itself)"
    cmd = str(holder.get("command") or "")
    cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"
            + (f" ({cmd})" if cmd else ""))


def _record() -> dict:
    program = Path(sys.argv[0] or "python")
    if program.name == "__main__.py":  # python -m vlprompt ...
        program = program.parent
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
            "command": " ".join([program.name, *sys.argv[1:]])}


def _read(fd: int) -> Optional[dict]:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        obj = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _write(fd: int, record: Optional[dict]) -> None:
    os.ftruncate(fd, 0)
    if record is not None:
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    os.fsync(fd)


def _alive(record: dict) -> bool:
    """Whether the process of a holder record may still run: another host's cannot be checked (assumed alive)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record.get("pid"))
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return False  # a record of this process that it did not release (a fork's parent): not another holder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def holder(path: Path) -> Optional[dict]:
    """The record of the process that holds the lock file ``path`` now, or None when nobody does (this process
    excepted). Reads only: a missing file is a free lock, and nothing is created."""
    path = Path(path)
    if str(path.absolute()) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: a reader needs no write access
        except BlockingIOError:
            return _read(fd) or {}
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            record = _read(fd)
            return record if record and _alive(record) else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DirLock:
    """An exclusive, non-blocking lock on ``path`` (a lock file; its folder is created). ``acquire`` raises
    :class:`BusyError` naming the holder, or returns; ``taken_over`` is then the record of a process that died
    holding it (None otherwise), for the caller to log. Use as a context manager."""

    def __init__(self, path: Path, what: str = "this directory"):
        self.path = Path(path).absolute()
        self.what = what
        self.taken_over: Optional[dict] = None
        self._fd: Optional[int] = None
        self._depth = 0
        self._flock = True
        self._outer: Optional[DirLock] = None  # the lock this process already held, when reentered

    def acquire(self) -> "DirLock":
        key = str(self.path)
        with _held_guard:
            held = _held.get(key)
            if held is not None:  # this process holds it already (a run's evaluation inside the run): reenter
                held._depth += 1
                self._outer = held if held is not self else None
                self.taken_over = held.taken_over
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            previous = self._lock(fd)
            self.taken_over = previous if previous and previous.get("pid") is not None else None
            _write(fd, _record())
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._depth = fd, 1
        with _held_guard:
            _held[key] = self
        return self

    def _lock(self, fd: int) -> Optional[dict]:
        """Take the lock on ``fd``; returns the record found in the file (a dead holder's, or None)."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(self._busy(_read(fd))) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            self._flock = False  # this filesystem has no flock: the record is the lock
            record = _read(fd)
            if record and _alive(record):
                raise BusyError(self._busy(record)) from None
            return record
        return _read(fd)  # free: a record left there is a holder that died without releasing

    def _busy(self, record: Optional[dict]) -> str:
        return (f"{self.what} is in use by {describe(record)}: one process per run directory; wait for it to "
                f"finish or stop it (a killed process's lock is taken over)")

    def release(self) -> None:
        owner = self._outer or self
        self._outer = None
        with _held_guard:
            if _held.get(str(owner.path)) is not owner:
                return
            owner._depth -= 1
            if owner._depth > 0:
                return
            del _held[str(owner.path)]
        fd, owner._fd = owner._fd, None
        try:
            _write(fd, None)  # a normal release leaves an empty record: nobody died holding it
        except OSError:
            pass
        finally:
            if owner._flock:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
