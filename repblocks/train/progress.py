"""Progress a person can follow in a terminal and in a log: Lightning's bar, or a line per epoch.

In a terminal, the progress bar redraws one line as training goes. In a log file or a pipe
(``make demo > log``, CI) there is no line to redraw: Rich's bar writes nothing until the run ends and
TQDM's writes a line per refresh. There, :func:`progress_callbacks` takes the bar out and puts
:class:`EpochLines` in: one line per epoch, with its losses, validation accuracy and seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

__all__ = ["EpochLines", "epoch_line", "output_is_terminal", "progress_callbacks"]

log = logging.getLogger(__name__)


class EpochLines(L.Callback):
    """Logs one line when each training epoch ends: epoch, train loss, val loss and accuracy, seconds.

    ``epoch 2/30: train loss 1.234, val loss 1.100, val acc 71.39%, 8.4 s``. Validation figures
    appear for the epochs that validated; the sanity check before training is not an epoch.
    """

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._validation: dict[str, float] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._validation = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self._validation = {name: float(metrics[name]) for name in ("val_loss", "val_acc") if name in metrics}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info(epoch_line(trainer, self._validation, time.perf_counter() - self._started))


def epoch_line(trainer: L.Trainer, validation: dict[str, float], seconds: float) -> str:
    """``epoch 2/30: train loss 1.234, val loss 1.100, val acc 71.39%, 8.4 s`` (the parts that were measured)."""
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    head = f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs else "")
    train_loss = trainer.callback_metrics.get("train_loss_epoch")
    figures = [f"train loss {float(train_loss):.3f}"] if train_loss is not None else []
    if "val_loss" in validation:
        figures.append(f"val loss {validation['val_loss']:.3f}")
    if "val_acc" in validation:
        figures.append(f"val acc {100 * validation['val_acc']:.2f}%")
    return f"{head}: " + ", ".join([*figures, f"{seconds:.1f} s"])


def output_is_terminal() -> bool:
    """Whether standard output is a terminal, where a progress bar can redraw its line."""
    return sys.stdout.isatty()


def progress_callbacks(callbacks: list, *, terminal: bool | None = None) -> tuple[list, dict[str, Any]]:
    """``callbacks`` with the progress shown as fits the output, and the ``Trainer`` settings that go with them.

    Args:
        callbacks: The run's callbacks, a progress bar among them or not.
        terminal: Whether standard output is a terminal; None: ask it.

    Returns:
        In a terminal: ``callbacks`` unchanged and no setting. Otherwise the callbacks without their
        progress bar, with :class:`EpochLines`, and ``enable_progress_bar=False`` (without it,
        Lightning would add its own bar back).
    """
    if terminal is None:
        terminal = output_is_terminal()
    if terminal:
        return callbacks, {}
    kept = [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
    return [*kept, EpochLines()], {"enable_progress_bar": False}
