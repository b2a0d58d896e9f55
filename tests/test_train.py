"""train.py: the real configs, composed and shrunk (tiny models, tiny data, a few steps)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import repblocks
from repblocks.cli import check_overrides, exit_on_user_error
from repblocks.datasets import DATASETS
from repblocks.deploy.sources import load_network
from train import CONFIG_DIR, train

ROOT = Path(__file__).resolve().parents[1]


def compose_train(output_dir: Path, *overrides: str):
    """The train config as `python train.py OVERRIDES` would see it, writing into ``output_dir``."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={output_dir}",
                "logger=csv",
                "callbacks.progress_bar=null",
                "trainer.accelerator=cpu",
                "+trainer.enable_model_summary=false",
                *overrides,
            ],
        )


def run_train_py(*overrides: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 36), color=(40 * index, 10 * i, 200)).save(folder / f"{i}.png")
    return root


FAST = ("trainer.fast_dev_run=true",)


@pytest.mark.parametrize("model", ["repvgg_tiny", "repvgg_tiny_g2se", "repvgg_a0"])
def test_fast_dev_run_models(tmp_path, model):
    metrics = train(compose_train(tmp_path, f"model={model}", "data=fake", *FAST))
    assert metrics["global_step"] == 1
    assert not (tmp_path / "metrics.json").exists()  # fast_dev_run writes nothing


def test_fast_dev_run_digits_and_imagefolder(tmp_path):
    train(compose_train(tmp_path / "digits", "model=repvgg_tiny", "data=digits", *FAST))
    root = write_image_folder(tmp_path / "images")
    overrides = [
        "model=repvgg_tiny",
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.num_workers=0",
    ]
    train(compose_train(tmp_path / "folder", *overrides, "data.batch_size=4", *FAST))


@pytest.mark.skipif(not os.environ.get("CIFAR10_ROOT"), reason="set CIFAR10_ROOT to a folder with cifar-10-batches-py")
def test_fast_dev_run_cifar10(tmp_path):
    overrides = ["data=cifar10", f"data.root={os.environ['CIFAR10_ROOT']}", "data.num_workers=0"]
    train(compose_train(tmp_path, "model=repvgg_tiny", *overrides, *FAST))


def test_every_zoo_model_and_data_module_has_a_config():
    assert sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml")) == repblocks.list_models()
    targets = {
        compose_train(Path("/tmp"), f"data={path.stem}").data._target_ for path in (CONFIG_DIR / "data").glob("*.yaml")
    }
    assert targets == {name for name in DATASETS if name.startswith("repblocks.datasets.")}


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss=rdrop"],
        ["rep_l2=true"],
        ["ema_decay=0.99", "channels_last=true"],
        ["+experiment=mixup"],
        ["optimizer=adamw", "scheduler=constant"],
    ],
    ids=["rdrop", "rep_l2", "ema+channels_last", "mixup", "adamw"],
)
def test_recipe_options_run(tmp_path, overrides):
    """One short epoch each, so the deploy check also runs on what the option checkpoints (EMA weights...)."""
    metrics = train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1", *overrides))
    assert math.isfinite(metrics["val_acc"]) and metrics["global_step"] == 4
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_err"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["compile=true"], ["trainer.precision=bf16-mixed"]], ids=["compile", "bf16"])
def test_compile_and_bf16_run(tmp_path, overrides):
    metrics = train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1", *overrides))
    assert math.isfinite(metrics["val_acc"]) and metrics["top1_agreement"] == 1.0
    checkpoint = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])  # compiled in place: same keys


def test_short_digits_run_learns_and_deploys_exactly(tmp_path):
    """Two epochs of the tiny model on the real digits: far above chance, deploy form agrees."""
    cfg = compose_train(tmp_path, "model=repvgg_tiny", "trainer.max_epochs=3", "data.batch_size=32")
    metrics = train(cfg)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    assert metrics["val_acc"] > 0.5  # chance is 0.1
    assert metrics["val_acc_deploy"] == metrics["val_acc_train_form"]
    assert metrics["top1_agreement"] == 1.0
    assert metrics["max_abs_err"] < 1e-4
    # The deploy weights load into the plain model and give the checkpoint's predictions.
    network = load_network(ckpt=metrics["best_ckpt"])
    trained, hparams = network.model, torch.load(metrics["best_ckpt"], weights_only=True)["hyper_parameters"]
    plain = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)
    repblocks.load_weights(plain, metrics["deploy_weights"])
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), trained(images), atol=1e-4, rtol=1e-4)
    assert hparams["data"]["_target_"] == "repblocks.datasets.DigitsData"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs" / "metrics.csv").is_file()


