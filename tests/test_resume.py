"""Resuming a run as it was trained: ``python train.py ckpt_path=RUN/checkpoints/last.ckpt`` takes its settings.

R-Drop and RepVGG's custom L2 are the cases that broke: the command line without ``loss=rdrop`` trained on
with cross-entropy, and without ``rep_l2=true`` Lightning failed to restore the optimizer's groups after
writing a new run folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from repblocks.cli import check_overrides
from repblocks.run_checkpoint import RunCheckpoint
from repblocks.train.resume import check_resumed_as_trained, recorded_overrides, resume_as_trained

from .helpers import ROOT

CONFIG_DIR = ROOT / "configs"
TINY = ("trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "callbacks.progress_bar=null")


def _run(hparams: dict, **fields) -> RunCheckpoint:
    return RunCheckpoint(
        path=Path("run/checkpoints/last.ckpt"),
        model_name=fields.get("model_name", "repvgg_tiny"),
        num_classes=10,
        in_chans=3,
        model_kwargs=fields.get("model_kwargs", {"drop_rate": 0.2, "bn_eps": 1e-05}),
        state_dict={},
        data=fields.get("data", {"_target_": "repblocks.datasets.DigitsData", "image_size": 32, "root": "x"}),
        hyper_parameters=hparams,
    )


def test_recorded_overrides_rebuild_model_loss_rep_l2_ema_and_data():
    run = _run({"loss": "RDropLoss", "rep_l2": True, "ema_decay": 0.99})
    overrides = recorded_overrides(run, CONFIG_DIR, given=["trainer.max_epochs=2", "data.image_size=40"])
    assert overrides == [
        "model=repvgg_tiny",
        "++model.drop_rate=0.2",
        "++model.bn_eps=1e-05",
        "loss=rdrop",
        "rep_l2=true",
        "ema_decay=0.99",
        "data=digits",  # data.image_size is the command line's; "root" is no key of digits.yaml
    ]
    composed = check_overrides([*overrides, "trainer.max_epochs=2"], CONFIG_DIR, "train")
    check_resumed_as_trained(run, composed)  # what was recorded composes back to itself


def test_recorded_names_become_config_choices_only_where_a_config_of_ours_has_them():
    run = _run(
        {"loss": "os.system", "rep_l2": "yes"},
        model_name="../../etc/passwd",
        data={"_target_": "builtins.eval", "image_size": 32},
    )
    overrides = recorded_overrides(run, CONFIG_DIR, given=[])
    assert overrides == ["++model.drop_rate=0.2", "++model.bn_eps=1e-05"]


def test_strings_are_quoted_so_a_path_is_read_as_text():
    run = _run({}, data={"_target_": "repblocks.datasets.ImageFolderData", "root": "/data/it's=here,[x]"})
    assert "data.root='/data/it\\'s=here,[x]'" in recorded_overrides(run, CONFIG_DIR, given=[])


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("rep_l2=false", "rep_l2=true (this command: false)"),
        ("loss=ce", "loss RDropLoss (this command: CrossEntropyLoss)"),
    ],
)
def test_a_command_line_that_changes_how_it_trained_is_refused_in_one_line(override, said):
    run = _run({"loss": "RDropLoss", "rep_l2": True, "ema_decay": 0.99})
    composed = check_overrides([*recorded_overrides(run, CONFIG_DIR, [override]), override], CONFIG_DIR, "train")
    with pytest.raises(ValueError, match="a resumed run continues as it was trained") as err:
        check_resumed_as_trained(run, composed)
    assert said in str(err.value) and "\n" not in str(err.value)


def _train_py(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three train.py processes of a few seconds each
@pytest.mark.parametrize("setting", [("loss=rdrop",), ("rep_l2=true",)], ids=["rdrop", "rep_l2"])
def test_resume_with_only_ckpt_path_continues_as_trained(tmp_path, setting):
    first = _train_py("model=repvgg_tiny", *setting, "trainer.max_epochs=1", *TINY, "hydra.run.dir=first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"

    refused = _train_py(f"ckpt_path={last}", "rep_l2=false", "loss=ce", "hydra.run.dir=refused", cwd=tmp_path)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("error: ckpt_path:")
    assert not (tmp_path / "refused").exists(), "a refused resume writes nothing"

    resumed = _train_py(f"ckpt_path={last}", "trainer.max_epochs=2", *TINY, "hydra.run.dir=second", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "as it was trained: model=repvgg_tiny" in resumed.stderr
    config = yaml.safe_load((tmp_path / "second" / "config.yaml").read_text())
    assert config["model"]["name"] == "repvgg_tiny"
    if setting == ("loss=rdrop",):
        assert config["loss"]["_target_"].endswith("RDropLoss") and config["model"]["drop_rate"] == 0.2
    else:
        assert config["rep_l2"] is True
    assert any(path.name.startswith("epoch=001") for path in (tmp_path / "second" / "checkpoints").iterdir())


@pytest.mark.parametrize("block_mode", [{"offline": 1}, ["offline"]], ids=["dict", "list"])
def test_a_checkpoint_with_an_argument_of_the_wrong_kind_is_one_line(tmp_path, block_mode):
    """A dict or a list where a name belongs (model_kwargs.block_mode) was a TypeError traceback."""
    import repblocks

    from .helpers import write_checkpoint

    path = write_checkpoint(tmp_path / "last.ckpt", repblocks.create_model("repvgg_tiny", num_classes=10))
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["model_kwargs"]["block_mode"] = block_mode
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"^ckpt_path: .* model_kwargs block_mode=.* is invalid; it must be one of"):
        resume_as_trained([f"ckpt_path={path}"], str(path), CONFIG_DIR)


@pytest.mark.slow  # a train.py process of a few seconds
def test_a_refused_resume_is_one_line(tmp_path):
    """Refused, it says why and nothing else: not first what it would have taken from the checkpoint."""
    import repblocks

    from .helpers import write_checkpoint

    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    last = write_checkpoint(tmp_path / "last.ckpt", model, rep_l2=True, loss="CrossEntropyLoss")
    refused = _train_py(f"ckpt_path={last}", "rep_l2=false", "hydra.run.dir=refused", cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip().splitlines()[-1]], refused.stderr
    assert refused.stderr.startswith("error: ckpt_path:") and "rep_l2=true (this command: false)" in refused.stderr
