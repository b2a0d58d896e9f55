"""The run folder of train.py: checked before any work, and never shared by two runs.

A run writes ``config.yaml``, ``checkpoints/``, ``logs/``, ``deploy_weights/`` and ``metrics.json`` into its
folder. A second run into a folder that holds a run would mix its checkpoints and metrics with the
first one's (and overwrite its best checkpoint's record), so it is refused; the one exception is
resuming that same run, from a checkpoint inside the folder: the run then continues where it stopped
(as a job requeued with the same command line does), and train.py keeps the earlier CSV log beside
the new one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import yaml
from torch import nn

from repblocks.files import check_free_space, check_writable_dir

__all__ = ["check_run_folder", "check_run_space", "release_folder_if_nothing_saved", "run_files"]

log = logging.getLogger("train")

# Checkpoints on disk at once: the best, last.ckpt, and the next one being written beside them.
_CHECKPOINTS_AT_ONCE = 3
_LOG_BYTES = 2**20  # CSV and TensorBoard logs, config.yaml and metrics.json of a run: well under this


def run_files(folder: Path) -> list[str]:
    """The files in ``folder`` that a train.py run wrote there (empty for a new folder)."""
    found = []
    config = folder / "config.yaml"
    if config.is_file() and _is_train_config(config):
        found.append("config.yaml")
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")):
        found.append("checkpoints/")
    if (folder / "metrics.json").is_file():
        found.append("metrics.json")
    return found


def check_run_folder(
    folder: str | os.PathLike,
    *,
    ckpt_path: str | None,
    subfolders: Iterable[str | os.PathLike] = (),
    new_run: bool = True,
) -> None:
    """Check, before any work, that a run may write into ``folder`` and its ``subfolders``.

    Args:
        folder: The run folder (``paths.output_dir``, Hydra's ``hydra.run.dir``).
        ckpt_path: The checkpoint the run resumes from, if any. Resuming from a checkpoint of
            ``folder`` itself continues that run, in its folder.
        subfolders: Further folders the run writes into (checkpoints, deploy weights).
        new_run: False in processes that join a run another one started (DDP's other ranks):
            only whether they can write is checked.

    Raises:
        ValueError: A folder is not writable, or ``folder`` holds another run; one line that says
            what to do instead.
    """
    folder = Path(folder).expanduser()
    found = run_files(folder) if new_run and folder.is_dir() else []
    if found and not (ckpt_path and _is_inside(Path(ckpt_path), folder)):
        resume = folder / "checkpoints" / "last.ckpt"
        raise ValueError(
            f"run folder {folder} already holds a run ({', '.join(found)}): choose another folder "
            f"(hydra.run.dir=...), or continue that run with ckpt_path={resume}"
        )
    check_writable_dir(folder, "run folder")
    for subfolder in subfolders:
        check_writable_dir(subfolder, "run folder")


def check_run_space(folder: str | os.PathLike, module: nn.Module) -> None:
    """Refuse, before any work, a run folder whose disk cannot hold the run's checkpoints and deploy weights.

    A checkpoint holds ``module``'s state (the model and its EMA copy) and the optimizer's, at most
    two tensors per trainable parameter (Adam's moments); the estimate errs on the large side.

    Raises:
        DiskFullError: Less space is free there than the run needs; one line naming the folder and both sizes.
    """
    state = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    optimizer = 2 * sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    needed = _CHECKPOINTS_AT_ONCE * (state + optimizer) + state + _LOG_BYTES  # + the deploy form's weights
    check_free_space(folder, needed, "run folder")


def release_folder_if_nothing_saved(folder: Path, *, fresh_logs: Iterable[Path] = ()) -> None:
    """A run that failed before its first checkpoint leaves nothing to resume, and nothing that claims ``folder``.

    Its ``config.yaml`` goes, so that running the corrected command again in the same folder is not
    refused as a second run, and so do the log folders it created (``fresh_logs``: a CSV log with
    no epoch in it, its ``hparams.yaml``).
    """
    if run_files(folder) != ["config.yaml"]:
        return
    (folder / "config.yaml").unlink()
    for logs in fresh_logs:
        shutil.rmtree(logs, ignore_errors=True)
    log.info("the run failed before saving a checkpoint: %s is free for another run", folder)


def _is_train_config(path: Path) -> bool:
    # Ours is the resolved train config; any other config.yaml is not a run's.
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and all(key in config for key in ("model", "data", "trainer"))


def _is_inside(path: Path, folder: Path) -> bool:
    return path.expanduser().resolve().is_relative_to(folder.resolve())
