"""Checkpoints written so that a kill never leaves half a file under their name.

Lightning's :class:`~lightning.fabric.plugins.io.TorchCheckpointIO` writes through an fsspec
transaction: a temporary file in ``$TMPDIR``, moved into place at the end. When ``$TMPDIR`` and the
checkpoint folder are on different file systems, that move is a copy, and a SIGKILL during the copy
leaves a truncated (or empty) ``last.ckpt`` where the previous good one was. :class:`AtomicCheckpointIO`
writes beside the final name instead and renames (:func:`repblocks.files.atomic_path`): the name
holds the previous checkpoint or the whole new one, never a part. What a killed write leaves is a
hidden temporary file; the next save under the same name removes it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from repblocks.files import TEMP_SUFFIX, atomic_path

__all__ = ["AtomicCheckpointIO"]

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing local checkpoints atomically in their own folder.

    Pass it to the trainer as a plugin: ``L.Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths
    (``s3://...``) keep Lightning's own writer, whose object stores have no partial files to fear.
    Loading is Lightning's; removing removes one regular file, never a folder (Lightning's removes recursively).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        _remove_killed_writes(Path(path))
        # Through an open file: the bytes go the way of any file write, and atomic_path flushes them to disk.
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        if "://" in str(path):
            super().remove_checkpoint(path)
            return
        path = Path(path)
        if path.is_dir() and not path.is_symlink():
            log.warning("not removing %s: a folder, not a checkpoint file", path)
            return
        path.unlink(missing_ok=True)  # a file, or a link (never what it points to)


def _remove_killed_writes(path: Path) -> None:
    """Remove what an earlier, killed write of ``path`` left: its hidden temporary files.

    A run folder has one writer of checkpoints (train.py refuses a second run in it, and only the
    first DDP process saves), so a temporary file of this name that exists now is no one's.
    """
    for leftover in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)
