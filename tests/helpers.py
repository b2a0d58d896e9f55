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


def read_tflite_standard_metadata(path: Path) -> dict | None:
    """The ``TFLITE_METADATA`` entry of a ``.tflite`` as TFLite's metadata convention defines it, or None without one.

    Read field by field at the slots of ``metadata_schema.fbs`` (tflite-support's schema: ModelMetadata
    name 0, description 1, subgraph_metadata 3; SubGraphMetadata input 2, output 3; TensorMetadata
    content 3, process_units 4, associated_files 6; ...) with flatbuffers' generic table reader, not
    with the writer's code: what any reader of the convention would find.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers.table import Table

    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    entries = {model.Metadata(i).Name(): model.Metadata(i).Buffer() for i in range(model.MetadataLength())}
    if b"TFLITE_METADATA" not in entries:
        return None
    buffer = model.Buffers(entries[b"TFLITE_METADATA"]).DataAsNumpy().tobytes()

    def offset(table, slot):
        return table.Offset(4 + 2 * slot)

    def string(table, slot):
        found = offset(table, slot)
        return table.String(found + table.Pos).decode() if found else None

    def byte(table, slot):
        found = offset(table, slot)
        return table.Get(flatbuffers.number_types.Uint8Flags, found + table.Pos) if found else 0

    def sub(table, slot):
        found = offset(table, slot)
        return Table(table.Bytes, table.Indirect(found + table.Pos)) if found else None

    def tables(table, slot):
        found = offset(table, slot)
        if not found:
            return []
        start = table.Vector(found)
        return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(found))]

    def floats(table, slot):
        found = offset(table, slot)
        start = table.Vector(found)
        return [table.Get(flatbuffers.number_types.Float32Flags, start + 4 * i) for i in range(table.VectorLen(found))]

    assert buffer[4:8] == b"M001", "not a ModelMetadata flatbuffer (identifier M001)"
    root = Table(buffer, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buffer, 0))
    (subgraph,) = tables(root, 3)
    (image,), (logits,) = tables(subgraph, 2), tables(subgraph, 3)
    units = tables(image, 4)
    normalization = [sub(unit, 1) for unit in units if byte(unit, 0) == 1]  # ProcessUnitOptions.NormalizationOptions
    content = sub(image, 3)
    return {
        "name": string(root, 0),
        "description": string(root, 1),
        "min_parser_version": string(root, 7),
        "input_content": byte(content, 0),  # ContentProperties: 2 ImageProperties
        "color_space": byte(sub(content, 1), 0),  # ColorSpaceType: 1 RGB, 2 GRAYSCALE
        "mean": floats(normalization[0], 0) if normalization else None,
        "std": floats(normalization[0], 1) if normalization else None,
        "output_files": [(string(f, 0), byte(f, 2)) for f in tables(logits, 6)],  # type 2: TENSOR_AXIS_LABELS
    }
