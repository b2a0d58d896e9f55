"""A folder of labelled images for the int8 gate (``quantize.validation=DIR``): any weights can be quantized.

The layout is torchvision's ImageFolder: ``DIR/<class>/<image>``, one subfolder per class. How a
class folder maps to one of the model's outputs is decided by :func:`class_indices`, one rule a
case, never guessed:

1. ``quantize.class_names=FILE`` (one folder name per line, line 1 = output 0, as many lines as
   the model has outputs): each folder's line. ImageNet's wnid folders (``n01440764``) with a
   1000-class model and the synset list it was trained with.
2. Every folder name a number (``0``, ``207``): the number is the output index. A subset of
   ImageNet's classes named by index, or a model's own outputs.
3. Otherwise, as many folders as outputs: ImageFolder's own mapping, the sorted folder names to
   outputs ``0..N-1`` (what ``train.py data=imagefolder`` trained with).

Anything else is refused in one line that says which rule would apply: numbered folders beside
named ones, fewer or more named folders than outputs, and numbered folders whose sorted order
is not their numeric order when there are as many as outputs (``10`` sorts before ``2``: a model
trained on such a folder by ImageFolder learned the sorted order, a model named by index the other).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from repblocks.datasets import eval_transform, load_rgb_image
from repblocks.errors import UserError

__all__ = ["ClassMapping", "class_indices", "read_class_names", "validation_folder"]

log = logging.getLogger(__name__)

BATCH = 32  # images per gate batch


@dataclass(frozen=True)
class ClassMapping:
    """Each class folder's output index, and the rule that gave it (for the report)."""

    indices: dict[str, int]  # folder name -> model output
    rule: str


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """The class names of ``path``, one per line (blank lines and surrounding spaces ignored), checked against ``num_classes``.

    Raises:
        UserError: The file is missing, or does not hold one distinct name per output.
    """
    path = Path(path).expanduser()
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"quantize.class_names: cannot read {path}: {err}") from None
    if len(names) != num_classes:
        raise UserError(
            f"quantize.class_names: {path} holds {len(names)} names, but the model has {num_classes} outputs: "
            "give one folder name per line, in output order"
        )
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise UserError(f"quantize.class_names: {path} names {repeated!r} more than once")
    return names


def class_indices(
    classes: Sequence[str], num_classes: int, *, class_names: Sequence[str] | None = None, where: str = "the folder"
) -> ClassMapping:
    """Map class folder names to model outputs (the rules in this module's docstring).

    Args:
        classes: The class folder names, sorted (ImageFolder's ``classes``).
        num_classes: The model's outputs.
        class_names: ``quantize.class_names`` read by :func:`read_class_names`, or None.
        where: The folder, for messages.

    Raises:
        UserError: The folders cannot be mapped, or could be mapped two ways.
    """
    how = f"name the folders by output index (0..{num_classes - 1}) or pass quantize.class_names=FILE"
    if class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = [name for name in classes if name not in index]
        if unknown:
            raise UserError(
                f"quantize.validation: {where} has class folder {unknown[0]!r}, which quantize.class_names does not "
                f"list ({len(unknown)} such folders)"
            )
        return ClassMapping({name: index[name] for name in classes}, "folder names looked up in quantize.class_names")
    numbered = [name for name in classes if name.isdecimal()]
    if numbered and len(numbered) != len(classes):
        named = next(name for name in classes if not name.isdecimal())
        raise UserError(
            f"quantize.validation: {where} mixes numbered class folders ({numbered[0]!r}) with named ones ({named!r}): "
            f"{how}"
        )
    if numbered:
        indices = {name: int(name) for name in classes}
        too_large = [name for name, i in indices.items() if i >= num_classes]
        if too_large:
            raise UserError(
                f"quantize.validation: {where} has class folder {too_large[0]!r}, but the model has only "
                f"{num_classes} outputs (0..{num_classes - 1})"
            )
        if len(classes) == num_classes and list(classes) != sorted(classes, key=int):
            raise UserError(
                f"quantize.validation: {where}'s class folders are numbered, and their sorted order "
                f"({', '.join(classes[:4])}, ...) is not their numeric order: whether a folder's number is its output "
                "(used when numbered) or its place in sorted order (ImageFolder training) cannot be told; "
                "pass quantize.class_names=FILE"
            )
        return ClassMapping(indices, "numbered folders: the number is the output index")
    if len(classes) != num_classes:
        raise UserError(
            f"quantize.validation: {where} holds {len(classes)} named class folders (first: {classes[0]!r}), but the "
            f"model has {num_classes} outputs: sorted names map to outputs 0..N-1 only when there is one folder per "
            f"output; {how}"
        )
    return ClassMapping({name: i for i, name in enumerate(classes)}, "sorted folder names -> outputs 0..N-1")


def validation_folder(
    folder: str | Path,
    *,
    preprocessing: Mapping,
    num_classes: int,
    class_names: str | None = None,
    count: int | None = None,
    seed: int = 0,
) -> tuple[DataLoader, dict]:
    """The labelled images of ``folder`` as ``(images, output index)`` batches, and what they are for the report.

    ``count``: that many images drawn at random (seeded, as :func:`repblocks.datasets.evaluation_loader`
    draws); None: all of them.

    Raises:
        UserError: Not a folder, no class folders or images, or class folders that cannot be mapped.
    """
    from torchvision import datasets

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"quantize.validation: {folder} is not a folder (expected DIR/<class>/<image>)")
    names = read_class_names(class_names, num_classes) if class_names is not None else None
    transform = _channels(eval_transform(preprocessing), preprocessing["input_size"][0])
    try:
        dataset = datasets.ImageFolder(folder, transform=transform, loader=load_rgb_image)
    except FileNotFoundError as err:  # no class folders, or a class folder without images: torchvision says which
        raise UserError(f"quantize.validation: {folder}: {err} (expected DIR/<class>/<image>)") from None
    mapping = class_indices(dataset.classes, num_classes, class_names=names, where=str(folder))
    outputs = torch.tensor([mapping.indices[name] for name in dataset.classes])
    dataset.target_transform = lambda target: int(outputs[target])
    total = len(dataset)
    if count is not None and count < total:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]
        dataset = Subset(dataset, order.tolist())
    info = {
        "source": str(folder),
        "images": len(dataset),
        "images_in_folder": total,
        "classes": len(mapping.indices),
        "class_mapping": mapping.rule,
    }
    log.info(
        "int8 gate: %d of %d images in %d class folders of %s (%s)",
        len(dataset),
        total,
        info["classes"],
        folder,
        mapping.rule,
    )
    return DataLoader(dataset, batch_size=BATCH, shuffle=False), info


class _channels:
    """``transform`` keeping the first ``channels`` channels: a model of fewer than 3 reads the first of RGB."""

    def __init__(self, transform, channels: int):
        self.transform, self.channels = transform, channels

    def __call__(self, image):
        return self.transform(image)[: self.channels]
