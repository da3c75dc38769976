"""One runner per output folder: OUT/.step1x-edit.lock, taken before any model loads.

Two runs writing into one folder would each keep their own copy of results.jsonl and the last to finish
would rewrite the file without the other's records. So a run creates the lock file atomically (O_EXCL)
with its pid, host and start time, and removes it when it ends (normally, on an error, Ctrl-C or
SIGTERM). A second run finds the file and refuses, naming the holder.

A run killed outright (kill -9, a power cut) leaves its lock behind. When the file names a process on
this host that is no longer alive (or whose pid now belongs to a newer process), the next run takes it
over and says so. Taking over happens under a second file, also created with O_EXCL, and re-reads the
lock under it: of several runs racing to take over one stale lock exactly one wins, and the others then
find that winner's lock and refuse.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from ..images.writing import pid_alive, process_start

__all__ = ["LOCK_FILE", "FolderInUse", "OutputLock"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".step1x-edit.lock"
TAKEOVER_SUFFIX = ".takeover"
# A takeover takes microseconds; a guard file older than this was left by a run killed inside one.
TAKEOVER_STALE_SECONDS = 30.0


class FolderInUse(RuntimeError):
    """Another run holds the output folder's lock; the message names it and what to do."""


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            if isinstance(started, (int, float)) else "an unknown time")
    return f"{holder.get('command') or 'a run'} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, " \
           f"started {when})"


class OutputLock:
    """``with OutputLock(out, "step1x-edit-batch"):`` holds ``out``'s lock for the block; raises FolderInUse.

    Re-entrant within one process: a block nested in another that holds the same folder's lock (the
    GEdit command around the batch runner) neither takes nor releases it again."""

    def __init__(self, folder: str | Path, command: str = "step1x-edit-batch") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self._record: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder replaced, if any
        self._made_folder = False

    # -- the file ------------------------------------------------------------------------------------
    def _mine(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
                "process_start": process_start(os.getpid()), "command": self.command,
                "token": os.urandom(8).hex()}

    def _read(self) -> dict[str, Any] | None:
        """The holder, {} for a file being written or not ours to read, None when there is no lock."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _create(self) -> bool:
        """Create the lock with O_EXCL; False when it exists."""
        record = self._mine()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self._record = record
        return True

    def _stale(self, holder: dict[str, Any]) -> bool:
        return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                and not pid_alive(holder["pid"], holder.get("process_start")))

    def _take_over(self, stale: dict[str, Any]) -> bool:
        """Replace the stale lock ``stale`` with ours; False when another run got there first."""
        guard = self.path.with_name(self.path.name + TAKEOVER_SUFFIX)
        try:
            fd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_SECONDS:
                    guard.unlink()  # left by a run killed in the middle of a takeover
            return False
        try:
            if self._read() != stale:  # changed since we looked: someone else took it over
                return False
            self.path.unlink(missing_ok=True)
            return self._create()
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    # -- taking and releasing ------------------------------------------------------------------------
    def acquire(self) -> OutputLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--out {self.folder} is a file; give a folder")
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if self._create():
                return self
            holder = self._read()
            if holder is None:
                continue  # released in between: try again
            if (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
                    and holder.get("process_start") == process_start(os.getpid())):
                return self  # this process holds it already (nested): leave it to the outer block
            if holder and self._stale(holder):
                if self._take_over(holder):
                    self.took_over = holder
                    logger.warning("%s: took over the lock of %s, which is no longer running", self.folder,
                                   _describe(holder))
                    return self
                time.sleep(0.01)
                continue
            if not holder:  # being written this instant, or unreadable
                time.sleep(0.02)
                continue
            break
        holder = self._read() or {}
        raise FolderInUse(
            f"{self.folder} is in use by {_describe(holder)}: two runs into one folder would lose each other's "
            f"results; wait for that run to end or give another --out folder (if no such run is going on, "
            f"delete {self.path})")

    def release(self) -> None:
        """Remove the lock if this block took it (and it still is ours)."""
        if self._record is None:
            return
        record, self._record = self._record, None
        if self._read() == record:
            self.path.unlink(missing_ok=True)
        if self._made_folder:  # a run that stopped before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
