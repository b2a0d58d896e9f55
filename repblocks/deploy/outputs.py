"""A deploy run's output folder, all or nothing.

Everything a run writes goes into a hidden staging folder beside ``out_dir``; only when the
whole run has succeeded is that folder renamed to ``out_dir``. A failure, Ctrl-C or SIGTERM
(under :func:`repblocks.cli.sigterm_as_interrupt`) removes the staging folder, so ``out_dir``
holds either the previous run's outputs, whole, or this run's, never half of either and never
one model's exports beside another's. A folder that is not a deploy output is never replaced:
:func:`check_out_dir` refuses it before anything is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from repblocks.errors import UserError
from repblocks.files import check_writable_dir

__all__ = ["CONFIG_FILE", "DEPLOY_FILES", "STAGING_SUFFIX", "check_out_dir", "staged_output"]

CONFIG_FILE = "config.json"  # the run's settings, as resolved: which run made these files, and how to make them again
# Every name a deploy run writes, and what Hydra put in the run folder before deploy turned that off.
DEPLOY_FILES = frozenset(
    {"model.safetensors", "model.onnx", "model.pt2", "report.json", "report.md", "throughput.png"}
    | {"speed_table.json", "speed_table.md", CONFIG_FILE, ".hydra", "deploy.log"}
)
_REPORTS = ("report.json", "speed_table.json")  # a deploy output has one of them
STAGING_SUFFIX = ".deploy-staging"
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # an atomic write interrupted by an older version (repblocks.files)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Check, before any work, that a run can write ``out_dir``: a new or empty folder, or a previous deploy output.

    Raises:
        UserError: ``out_dir`` is a file, holds files of something else, or cannot be written.
    """
    path = Path(out_dir).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"out_dir {path} is a file; give a folder (it is created if missing)")
        check_writable_dir(path, "out_dir")
        if path.is_dir():  # the outputs are built beside it and renamed into its place
            check_writable_dir(path.resolve().parent, f"the folder holding out_dir {path}")
        _check_replaceable(path)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # a parent this user cannot enter
        raise UserError(f"out_dir {path} cannot be reached: {err.strerror or err} ({err.filename})") from None
    return path


@contextmanager
def staged_output(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; on success it replaces ``out_dir``, on failure it is removed.

    Folders made for it (missing parents of ``out_dir``) are removed again on failure.
    """
    out_dir = Path(out_dir).expanduser()
    made = _make_parents(out_dir.parent)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=STAGING_SUFFIX))
    try:
        yield staging
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty (something else was put there) or gone: leave it
                folder.rmdir()
        raise


def _check_replaceable(path: Path) -> None:
    if not path.is_dir():
        return
    names = sorted(entry.name for entry in path.iterdir())
    if not names:
        return
    foreign = [name for name in names if name not in DEPLOY_FILES and not _TEMPORARY.match(name)]
    if foreign or not any(name in names for name in _REPORTS):
        shown = ", ".join(foreign[:5] or names[:5])
        raise UserError(
            f"out_dir {path} is not empty and not a deploy output (it holds {shown}); "
            "give a new or empty folder, or a previous deploy output to replace"
        )


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        made.mkdir()
    return list(reversed(missing))  # outermost first


def _publish(staging: Path, out_dir: Path) -> None:
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the outputs should read like any new folder
    _check_replaceable(out_dir)  # again: something may have been put there while the run went on
    try:
        os.rename(staging, out_dir)  # atomic, when out_dir is missing or an empty folder
        return
    except OSError:
        if not out_dir.is_dir():
            raise
    # A previous deploy output: move it aside, move the new one in, then delete the old.
    previous = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".replaced"))
    os.rename(out_dir, previous)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(previous, out_dir)  # keep the previous output where it was
        raise
    shutil.rmtree(previous, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(umask)
    return umask
