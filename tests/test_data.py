"""Data modules: the embedded digits split, batch augmentation, and clear errors for missing data."""

import subprocess
import sys

import pytest
import torch

from repblocks.data import (
    DATAMODULES,
    Cifar10DataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
    RandomAffineBatch,
    build_datamodule,
)


def test_digits_split_is_stratified_fixed_and_complete():
    first, second = DigitsDataModule(), DigitsDataModule()
    first.setup(), second.setup()
    assert len(first.train_set) + len(first.val_set) == 1797
    assert torch.equal(first.val_set.labels, second.val_set.labels)
    counts = torch.bincount(first.val_set.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    images, labels = next(iter(first.val_dataloader()))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1


def test_digits_train_batches_are_augmented_val_batches_are_not():
    data = DigitsDataModule(image_size=16, in_chans=1, batch_size=1437)
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
    data = build_datamodule({"_target_": "repblocks.data.FakeDataModule", "num_classes": 3, "image_size": 16})
    data.setup()
    images, labels = next(iter(data.val_dataloader()))
    assert isinstance(data, FakeDataModule) and images.shape[1:] == (3, 16, 16) and labels.max() < 3
    assert set(DATAMODULES) == {
        f"repblocks.data.{cls.__name__}"
        for cls in (DigitsDataModule, Cifar10DataModule, ImageFolderDataModule, FakeDataModule)
    }


def test_rebuild_refuses_targets_outside_the_table():
    with pytest.raises(ValueError, match="unknown data module 'os.system'; known: repblocks.data.DigitsDataModule"):
        build_datamodule({"_target_": "os.system", "command": "echo hi"})


def test_missing_data_roots_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        Cifar10DataModule(root=None)
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py\) not found at .*pass data.download=true"):
        Cifar10DataModule(root=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/ folder at .* is empty"):
        ImageFolderDataModule(root=tmp_path)
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "x.png").touch()
    with pytest.raises(FileNotFoundError, match="val/ folder not found"):
        ImageFolderDataModule(root=tmp_path)


@pytest.mark.parametrize("bad", [{"image_size": 4}, {"batch_size": 0}, {"val_fraction": 1.0}])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DigitsDataModule(**bad)


def test_library_never_imports_hydra():
    code = (
        "import sys, pkgutil, importlib, repblocks\n"
        "for module in pkgutil.walk_packages(repblocks.__path__, 'repblocks.'):\n"
        "    importlib.import_module(module.name)\n"
        "assert not [name for name in sys.modules if name.split('.')[0] in ('hydra', 'omegaconf')], 'hydra imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
