"""Helpers the tests share: running a command as a user for whom a read-only folder really is read-only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # util-linux is on every Debian; without it the caller's test cannot mean anything
        raise RuntimeError("running as root without setpriv: cannot drop privileges to test a read-only folder")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def open_to_everyone(path: Path) -> Path:
    """Let the unprivileged user into ``path`` and write inside it (pytest makes its temp folders 0700)."""
    for folder in [path, *path.parents]:
        if folder == Path("/tmp") or folder == folder.parent:
            break
        folder.chmod(folder.stat().st_mode | 0o777 if folder == path else folder.stat().st_mode | 0o755)
    return path
