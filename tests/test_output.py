"""What runs show a person: throughput.png, training_curves.png, the one-line summaries, --help."""

import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from matplotlib.patches import Rectangle
from omegaconf import OmegaConf

from repblocks.cli import check_overrides
from repblocks.config_help import config_help
from repblocks.deploy.plot import throughput_figure, write_throughput_plot
from repblocks.train.console import ModelSummaryLine
from repblocks.train.curves import (
    CURVES_FILE,
    TrainingCurves,
    read_history,
    training_curves_figure,
    write_training_curves,
)
from tests.helpers import ROOT, compose_train

PNG = b"\x89PNG\r\n\x1a\n"


def _row(form, backend, batch_size, throughput, dtype="fp32", ratio=None, ratio_eager=None) -> dict:
    return {
        "form": form,
        "backend": backend,
        "dtype": dtype,
        "batch_size": batch_size,
        "throughput": throughput,
        "latency_ms": 1000 * batch_size / throughput,
        "latency_p90_ms": 1000 * batch_size / throughput,
        "ratio_to_train": ratio,
        "ratio_to_train_eager": ratio_eager,
    }


def _report(rows: list[dict], **extra) -> dict:
    return {"model": "repvgg_tiny", "device": "cpu (2 threads)", "image_shape": [3, 32, 32], "benchmark": rows, **extra}


def _bars(axes) -> list[Rectangle]:
    return [patch for patch in axes.patches if isinstance(patch, Rectangle)]


def test_throughput_plot_has_a_panel_per_batch_size_and_a_row_per_backend_and_dtype(tmp_path):
    rows = [
        _row("train", "eager", 1, 100.0, ratio=1.0),
        _row("deploy", "eager", 1, 300.0, ratio=3.0),
        _row("train", "onnxruntime", 1, 900.0, ratio=1.0),
        _row("deploy", "onnxruntime", 1, 1200.0, ratio=1.33),
        _row("train", "eager", 16, 200.0, ratio=1.0),
        _row("deploy", "eager", 16, 800.0, ratio=4.0),
        # onnxruntime failed at batch 16: no bar there; int8 has no train form
        _row("deploy", "openvino", 16, 5000.0, dtype="int8", ratio_eager=25.0),
    ]
    figure = throughput_figure(_report(rows))
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title() for axes in panels] == ["batch 1", "batch 16"]
    labels = [tick.get_text() for tick in panels[0].get_yticklabels()]
    assert sorted(labels) == [
        "eager fp32",
        "onnxruntime fp32",
        "openvino int8",
    ]  # each runner once, skipped ones absent
    assert [len(_bars(axes)) for axes in panels] == [4, 3]
    texts = [text.get_text() for axes in panels for text in axes.texts]
    assert "300  3.00x" in texts and "5,000  25.00x train eager" in texts and "100" in texts
    assert "repvgg_tiny" in figure._suptitle.get_text() and "3x32x32" in figure._suptitle.get_text()
    assert all(axes.get_xscale() == "log" for axes in panels)  # 100 to 5000 img/s: one scale that shows both

    write_throughput_plot(_report(rows), tmp_path / "plot")
    assert (tmp_path / "plot").read_bytes()[:8] == PNG


