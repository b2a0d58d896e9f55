"""Writing files so that a failure or a kill never leaves half a file behind, and checking folders before any work.

A file is written under a temporary name in its destination folder, flushed to disk, and renamed
over the final name (:func:`atomic_path`): a rename within one file system is atomic, so the final
name holds either the old file or the whole new one, whatever kills the process in between. A
temporary file in another folder (``$TMPDIR``) would not do: moving it across file systems is a
copy, and a kill during the copy leaves a truncated file under the final name.

A folder of outputs is built the same way (:func:`staged_folder`): in a hidden staging folder beside
it, renamed into place whole. The staging folder holds an owner file naming the process that writes
it, so that what a SIGKILL left behind can be told from a run still in progress and removed
(:func:`remove_dead_staging`). A disk that fills up while writing is one line naming the folder and
the space it took (:class:`DiskFullError`), and nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from repblocks.errors import UserError
from repblocks.signals import check_interrupted

__all__ = [
    "STAGING_OWNER",
    "TEMP_SUFFIX",
    "DiskFullError",
    "atomic_path",
    "check_free_space",
    "check_not_an_input",
    "check_writable_dir",
    "default_mode",
    "fsync",
    "remove_dead_staging",
    "staged_folder",
    "umask",
]

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"  # temporary files are ".<final name>.<random>.tmp" beside the final name
STAGING_OWNER = ".staging-owner"  # in a staging folder: "<pid> <start time>" of the process writing it
# What a full disk looks like when it is not an OSError: torch.save's and ONNX's C++ streams.
_DISK_FULL_MESSAGES = ("no space left", "iostream error", "failed writing file", "disk quota")
_NEARLY_FULL = 256 * 1024  # free bytes under which a failed write is taken for a full disk


class DiskFullError(UserError):
    """The file system ran out of space (or quota) while writing; the message names the folder and the space needed."""


@contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = True, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on failure removed.

    Args:
        path: The final name. Its folder is created if missing.
        durable: Flush the file (and then the folder entry) to disk before and after the rename, so
            that a power cut cannot leave a renamed but empty file. Costs a disk flush per file.
        folder: ``path`` is a folder (a Core ML ``.mlpackage``): the temporary path is an empty
            folder to fill, named with ``path``'s suffix last (``.model.mlpackage.<random>.tmp.mlpackage``:
            writers check it), and a previous folder at ``path`` is moved aside, replaced, then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX + path.suffix)
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
    try:
        yield Path(tmp)
        check_interrupted()  # a signal that a library swallowed while this was written: the old file stays
        # mkstemp and mkdtemp make it owner-only; the result should read like any new file or folder
        os.chmod(tmp, 0o777 & ~umask() if folder else default_mode())
        if durable:
            for item in Path(tmp).rglob("*") if folder else ():  # a folder's files, then the folder
                fsync(item)
            fsync(tmp)
        _replace(Path(tmp), path)
        if durable:
            fsync(path.parent)
    except BaseException as err:
        written = _size(Path(tmp))
        _remove_if_there(Path(tmp))
        if isinstance(err, Exception) and not isinstance(err, UserError) and _disk_full(err, path.parent):
            raise DiskFullError(_disk_full_message(path.parent, path.name, written, exact=False)) from None
        raise


@contextmanager
def staged_folder(
    folder: str | os.PathLike,
    *,
    suffix: str = TEMP_SUFFIX,
    replace: Callable[[Path], None] | None = None,
    needed: int = 0,
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; on success it becomes ``folder``, on failure it is removed.

    The staging folder is ``.<name>.<random><suffix>``, made with the umask's permissions when
    published, its files flushed to disk first. Missing parents of ``folder`` are made, and removed
    again on failure. While it exists it holds :data:`STAGING_OWNER`, which :func:`remove_dead_staging`
    reads to tell a dead run's leftovers from a live one.

    Args:
        folder: Where the outputs go.
        suffix: Ends the staging folder's name (what :func:`remove_dead_staging` looks for).
        replace: None: ``folder`` must be missing or empty when publishing. Else a check, called with
            ``folder`` just before an existing non-empty ``folder`` is replaced; it raises to refuse.
        needed: Bytes the outputs are expected to take, for the message when the disk fills up.

    Raises:
        DiskFullError: The disk filled up while writing into the staging folder.
    """
    folder = Path(folder).expanduser()
    made = _make_parents(folder.parent)
    try:
        base = _staging_base(folder)
        staging = Path(tempfile.mkdtemp(dir=base, prefix=f".{folder.name}.", suffix=suffix))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        _write_owner(staging)
        yield staging
        check_interrupted()  # a signal that a library swallowed while this was written: the old folder stays
        (staging / STAGING_OWNER).unlink()
        for path in staging.iterdir():  # on disk before the rename makes them visible
            fsync(path)
        staging.chmod(0o777 & ~umask())  # mkdtemp makes it owner-only; the outputs should read like any new folder
        _publish(staging, folder, replace)
        fsync(folder.parent)
    except BaseException as err:
        written = _size(staging)
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(made)
        full = isinstance(err, DiskFullError) or (
            isinstance(err, Exception) and not isinstance(err, UserError) and _disk_full(err, base)
        )
        if full:  # named after the folder being written, not the hidden staging folder
            raise DiskFullError(
                _disk_full_message(base, folder.name, max(written, needed), exact=needed > written)
            ) from None
        raise


