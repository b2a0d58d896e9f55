"""The Lightning loggers of train.py's ``logger=`` group, and what becomes of their files.

A run resumed in its own folder keeps its earlier CSV log (Lightning's CSVLogger would delete it),
and a run that fails before its first checkpoint leaves no log behind (:func:`fresh_log_dirs`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig

__all__ = ["build_loggers", "fresh_log_dirs", "keep_earlier_csv_logs"]


def build_loggers(config: DictConfig | None) -> list[Logger] | bool:
    """The loggers the ``logger`` node names; False (Lightning's "none") when it names none.

    Raises:
        ValueError: ``logger=tensorboard`` without TensorBoard installed.
    """
    loggers = []
    for name, node in (config or {}).items():
        if name == "tensorboard" and not _tensorboard_installed():
            raise ValueError("logger=tensorboard needs TensorBoard: pip install tensorboard (or leave logger at csv)")
        loggers.append(instantiate(node))
    return loggers or False


def keep_earlier_csv_logs(loggers: list[Logger] | bool, *, step: int) -> None:
    """Rename a resumed run's earlier ``metrics.csv`` to ``metrics.before-step-N.csv``, which CSVLogger would delete."""
    for logger in loggers or []:
        if isinstance(logger, CSVLogger):
            earlier = Path(logger.log_dir) / "metrics.csv"
            if earlier.is_file():
                earlier.rename(earlier.with_name(f"metrics.before-step-{step}.csv"))


def fresh_log_dirs(loggers: list[Logger] | bool) -> list[Path]:
    """The loggers' folders that do not exist yet: what this run alone will have written there."""
    folders = {Path(logger.log_dir) for logger in loggers or [] if getattr(logger, "log_dir", None)}
    return sorted(folder for folder in folders if not folder.exists())


def _tensorboard_installed() -> bool:
    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))
