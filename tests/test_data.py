"""Data sets: the embedded digits split, batch augmentation, rebuilding from a saved config, and clear errors for missing data."""

import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from repblocks.cli import one_line
from repblocks.datasets import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Cifar10Data,
    DigitsData,
    FakeData,
    ImageFolderData,
    RandomAffineBatch,
    build_data,
)
from tests.helpers import write_crafted_cifar


def test_digits_split_is_stratified_fixed_and_complete():
    first, second = DigitsData(), DigitsData()
    first.setup(), second.setup()
    assert len(first.train_set) + len(first.val_set) == 1797
    assert torch.equal(first.val_set.labels, second.val_set.labels)
    counts = torch.bincount(first.val_set.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    images, labels = next(iter(first.val_dataloader()))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1


def test_digits_train_batches_are_augmented_val_batches_are_not():
    data = DigitsData(image_size=16, in_chans=1, batch_size=1437)
    data.setup()
    first, _ = next(iter(data.train_dataloader()))
    assert first.shape == (1437, 1, 16, 16)
    val_a, _ = next(iter(data.val_dataloader()))
    val_b, _ = next(iter(data.val_dataloader()))
    assert torch.equal(val_a, val_b)
    sorted_train = data.train_set.images[data.train_set.labels.argsort(stable=True)]
    assert not torch.equal(first.sort(0).values, sorted_train.sort(0).values)


def test_random_affine_batch_identity_and_fill():
    images = torch.rand(4, 3, 12, 12)
    identity = RandomAffineBatch(degrees=0, translate=0, scale=(1, 1))
    torch.testing.assert_close(identity(images), images, atol=1e-5, rtol=0)
    shifted = RandomAffineBatch(degrees=0, translate=0, scale=(0.5, 0.5), fill=-1.0)(torch.zeros(1, 1, 8, 8))
    assert shifted[0, 0, 4, 4] == 0 and shifted[0, 0, 0, 0] == -1  # zoomed out: the border shows the fill


def test_fake_data_and_rebuild_from_config():
    data = build_data({"_target_": "repblocks.datasets.FakeData", "num_classes": 3, "image_size": 16})
    data.setup()
    images, labels = next(iter(data.val_dataloader()))
    assert isinstance(data, FakeData) and images.shape[1:] == (3, 16, 16) and labels.max() < 3
    # Checkpoints written before the library was split into packages name the old classes.
    assert isinstance(build_data({"_target_": "repblocks.data.DigitsDataModule"}), DigitsData)
    assert set(DATASETS.values()) == {DigitsData, Cifar10Data, ImageFolderData, FakeData}


def test_rebuild_refuses_targets_outside_the_table():
    with pytest.raises(ValueError, match="unknown data set 'os.system'; known: repblocks.datasets.DigitsData"):
        build_data({"_target_": "os.system", "command": "echo hi"})


def test_missing_data_roots_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        Cifar10Data(root=None)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py\) not found at .*pass data.download=true"):
        Cifar10Data(root=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/ folder at .* is empty"):
        ImageFolderData(root=tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "x.png").touch()
    with pytest.raises(FileNotFoundError, match="val/ folder not found"):
        ImageFolderData(root=tmp_path)


@pytest.mark.parametrize("bad", [{"image_size": 4}, {"batch_size": 0}, {"val_fraction": 1.0}])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DigitsData(**bad)


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 2, color=(200, 100, 50)) -> Path:
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 36), color=color).save(folder / f"{i}.png")
    return root


def test_each_data_set_says_how_it_prepares_images(tmp_path):
    digits = DigitsData(image_size=16, in_chans=1).preprocessing
    assert digits == {
        "input_size": [1, 16, 16],
        "mean": [0.5],
        "std": [0.5],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    assert FakeData(image_size=24).preprocessing["input_size"] == [3, 24, 24]
    folder = ImageFolderData(root=write_image_folder(tmp_path), image_size=32).preprocessing
    assert folder == {
        "input_size": [3, 32, 32],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }  # nothing set, no model: ImageNet's


def test_image_folder_takes_open_settings_from_the_model(tmp_path):
    root = write_image_folder(tmp_path)
    model_cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9, "interpolation": "bicubic"}
    data = ImageFolderData(root=root, image_size=32, std=[0.25, 0.25, 0.25], batch_size=4, num_workers=0)
    data.use_model_preprocessing(model_cfg)
    assert data.preprocessing == {
        "input_size": [3, 32, 32],
        "mean": [0.1, 0.2, 0.3],  # the model's
        "std": [0.25, 0.25, 0.25],  # set for the data: kept
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    }
    data.setup()
    images, _ = next(iter(data.val_dataloader()))
    # A plain (200, 100, 50) image, normalized with the model's mean and the data's std.
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor([0.1, 0.2, 0.3])) / 0.25
    torch.testing.assert_close(images[0, :, 16, 16], expected, atol=1e-5, rtol=0)
    # Checkpoints written before crop_pct was named so still rebuild.
    old = build_data({"_target_": "repblocks.datasets.ImageFolderData", "root": str(root), "crop_fraction": 0.5})
    assert old.preprocessing["crop_pct"] == 0.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mean": [0.5, 0.5]}, r"data.mean must be 3 numbers"),
        ({"std": [0.5, 0.0, 0.5]}, r"data.std must be positive"),
        ({"crop_pct": 1.5}, r"data.crop_pct must be a fraction in \(0, 1\]"),
        ({"interpolation": "cubic"}, r"data.interpolation must be one of nearest, .*bicubic.*; got 'cubic'"),
    ],
)
def test_bad_preprocessing_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        ImageFolderData(root=write_image_folder(tmp_path), **settings)


def test_a_classifier_needs_two_classes(tmp_path):
    with pytest.raises(ValueError, match=r"holds \['cat'\]: a classifier needs at least 2 classes, got 1"):
        ImageFolderData(root=write_image_folder(tmp_path, classes=("cat",)))
    with pytest.raises(ValueError, match="data.num_classes: a classifier needs at least 2 classes, got 1"):
        FakeData(num_classes=1)


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # workers: 5 s to start and stop
def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path, num_workers):
    root = write_image_folder(tmp_path)
    broken = root / "val" / "dog" / "1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a png")
    data = ImageFolderData(root=root, image_size=32, batch_size=4, num_workers=num_workers)
    data.setup()
    with pytest.raises(ValueError) as raised:
        list(data.val_dataloader())
    assert one_line(raised.value).startswith(f"data.root: cannot read image {broken}: cannot identify image file")


def test_crafted_cifar_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    root = write_crafted_cifar(tmp_path / "data", marker)
    pickle.loads((root / "cifar-10-batches-py" / "test_batch").read_bytes())[b"data"].close()
    assert marker.exists()  # the payload does run when unpickled ...
    marker.unlink()
    with pytest.raises(
        ValueError, match=r"CIFAR-10 in .* is incomplete or corrupted: .*\(MD5 check\); nothing was unp"
    ):
        Cifar10Data(root=root, num_workers=0).setup()
    assert not marker.exists()  # ... and torchvision's MD5 check kept it from being unpickled


@pytest.mark.parametrize("root", ["~/nowhere", "'~/nowhere'"])
def test_a_data_root_under_home_is_read_quoted_or_not(tmp_path, monkeypatch, root):
    """Hydra's grammar has no unquoted '~': train.py quotes it, and the data set expands it."""
    from tests.helpers import exit_message

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    printed = exit_message(tmp_path / "run", "model=repvgg_tiny", "data=imagefolder", f"data.root={root}")
    assert printed.startswith(f"error: data.root: train/ folder not found at {tmp_path}/home/nowhere/train")