def remove_dead_staging(folder: str | os.PathLike, *, suffix: str = TEMP_SUFFIX) -> list[Path]:
    """Remove the staging folders of ``folder`` (see :func:`staged_folder`) whose writer is provably dead.

    A staging folder is removed only when its owner file names a process that no longer runs (or
    another process now holding that pid, told apart by its start time). One without an owner file
    (made by an older version, or in the instant between its creation and the file's) is left alone.

    Returns:
        The folders removed.
    """
    folder = Path(folder).expanduser()
    removed = []
    if not folder.parent.is_dir():
        return removed
    for staging in _staging_base(folder).glob(f".{folder.name}.*{suffix}"):
        owner = _read_owner(staging / STAGING_OWNER)
        if owner is None or _alive(*owner):
            continue
        shutil.rmtree(staging, ignore_errors=True)
        log.info("removed %s, left by process %d that was killed while writing it", staging, owner[0])
        removed.append(staging)
    return removed


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, before any work, to write about ``needed`` bytes into ``folder`` (or its nearest existing parent).

    Raises:
        DiskFullError: Less than ``needed`` bytes are free there.
    """
    probe = Path(folder).expanduser()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = _free(probe)
    if free is not None and free < needed:
        raise DiskFullError(
            f"{what} {folder}: not enough space, {_mb(needed)} needed and {_mb(free)} free in {probe}; "
            "free some space or choose a folder on another disk"
        )


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


def check_not_an_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str) -> None:
    """Refuse, before any work, an output file that is one of the inputs: writing it would destroy what is read.

    Compared as files, not names (:func:`os.path.samefile`'s device and inode): a symbolic link to
    an input, another path to it, or a hard link of it are the input too. A missing output is none.

    Args:
        output: The file to be written.
        inputs: The files that will be read.
        what: The setting that names the output, to start the message (``"csv"``).

    Raises:
        UserError: ``output`` is one of ``inputs``; one line naming both.
    """
    try:
        written = os.stat(output)
    except OSError:  # missing (or unreachable, which writing it will say): nothing there to destroy
        return
    for path in inputs:
        try:
            read = os.stat(path)
        except OSError:
            continue
        if (read.st_dev, read.st_ino) == (written.st_dev, written.st_ino):
            same = "" if os.path.abspath(output) == os.path.abspath(path) else f" (the same file as {path})"
            raise UserError(f"{what}: {output} is an input{same}; writing it would destroy it: give another file name")


def fsync(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file, or a folder after a rename in it) to disk; a file system that cannot is let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot flush a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (which can only be read by setting it, and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The permissions a new file gets from ``open()`` under the current umask (what mkstemp does not give)."""
    return 0o666 & ~umask()


def _make_parents(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; return those made, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return list(reversed(missing))


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty (something else was put there) or gone: leave it
            folder.rmdir()


def _staging_base(folder: Path) -> Path:
    """Where ``folder``'s staging folder goes: beside it, or inside it when it is a mount point (a file system of its own).

    A rename cannot cross file systems, and a mount point cannot be renamed at all.
    """
    return folder if os.path.ismount(folder) else folder.parent


def _publish(staging: Path, folder: Path, replace: Callable[[Path], None] | None) -> None:
    """Rename ``staging`` to ``folder``; an existing non-empty ``folder`` is replaced when ``replace`` allows it."""
    if staging.parent == folder:  # folder is a mount point: its entries are replaced one by one, each atomically
        _publish_into(staging, folder, replace)
        return
    try:
        os.rename(staging, folder)  # atomic, when folder is missing or an empty folder
        return
    except OSError:
        if replace is None or not folder.is_dir() or folder.is_symlink():
            raise
    replace(folder)  # raises to refuse: something else may have been put there while the outputs were written
    _swap_folder(staging, folder)


def _publish_into(staging: Path, folder: Path, replace: Callable[[Path], None] | None) -> None:
    previous = [
        entry for entry in folder.iterdir() if entry != staging and not entry.name.startswith(f".{folder.name}.")
    ]
    if previous:
        if replace is None:
            raise FileExistsError(errno.EEXIST, "not empty", str(folder))
        replace(folder)
    new = {entry.name for entry in staging.iterdir()}
    for entry in previous:
        if entry.name not in new:  # the others are replaced by the renames below
            _remove(entry)
    for entry in staging.iterdir():
        target = folder / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def _replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``: atomic for a file; a folder already at ``path`` is moved aside first, then deleted."""
    if not tmp.is_dir() or not path.is_dir() or path.is_symlink():
        os.replace(tmp, path)  # a folder onto a missing name is atomic too
        return
    _swap_folder(tmp, path)


def _swap_folder(new: Path, folder: Path) -> None:
    """Put the folder ``new`` in the place of the existing ``folder``: the old one aside, the new one in, the old deleted.

    Each rename is atomic; if the second fails, the previous folder goes back where it was.
    """
    previous = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".replaced"))
    os.replace(folder, previous)  # onto the empty folder just made: atomic
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(previous, folder)  # keep the previous one where it was
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _remove_if_there(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _write_owner(staging: Path) -> None:
    # Plain write: the file is tiny, and a staging folder whose owner file is cut short is left alone.
    (staging / STAGING_OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")


def _read_owner(path: Path) -> tuple[int, str] | None:
    try:
        pid, start = path.read_text().split()
        return int(pid), start
    except (OSError, ValueError):
        return None


def _alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``start`` (pids are reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return _start_time(pid) == start


def _start_time(pid: int) -> str:
    """When ``pid`` started, in clock ticks since boot (Linux's /proc); "unknown" elsewhere, which never proves death."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "unknown"
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name (which may hold spaces)


def _disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` (or what caused it) is a full disk or quota, or the disk is nearly full now."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(message in str(seen).lower() for message in _DISK_FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    free = _free(folder)
    return free is not None and free < _NEARLY_FULL and isinstance(error, OSError)


def _disk_full_message(folder: Path, what: str, needed: int, *, exact: bool) -> str:
    free = _free(folder) or 0
    amount = f"about {_mb(needed)}" if exact else f"more than {_mb(needed)}"
    return (
        f"no space left in {folder} while writing {what}: it needs {amount}, {_mb(free)} are free; "
        "free some space or choose a folder on another disk (nothing was left half-written)"
    )


def _free(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
