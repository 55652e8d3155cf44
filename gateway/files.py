"""Writing small private files safely: keys, certificates, pins, secrets.

Readers see the old file or the new one, never half of it (temp file in the
same directory, then rename); the temp file is 0600 from creation, so a
private key is never readable by others even for a moment; and the rename is
fsynced with its directory, because a Pi's usual way to stop is a power cut.
A process killed between the two can leave a ``.NAME.*.tmp`` behind:
``remove_stale_temps`` clears those.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# Filesystems without hard links (FAT on a USB stick) answer these to os.link.
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _write_temp(path: Path, data: bytes, mode: int) -> str:
    """A fsynced temp file next to ``path`` holding ``data``; its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, replace: bool = True) -> bool:
    """Write ``data`` to ``path``; with ``replace=False`` keep an existing file and return False."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = _write_temp(path, data, mode)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if another process created it first
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                os.replace(tmp, path)  # no links here: last writer wins
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def write_atomic_all(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write several files (path, data, mode) so that a failure replaces none of them.

    Every temp file is written and fsynced before the first rename: a full disk
    or a read-only directory fails while all the old files are still in place
    (a new leaf key next to the old leaf certificate would be a broken pair).
    Renames need no space, so once they start they complete.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, data, mode in files:
            try:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                temps.append((_write_temp(path, data, mode), path))
            except OSError as exc:
                exc.filename = exc.filename or str(path)  # a failed write() names no file: say which one
                raise
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    for directory in {path.parent for _, path in temps}:
        _fsync_dir(directory)


def remove_stale_temps(path: Path, *, older_than: float = 0.0) -> list[Path]:
    """Delete temp files ``write_atomic`` left next to ``path`` (a writer killed mid-write).

    ``older_than`` (seconds) spares a temp file another process may be writing
    right now; pass 0 only while holding the lock every writer of ``path`` takes.
    Returns what was removed; a file that cannot be removed is left alone.
    """
    removed: list[Path] = []
    cutoff = time.time() - older_than
    prefix = _temp_prefix(path)
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    for candidate in candidates:
        with contextlib.suppress(OSError):
            if candidate.lstat().st_mtime <= cutoff:
                candidate.unlink()
                removed.append(candidate)
    return removed


@contextlib.contextmanager
def flocked(lock_file: Path, *, timeout: float) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (created 0600 if missing).

    Raises ``TimeoutError`` when another process holds it past ``timeout``, and
    ``OSError`` when the lock file cannot be opened. Closing the descriptor
    releases the lock, also when the process dies, so a crash never leaves it held.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{lock_file} is held by another process") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
