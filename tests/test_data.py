"""Data sets: the embedded digits split, batch augmentation, rebuilding from a saved config, and clear errors for missing data."""

import pytest
import torch

from repblocks.datasets import (
    DATASETS,
    Cifar10Data,
    DigitsData,
    FakeData,
    ImageFolderData,
    RandomAffineBatch,
    build_data,
)


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
