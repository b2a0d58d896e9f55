"""``training_curves.png``: a run's loss and validation accuracy per epoch, drawn from its CSV log.

:class:`TrainingCurves` writes it into the run folder when training ends, and when it is
interrupted (Ctrl-C, SIGTERM) after at least one logged value. The data is the CSV logger's
``metrics.csv`` (and the ``metrics.before-step-N.csv`` that train.py keeps when a run resumes in its
folder), so a finished run can be drawn again with :func:`write_training_curves`. Values that are
not finite (a loss that became NaN) leave a gap, never a broken figure. Epochs count from 1, as the
log and the checkpoint names do; the best epoch marked is the checkpoint's (the first to reach the best
accuracy), and when validation ran on an EMA of the weights the figure says so.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from repblocks.files import atomic_path

__all__ = [
    "CURVES_FILE",
    "History",
    "TrainingCurves",
    "read_history",
    "training_curves_figure",
    "write_training_curves",
]

log = logging.getLogger(__name__)
CURVES_FILE = "training_curves.png"


@dataclass
class History:
    """The epoch-level values of a run's CSV log, by epoch (1 = after the first epoch)."""

    train_loss: dict[int, float] = field(default_factory=dict)
    val_loss: dict[int, float] = field(default_factory=dict)
    val_acc: dict[int, float] = field(default_factory=dict)
    val_acc_top5: dict[int, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.train_loss or self.val_loss or self.val_acc)

    def best_epoch(self) -> int | None:
        """The first epoch of the highest finite ``val_acc``: the one ModelCheckpoint kept (it saves only on a gain)."""
        finite = {epoch: value for epoch, value in self.val_acc.items() if math.isfinite(value)}
        if not finite:
            return None
        best = max(finite.values())
        return min(epoch for epoch, value in finite.items() if value == best)


def read_history(csv_files: list[str | os.PathLike]) -> History:
    """The epoch-level values in Lightning ``CSVLogger`` files, earlier files first (a later value wins)."""
    history = History()
    columns = {
        "train_loss_epoch": history.train_loss,
        "val_loss": history.val_loss,
        "val_acc": history.val_acc,
        "val_acc_top5": history.val_acc_top5,
    }
    for path in csv_files:
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                epoch = _number(row.get("epoch"))
                if epoch is None:
                    continue
                for column, values in columns.items():
                    value = _number(row.get(column))
                    if value is not None:
                        values[int(epoch) + 1] = value
    return history


def training_curves_figure(history: History, *, title: str, ema_decay: float | None = None) -> Figure:
    """Loss (train and validation) and validation accuracy per epoch, side by side.

    Args:
        history: The values to draw (:func:`read_history`).
        title: The figure's title.
        ema_decay: The decay of the weights' EMA that validation ran on; None: it ran on the weights.
    """
    # A bare Figure, not pyplot: no global backend or window state, and it renders PNG on any server.
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    loss_axes, acc_axes = figure.subplots(1, 2)
    _curve(loss_axes, history.train_loss, "train", "C0")
    on_ema = f" on EMA weights (decay {ema_decay:g})" if ema_decay else ""  # not the weights train loss was on
    _curve(loss_axes, history.val_loss, f"validation{on_ema}", "C1")
    loss_axes.set_title("loss", fontsize="medium")
    _curve(acc_axes, {k: 100 * v for k, v in history.val_acc.items()}, "top-1", "C2")
    _curve(acc_axes, {k: 100 * v for k, v in history.val_acc_top5.items()}, "top-5", "C2", dashed=True)
    acc_axes.set_ylim(0, 105)
    best = history.best_epoch()
    accuracy = f"validation accuracy (%){on_ema}"
    if best is None:
        acc_axes.set_title(accuracy, fontsize="medium")
    else:
        best_acc = 100 * history.val_acc[best]
        acc_axes.plot(best, best_acc, "*", color="C3", markersize=11, zorder=3)
        acc_axes.set_title(f"{accuracy}\nbest top-1 {best_acc:.2f}% at epoch {best}", fontsize="medium")
    for axes in (loss_axes, acc_axes):
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small", loc="lower right" if axes is acc_axes else "upper right")
    epochs = [*history.train_loss, *history.val_loss, *history.val_acc]
    if len(set(epochs)) == 1:  # one epoch: a point in the middle, not an axis of fractions
        for axes in (loss_axes, acc_axes):
            axes.set_xlim(epochs[0] - 1, epochs[0] + 1)
    figure.suptitle(title, fontsize="medium")
    return figure


def write_training_curves(
    csv_files: list[str | os.PathLike], path: str | os.PathLike, *, title: str, ema_decay: float | None = None
) -> bool:
    """Draw the values of ``csv_files`` into ``path`` (written atomically); False when they hold none.

    ``ema_decay``: as in :func:`training_curves_figure`.
    """
    history = read_history(csv_files)
    if history.empty():
        return False
    with atomic_path(Path(path)) as tmp:
        training_curves_figure(history, title=title, ema_decay=ema_decay).savefig(tmp, format="png", dpi=110)
    return True


class TrainingCurves(L.Callback):
    """Write ``training_curves.png`` into ``output_dir`` when fit ends or is interrupted.

    Args:
        output_dir: The run folder.

    Reads the files of the trainer's ``CSVLogger``; without one (``logger=null``), it writes nothing.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, Exception):  # Ctrl-C, SIGTERM: the epochs run so far are worth a look
            self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        folders = [Path(logger.log_dir) for logger in trainer.loggers if isinstance(logger, CSVLogger)]
        if not folders:
            return
        # Lightning saves the CSV after every logged value: the file is complete (a save here could, on a logger
        # that has logged nothing yet, start a new file over the earlier one).
        csv_files = sorted(folders[0].glob("metrics.before-step-*.csv"), key=_resumed_step) + [
            path for path in [folders[0] / "metrics.csv"] if path.is_file()
        ]
        name = pl_module.hparams.get("model_name", type(pl_module).__name__)
        ema_decay = pl_module.hparams.get("ema_decay")  # RepClassifier validates on its EMA when there is one
        try:
            written = write_training_curves(
                csv_files, self.output_dir / CURVES_FILE, title=f"{name}: training curves", ema_decay=ema_decay
            )
        except (OSError, ValueError) as err:  # a plot is no reason to fail a finished run
            log.warning("training curves not written: %s", err)
            return
        if written:
            log.info("training curves: %s", self.output_dir / CURVES_FILE)


def _curve(axes, values: dict[int, float], label: str, color: str, *, dashed: bool = False) -> None:
    if not values:
        return
    epochs = sorted(values)
    points = [values[epoch] if math.isfinite(values[epoch]) else math.nan for epoch in epochs]
    if all(math.isnan(point) for point in points):
        label += " (not finite)"
    axes.plot(epochs, points, "--" if dashed else "-", marker="o", markersize=3, color=color, label=label)


def _resumed_step(path: Path) -> int:
    return int(_number(path.stem.rpartition("-")[2]) or 0)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None
