"""int8 for weights from anywhere (``quantize.validation=DIR``), and the warning when fp32 is near chance.

A bare weights file names no data set: the gate reads a labelled folder (ImageFolder layout) made
here, whose class folders map to outputs by one rule a case. Accuracies are forced (the accuracy
functions are replaced): the tests assert what is reported and refused, never what a CPU's int8
kernels make of a model.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

import repblocks
from repblocks.datasets import DigitsData, FakeData
from repblocks.deploy import quantize
from repblocks.deploy.engines import openvino
from repblocks.deploy.labelled_folder import class_indices, validation_folder
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.errors import UserError
from repblocks.int8 import near_chance
from repblocks.numerics import randomize_bn_
from repblocks.train import qat
from repblocks.train.data import ClassificationDataModule
from repblocks.train.report import summary as _summary
from repblocks.train.report import val_acc_measured_on as _val_acc_measured_on
from tests.helpers import ROOT, compose_train, write_untrained_run
from train import train

NO_BENCH = {"device": "cpu", "batch_sizes": []}
ANY_DROP = {"max_drop": 100.0}
ORT = {"precision": "int8", "engines": ["onnxruntime"], "worst_layers": 0}


def _write_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    """``root/<class>/<i>.png``: flat-colour 40x36 images, a colour per class."""
    from PIL import Image

    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((36, 40, 3), (40 * index, 30 * i, 200), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


def _weights(path: Path, num_classes: int) -> Path:
    """A bare state dict of repvgg_tiny: what official or timm weights look like to deploy.py (no data set named)."""
    torch.save(randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=num_classes), seed=0).state_dict(), path)
    return path


def _deploy(tmp_path: Path, weights: Path, **quantize_settings) -> dict:
    config = {
        "ckpt": str(weights),
        "model": "repvgg_tiny",
        "out_dir": str(tmp_path / "out"),
        "bench": NO_BENCH,
        "export": {"formats": []},
        "quantize": {**ORT, **quantize_settings},
    }
    return run_deploy(DeployConfig.from_dict(config))


@pytest.fixture
def forced_top1(monkeypatch):
    """Force fp32's top-1 and int8's (in percent); record the labels the gate scored."""
    labels_seen = []

    def force(fp32: float, int8: float) -> None:
        monkeypatch.setattr(quantize.Gate, "fp32_top1", property(lambda self: fp32))

        def int8_top1(logits, labels):
            labels_seen.append(labels.clone())
            return int8

        monkeypatch.setattr(quantize, "_top1", int8_top1)

    force.labels = labels_seen
    return force


# -- class folders -> outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classes", "num_classes", "names", "expected", "rule"),
    [
        (["cat", "dog", "fox"], 3, None, [0, 1, 2], "sorted folder names"),
        (["0", "207", "999"], 1000, None, [0, 207, 999], "the number is the output index"),
        (["0", "1", "2"], 3, None, [0, 1, 2], "the number is the output index"),
        (["n02", "n07"], 10, [f"n{i:02d}" for i in range(10)], [2, 7], "quantize.class_names"),
    ],
)
def test_class_folders_map_to_outputs_by_one_rule(classes, num_classes, names, expected, rule):
    mapping = class_indices(classes, num_classes, class_names=names)
    assert [mapping.indices[name] for name in classes] == expected and rule in mapping.rule


@pytest.mark.parametrize(
    ("classes", "num_classes", "names", "message"),
    [
        (["cat", "dog"], 1000, None, "holds 2 named class folders (first: 'cat'), but the model has 1000 outputs"),
        (["0", "cat"], 10, None, "mixes numbered class folders ('0') with named ones ('cat')"),
        (["3", "12"], 10, None, "has class folder '12', but the model has only 10 outputs (0..9)"),
        ([str(i) for i in sorted(map(str, range(11)))], 11, None, "is not their numeric order"),
        (["n01", "n99"], 3, ["n00", "n01", "n02"], "has class folder 'n99', which quantize.class_names does not list"),
    ],
)
def test_class_folders_that_cannot_be_mapped_are_refused_in_one_line(classes, num_classes, names, message):
    with pytest.raises(UserError, match=f"^quantize.validation: .*{__import__('re').escape(message)}") as err:
        class_indices(classes, num_classes, class_names=names)
    assert "\n" not in str(err.value)


# -- the gate on a folder ------------------------------------------------------------------------------------


def test_bare_weights_are_quantized_and_gated_on_a_labelled_folder(tmp_path, forced_top1, caplog):
    weights = _weights(tmp_path / "w.pth", num_classes=3)
    validation = _write_folder(tmp_path / "val", ["cat", "dog", "fox"])
    calibration = _write_folder(tmp_path / "calibration", ["any"], per_class=3)  # unlabelled: one folder is enough
    forced_top1(fp32=90.0, int8=89.5)
    with caplog.at_level(logging.INFO, logger="repblocks"):
        report = _deploy(tmp_path, weights, validation=str(validation), calibration=str(calibration))
    evaluation = report["int8"]["evaluation"]
    assert evaluation["source"] == str(validation) and evaluation["images"] == 6 and evaluation["classes"] == 3
    assert evaluation["class_mapping"] == "sorted folder names -> outputs 0..N-1"
    assert evaluation["preprocessing"].startswith("shorter side to 32 (bilinear), centre crop 32x32, mean [0.485")
    assert "the model's pretrained_cfg" in evaluation["preprocessing"]
    assert evaluation["near_chance"] is None and report["int8"]["calibration"]["source"] == str(calibration)
    assert torch.equal(forced_top1.labels[0], torch.tensor([0, 0, 1, 1, 2, 2]))  # cat, dog, fox: sorted
    assert report["int8"]["engines"]["onnxruntime"]["passed"]
    written = (tmp_path / "out" / "report.md").read_text()
    assert f"- gated on 6 images of {validation}; classes: sorted folder names" in written
    assert f"gating on 6 validation images of {validation}" in caplog.text
    assert "WARNING" not in written and "near chance" not in caplog.text


def test_numbered_folders_are_output_indices_and_eval_images_draws_from_them(tmp_path, forced_top1):
    weights = _weights(tmp_path / "w.pth", num_classes=10)
    validation = _write_folder(tmp_path / "val", ["2", "7"], per_class=3)
    forced_top1(fp32=90.0, int8=90.0)
    settings = {"validation": str(validation), "calibration": str(validation), "eval_images": 4, **ANY_DROP}
    evaluation = _deploy(tmp_path, weights, **settings)["int8"]["evaluation"]
    assert evaluation["images"] == 4 and evaluation["images_in_folder"] == 6
    assert set(forced_top1.labels[0].tolist()) <= {2, 7} and len(forced_top1.labels[0]) == 4


def test_wnid_folders_map_through_the_class_names_file(tmp_path, forced_top1):
    weights = _weights(tmp_path / "w.pth", num_classes=10)
    validation = _write_folder(tmp_path / "val", ["n03", "n05"])
    names = tmp_path / "synsets.txt"
    names.write_text("".join(f"n{i:02d}\n" for i in range(10)))
    forced_top1(fp32=90.0, int8=90.0)
    settings = {"validation": str(validation), "calibration": str(validation), "class_names": str(names)}
    evaluation = _deploy(tmp_path, weights, **settings)["int8"]["evaluation"]
    assert evaluation["class_mapping"] == "folder names looked up in quantize.class_names"
    assert torch.equal(forced_top1.labels[-1], torch.tensor([3, 3, 5, 5]))


def test_a_failed_gate_on_a_folder_names_it_and_writes_nothing(tmp_path, forced_top1):
    weights = _weights(tmp_path / "w.pth", num_classes=3)
    validation = _write_folder(tmp_path / "val", ["cat", "dog", "fox"])
    forced_top1(fp32=90.0, int8=50.0)
    with pytest.raises(UserError, match=f"on 6 validation images of {validation}; nothing was written"):
        _deploy(tmp_path, weights, validation=str(validation), calibration=str(validation))
    assert not (tmp_path / "out").exists()


def test_preprocessing_settings_replace_the_models_for_the_gate_and_the_exports(tmp_path, forced_top1):
    weights = _weights(tmp_path / "w.pth", num_classes=3)
    validation = _write_folder(tmp_path / "val", ["cat", "dog", "fox"])
    forced_top1(fp32=90.0, int8=90.0)
    config = {
        "ckpt": str(weights),
        "model": "repvgg_tiny",
        "out_dir": str(tmp_path / "out"),
        "bench": NO_BENCH,
        "export": {"formats": []},
        "preprocessing": {"input_size": 24, "crop_pct": 0.75, "mean": None},
        "quantize": {**ORT, "validation": str(validation), "calibration": str(validation)},
    }
    report = run_deploy(DeployConfig.from_dict(config))
    assert report["preprocessing"]["input_size"] == [3, 24, 24] and report["preprocessing"]["crop_pct"] == 0.75
    assert report["preprocessing"]["source"]["input_size"] == "deploy.py's preprocessing settings"
    assert report["preprocessing"]["source"]["mean"] == "the model's pretrained_cfg"  # None: left as it was
    assert report["int8"]["evaluation"]["preprocessing"].startswith("shorter side to 32 (bilinear), centre crop 24x24")
    with pytest.raises(UserError, match="unknown setting preprocessing.size; known: input_size, mean"):
        DeployConfig.from_dict({**config, "preprocessing": {"size": 24}})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "names no data set: pass quantize.validation=DIR (one subfolder of images per class) and "),
        ({"validation": "{val}"}, "names no data set: pass quantize.calibration=DIR (a folder of images, unlabelled"),
        ({"validation": "/nonexistent/val"}, "quantize.validation: /nonexistent/val is not a folder of images"),
        (
            {"class_names": "/nonexistent/names.txt"},
            "quantize.class_names maps the class folders of quantize.validation",
        ),
    ],
)
def test_without_labelled_images_int8_says_what_to_pass(tmp_path, settings, message):
    weights = _weights(tmp_path / "w.pth", num_classes=3)
    validation = _write_folder(tmp_path / "val", ["cat", "dog", "fox"])
    settings = {key: value.format(val=validation) for key, value in settings.items()}
    with pytest.raises(UserError, match=__import__("re").escape(message)) as err:
        _deploy(tmp_path, weights, **settings)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


# -- near chance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top1", "num_classes", "near"),
    [(10.0, 10, True), (19.9, 10, True), (20.0, 10, False), (55.0, 2, True), (60.0, 2, False), (0.15, 1000, True)],
)
def test_near_chance_is_under_twice_chance_and_within_ten_points(top1, num_classes, near):
    assert (near_chance(top1, num_classes) is not None) == near


def test_the_int8_gate_warns_when_fp32_is_near_chance(tmp_path, forced_top1, caplog):
    """35% on 3 classes (chance 33.33%); 90% is not warned about (test_bare_weights_are_quantized_and_gated...)."""
    weights = _weights(tmp_path / "w.pth", num_classes=3)
    validation = _write_folder(tmp_path / "val", ["cat", "dog", "fox"])
    forced_top1(fp32=35.0, int8=35.0)  # int8 keeps fp32's top-1 exactly: the gate passes
    with caplog.at_level(logging.WARNING, logger="repblocks"):
        report = _deploy(tmp_path, weights, validation=str(validation), calibration=str(validation))
    evaluation = report["int8"]["evaluation"]
    assert report["int8"]["engines"]["onnxruntime"]["passed"]
    assert evaluation["chance_top1"] == pytest.approx(100 / 3)
    assert evaluation["near_chance"].startswith("fp32 top-1 35.00% is near chance (33.33% for 3 classes")
    assert f"- WARNING: {evaluation['near_chance']}" in (tmp_path / "out" / "report.md").read_text()
    assert "int8 gate: fp32 top-1 35.00% is near chance" in caplog.text


def test_the_qat_summary_warns_when_fp32_is_near_chance():
    metrics = {"fast_dev_run": True, "top1": {"fp32": 10.0, "ptq_int8": 11.11}, "val_images": 360}
    assert "WARNING" not in qat.summary(metrics)
    metrics["near_chance"] = near_chance(10.0, 10)
    assert qat.summary(metrics).splitlines()[-1] == f"WARNING: {metrics['near_chance']}"


# -- the end-of-training summary -----------------------------------------------------------------------------


def _trainer(*, processes: int, images: int, precision: str = "32-true", limit=1.0, sampler=None) -> SimpleNamespace:
    data = SimpleNamespace(val_set=range(images))
    return SimpleNamespace(
        world_size=processes,
        datamodule=SimpleNamespace(data=data),
        val_dataloaders=SimpleNamespace(sampler=sampler),
        limit_val_batches=limit,
        precision=precision,
    )


def test_the_training_summary_says_what_each_accuracy_is_measured_on():
    once = UnrepeatedDistributedSampler(range(33), num_replicas=2, rank=0, shuffle=False)
    ddp = _val_acc_measured_on(_trainer(processes=2, images=33, precision="bf16-mixed", sampler=once), best=True)
    assert ddp == (
        "Lightning's val_acc of the best epoch, over 2 processes sharing the 33 validation images, each image once, "
        "at precision bf16-mixed"
    )
    repeated = DistributedSampler(range(33), num_replicas=2, rank=0, shuffle=False)
    assert "some images counted twice by DDP's sampler" in _val_acc_measured_on(
        _trainer(processes=2, images=33, sampler=repeated), best=True
    )
    assert _val_acc_measured_on(_trainer(processes=1, images=32, limit=2), best=False) == (
        "Lightning's val_acc of the last epoch, over the 32 validation images, "
        "limited to trainer.limit_val_batches=2 per process"
    )
    metrics = {
        "val_acc": 0.1721,
        "val_acc_measured_on": ddp,
        "val_acc_train_form": 0.1694,
        "val_acc_deploy": 0.1694,
        "top1_agreement": 1.0,
        "max_abs_err": 1e-6,
        "deploy_check_images": 33,
        "epochs": 2,
        "global_step": 10,
        "train_time_s": 5.0,
        "best_ckpt": "best.ckpt",
        "deploy_weights": "deploy.safetensors",
    }
    lines = _summary(metrics).splitlines()
    assert lines[0] == f"best val acc 17.21% ({ddp})"
    assert lines[1] == (
        "deploy check on 33 validation images, float32, one process: train form 16.94%, deploy form 16.94% "
        "(top-1 agreement 100.00%, max |logit diff| 1.00e-06)"
    )


@pytest.mark.slow
@pytest.mark.skipif(openvino.missing() is not None, reason="the [openvino] extra is not installed")
def test_a_qat_run_warns_when_fp32_is_near_chance(tmp_path, monkeypatch, caplog):
    """A fast_dev_run of QAT on an untrained run, its top-1 forced to chance: the log, the metrics and the summary say so."""
    run = write_untrained_run(tmp_path / "last.ckpt", "qarepvgg_tiny")
    monkeypatch.setattr(qat, "top1", lambda logits, labels: 10.0)
    overrides = (f"qat.init={run}", "qat.calibration_images=1", "trainer.fast_dev_run=true")
    with caplog.at_level(logging.WARNING, logger="repblocks"):
        metrics = train(compose_train(tmp_path / "out", "model=qarepvgg_tiny", "+experiment=qat", *overrides))
    assert metrics["near_chance"].startswith("fp32 top-1 10.00% is near chance (10.00% for 10 classes")
    assert "qat: fp32 top-1 10.00% is near chance" in caplog.text
    assert qat.summary(metrics).splitlines()[-1] == f"WARNING: {metrics['near_chance']}"


@pytest.mark.parametrize(
    ("data", "batches"),
    [
        (FakeData(val_size=33, batch_size=16), 3),  # images shared out one by one: 17 and 16
        (DigitsData(batch_size=50), 8),  # in-memory batches shared out whole: 4 and 4
    ],
)
def test_under_ddp_each_process_validates_its_share_each_image_once(data, batches):
    """Lightning's default sampler would repeat images (the digits': a whole batch) to give each process as many."""
    data.setup("validate")
    every = torch.cat([labels for _, labels in data.val_dataloader()])
    shares = []
    for rank in (0, 1):
        module = ClassificationDataModule(data)
        module.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = module.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)  # Lightning leaves it in place
        shares.append(torch.cat([labels for _, labels in loader]))
    assert len(shares[0]) + len(shares[1]) == len(every) == len(data.val_set)
    assert torch.equal(torch.cat(shares).bincount(), every.bincount())
    assert len(data.val_dataloader()) == batches


@pytest.mark.slow
def test_a_ddp_runs_val_acc_is_the_deploy_checks_train_form(tmp_path):
    """33 images on 2 processes: Lightning's default sampler would have counted one twice (k/34 against k/33)."""
    overrides = ["model=repvgg_tiny", "data=fake", "data.val_size=33", "trainer=ddp", "trainer.accelerator=cpu"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["deploy_check_images"] == 33
    assert metrics["val_acc"] == pytest.approx(metrics["val_acc_train_form"])
    assert "sharing the 33 validation images, each image once" in metrics["val_acc_measured_on"]
    assert (
        f"best val acc {100 * metrics['val_acc']:.2f}% at epoch {metrics['best_epoch']} (Lightning's val_acc"
        in result.stdout
    )


def test_a_validation_folder_without_class_folders_is_one_line(tmp_path):
    flat = _write_folder(tmp_path / "images", ["cat"]) / "cat"  # images, but no class folders
    preprocessing = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    preprocessing["interpolation"] = "bilinear"
    with pytest.raises(UserError, match=f"^quantize.validation: {flat}: .*expected DIR/<class>/<image>") as err:
        validation_folder(flat, preprocessing=preprocessing, num_classes=3)
    assert "\n" not in str(err.value)
    loader, info = validation_folder(tmp_path / "images", preprocessing=preprocessing, num_classes=1)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 0] and info["images"] == 2
