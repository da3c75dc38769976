"""Where an edit is written: the destination checked before any model loads, the file written whole or not at all.

A PNG is written to a hidden temporary file beside its destination and renamed over it, so the destination
holds either the old file or the complete new one. The temporary file is named before it is created, so
whatever stops the write (an error, Ctrl-C, or SIGTERM turned into an exception by ``signals_as_exceptions``)
removes it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["OutputError", "Terminated", "check_destination", "pid_alive", "process_start",
           "remove_leftover_temporaries", "save_png_atomically", "signals_as_exceptions", "temporary_path",
           "write_atomically"]

logger = logging.getLogger(__name__)

# write_atomically's temporary files: .<name>.<pid>.<8 hex digits>.tmp beside the destination.
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp$")


class OutputError(ValueError):
    """The output path cannot receive the edit; the message names it and the fix."""


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwinds like Ctrl-C, so half-done work is cleaned up on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _nearest_existing(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path(path.anchor or ".")


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the only test a read-only mount, ACLs or quotas cannot fool."""
    probe = folder / f".step1x-write-test.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_destination(output: Path, inputs: Iterable[Path] = (), flag: str = "--output") -> None:
    """Refuse, before anything is loaded, an output that is a folder, one of ``inputs``, or not writable."""
    output = Path(output).expanduser()
    if output.is_dir():
        raise OutputError(f"{flag} {output} is a folder; give a file name such as {output / 'edited.png'}")
    for source in inputs:
        if _same_file(output, Path(source)):
            raise OutputError(f"{flag} {output} is the input image: writing the edit there would destroy the "
                              "original; give another file name")
    if output.exists() and not os.access(output, os.W_OK):
        raise OutputError(f"{flag} {output} is read-only (protected from being overwritten?); give another file name "
                          "or make it writable")
    folder = output.parent if output.parent.exists() else _nearest_existing(output)
    if not folder.is_dir():
        raise OutputError(f"{flag} {output}: {folder} is a file, not a folder")
    try:
        _probe_writable(folder) if folder == output.parent else _require_access(folder)
    except OSError as err:
        raise OutputError(f"{flag} {output}: cannot write in {folder} ({err.strerror or err}); choose a folder "
                          "you can write to") from err


def _require_access(folder: Path) -> None:
    # The output's folder does not exist yet and is created when saving; its nearest existing parent decides.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(13, "permission denied")


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host still runs (and, when ``start`` is known, is the same process
    that recorded it). Where this cannot be told (Windows), a process counts as alive."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill would terminate it: never guess a Windows lock stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by a newer process
    return True


def temporary_path(path: Path) -> Path:
    """Where ``write_atomically`` writes ``path`` first (named before it exists, so it can be removed)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Remove, anywhere below ``folder``, the temporary files of ``write_atomically`` whose process is gone
    (a run killed with SIGKILL in the middle of a save). Only names of that exact pattern are touched, and
    only when their pid runs no longer on this host; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp"):
        match = TEMPORARY_NAME.match(path.name)
        if match is None or not path.is_file() or path.is_symlink() or pid_alive(int(match["pid"])):
            continue
        try:
            path.unlink()
        except OSError as err:
            logger.warning("cannot remove %s, left by an interrupted save: %s", path, err.strerror or err)
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted save (e.g. %s)", len(removed), removed[0])
    return removed


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``: no half-written file
    and no temporary file left behind on failure, Ctrl-C or SIGTERM; the old file stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)  # named before it exists
    try:
        # os.open applies the umask: the file gets the permissions any new file would.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as err:  # named by the destination, not by the temporary file the error came from
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png_atomically(image, path: Path) -> None:
    """Save ``image`` as PNG with ``write_atomically``."""
    write_atomically(path, lambda f: image.save(f, format="PNG"))


@contextlib.contextmanager
def signals_as_exceptions(signums: Iterable[int] = (signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM))
                          ) -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise ``Terminated`` (as SIGINT raises KeyboardInterrupt) instead of
    killing the process where it stands; the previous handlers come back afterwards."""
    def terminate(signum, frame):
        raise Terminated(signum)

    previous = {}
    try:
        for signum in set(signums):
            previous[signum] = signal.signal(signum, terminate)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
