"""Under DDP each line is logged once, by rank zero (the two-process run: tests/test_train.py, slow)."""

import logging

import pytest

pytest.importorskip("lightning")
from lightning.fabric.utilities.rank_zero import rank_zero_only  # noqa: E402

from repblocks.train import console  # noqa: E402


@pytest.fixture
def loggers():
    levels = {name: logging.getLogger(name).level for name in console._RUN_LOGGERS}
    yield [logging.getLogger(name) for name in ("train", "repblocks.train.optim", "lightning.fabric.utilities.seed")]
    for name, level in levels.items():  # setLevel, not an attribute: it also clears logging's cache of levels
        logging.getLogger(name).setLevel(level)


def test_other_ranks_log_errors_only(monkeypatch, loggers):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    console.log_from_rank_zero()
    assert all(not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR) for logger in loggers)


def test_rank_zero_logs_as_before(monkeypatch, loggers):
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    before = [logger.getEffectiveLevel() for logger in loggers]
    console.log_from_rank_zero()
    assert [logger.getEffectiveLevel() for logger in loggers] == before
