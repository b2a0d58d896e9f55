"""A deploy run's output folder, all or nothing.

Everything a run writes goes into a hidden staging folder beside ``out_dir``; only when the
whole run has succeeded is that folder renamed to ``out_dir`` (:func:`repblocks.files.staged_folder`).
A failure, Ctrl-C or SIGTERM (under :func:`repblocks.cli.sigterm_as_interrupt`) removes the staging
folder, so ``out_dir`` holds either the previous run's outputs, whole, or this run's, never half of
either and never one model's exports beside another's. A SIGKILL leaves the staging folder behind;
the next run into the same ``out_dir`` removes it once its writer is provably dead. A folder that is
not a deploy output is never replaced: :func:`check_out_dir` refuses it before anything is loaded.
``out_dir`` given as a symbolic link is resolved first: the folder it points to is what is replaced.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from repblocks.deploy.engines import ENGINES
from repblocks.errors import UserError
from repblocks.files import check_free_space, check_writable_dir, remove_dead_staging, staged_folder

__all__ = [
    "CONFIG_FILE",
    "DEPLOY_FILES",
    "STAGING_SUFFIX",
    "check_out_dir",
    "check_out_dir_space",
    "remove_killed_runs_staging",
    "staged_output",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"  # the run's settings, as resolved: which run made these files, and how to make them again
_EXPORTS = {file for entry in ENGINES for file in entry.files.values()}
# Every name a deploy run writes: the exports (OpenVINO's .bin beside each .xml), the reports, and what Hydra
# put in the run folder before deploy turned that off.
DEPLOY_FILES = frozenset(
    _EXPORTS
    | {name.removesuffix(".xml") + ".bin" for name in _EXPORTS if name.endswith(".xml")}
    | {"report.json", "report.md", "throughput.png", "speed_table.json", "speed_table.md", CONFIG_FILE}
    | {".hydra", "deploy.log"}
)
_REPORTS = ("report.json", "speed_table.json")  # a deploy output has one of them
STAGING_SUFFIX = ".deploy-staging"
_TEMPORARY = re.compile(r"^\..+\.tmp(\.xml|\.bin|\.mlpackage)?$")  # an atomic write interrupted by an older version
_STAGING = re.compile(rf"^\..+{re.escape(STAGING_SUFFIX)}$")
_REPORT_BYTES = 2**19  # reports, plot and config: well under half a megabyte


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Check, before any work, that a run can write ``out_dir``: a new or empty folder, or a previous deploy output.

    Returns:
        The folder to write: ``out_dir`` with a symbolic link (at any level) resolved.

    Raises:
        UserError: ``out_dir`` is a file, holds files of something else, or cannot be written.
    """
    given = Path(out_dir).expanduser()
    path = given.resolve()  # a link to a folder: that folder is what gets replaced; the link stays as it was
    if path != given.absolute():
        log.info("out_dir %s is a link to %s: the outputs go there", given, path)
    try:
        if path.exists() and not path.is_dir():
            raise UserError(f"out_dir {given} is a file; give a folder (it is created if missing)")
        check_writable_dir(path, "out_dir")
        if path.is_dir():  # the outputs are built beside it and renamed into its place
            check_writable_dir(path.parent, f"the folder holding out_dir {given}")
        _check_replaceable(path)
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:  # a parent this user cannot enter
        raise UserError(f"out_dir {given} cannot be reached: {err.strerror or err} ({err.filename})") from None
    return path


def remove_killed_runs_staging(out_dir: Path) -> None:
    """Remove the staging folders that killed runs left for ``out_dir`` (their writer provably gone); keep live ones."""
    remove_dead_staging(out_dir, suffix=STAGING_SUFFIX)


def check_out_dir_space(out_dir: Path, needed: int) -> None:
    """Refuse, before anything is written, an ``out_dir`` whose disk has less than ``needed`` bytes (and the reports') free."""
    check_free_space(out_dir, needed + _REPORT_BYTES, "out_dir")


@contextmanager
def staged_output(out_dir: str | os.PathLike, *, needed: int = 0) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out_dir``; on success it replaces ``out_dir``, on failure it is removed.

    Folders made for it (missing parents of ``out_dir``) are removed again on failure.

    Args:
        needed: Bytes the outputs are expected to take, for the message when the disk fills up.
    """
    with staged_folder(Path(out_dir), suffix=STAGING_SUFFIX, replace=_check_replaceable, needed=needed) as staging:
        yield staging


def _check_replaceable(path: Path) -> None:
    if not path.is_dir():
        return
    # A staging folder inside: out_dir is a mount point, whose outputs are staged in it (repblocks.files).
    names = sorted(entry.name for entry in path.iterdir() if not _STAGING.match(entry.name))
    if not names:
        return
    foreign = [name for name in names if name not in DEPLOY_FILES and not _TEMPORARY.match(name)]
    if foreign or not any(name in names for name in _REPORTS):
        shown = ", ".join(foreign[:5] or names[:5])
        raise UserError(
            f"out_dir {path} is not empty and not a deploy output (it holds {shown}); "
            "give a new or empty folder, or a previous deploy output to replace"
        )
