"""One writer per run folder: an exclusive OS lock (``fcntl.flock``) on ``<folder>/.lock``.

The lock belongs to the open file, so the kernel releases it whenever the process ends, however it ends
(an exception, SIGTERM, SIGKILL, a crash): a lock left by a killed run is never in the way. The file
itself stays; after the checks of a run pass, it names the holder (pid, host, start time) so that a second
writer is refused with one line saying who holds the folder. Where ``fcntl`` does not exist (Windows),
locking is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from trainers.core.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


@dataclass
class _Held:
    fd: int
    path: Path
    created: bool       # this process created the lock file (an older run folder had none)
    made_folder: bool   # this process created the folder
    previous: bytes     # the lock file's content before this process claimed it
    claimed: bool = False


_HELD: dict[str, _Held] = {}  # resolved folder -> the lock this process holds


def _key(folder: Path) -> str:
    return str(Path(folder).resolve())


def holder(folder: Path) -> str:
    """``pid N on host H since T`` as the lock file says, or ``holder unknown``."""
    try:
        info = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def lock_dir(folder: Path, hint: str) -> bool:
    """Take the exclusive lock of ``folder`` (created if missing) for this process.

    Returns False if this process already holds it. Raises UserError naming the holder if another process
    does: ``<folder> is in use by another run (pid N on host H since T); wait for it to end or <hint>``.
    Nothing in the folder changes unless it had no lock file yet (then an empty one is created).
    """
    folder = Path(folder)
    if fcntl is None or _key(folder) in _HELD:
        return False
    made_folder = not folder.exists()
    if not made_folder and not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{folder} is not writable by this user; make it writable or {hint}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"cannot lock {folder}: {exc.strerror or exc} ({hint})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise UserError(f"{folder} is in use by another run ({holder(folder)}); wait for it to end or "
                            f"{hint}") from None
        raise UserError(f"cannot lock {folder}: {exc.strerror or exc} ({hint})") from None
    previous = b"" if created else path.read_bytes()
    _HELD[_key(folder)] = _Held(fd, path, created, made_folder, previous)
    return True


def claim_dir(folder: Path) -> None:
    """Write this process as the holder into the lock file of ``folder`` (which this process must hold)."""
    held = _HELD.get(_key(folder))
    if held is None or held.claimed:
        return
    info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
    os.ftruncate(held.fd, 0)
    os.pwrite(held.fd, info.encode("utf-8"), 0)
    held.claimed = True


def unlock_dir(folder: Path, refused: bool = False) -> None:
    """Release the lock of ``folder`` if this process holds it.

    ``refused``: the run was refused and must leave the folder as it was: the lock file gets its earlier
    content back, or is removed (still under the lock) if this process created it, and so is the folder."""
    held = _HELD.pop(_key(folder), None)
    if held is None:
        return
    if refused:
        with contextlib.suppress(OSError):
            if held.created:
                held.path.unlink()
            elif held.claimed:
                os.ftruncate(held.fd, 0)
                os.pwrite(held.fd, held.previous, 0)
    os.close(held.fd)
    if refused and held.made_folder:
        with contextlib.suppress(OSError):
            held.path.parent.rmdir()  # only if empty


def holds_lock(folder: Path) -> bool:
    """True if this process holds the lock of ``folder``."""
    return _key(folder) in _HELD
