"""What a training run prints: Lightning's messages that say nothing about this run left out, a one-line model summary.

:func:`quiet_lightning` drops, by their exact text, the messages Lightning prints on every run that
are advice, not news (its cloud logger's tip, a torch deprecation inside Lightning's own code, the
EMA copy being in eval mode on purpose, an epoch shorter than the step-logging interval). Every other warning
still shows. :func:`log_from_rank_zero` leaves DDP's other processes only their errors, so each line is logged
once. :class:`ModelSummaryLine`
replaces Lightning's model summary table, whose FLOPs column reads 0 unless the module carries an
example input, with one line of what the table says.
"""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

__all__ = ["ModelSummaryLine", "log_from_rank_zero", "quiet_lightning"]

log = logging.getLogger("train")

# Lightning's info messages that are no news about this run, matched by their start.
_LIGHTNING_ADVICE = (
    "💡 Tip: For seamless cloud logging",  # an advert for its cloud logger, on every run
    "Trainer already configured with model summary callbacks",  # ours, ModelSummaryLine, replaces the default
    "Loading `train_dataloader` to estimate number of stepping batches",  # the LR schedule's length, an internal step
)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_ADVICE)


def quiet_lightning() -> None:
    """Leave out Lightning's messages that say nothing about the run; safe to call more than once."""
    # The EMA copy of the weights is in eval mode on purpose (it is never trained).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # An epoch shorter than log_every_n_steps logs no per-step train_loss: the log, the curves and the checkpoints
    # are per epoch, so nothing the user reads is missing, and a short run (or one stopped by a bad image) need not hear it.
    warnings.filterwarnings(
        "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
    )
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates: nothing for a user (or us) to change.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=r"lightning\.")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropAdvice) for existing in logger.filters):
            logger.addFilter(_DropAdvice())


# The loggers of everything a training run logs through: train.py, repblocks (the core and repblocks.train)
# and Lightning (its "[rank: 1] Seed set to 42" and "Initializing distributed: GLOBAL_RANK: 1" included).
_RUN_LOGGERS = ("train", "repblocks", "lightning.pytorch", "lightning.fabric")


def log_from_rank_zero() -> None:
    """Under DDP, leave the processes other than rank zero their errors only; safe to call more than once.

    Every process runs the same code on its share of the data, so each would log the same line (the
    learning-rate schedule's warning, the threads line, Lightning's seed line); rank zero speaks for
    all. An error still shows from whichever process meets it. The rank is read from the environment
    Lightning, torchrun and SLURM set before the script starts (RANK, LOCAL_RANK, SLURM_PROCID).
    """
    if rank_zero_only.rank == 0:
        return
    for name in _RUN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class ModelSummaryLine(ModelSummary):
    """Lightning's model summary as one line: each top-level module's parameters, trainable and total size."""

    def __init__(self) -> None:
        super().__init__(max_depth=1)

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs,
    ) -> None:
        columns = dict(summary_data)
        parts = [
            f"{name} ({kind}) {params}"
            for name, kind, params in zip(columns["Name"], columns["Type"], columns["Params"], strict=True)
            if params.strip() not in ("0", "")
        ]
        log.info(
            "parameters: %s; %s trainable, %.1f MB in all",
            ", ".join(parts),
            get_human_readable_count(trainable_parameters).strip(),
            model_size,
        )