def test_throughput_plot_of_one_batch_size_a_deploy_form_only_and_nothing(tmp_path):
    one = [_row("deploy", "eager", 1, 50.0), _row("deploy", "onnxruntime", 1, 60.0)]  # loaded in deploy form
    figure = throughput_figure(_report(one))
    [panel] = [axes for axes in figure.axes if axes.get_title()]
    assert panel.get_xscale() == "linear" and len(_bars(panel)) == 2
    assert [text.get_text() for text in panel.texts] == ["50", "60"]  # no speedup without a train form
    skewed = _report(one, load={"skewed": True, "other_load_cores": 1.5})
    assert "skewed" in throughput_figure(skewed)._suptitle.get_text()
    for name, report in {
        "one": _report(one),
        "none": _report([]),
        "nan": _report([_row("deploy", "eager", 1, math.nan)]),
    }.items():
        write_throughput_plot(report, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG


def _lightning_csv(path: Path, epochs: list[tuple[float, float, float]]) -> Path:
    """A CSVLogger file as Lightning writes it: step rows and epoch rows, most fields empty."""
    lines = ["epoch,lr-SGD,step,train_loss_epoch,train_loss_step,val_acc,val_acc_top5,val_loss", ",0.05,0,,,,,"]
    for epoch, (train_loss, val_loss, val_acc) in enumerate(epochs):
        step = 10 * epoch + 9
        lines += [f"{epoch},,{step},,{train_loss},,,", f"{epoch},,{step},,,{val_acc},1.0,{val_loss}"]
        lines += [f"{epoch},,{step},{train_loss},,,,"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_curves_of_a_run_a_single_epoch_and_nan_losses(tmp_path):
    csv = _lightning_csv(tmp_path / "a.csv", [(2.0, 1.5, 0.3), (1.0, 0.8, 0.7), (0.5, 0.6, 0.9)])
    history = read_history([csv])
    assert history.train_loss == {1: 2.0, 2: 1.0, 3: 0.5} and history.val_acc == {1: 0.3, 2: 0.7, 3: 0.9}
    assert write_training_curves([csv], tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG

    single = _lightning_csv(tmp_path / "one.csv", [(2.0, 1.5, 0.3)])
    nan = _lightning_csv(tmp_path / "nan.csv", [(math.nan, math.nan, 0.1), (math.nan, math.nan, 0.1)])
    assert math.isnan(read_history([nan]).train_loss[1])
    for source in (single, nan):
        assert write_training_curves([source], tmp_path / f"{source.stem}.png", title="t")
        assert (tmp_path / f"{source.stem}.png").read_bytes()[:8] == PNG

    header_only = tmp_path / "empty.csv"
    header_only.write_text("epoch,step,train_loss_step\n")
    assert not write_training_curves([header_only], tmp_path / "none.png", title="t")
    assert not (tmp_path / "none.png").exists()


def _texts(figure) -> str:
    """Every title and legend label of a figure, one per line."""
    axes = figure.axes
    titles = [figure.get_suptitle(), *(a.get_title() for a in axes)]
    return "\n".join([*titles, *(label for a in axes for label in a.get_legend_handles_labels()[1])])


def test_training_curves_mark_the_checkpoints_best_epoch_and_say_when_validation_ran_on_the_ema(tmp_path):
    # 0.9 twice: ModelCheckpoint kept the second epoch (it saves only on a gain), so the plot marks that one.
    history = read_history([_lightning_csv(tmp_path / "a.csv", [(2.0, 1.5, 0.3), (1.0, 0.8, 0.9), (0.5, 0.6, 0.9)])])
    assert history.best_epoch() == 2
    on_ema = _texts(training_curves_figure(history, title="t", ema_decay=0.99))
    assert "best top-1 90.00% at epoch 2" in on_ema
    assert "validation accuracy (%) on EMA weights (decay 0.99)" in on_ema
    assert "validation on EMA weights (decay 0.99)" in on_ema  # the validation loss too; the train loss is not
    assert "EMA" not in _texts(training_curves_figure(history, title="t", ema_decay=None))


def test_a_resumed_runs_earlier_log_is_drawn_too(tmp_path):
    earlier = _lightning_csv(tmp_path / "metrics.before-step-19.csv", [(2.0, 1.5, 0.3), (1.0, 0.8, 0.7)])
    later = tmp_path / "metrics.csv"
    later.write_text("epoch,step,val_acc,val_loss,train_loss_epoch\n2,29,0.9,0.5,0.4\n")
    assert read_history([earlier, later]).val_acc == {1: 0.3, 2: 0.7, 3: 0.9}


def _trainer(tmp_path: Path, *, fast_dev_run=False, loggers=None) -> SimpleNamespace:
    logger = CSVLogger(tmp_path, name="logs", version="")
    return SimpleNamespace(
        is_global_zero=True, fast_dev_run=fast_dev_run, loggers=[logger] if loggers is None else loggers
    )


@pytest.mark.parametrize(
    ("exception", "fast_dev_run", "loggers", "written"),
    [
        (KeyboardInterrupt(), False, None, True),  # Ctrl-C: the epochs so far are drawn
        (ValueError("nan loss"), False, None, False),  # an error: the run failed, nothing added to its folder
        (KeyboardInterrupt(), True, None, False),  # fast_dev_run writes nothing
        (KeyboardInterrupt(), False, [], False),  # no CSV log to draw from
    ],
)
def test_training_curves_callback_on_interrupt(tmp_path, exception, fast_dev_run, loggers, written):
    _lightning_csv(tmp_path / "logs" / "metrics.csv", [(2.0, 1.5, 0.3)])
    module = SimpleNamespace(hparams={"model_name": "repvgg_tiny"})
    TrainingCurves(tmp_path).on_exception(
        _trainer(tmp_path, fast_dev_run=fast_dev_run, loggers=loggers), module, exception
    )
    assert (tmp_path / CURVES_FILE).is_file() == written


def test_model_summary_is_one_line(caplog):
    data = [("Name", ["model", "criterion", "ema"]), ("Type", ["RepVGG", "CrossEntropyLoss", "ModelEmaV3"])]
    data += [("Params", ["167 K", "0", "167 K"]), ("FLOPs", ["0", "0", "0"])]
    with caplog.at_level("INFO", logger="train"):
        ModelSummaryLine.summarize(data, 334_000, 167_000, 1.3, {"train": 90, "eval": 85}, total_flops=0)
    [record] = caplog.records
    assert (
        record.getMessage()
        == "parameters: model (RepVGG) 167 K, ema (ModelEmaV3) 167 K; 167 K trainable, 1.3 MB in all"
    )


def test_help_lists_its_own_groups_with_descriptions():
    text = config_help(ROOT / "configs", "train", usage="usage", skip=["deploy"])
    for group in (
        "model=[",
        "data=[digits]",
        "trainer=[",
        "optimizer=[sgd]",
        "scheduler=[",
        "loss=[ce]",
        "logger=[csv]",
    ):
        assert f"\n  {group}" in text, group
    assert "+experiment=NAME" in text and "quantize" not in text and "paper_speed" not in text  # deploy's
    assert "cross-entropy with label smoothing" in text  # the defaults list's comment
    assert "trainer.max_epochs=30" in text and "seed=42" in text
    assert "seeds torch, numpy, python" in text  # a setting's comment
    deploy = config_help(ROOT / "configs" / "deploy", "deploy", usage="usage", shown_as="configs/deploy")
    assert "quantize=[none]" in deploy and "bench.batch_sizes=null" in deploy and "model=[" not in deploy


def test_runs_land_in_outputs_train_and_outputs_deploy():
    train = check_overrides(["model=repvgg_tiny"], ROOT / "configs", "train")
    deploy = check_overrides(["model=repvgg_tiny"], ROOT / "configs" / "deploy", "deploy")
    assert re.fullmatch(r"outputs/train/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", train.hydra.run.dir)
    assert re.fullmatch(r"outputs/deploy/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", deploy.hydra.run.dir)
    deploy_weights = OmegaConf.to_container(train.callbacks.deploy_check)["output_dir"]  # unresolved
    assert deploy_weights == "${paths.output_dir}/deploy_weights"  # in the run folder, named for what it holds


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "present", "absent"),
    [("train.py", "optimizer=[sgd]", "quantize="), ("deploy.py", "quantize=[none]", "optimizer=")],
)
def test_help_of_the_scripts(tmp_path, script, present, absent):
    done = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert present in done.stdout and absent not in done.stdout and "$" not in done.stdout.replace("${", "")
    assert not list(tmp_path.iterdir())  # --help makes no run folder


def test_deploy_logging_keeps_torchs_trace_records_to_themselves():
    """Configuring the `torch` logger makes its children propagate: the trace logger (DEBUG by design) must not."""
    composed = check_overrides([], ROOT / "configs" / "deploy", "deploy")
    loggers = composed.hydra.job_logging.loggers
    assert loggers["torch"].level == "WARNING"
    assert loggers["torch.__trace"].propagate is False


def test_tensorboard_is_asked_for_not_announced(tmp_path, monkeypatch):
    """The default logs CSV and says nothing about TensorBoard; logger=tensorboard without it is one clear error."""
    import train
    from repblocks.train import loggers

    with initialize_config_dir(str(train.CONFIG_DIR), version_base="1.3"):
        assert list(compose("train").logger) == ["csv"]
    monkeypatch.setattr(loggers, "_tensorboard_installed", lambda: False)
    config = compose_train(
        tmp_path, "model=repvgg_tiny", "data=fake", "logger=tensorboard", "trainer.fast_dev_run=true"
    )
    with pytest.raises(ValueError, match="logger=tensorboard needs TensorBoard: pip install tensorboard"):
        train.train(config)
