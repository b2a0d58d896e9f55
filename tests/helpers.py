"""What the tests share: train.py checkpoints and configs, crafted files, commands run as an unprivileged user, a small disk.

A test module imports these from here, never from another test module.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import repblocks
from repblocks.numerics import randomize_bn_

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534
IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (B, C, H, W)


def trained_model(seed: int = 0) -> torch.nn.Module:
    """repvgg_tiny (10 classes) with random BatchNorm statistics, as after training: not an identity."""
    return randomize_bn_(repblocks.create_model("repvgg_tiny", num_classes=10), seed=seed).eval()


def accurate_model(epochs: int = 3) -> torch.nn.Module:
    """repvgg_tiny trained for a few epochs on the digits at 32x32 (3: under 2 s on 2 cores, about 90% top-1), eval mode.

    Accurate enough that an int8 model made to predict the least likely class fails any accuracy gate, and
    that agreement between exports means something.
    """
    from repblocks.datasets import DigitsData

    torch.manual_seed(0)
    data = DigitsData(image_size=32, augment=False)
    data.setup()
    images, labels = data.calibration_set.images, data.calibration_set.labels
    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels)).split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def write_checkpoint(
    path: Path, model: torch.nn.Module, *, prefix: str = "model.", data: dict | None = None, **extra
) -> Path:
    """A checkpoint in train.py's format: a Lightning checkpoint whose hyper-parameters say how to rebuild the model.

    ``extra`` hyper-parameters are added to the usual ones.
    """
    state = {prefix + key: value for key, value in model.state_dict().items()}
    state["loss.weight"] = torch.ones(10)  # the LightningModule holds more than the network
    hyper_parameters = dict(
        model_name="repvgg_tiny",
        num_classes=10,
        in_chans=3,
        image_size=32,
        model_kwargs={"drop_rate": 0.0},
        weights_prefix=prefix,
        data=data,
        **extra,
    )
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": hyper_parameters,
        "pytorch-lightning_version": "2.6.6",
        "epoch": 0,
        "global_step": 1,
    }
    torch.save(checkpoint, path)
    return path


def compose_train(output_dir: Path, *overrides: str):
    """The train config as `python train.py OVERRIDES` would see it, writing into ``output_dir``."""
    from hydra import compose, initialize_config_dir

    from repblocks.cli import quote_path_values
    from train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=quote_path_values(
                [
                    f"paths.output_dir={output_dir}",
                    "logger=csv",
                    "callbacks.progress_bar=null",
                    "trainer.accelerator=cpu",
                    "+trainer.enable_model_summary=false",
                    *overrides,
                ]
            ),
        )


def exit_message(output_dir: Path, *overrides: str) -> str:
    """What train.py's __main__ prints for a user mistake, in process: the one line Python prints before exit 1."""
    from repblocks.cli import check_overrides, exit_on_user_error, quote_path_values
    from train import CONFIG_DIR, train

    argv = quote_path_values(overrides)
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        check_overrides(argv, CONFIG_DIR, "train")
        train(compose_train(output_dir, *argv))
    printed = exit_info.value.code
    assert isinstance(printed, str) and "\n" not in printed, printed
    return printed


class PicklePayload:
    """Unpickling this runs open(marker, "w"): a stand-in for any code a crafted pickle could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_crafted_cifar(root: Path, marker: Path) -> Path:
    """A ``cifar-10-batches-py`` folder under ``root`` whose every file is a pickle that creates ``marker``."""
    payload = pickle.dumps({b"data": PicklePayload(marker), b"labels": [0]})
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]:
        (folder / name).write_bytes(payload)
    return root


def read_only_dir(path: Path) -> Path:
    """A folder that ``unprivileged()`` commands cannot write into (its parent stays writable for them)."""
    path.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o777)
    path.chmod(0o555)
    return path


def unprivileged(command: list[str]) -> list[str]:
    """``command`` run as an unprivileged user when the tests run as root, for whom file modes do not apply.

    The tests' temporary folders must then be reachable by that user: pytest's ``tmp_path`` is
    under /tmp, and its parents are opened up here.
    """
    if os.geteuid() != 0:
        return command
    reason = closed_to_unprivileged()
    if reason is not None:
        pytest.skip(reason)
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # util-linux is on every Debian; without it the caller's test cannot mean anything
        raise RuntimeError("running as root without setpriv: cannot drop privileges to test a read-only folder")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def closed_to_unprivileged() -> str | None:
    """Why an unprivileged user cannot run this checkout's Python (a clone inside ``mktemp -d``'s 0700 folder), or None."""
    if os.geteuid() != 0:
        return None
    for needed in (Path(__file__).resolve().parents[1], Path(sys.executable)):
        blocked = _closed_to_others(needed)
        if blocked is not None:
            return (
                f"{blocked} is closed to other users (mode {blocked.stat().st_mode & 0o777:o}): clone the project "
                "under a folder others can enter to run the read-only-folder checks as an unprivileged user"
            )
    return None


def open_to_everyone(path: Path) -> Path:
    """Let the unprivileged user into ``path`` and write inside it (pytest makes its temp folders 0700)."""
    for folder in [path, *path.parents]:
        if folder == Path("/tmp") or folder == folder.parent:
            break
        folder.chmod(folder.stat().st_mode | 0o777 if folder == path else folder.stat().st_mode | 0o755)
    return path


def _closed_to_others(path: Path) -> Path | None:
    """The first folder on the way to ``path`` that other users cannot enter, or None."""
    for folder in reversed(path.parents):
        if not folder.stat().st_mode & 0o001:
            return folder
    return None


@contextlib.contextmanager
def small_disk(path: Path, size: str = "2m") -> Iterator[Path]:
    """A ``size`` tmpfs mounted at ``path`` for the block; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill a disk needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def write_untrained_run(path: Path, model_name: str) -> Path:
    """A checkpoint shaped as train.py writes them (hyper-parameters, weights under ``model.``), without training."""
    model = repblocks.create_model(model_name, num_classes=10)
    hyper_parameters = {
        "model_name": model_name,
        "num_classes": 10,
        "in_chans": 3,
        "model_kwargs": {},
        "image_size": 32,
        "data": {"_target_": "repblocks.datasets.DigitsData", "image_size": 32},
        "weights_prefix": "model.",
    }
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"hyper_parameters": hyper_parameters, "state_dict": state}, path)
    return path
