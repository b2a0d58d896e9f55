"""Writing files so that a failure or a kill never leaves half a file behind, and checking folders before any work.

A file is written under a temporary name in its destination folder, flushed to disk, and renamed
over the final name (:func:`atomic_path`): a rename within one file system is atomic, so the final
name holds either the old file or the whole new one, whatever kills the process in between. A
temporary file in another folder (``$TMPDIR``) would not do: moving it across file systems is a
copy, and a kill during the copy leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "atomic_path", "check_writable_dir", "fsync"]

TEMP_SUFFIX = ".tmp"  # temporary files are ".<final name>.<random>.tmp" beside the final name


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed.

    Args:
        path: The final name. Its folder is created if missing.
        durable: Flush the file (and then the folder entry) to disk before and after the rename, so
            that a power cut cannot leave a renamed but empty file. Costs a disk flush per file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes it owner-only; the result should read like any new file
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
        if durable:
            fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Check, before any work, that ``path`` is a folder this process can create files in (or can create).

    Nothing is left behind: a missing folder is not created; its nearest existing parent is tried instead.

    Args:
        path: The folder.
        what: What it is for, to start the error message (``"run folder"``, ``"out_dir"``).

    Raises:
        ValueError: ``path`` (or a parent) is a file, or files cannot be created there; one line.
    """
    path = Path(path).expanduser()
    probe_dir = path
    try:
        while not probe_dir.exists():
            if probe_dir.parent == probe_dir:
                break
            probe_dir = probe_dir.parent
    except PermissionError as err:  # a parent this user may not enter
        raise ValueError(f"{what} {path} is not reachable: {err.strerror} ({err.filename})") from None
    if not probe_dir.is_dir():
        raise ValueError(f"{what} {path} cannot be a folder: {probe_dir} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".repblocks-write-check.", suffix=TEMP_SUFFIX)
    except OSError as err:
        where = "" if probe_dir == path else f" (its parent {probe_dir} is not writable)"
        raise ValueError(f"{what} {path} is not writable{where}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def fsync(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file, or a folder after a rename in it) to disk; a file system that cannot is let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _default_file_mode() -> int:
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask
