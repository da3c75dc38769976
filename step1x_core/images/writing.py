"""Where an edit is written: the destination checked before any model loads, the file written whole or not at all.

A PNG is written to a hidden temporary file beside its destination and renamed over it, so the destination
holds either the old file or the complete new one. The temporary file is named before it is created, so
whatever stops the write (an error, Ctrl-C, or SIGTERM turned into an exception by ``signals_as_exceptions``)
removes it again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["OutputError", "Terminated", "check_destination", "save_png_atomically", "signals_as_exceptions",
           "write_atomically"]


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


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``: no half-written file
    and no temporary file left behind on failure, Ctrl-C or SIGTERM; the old file stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")  # named before it exists
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
