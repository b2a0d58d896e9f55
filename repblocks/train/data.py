"""The Lightning side of the data: a LightningDataModule around any :mod:`repblocks.datasets` data set.

The data sets themselves are plain torch and live in the core, because deployment reads the same
validation images to verify a converted model; Lightning only needs its hooks.

Under DDP each process validates its share of the validation images, each image once
(Lightning's ``UnrepeatedDistributedSampler``). Lightning's default sampler repeats images, whole
batches of the digits' in-memory loader, so that every process gets as many: ``val_acc`` would
count them twice, and differ from the deploy check's figure on the same images for no reason.
Validation syncs nothing per step (DDP syncs buffers on the first forward only, which every
process runs), so shares one batch apart are safe.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
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
        loader = self.data.val_dataloader()
        processes = self.trainer.world_size if self.trainer is not None else 1
        if processes < 2 or len(loader.sampler) < processes:  # every process must run at least one batch
            return loader
        # A DistributedSampler already: Lightning leaves it in place.
        share = UnrepeatedDistributedSamplerWrapper(
            loader.sampler, num_replicas=processes, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=share,
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            persistent_workers=loader.persistent_workers,
        )
