"""A training run's objects come from the config, and what its checkpoints record is what deployment reads back.

The LightningModule is ``configs/module/``'s target, with the loss, optimizer, schedule and Mixup
of their own groups: changing one is a YAML change. The record it saves
(:func:`repblocks.run_checkpoint.run_record`) is read back by the same module's readers.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.utils import instantiate
from timm.data import Mixup

from repblocks.run_checkpoint import (
    build_run_model,
    read_run_checkpoint,
    run_deploy_metadata,
    run_record,
    spec_from_deploy_metadata,
)
from repblocks.train.data import ClassificationDataModule
from repblocks.train.fit import build_module
from repblocks.train.losses import RDropLoss

from .helpers import compose_train


def _module(tmp_path, *overrides: str):
    cfg = compose_train(tmp_path, "model=repvgg_tiny", "data=fake", *overrides)
    data = instantiate(cfg.data)
    return cfg, data, build_module(cfg, data)


def test_the_module_optimizer_schedule_and_mixup_come_from_the_config(tmp_path):
    cfg, data, module = _module(
        tmp_path, "optimizer=adamw", "scheduler=constant", "+experiment=mixup", "ema_decay=null"
    )
    assert isinstance(module.optimizer_factory, functools.partial)
    assert module.optimizer_factory.func is torch.optim.AdamW and module.optimizer_factory.keywords["lr"] == 2e-3
    assert module.scheduler_factory is None  # scheduler=constant: no schedule
    assert isinstance(module.mixup, Mixup) and module.mixup.num_classes == data.num_classes
    assert module.ema is None and module.hparams["weights_prefix"] == "model."
    assert isinstance(instantiate(cfg.datamodule)(data), ClassificationDataModule)


def test_loss_and_module_settings_come_from_their_groups(tmp_path):
    _, _, module = _module(tmp_path, "loss=rdrop", "rep_l2=true", "ema_decay=0.9")
    assert isinstance(module.criterion, RDropLoss) and module.use_rep_l2
    assert module.ema is not None and module.hparams["weights_prefix"] == "ema.module."
    assert module.hparams["model_kwargs"]["drop_rate"] == 0.2  # rdrop's own model setting


def test_what_a_checkpoint_records_is_what_deployment_reads_back(tmp_path):
    _, data, module = _module(tmp_path, "model.drop_rate=0.1")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    run = read_run_checkpoint(path)
    assert (run.model_name, run.num_classes, run.in_chans) == ("repvgg_tiny", data.num_classes, data.in_chans)
    assert run.model_kwargs == {"drop_rate": 0.1, "block_mode": "offline", "bn_eps": module.model.bn_eps}
    assert run.image_size == data.image_size and run.preprocessing == data.preprocessing
    assert run.data["_target_"] == "repblocks.datasets.FakeData"
    assert spec_from_deploy_metadata(run_deploy_metadata(run.hyper_parameters), what="metadata") == run.spec
    rebuilt = build_run_model(run)
    images = torch.randn(2, data.in_chans, data.image_size, data.image_size)
    module.model.eval()
    torch.testing.assert_close(rebuilt(images), module.model(images))


def test_a_network_without_a_classifier_is_refused():
    with pytest.raises(ValueError, match=r"model 'identity' has no classifier \(num_classes=None\)"):
        run_record(torch.nn.Identity(), model_name="identity", model_kwargs={}, in_chans=3, image_size=32)
