"""train.py: the real configs, composed and shrunk (tiny models, tiny data, a few steps)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import repblocks
from repblocks.datasets import DATASETS, DigitsData
from repblocks.deploy.sources import load_network
from repblocks.run_checkpoint import build_run_model, read_run_checkpoint
from repblocks.train import callbacks
from repblocks.train.checkpoint_io import AtomicCheckpointIO
from repblocks.train.run_folder import run_files
from tests.helpers import (
    ROOT,
    closed_to_unprivileged,
    compose_train,
    exit_message,
    open_to_everyone,
    read_only_dir,
    unprivileged,
    write_crafted_cifar,
)
from train import CONFIG_DIR, main, train


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


# One of each family (the tiny variants of the newer ones: fastvit, repvit, the two ghost networks, unireplknet).
FAMILIES = ["fastvit_tiny", "repvit_tiny", "repghostnet_tiny", "ghostnetv3_tiny", "unireplknet_tiny"]


@pytest.mark.parametrize("model", ["repvgg_tiny", "repvgg_tiny_g2se", "repvgg_a0", *FAMILIES])
def test_fast_dev_run_models(tmp_path, model):
    metrics = train(compose_train(tmp_path, f"model={model}", "data=fake", *FAST))
    assert metrics["global_step"] == 1
    assert not (tmp_path / "metrics.json").exists()  # fast_dev_run writes nothing


def test_fast_dev_run_digits_and_imagefolder(tmp_path):
    digits = train(compose_train(tmp_path / "digits", "model=repvgg_tiny", "data=digits", *FAST))
    root = write_image_folder(tmp_path / "images")
    overrides = [
        "model=repvgg_tiny",
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=32",
        "data.num_workers=0",
    ]
    folder = train(compose_train(tmp_path / "folder", *overrides, "data.batch_size=4", *FAST))
    assert digits["global_step"] == folder["global_step"] == 1  # one batch of real images each, trained on


@pytest.mark.skipif(not os.environ.get("CIFAR10_ROOT"), reason="set CIFAR10_ROOT to a folder with cifar-10-batches-py")
def test_fast_dev_run_cifar10(tmp_path):
    overrides = ["data=cifar10", f"data.root={os.environ['CIFAR10_ROOT']}", "data.num_workers=0"]
    metrics = train(compose_train(tmp_path, "model=repvgg_tiny", *overrides, *FAST))
    assert metrics["global_step"] == 1


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
        ["ema_decay=null", "channels_last=true"],  # EMA is the default: the raw weights here
        ["+experiment=mixup"],
        ["optimizer=adamw", "scheduler=constant"],
    ],
    ids=["rdrop", "rep_l2", "no ema+channels_last", "mixup", "adamw"],
)
def test_recipe_options_run(tmp_path, overrides):
    """One short epoch each, so the deploy check also runs on what the option checkpoints (EMA weights...)."""
    metrics = train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1", *overrides))
    assert math.isfinite(metrics["val_acc"]) and metrics["global_step"] == 4
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_err"] < 1e-4


@pytest.mark.slow
def test_a_large_kernel_model_trains_and_its_deploy_form_agrees(tmp_path):
    """UniRepLKNet: dilated branches and an FFN whose BN and layer scale fold; the run's deploy check says all agree."""
    metrics = train(compose_train(tmp_path, "model=unireplknet_tiny", "data=fake", "trainer.max_epochs=1"))
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
    assert hparams["preprocessing"] == DigitsData().preprocessing  # what deployment prepares images with
    assert hparams["class_names"] == DigitsData().class_names == [str(digit) for digit in range(10)]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs" / "metrics.csv").is_file()


def test_online_block_mode_trains_and_deploys_into_the_plain_model(tmp_path):
    """`model.block_mode=online` (repblocks.online): trained, checked, and rebuilt by deployment from the checkpoint."""
    overrides = ("model=repvgg_tiny", "model.block_mode=online", "data=fake", "trainer.max_epochs=1", "rep_l2=true")
    metrics = train(compose_train(tmp_path, *overrides))
    assert metrics["top1_agreement"] == 1.0 and metrics["max_abs_err"] < 1e-4
    network = load_network(ckpt=metrics["best_ckpt"])
    assert any(type(m).__name__ == "OnlineRepBlock" for m in network.model.modules())
    plain = repblocks.load_weights(
        repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True), metrics["deploy_weights"]
    )
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images), network.model(images), atol=1e-4, rtol=1e-4)


def test_checkpoint_loads_weights_only_and_resumes(tmp_path):
    first = train(
        compose_train(tmp_path / "a", "model=repvgg_tiny", "+model.bn_eps=0.001", "data=fake", "trainer.max_epochs=1")
    )
    checkpoint = torch.load(first["last_ckpt"], map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["model_name"] == "repvgg_tiny"
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == first["global_step"] > 0
    # BatchNorm's eps is not in the weights: the checkpoint records it so its model is rebuilt as it trained.
    assert checkpoint["hyper_parameters"]["model_kwargs"]["bn_eps"] == 1e-3
    assert checkpoint["hyper_parameters"]["run_length"] == {"max_epochs": 1, "max_steps": -1}  # a bare resume's end
    rebuilt = build_run_model(read_run_checkpoint(first["last_ckpt"]))
    assert {m.eps for m in rebuilt.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    resumed = train(
        compose_train(
            tmp_path / "b",
            "model=repvgg_tiny",
            "+model.bn_eps=0.001",
            "data=fake",
            "trainer.max_epochs=2",
            f"ckpt_path={first['last_ckpt']}",
        )
    )
    assert resumed["epochs"] == 2
    assert resumed["global_step"] == 2 * first["global_step"]


class NanLoss(torch.nn.Module):
    def __init__(self, **config):  # takes (and ignores) the ce config's label_smoothing
        super().__init__()

    def forward(self, logits, target):
        return logits.sum() * float("nan")


def test_nan_loss_stops_with_the_step_and_leaves_the_folder_free(tmp_path):
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0 \(epoch 0\)"):
        train(
            compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "loss._target_=tests.test_train.NanLoss", *FAST)
        )
    # Nothing was saved, so the corrected command may run in the same folder: it is not a second run.
    assert run_files(tmp_path) == []
    assert train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", *FAST))["global_step"] == 1


def test_rdrop_without_dropout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.drop_rate"):
        train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "loss=rdrop", "model.drop_rate=0", *FAST))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=resnet9000"], "error: unknown model 'resnet9000'; available: fastvit_s12, "),
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
        (["trainer.max_epochs=0"], "error: trainer.max_epochs=0 trains nothing: set it above 0"),
        (["trainer.max_steps=0", "trainer.max_epochs=null"], "error: trainer.max_steps=0 trains nothing"),
        (["trainer.limit_train_batches=0"], "error: trainer.limit_train_batches=0 trains nothing"),
        (["data=fake", "data.num_classes=1"], "error: data.num_classes: a classifier needs at least 2 classes, got 1"),
        (["callbacks.deploy_check.atol=-1"], "error: deploy_check atol and rtol must be non-negative, got atol=-1"),
        (["trainer.max_epochs=abc"], "error: trainer.max_epochs must be an integer (default 30), got 'abc'"),
        (["rep_l2=yes"], "error: rep_l2 must be true or false (default false), got 'yes'"),
        (
            ["+model.foo=1"],
            "error: repvgg_tiny got unknown argument foo; it accepts: act, block_mode, bn_eps, deploy, drop_rate, ",
        ),
        (["+model.act=swish_it"], "error: unknown activation 'swish_it'; known activations: relu, "),
        (["model.drop_rate=1.5"], "error: drop_rate must be in [0, 1), got 1.5"),
    ],
)
def test_bad_input_is_one_line(tmp_path, overrides, message):
    """What train.py's __main__ does, in process: check the overrides, then train, under exit_on_user_error."""
    printed = exit_message(tmp_path, "model=repvgg_tiny", *overrides)
    assert printed.startswith(message), printed
    assert not (tmp_path / "config.yaml").exists()  # refused before the run started


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    printed = exit_message(taken, "model=repvgg_tiny", "data=imagefolder", "data.root=/nonexistent")
    assert printed == f"error: run folder {taken} cannot be a folder: {taken} is a file"  # before the data


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """One epoch of repvgg_tiny on fake data: a run folder and its checkpoints, shared (never modified)."""
    folder = tmp_path_factory.mktemp("tiny_run")
    return train(compose_train(folder, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1"))


def _train_py_runs(folder: Path, tiny_run: dict) -> dict[str, tuple[list[str], bool, str]]:
    """name -> (train.py arguments, run unprivileged, start of the last stderr line; "" for success)."""
    read_only_checkpoints = read_only_dir(folder / "ro_checkpoints" / "checkpoints")  # its run folder is writable
    read_only_run = read_only_dir(folder / "ro_parent" / "run")
    tiny_folder = Path(tiny_run["last_ckpt"]).parents[1]
    tiny = ["model=repvgg_tiny", "data=fake"]
    return {
        "unknown model": (["model=resnet9000"], False, "error: unknown model 'resnet9000'; available: fastvit_s12, "),
        "cifar10 without root": (["data=cifar10"], False, "error: data.root is not set"),
        # data.root does not exist: the folder check must come first, before any data is looked at.
        "read-only checkpoints/": (
            ["data=imagefolder", "data.root=/nonexistent", f"hydra.run.dir={read_only_checkpoints.parent}"],
            True,
            f"error: run folder {read_only_checkpoints} is not writable: Permission denied",
        ),
        "read-only run folder": (
            [*tiny, f"hydra.run.dir={read_only_run}"],
            True,
            f"error: run folder {read_only_run} is not writable: Permission denied",
        ),
        "another run's folder": (
            [*tiny, f"hydra.run.dir={tiny_folder}"],
            False,
            f"error: run folder {tiny_folder} already holds a run (config.yaml, checkpoints/, metrics.json): "
            "choose another folder (hydra.run.dir=...), or continue that run with ckpt_path=",
        ),
        # A checkpoint name of train.py's own, with its '=' signs, passed back as it is.
        "resume from epoch=000-val_acc=....ckpt": (
            [*tiny, "trainer.max_epochs=2", f"ckpt_path={tiny_run['best_ckpt']}"],
            False,
            "",
        ),
    }


@pytest.fixture(scope="module")
def train_py_runs(tmp_path_factory, tiny_run):
    """Every train.py command line of the tests below, run at once as separate processes."""
    folder = open_to_everyone(tmp_path_factory.mktemp("train_py"))
    home = folder / "home"  # the unprivileged user's caches (matplotlib's) go there
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    processes, results = {}, {}
    for name, (overrides, as_nobody, expected) in _train_py_runs(folder, tiny_run).items():
        if as_nobody and closed_to_unprivileged():
            results[name] = closed_to_unprivileged()  # the tests of this run skip, saying why
            continue
        run_dir = (
            [] if any(arg.startswith("hydra.run.dir=") for arg in overrides) else [f"hydra.run.dir={folder / name}"]
        )
        command = [sys.executable, str(ROOT / "train.py"), *overrides, *run_dir]
        run_env = dict(env, HOME=str(home)) if as_nobody else env
        process = subprocess.Popen(
            unprivileged(command) if as_nobody else command,
            cwd=ROOT,
            env=run_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        processes[name] = (process, expected, folder / name)
    for name, (process, expected, run_folder) in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (process.returncode, stdout, stderr, expected, run_folder)
    return folder, results


@pytest.mark.parametrize(
    "name",
    [
        "unknown model",
        "cifar10 without root",
        "read-only checkpoints/",
        "read-only run folder",
        "another run's folder",
    ],
)
def test_train_py_bad_input_exits_with_one_line(train_py_runs, name):
    folder, results = train_py_runs
    if isinstance(results[name], str):
        pytest.skip(results[name])
    returncode, stdout, stderr, expected, _ = results[name]
    assert returncode == 1, stderr
    assert stderr.strip().splitlines()[-1].startswith(expected), stderr
    assert "Traceback" not in stderr and "error:" not in stdout


def test_train_py_refuses_folders_before_writing_anything(train_py_runs, tiny_run):
    folder, results = train_py_runs
    if isinstance(results["read-only checkpoints/"], str):
        pytest.skip(results["read-only checkpoints/"])
    for name in ("read-only checkpoints/", "another run's folder"):
        assert len(results[name][2].strip().splitlines()) == 1, results[name][2]  # nothing else was printed
    assert not (folder / "ro_checkpoints" / "config.yaml").exists()
    # Refused before Hydra started: the earlier run's folder got no Hydra logs or .hydra/.
    assert not (Path(tiny_run["last_ckpt"]).parents[1] / ".hydra").exists()


def test_train_py_resumes_from_its_own_checkpoint_names_and_prints_summary(train_py_runs, tiny_run):
    _, results = train_py_runs
    returncode, stdout, stderr, _, run_folder = results["resume from epoch=000-val_acc=....ckpt"]
    assert "=" in Path(tiny_run["best_ckpt"]).name
    assert returncode == 0, stderr
    assert "best val acc" in stdout and "deploy weights:" in stdout
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * tiny_run["global_step"]
    assert Path(metrics["deploy_weights"]).is_file()


# What every run printed and told a person nothing about it: Lightning's advice, a deprecation inside it, the
# TensorBoard notice, a model summary whose FLOPs read 0, the deploy check as a raw dict, torch's trace records.
NOISE = (
    "litlogger",
    "LeafSpec",
    "ensorboard",
    "Total FLOPs",
    "deploy check: {",
    "Trainer already configured",
    "Loading `train_dataloader`",
    "torch.__trace",
)


def test_train_py_output_is_what_the_run_did(train_py_runs):
    _, results = train_py_runs
    returncode, stdout, stderr, _, run_folder = results["resume from epoch=000-val_acc=....ckpt"]
    assert returncode == 0, stderr
    for noise in NOISE:
        assert noise not in stdout + stderr, noise
    output = stdout + stderr
    assert "parameters: model (RepVGG)" in output and "deploy check on " in output  # one line each, in their place
    assert (run_folder / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_folder / "deploy_weights" / "repvgg_tiny_deploy.safetensors").is_file()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_data_files_are_one_line(tmp_path, num_workers):
    images = write_image_folder(tmp_path / "images")
    broken = images / "val" / "dog" / "1.png"
    broken.write_bytes(b"not an image")
    data = [f"data.root={images}", "data.image_size=32", "data.batch_size=4", f"data.num_workers={num_workers}"]
    printed = exit_message(tmp_path / "folder", "model=repvgg_tiny", "data=imagefolder", *data)
    # From a DataLoader worker too: one line, the file named.
    assert printed.startswith(f"error: data.root: cannot read image {broken}: cannot identify image file"), printed

    cifar = write_crafted_cifar(tmp_path / "cifar", tmp_path / "pwned")
    data = [f"data.root={cifar}", f"data.num_workers={num_workers}"]
    printed = exit_message(tmp_path / "cifar_run", "model=repvgg_tiny", "data=cifar10", *data)
    assert printed.startswith(
        f"error: data.root: CIFAR-10 in {cifar / 'cifar-10-batches-py'} is incomplete or corrupted"
    )
    assert not (tmp_path / "pwned").exists()  # the crafted pickle never ran


def _truncated(path: str, folder: Path) -> Path:
    data = Path(path).read_bytes()
    truncated = folder / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    return truncated


def _not_from_train_py(path: str, folder: Path) -> Path:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    other = folder / "plain.ckpt"
    torch.save({"state_dict": state}, other)
    return other


@pytest.mark.parametrize(
    ("overrides", "make_checkpoint", "message"),
    [
        (
            ["model=repvgg_tiny_g2se"],
            None,
            r"is a checkpoint of repvgg_tiny with num_classes=10, in_chans=3; this run builds repvgg_tiny_g2se with",
        ),
        (["data.num_classes=3"], None, r"this run builds repvgg_tiny with num_classes=3, in_chans=3"),
        (["data=digits", "data.in_chans=1"], None, r"this run builds repvgg_tiny with num_classes=10, in_chans=1"),
        (
            ["ema_decay=null"],
            None,
            r"do not fit this run's model: \d+ unexpected \(first: ema\.module\..*ema_decay=None\)$",
        ),
        ([], _truncated, r"cannot read .*truncated.ckpt: not a PyTorch checkpoint, or truncated/corrupted"),
        ([], _not_from_train_py, r"plain.ckpt is not a train.py checkpoint"),
    ],
    ids=["other model", "other num_classes", "other in_chans", "ema off", "truncated", "not train.py's"],
)
def test_resuming_from_a_checkpoint_that_does_not_fit_is_one_line(
    tiny_run, tmp_path, overrides, make_checkpoint, message
):
    checkpoint = make_checkpoint(tiny_run["last_ckpt"], tmp_path) if make_checkpoint else tiny_run["last_ckpt"]
    printed = exit_message(tmp_path / "run", "model=repvgg_tiny", "data=fake", *overrides, f"ckpt_path={checkpoint}")
    assert printed.startswith("error: ckpt_path: ") and re.search(message, printed), printed
    assert not (tmp_path / "run").exists()


def test_resuming_in_its_own_folder_continues_the_run_and_main_returns_val_acc(tmp_path, monkeypatch):
    saved = []
    save = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    tiny = ["model=repvgg_tiny", "data=fake"]
    first = train(compose_train(tmp_path, *tiny, "trainer.max_epochs=1"))
    assert "last.ckpt" in saved and Path(first["best_ckpt"]).name in saved  # every checkpoint written atomically
    printed = exit_message(tmp_path, *tiny)  # a second run into the folder, not resuming
    assert printed.startswith(f"error: run folder {tmp_path} already holds a run"), printed

    returned = main(compose_train(tmp_path, *tiny, "trainer.max_epochs=2", f"ckpt_path={first['last_ckpt']}"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 2 * first["global_step"]
    assert isinstance(returned, float) and returned == metrics["val_acc"]  # what Hydra's sweepers optimize
    logs = tmp_path / "logs"  # the first part's per-step log is kept beside the new one
    assert (logs / "metrics.csv").is_file() and (logs / f"metrics.before-step-{first['global_step']}.csv").is_file()


def with_pretrained_cfg(**kwargs) -> torch.nn.Module:
    """create_model, with a pretrained_cfg unlike ImageNet's defaults."""
    model = repblocks.create_model(**kwargs)
    model.pretrained_cfg = {
        "input_size": (3, 224, 224),
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
        "crop_pct": 0.95,
        "interpolation": "bicubic",
    }
    return model


def test_image_folder_runs_use_and_save_the_models_preprocessing(tmp_path):
    root = write_image_folder(tmp_path / "images")
    data = ["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.batch_size=4", "data.num_workers=0"]
    model = ["model=repvgg_tiny", "model._target_=tests.test_train.with_pretrained_cfg"]
    overrides = [*model, *data, "data.std=[0.25,0.25,0.25]", "trainer.max_epochs=1"]
    metrics = train(compose_train(tmp_path / "run", *overrides))
    expected = {
        "input_size": [3, 32, 32],  # the data's image size
        "mean": [0.1, 0.2, 0.3],  # the model's
        "std": [0.25, 0.25, 0.25],  # set for the data: kept
        "crop_pct": 0.95,
        "interpolation": "bicubic",
    }
    hparams = torch.load(metrics["best_ckpt"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["preprocessing"] == expected
    assert {key: hparams["data"][key] for key in ("mean", "std", "crop_pct", "interpolation")} == {
        key: expected[key] for key in ("mean", "std", "crop_pct", "interpolation")
    }  # the data config rebuilds the same images
    assert read_run_checkpoint(metrics["best_ckpt"]).preprocessing == expected
    assert read_run_checkpoint(metrics["best_ckpt"]).class_names == ["cat", "dog"]  # the class folders, in order


def test_deploy_check_compares_in_full_fp32(tmp_path, monkeypatch):
    backends = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    seen = []
    compare_forms = callbacks.compare_forms

    def recording(*args, **kwargs):
        seen.append([backend.fp32_precision for backend in backends])
        return compare_forms(*args, **kwargs)

    monkeypatch.setattr(callbacks, "compare_forms", recording)
    previous = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:  # what Ampere GPUs do by default for convs: TF32, ~1e-3 relative error
            backend.fp32_precision = "tf32"
        metrics = train(compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1"))
        after = [backend.fp32_precision for backend in backends]
    finally:
        for backend, precision in zip(backends, previous, strict=True):
            backend.fp32_precision = precision
    assert seen == [["ieee", "ieee"]] and metrics["top1_agreement"] == 1.0
    assert after == ["tf32", "tf32"]  # restored afterwards


def test_deploy_check_over_tolerance_fails_the_run(tmp_path, monkeypatch):
    switch_to_deploy = callbacks.switch_to_deploy

    def off_by_a_little(model):
        deploy = switch_to_deploy(model)
        with torch.no_grad():
            deploy.head.fc.bias += 0.1
        return deploy

    monkeypatch.setattr(callbacks, "switch_to_deploy", off_by_a_little)
    tolerance = ["callbacks.deploy_check.atol=0.01", "callbacks.deploy_check.rtol=0"]
    printed = exit_message(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1", *tolerance)
    pattern = (
        r"error: deploy check failed: the deploy form of .*\.ckpt differs from its train form by \S+ abs, .* over 32"
    )
    assert re.match(pattern, printed), printed
    assert "callbacks.deploy_check.atol=0.01 or rtol=0" in printed
    assert not (tmp_path / "deploy").exists() and not (tmp_path / "metrics.json").exists()


def test_deploy_check_without_validation_batches_says_why_it_skipped(tmp_path):
    metrics = train(
        compose_train(tmp_path, "model=repvgg_tiny", "data=fake", "trainer.max_epochs=1", "trainer.limit_val_batches=0")
    )
    assert metrics["deploy_check_skipped"] == "no validation batches to compare on (trainer.limit_val_batches=0)"
    assert "deploy_weights" not in metrics and not (tmp_path / "deploy").exists()
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


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
    # Each line once, from rank zero: the log lines (time stamp left out) repeat none, and rank 1 says nothing.
    # The run is short enough for the schedule's warning (2 steps, all warm-up), which every process meets.
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    logged = [re.sub(r"^\[[^]]*\]", "", line) for line in lines if re.match(r"^\[\d{4}-\d\d-\d\d ", line)]
    assert any("warmup_steps" in line for line in logged), "the run no longer meets a warning every process logs"
    assert len(logged) == len(set(logged)), [line for line in logged if logged.count(line) > 1]
    assert not [line for line in lines if "[rank: 1]" in line or "GLOBAL_RANK: 1" in line]


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
    deadline = time.monotonic() + 600  # a guard against a hang, not a race: the signal waits for the checkpoint
    while not any(best.glob("epoch=*.ckpt")):  # past the first epoch, however long it takes
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(
                f"train.py wrote no epoch checkpoint (exit {process.poll()}): {process.communicate()[1][-2000:]}"
            )
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


@pytest.mark.slow  # a train.py/deploy.py process, or DataLoader workers: 15-20 s on 2 busy cores
def test_a_run_folder_on_a_full_disk_is_one_line_before_training(tmp_path):
    from tests.helpers import small_disk

    with small_disk(tmp_path / "disk") as disk:
        done = run_train_py("model=repvgg_tiny", "data=digits", "trainer=cpu", f"hydra.run.dir={disk / 'run'}")
        assert done.returncode == 1
        assert (
            done.stderr.strip().splitlines()[-1].startswith(f"error: run folder {disk / 'run'}: not enough space, ")
        ), done.stderr[-2000:]
        assert "Traceback" not in done.stderr and "Epoch" not in done.stdout  # refused before the first step
        assert not (disk / "run" / "checkpoints").exists() and not (disk / "run" / "config.yaml").exists()


@pytest.mark.slow  # a train.py/deploy.py process, or DataLoader workers: 15-20 s on 2 busy cores
def test_an_error_in_the_middle_of_a_run_saves_no_checkpoint_and_prints_one_line(tmp_path, caplog):
    images = write_image_folder(tmp_path / "images", per_class=12)  # 6 validation batches of 4
    broken = images / "val" / "dog" / "10.png"  # read in the first epoch's validation, after the sanity check
    broken.write_bytes(b"not an image")
    data = [f"data.root={images}", "data.image_size=32", "data.batch_size=4", "data.num_workers=2"]
    printed = exit_message(tmp_path / "run", "model=repvgg_tiny", "data=imagefolder", "trainer.max_epochs=1", *data)
    assert printed.startswith(f"error: data.root: cannot read image {broken}"), printed
    assert "Original Traceback" not in caplog.text  # Lightning's save_on_exception message carried the worker's
    assert run_files(tmp_path / "run") == []  # no epoch=001 checkpoint or last.ckpt claims the folder
    assert not (tmp_path / "run" / "logs").exists()  # nor a log of no epoch (hparams.yaml, metrics.csv)
