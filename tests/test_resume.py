"""Resuming a run as it was trained: ``python train.py ckpt_path=RUN/checkpoints/last.ckpt`` takes its settings.

R-Drop and RepVGG's custom L2 are the cases that broke: the command line without ``loss=rdrop`` trained on
with cross-entropy, and without ``rep_l2=true`` Lightning failed to restore the optimizer's groups after
writing a new run folder.

And it resumes where the run stopped: ``last.ckpt`` holds the last epoch trained (Lightning 2.6 rewrote it
only with a new best, so a run killed at epoch 20 whose best was epoch 14 went back to 15), a run killed
with SIGKILL in epoch N resumes at epoch N, and a finished run is not trained again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from repblocks.cli import check_overrides
from repblocks.run_checkpoint import RunCheckpoint
from repblocks.train.curves import read_history
from repblocks.train.resume import (
    check_resumed_as_trained,
    finished_run,
    recorded_overrides,
    resume_as_trained,
    trained_so_far,
)

from .helpers import ROOT, compose_train

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


def test_a_bare_resume_takes_the_run_length_and_a_command_line_length_replaces_it():
    run = _run({"run_length": {"max_epochs": 7, "max_steps": -1}})
    assert recorded_overrides(run, CONFIG_DIR, given=[])[-2:] == ["trainer.max_epochs=7", "trainer.max_steps=-1"]
    for given in ("trainer.max_epochs=9", "trainer.max_steps=100"):  # either one: the end is the command line's
        assert not any(arg.startswith("trainer.") for arg in recorded_overrides(run, CONFIG_DIR, given=[given]))
    composed = check_overrides(recorded_overrides(run, CONFIG_DIR, given=[]), CONFIG_DIR, "train")
    assert (composed.trainer.max_epochs, composed.trainer.max_steps) == (7, -1)
    junk = _run({"run_length": {"max_epochs": "7; rm -rf", "max_steps": True}})  # data, never text for Hydra
    assert not any(arg.startswith("trainer.") for arg in recorded_overrides(junk, CONFIG_DIR, given=[]))


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
    assert any(path.name.startswith("epoch=002") for path in (tmp_path / "second" / "checkpoints").iterdir())


def test_last_ckpt_is_the_last_epoch_when_the_monitored_metric_stopped_improving(tmp_path):
    from train import train

    # The lowest step is the best: the monitored value improves in the first epoch only, on any machine.
    worsening = ["callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=min"]
    metrics = train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=3", *worsening))
    steps_per_epoch = metrics["global_step"] // 3
    last = torch.load(metrics["last_ckpt"], map_location="cpu", weights_only=True)
    assert trained_so_far(last) == (3, metrics["global_step"]), "last.ckpt must hold the end of the third epoch"
    best = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert trained_so_far(best) == (1, steps_per_epoch)
    # Epochs from 1, as the log counts them: the best checkpoint of the first epoch is epoch=001.
    assert Path(metrics["best_ckpt"]).name.startswith("epoch=001-") and metrics["best_epoch"] == 1


def _lightning_checkpoint(path: Path, *, epochs: int, steps: int) -> Path:
    """The part of a Lightning checkpoint that says how far its run trained."""
    loops = {"fit_loop": {"epoch_progress": {"current": {"processed": epochs}}}}
    torch.save({"epoch": epochs - 1, "global_step": steps, "loops": loops, "state_dict": {}}, path)
    return path


@pytest.mark.parametrize(
    ("trainer", "said"),
    [
        ({"max_epochs": 3, "max_steps": -1}, "3 epochs, 66 steps trained, trainer.max_epochs=3 reached"),
        ({"max_epochs": 2, "max_steps": -1}, "trainer.max_epochs=2 reached; nothing to resume"),
        ({"max_epochs": 30, "max_steps": 66}, "trainer.max_steps=66 reached"),
        ({"max_epochs": 4, "max_steps": -1}, None),  # goes on with the fourth epoch
        ({"max_epochs": 30, "max_steps": 100}, None),
        ({"max_epochs": -1, "max_steps": -1}, None),  # no end
    ],
)
def test_a_finished_run_is_told_in_one_line(tmp_path, trainer, said):
    path = _lightning_checkpoint(tmp_path / "last.ckpt", epochs=3, steps=66)
    line = finished_run(path, trainer)
    if said is None:
        assert line is None
    else:
        assert line.startswith(f"{path} has finished: ") and said in line and "\n" not in line


def test_a_checkpoint_that_cannot_say_how_far_it_trained_is_left_to_the_resume(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    weights = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)
    for path in (junk, weights, tmp_path / "missing.ckpt"):
        assert finished_run(path, {"max_epochs": 1, "max_steps": -1}) is None  # the resume says what is wrong


# The run that is killed, and the same run unbroken: digits, so that the final accuracy means something.
DIGITS_RUN = ("model=repvgg_tiny", "data=digits", "trainer=cpu", "threads=1", "callbacks.progress_bar=null")
EPOCHS = 4


def _epoch_lines(output: str) -> list[tuple[int, float]]:
    """(epoch, val acc %) of each ``epoch N/M: ..., val acc A%`` line train.py logged."""
    return [(int(n), float(a)) for n, a in re.findall(rf"epoch (\d+)/{EPOCHS}: .*val acc ([\d.]+)%", output)]


def _start(*overrides: str, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _killed_in_an_epoch(folder: Path, *, after_epochs: int, cwd: Path) -> int:
    """Start the run into ``folder``, SIGKILL it once its last.ckpt holds ``after_epochs`` epochs: the epochs it holds."""
    process = _start(*DIGITS_RUN, f"trainer.max_epochs={EPOCHS}", f"hydra.run.dir={folder}", cwd=cwd)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600  # a guard against a hang: the kill waits for the checkpoint, however slow
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"train.py ended before the kill (exit {process.poll()}): {process.communicate()[0][-3000:]}")
        trained = trained_so_far(torch.load(last, map_location="cpu", weights_only=True)) if last.is_file() else None
        if trained is not None and trained[0] >= after_epochs:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # no handler runs: what is on disk is all a resume has
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    # The epochs last.ckpt holds now (a slow poll may have let one more epoch end before the kill).
    return trained_so_far(torch.load(last, map_location="cpu", weights_only=True))[0]


@pytest.fixture(scope="module")
def unbroken_and_killed(tmp_path_factory):
    """A 4-epoch digits run, and the same run SIGKILLed in its third epoch (or later); the two run side by side."""
    folder = tmp_path_factory.mktemp("resume")
    unbroken = _start(*DIGITS_RUN, f"trainer.max_epochs={EPOCHS}", "hydra.run.dir=unbroken", cwd=folder)
    held = _killed_in_an_epoch(folder / "killed", after_epochs=2, cwd=folder)
    output = _finish(unbroken)
    return folder, output, json.loads((folder / "unbroken" / "metrics.json").read_text()), held


@pytest.mark.slow  # three train.py processes of 4 short digits epochs: about a minute on 2 busy cores
def test_a_run_killed_in_epoch_n_resumes_at_epoch_n_and_ends_as_an_unbroken_one(unbroken_and_killed):
    folder, _, theirs, held = unbroken_and_killed
    assert 2 <= held < EPOCHS, f"the kill came after the last epoch ({held} held)"
    killed_in = held + 1  # epochs count from 1: last.ckpt after epoch 2 means the kill came in epoch 3

    # The README's resume command, continuing in its own folder: the run's length comes from its checkpoint.
    last = folder / "killed" / "checkpoints" / "last.ckpt"
    resumed = _finish(_start(f"ckpt_path={last}", *DIGITS_RUN[2:], "hydra.run.dir=killed", cwd=folder))
    epochs = [epoch for epoch, _ in _epoch_lines(resumed)]
    assert epochs == list(range(killed_in, EPOCHS + 1)), resumed[-3000:]

    ours = json.loads((folder / "killed" / "metrics.json").read_text())
    assert (ours["epochs"], ours["global_step"]) == (
        theirs["epochs"],
        theirs["global_step"],
    )  # no epoch lost or repeated
    # Within noise: the resumed epochs see the images in another order. Five seeds of this run end within 2.2 points.
    assert abs(ours["val_acc_last"] - theirs["val_acc_last"]) <= 0.04, (ours, theirs)
    assert ours["val_acc_last"] > 0.8 and theirs["val_acc_last"] > 0.8  # both learned: the comparison means something


@pytest.mark.slow  # two train.py processes after the fixture's
def test_a_finished_run_says_so_and_a_longer_one_goes_on(unbroken_and_killed):
    folder, unbroken_output, metrics, _ = unbroken_and_killed
    run = folder / "unbroken"
    last = run / "checkpoints" / "last.ckpt"
    # One numbering: the log's best epoch (the first of the highest accuracy), the checkpoint's name,
    # metrics.json and the plot's data.
    logged = _epoch_lines(unbroken_output)
    best_logged = min(epoch for epoch, acc in logged if acc == max(acc for _, acc in logged))
    assert metrics["best_epoch"] == best_logged
    assert Path(metrics["best_ckpt"]).name.startswith(f"epoch={best_logged:03d}-")
    assert read_history([run / "logs" / "metrics.csv"]).best_epoch() == best_logged
    assert f"best val acc {100 * metrics['val_acc']:.2f}% at epoch {best_logged}" in unbroken_output

    before = sorted((path.name, path.stat().st_mtime_ns) for path in run.rglob("*"))
    finished = _start(f"ckpt_path={last}", "hydra.run.dir=unbroken", cwd=folder)  # the recorded length: reached
    output = _finish(finished)
    assert output.strip() == (
        f"{last} has finished: {EPOCHS} epochs, {metrics['global_step']} steps trained, "
        f"trainer.max_epochs={EPOCHS} reached; nothing to resume (to train on, set trainer.max_epochs above {EPOCHS})"
    )
    assert sorted((path.name, path.stat().st_mtime_ns) for path in run.rglob("*")) == before  # nothing written

    longer = _finish(
        _start(
            f"ckpt_path={last}",
            *DIGITS_RUN[2:],
            f"trainer.max_epochs={EPOCHS + 1}",
            "hydra.run.dir=unbroken",
            cwd=folder,
        )
    )
    assert [epoch for epoch, _ in re.findall(r"epoch (\d+)/(\d+): ", longer)] == [str(EPOCHS + 1)], longer[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == EPOCHS + 1


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
