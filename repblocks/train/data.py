"""The Lightning side of the data: a LightningDataModule around any :mod:`repblocks.datasets` data set.

The data sets themselves are plain torch and live in the core, because deployment reads the same
validation images to verify a converted model; Lightning only needs its hooks.
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from repblocks.datasets import ClassificationData

__all__ = ["ClassificationDataModule"]


class ClassificationDataModule(L.LightningDataModule):
    """Lightning's view of a :class:`repblocks.datasets.ClassificationData`.

    Args:
        data: The data set (``DigitsData(...)``, ``ImageFolderData(...)``, ...).
    """

    def __init__(self, data: ClassificationData):
        super().__init__()
        self.data = data
        self.num_classes = data.num_classes
        self.in_chans = data.in_chans
        self.image_size = data.image_size

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        return self.data.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()
