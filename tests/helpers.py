"""Helpers the tests share: running a command as a user for whom a read-only folder really is read-only; a small disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534


def read_only_dir(path: Path) -> Path:
    """A folder that ``unprivileged()`` commands cannot write into (its parent stays writable for them)."""
    path.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o777)
    path.chmod(0o555)
    return path


def unprivileged(command: list[str]) -> list[str]:
    """``command`` run as an unprivileged user when the tests run as root, for whom file modes do not apply.

    The tests' temporary folders must then be reachable by that user: pytest's ``tmp_path`` is
    under /tmp, and its parents are opened up here.
    """
    if os.geteuid() != 0:
        return command
    reason = closed_to_unprivileged()
    if reason is not None:
        pytest.skip(reason)
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # util-linux is on every Debian; without it the caller's test cannot mean anything
        raise RuntimeError("running as root without setpriv: cannot drop privileges to test a read-only folder")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def closed_to_unprivileged() -> str | None:
    """Why an unprivileged user cannot run this checkout's Python (a clone inside ``mktemp -d``'s 0700 folder), or None."""
    if os.geteuid() != 0:
        return None
    for needed in (Path(__file__).resolve().parents[1], Path(sys.executable)):
        blocked = _closed_to_others(needed)
        if blocked is not None:
            return (
                f"{blocked} is closed to other users (mode {blocked.stat().st_mode & 0o777:o}): clone the project "
                "under a folder others can enter to run the read-only-folder checks as an unprivileged user"
            )
    return None


def open_to_everyone(path: Path) -> Path:
    """Let the unprivileged user into ``path`` and write inside it (pytest makes its temp folders 0700)."""
    for folder in [path, *path.parents]:
        if folder == Path("/tmp") or folder == folder.parent:
            break
        folder.chmod(folder.stat().st_mode | 0o777 if folder == path else folder.stat().st_mode | 0o755)
    return path


def _closed_to_others(path: Path) -> Path | None:
    """The first folder on the way to ``path`` that other users cannot enter, or None."""
    for folder in reversed(path.parents):
        if not folder.stat().st_mode & 0o001:
            return folder
    return None


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    """A ``size`` tmpfs mounted at ``path`` for the block; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill a disk needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