def test_checkpoint_loads_weights_only_and_resumes(tmp_path):
    first = train(compose_train(tmp_path / "a", "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1"))
    checkpoint = torch.load(first["last_ckpt"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["model_name"] == "repvgg_tiny"
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == first["global_step"] > 0
    resumed = train(
        compose_train(
            tmp_path / "b", "model=repvgg_tiny", "data=fake", "trainer.max_epochs=2", f"ckpt_path={first['last_ckpt']}"
        )
    )
    assert resumed["epochs"] == 2
    assert resumed["global_step"] == 2 * first["global_step"]


class NanLoss(torch.nn.Module):
    def __init__(self, **config):  # takes (and ignores) the ce config's label_smoothing
        super().__init__()

    def forward(self, logits, target):
        return logits.sum() * float("nan")


def test_nan_loss_stops_with_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0 \(epoch 0\)"):
        train(
            compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "loss._target_=tests.test_train.NanLoss", *FAST)
        )


def test_rdrop_without_dropout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.drop_rate"):
        train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "loss=rdrop", "model.drop_rate=0", *FAST))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=resnet9000"], "error: unknown model 'resnet9000'; available: repvgg_a0, "),
        (["data=mnist"], "error: unknown data 'mnist'; available: cifar10, digits, fake, imagefolder"),
        (["data=cifar10"], "error: data.root is not set"),
        (["data=cifar10", "data.root=/nonexistent"], "error: data.root: CIFAR-10 (cifar-10-batches-py) not found"),
        (["data=imagefolder", "data.root=/nonexistent"], "error: data.root: train/ folder not found at /nonexistent"),
        (["ckpt_path=/nonexistent.ckpt"], "error: ckpt_path: no checkpoint at /nonexistent.ckpt"),
        (["data.batch_size=0"], "error: data.batch_size must be at least 1, got 0"),
        (
            ["loss.alpha=2"],
            "error: Could not override 'loss.alpha'. To append to your config use +loss.alpha=2 (Key 'alpha' is not in struct)",
        ),
        (["seed"], "error: Error parsing override 'seed'"),
        (["+experiment=nope"], "error: unknown experiment 'nope'; available: imagenet_repvgg, mixup"),
    ],
)
def test_bad_input_is_one_line(tmp_path, overrides, message):
    """What train.py's __main__ does, in process: check the overrides, then train, under exit_on_user_error."""
    argv = ["model=repvgg_tiny", *overrides]
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        check_overrides(argv, CONFIG_DIR, "train")
        train(compose_train(tmp_path, *argv))
    printed = exit_info.value.code  # what Python prints to stderr before exiting with status 1
    assert isinstance(printed, str) and printed.startswith(message) and "\n" not in printed, printed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=resnet9000"], "error: unknown model 'resnet9000'; available: repvgg_a0, "),
        (["data=cifar10"], "error: data.root is not set"),
    ],
)
def test_train_py_bad_input_exits_with_one_line(tmp_path, overrides, message):
    result = run_train_py(*overrides, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr and "error:" not in result.stdout


def test_train_py_prints_summary(tmp_path):
    result = run_train_py("model=repvgg_tiny", "data=fake", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "best val acc" in result.stdout and "deploy weights:" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert Path(metrics["deploy_weights"]).is_file()


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    result = run_train_py(
        "model=repvgg_tiny",
        "data=fake",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # 64 fake images, batch 16, two processes: each process takes 2 of the 4 batches.
    assert metrics["global_step"] == 2
    assert metrics["top1_agreement"] == 1.0


@pytest.mark.slow
def test_sigterm_keeps_a_usable_last_checkpoint(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "model=repvgg_tiny",
            "trainer.max_epochs=1000",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    best = tmp_path / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(best.glob("epoch=*.ckpt")) and time.monotonic() < deadline:  # past the first epoch
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "interrupted" in stderr and "ckpt_path=" in stderr
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] > 0
    resumed = train(
        compose_train(
            tmp_path / "resumed",
            "model=repvgg_tiny",
            f"trainer.max_epochs={checkpoint['epoch'] + 2}",
            f"ckpt_path={last}",
        )
    )
    assert resumed["global_step"] > checkpoint["global_step"]
