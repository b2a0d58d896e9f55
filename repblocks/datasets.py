"""Image classification data: the embedded digits set, CIFAR-10, any ImageFolder, and fake data.

Plain torch (no Lightning): training wraps these in a LightningDataModule
(``repblocks.train.data``), deployment reads the same validation images to verify a converted
model. Every data set knows its ``num_classes`` and ``image_size`` at construction, before any
data is read, so the model can be built from them, and says how it prepares its images
(``preprocessing``: timm's ``pretrained_cfg`` keys), so deployment can prepare them the same way. Those that read from disk check ``root`` at
construction too, and raise ``FileNotFoundError`` with one line that says what was expected
where: a user finds out in the first second, not after the model has been built.

torchvision (CIFAR-10, ImageFolder, fake data) and scikit-learn (digits) are imported only when
a data set that needs them is set up. Nothing is ever downloaded unless ``download=True`` is
passed, and a config read back from a checkpoint never downloads (:func:`build_data`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from repblocks.threads import choose_threads, loader_workers

__all__ = [
    "DATASETS",
    "ClassificationData",
    "Cifar10Data",
    "DigitsData",
    "FakeData",
    "ImageFolderData",
    "IMAGE_SUFFIXES",
    "ImageFiles",
    "build_data",
    "eval_transform",
    "evaluation_loader",
    "load_image",
    "sample_images",
    "upright_image",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CROP_PCT = 0.875  # evaluation: resize to size / 0.875, then centre-crop size
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # what a folder of images holds
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")  # torchvision's


def preprocessing_dict(
    *, in_chans: int, image_size: int, mean, std, crop_pct: float, interpolation: str
) -> dict[str, object]:
    """The keys of timm's ``pretrained_cfg`` that say how images are prepared, as plain lists and numbers.

    ``input_size`` is ``[C, H, W]``; ``mean`` and ``std`` are per channel, on images scaled to [0, 1];
    evaluation resizes to ``image_size / crop_pct`` with ``interpolation`` and centre-crops ``image_size``.
    """
    return {
        "input_size": [in_chans, image_size, image_size],
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "crop_pct": float(crop_pct),
        "interpolation": interpolation,
    }


class ClassificationData:
    """Shared loader settings; subclasses set ``train_set``/``val_set``/``calibration_set`` in ``setup``.

    ``calibration_set`` holds the training images prepared as for evaluation (no augmentation):
    what int8 calibration reads, so that the ranges it measures are those the model will see.
    """

    num_classes: int
    in_chans: int = 3

    def __init__(self, *, image_size: int, batch_size: int, num_workers: int | None, pin_memory: bool = False):
        if image_size < 8:
            raise ValueError(f"data.image_size must be at least 8, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}")
        self.image_size = image_size
        self.batch_size = batch_size
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers must be at least 0 (or null: as many as fit), got {num_workers}")
        self.num_workers = num_workers  # None: as many as fit beside the training loop, chosen when first needed
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.calibration_set: Dataset | None = None

    @property
    def preprocessing(self) -> dict[str, object]:
        """How this data set prepares its images (:func:`preprocessing_dict`): what a model trained on it expects."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str] | None:
        """The name of each class, by index, recorded with the run so that predictions can say it; None: unnamed."""
        return None

    def use_model_preprocessing(self, pretrained_cfg: Mapping) -> None:
        """Take the settings left open (None) from a model's ``pretrained_cfg``; before ``setup``.

        Data sets whose images are prepared one fixed way ignore it.
        """

    def train_dataloader(self) -> DataLoader:
        # drop_last: Mixup needs an even batch, and a last batch of one breaks BatchNorm.
        return self._loader(self.train_set, shuffle=True, drop_last=len(self.train_set) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset | None, *, shuffle: bool, drop_last: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a data loader")
        if isinstance(dataset, InMemoryBatches):
            sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
            return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, self.batch_size, drop_last))
        if self.num_workers is None:  # the cores other processes leave free, measured once
            self.num_workers = loader_workers(None, choose_threads(None))
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )


def sample_images(dataset: Dataset, count: int, *, seed: int = 0) -> Tensor:
    """``count`` images of ``dataset`` drawn at random without replacement (all of them when it holds fewer).

    Drawn, not the first ``count``: an ImageFolder lists its images class by class.

    Returns:
        ``(N, C, H, W)`` float32, ``N = min(count, len(dataset))``.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    if isinstance(dataset, InMemoryBatches):
        return dataset[order][0]
    return torch.stack([dataset[index][0] for index in order])


def evaluation_loader(data: ClassificationData, count: int | None = None, *, seed: int = 0) -> DataLoader:
    """``data``'s validation images a batch at a time; ``count`` of them, drawn at random (seeded), when given.

    Drawn as :func:`sample_images` draws: the same ``seed`` gives the same images.
    """
    dataset = data.val_set
    if dataset is None:
        raise RuntimeError("call setup() before asking for a data loader")
    if count is not None and count < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
        if isinstance(dataset, InMemoryBatches):
            dataset = InMemoryBatches(dataset.images[order], dataset.labels[order], dataset.transform)
        else:
            dataset = Subset(dataset, order.tolist())
    return data._loader(dataset, shuffle=False, drop_last=False)


def eval_transform(preprocessing: Mapping):
    """torchvision's evaluation transform for a :func:`preprocessing_dict`: resize, centre-crop, normalize.

    Resizes to ``size / crop_pct`` with its interpolation and centre-crops ``size``, as timm evaluates.
    """
    from torchvision.transforms import InterpolationMode, v2

    size = preprocessing["input_size"][-1]
    interpolation = InterpolationMode(preprocessing["interpolation"])
    return v2.Compose(
        [
            v2.Resize(round(size / preprocessing["crop_pct"]), interpolation=interpolation, antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


class ImageFiles(Dataset):
    """The image files under ``folder`` (searched recursively, by suffix), unlabelled: for calibration.

    ``skipped_files`` are the other files found there (their suffix is not one of :data:`IMAGE_SUFFIXES`),
    ``skipped`` how many.
    """

    def __init__(self, folder: str | os.PathLike, transform=None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder of images")
        found = sorted(path for path in self.folder.rglob("*") if path.is_file())
        self.files = [path for path in found if path.suffix.lower() in IMAGE_SUFFIXES]
        self.skipped_files = [path for path in found if path.suffix.lower() not in IMAGE_SUFFIXES]
        self.skipped = len(self.skipped_files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = load_rgb_image(self.files[index])
        return (self.transform(image) if self.transform else image), -1  # -1: no label


class RandomAffineBatch:
    """Random rotation, shift and scale of every image in a batch, in one ``grid_sample`` call.

    Per image, torchvision's ``RandomAffine`` plus a collate took 5.7 s per digits epoch on two
    busy CPU cores, as long as the training steps; indexing and augmenting whole batches took 0.03 s.
    Pixels shifted in from outside take ``fill``.
    """

    def __init__(
        self,
        *,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        fill: float = 0.0,
    ):
        self.degrees, self.translate, self.scale, self.fill = degrees, translate, scale, fill

    def __call__(self, images: Tensor) -> Tensor:  # (B, C, H, W)
        batch = images.shape[0]
        angle = torch.empty(batch).uniform_(-self.degrees, self.degrees).deg2rad_()
        zoom = torch.empty(batch).uniform_(*self.scale)
        shift = torch.empty(batch, 2).uniform_(-self.translate, self.translate) * 2  # grid units span [-1, 1]
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)  # (B, H, W, 2)
        # Shifting by the fill value makes grid_sample's zero padding pad with ``fill``.
        return F.grid_sample(images - self.fill, grid, align_corners=False, padding_mode="zeros") + self.fill


class InMemoryBatches(Dataset):
    """Images and labels held as two tensors, indexed a whole batch at a time.

    Used with ``DataLoader(batch_size=None, sampler=BatchSampler(...))``: one fancy-indexing call
    per batch instead of one ``__getitem__`` per image and a collate, and the augmentation runs
    once on the whole batch.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        images = self.images[indices]
        return (self.transform(images) if self.transform else images), self.labels[indices]


class DigitsData(ClassificationData):
    """The 1,797 real 8x8 handwritten digits that ship inside scikit-learn: no download, ever.

    Images are scaled from 0..16 to 0..1, resized once to ``image_size`` (bilinear), repeated to
    ``in_chans`` channels and normalized to mean 0.5 / std 0.5. The train/val split is
    stratified and fixed by ``split_seed``, so every run validates on the same images.
    Training images get small random affine jitter (rotation, shift, scale), which is what lets
    a VGG-sized network reach high accuracy on so few images.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_chans: int = 3,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
        self.in_chans = in_chans
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = augment

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.clamp_(0.0, 1.0).sub_(0.5).div_(0.5).repeat(1, self.in_chans, 1, 1)  # (N, C, S, S)
        labels = torch.from_numpy(digits.target).long()
        train_idx, val_idx = train_test_split(
            range(len(labels)), test_size=self.val_fraction, stratify=digits.target, random_state=self.split_seed
        )
        train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
        # fill=-1 is the normalized background (0 before normalization): no bright borders.
        augment = RandomAffineBatch(fill=-1.0) if self.augment else None
        self.train_set = InMemoryBatches(images[train_idx], labels[train_idx], augment)
        self.val_set = InMemoryBatches(images[val_idx], labels[val_idx])
        self.calibration_set = InMemoryBatches(images[train_idx], labels[train_idx])
        log.info("digits: %d train / %d val images at %dx%d", len(train_idx), len(val_idx), *images.shape[-2:])

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    @property
    def preprocessing(self) -> dict[str, object]:
        # 0..16 scaled to 0..1, normalized to [-1, 1]; the 8x8 originals are enlarged, never cropped.
        return preprocessing_dict(
            in_chans=self.in_chans,
            image_size=self.image_size,
            mean=[0.5] * self.in_chans,
            std=[0.5] * self.in_chans,
            crop_pct=1.0,
            interpolation="bilinear",
        )


def _check_num_classes(num_classes: int, where: str) -> int:
    if num_classes < 2:
        raise ValueError(f"{where}: a classifier needs at least 2 classes, got {num_classes}")
    return num_classes


def _require_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"data.root: {what} not found at {path} ({hint})")
    if not any(path.iterdir()):
        raise FileNotFoundError(f"data.root: {what} at {path} is empty ({hint})")
    return path


class Cifar10Data(ClassificationData):
    """CIFAR-10 from ``root`` (torchvision's ``cifar-10-batches-py`` folder inside it).

    Training uses the usual random crop with 4-pixel padding and horizontal flips.

    The files are pickles. torchvision unpickles them only after each file's MD5 matched that of
    the published CIFAR-10 file; a file made to run code on unpickling fails that check (it would
    need an MD5 second preimage), and the failure is reported here as one line.
    """

    num_classes = 10

    def __init__(
        self,
        *,
        root: str | os.PathLike | None,
        download: bool = False,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if root is None:
            raise FileNotFoundError(
                "data.root is not set: pass data.root=DIR, the folder that holds cifar-10-batches-py"
            )
        self.root = Path(root).expanduser()
        self.download = download
        if not download:
            hint = "pass data.download=true to fetch it, or data.root=DIR where it already is"
            _require_dir(self.root / "cifar-10-batches-py", "CIFAR-10 (cifar-10-batches-py)", hint)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        from torchvision import datasets
        from torchvision.transforms import v2

        normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        resize = [v2.Resize(self.image_size, antialias=True)] if self.image_size != 32 else []
        train = v2.Compose([*resize, v2.RandomCrop(self.image_size, padding=4), v2.RandomHorizontalFlip(), *normalize])
        val = v2.Compose([*resize, *normalize])
        try:
            self.train_set = datasets.CIFAR10(self.root, train=True, transform=train, download=self.download)
            self.val_set = datasets.CIFAR10(self.root, train=False, transform=val, download=self.download)
            self.calibration_set = datasets.CIFAR10(self.root, train=True, transform=val)
        except RuntimeError as err:
            if "corrupted" not in str(err):  # torchvision's "... not found or corrupted": a file failed its MD5 check
                raise
            raise ValueError(
                f"data.root: CIFAR-10 in {self.root / 'cifar-10-batches-py'} is incomplete or corrupted: a file is "
                "missing or differs from the published one (MD5 check); nothing was unpickled. "
                "Delete the folder and pass data.download=true to fetch it again"
            ) from None

    @property
    def class_names(self) -> list[str]:
        return list(CIFAR10_CLASSES)

    @property
    def preprocessing(self) -> dict[str, object]:
        return preprocessing_dict(
            in_chans=3,
            image_size=self.image_size,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            crop_pct=1.0,
            interpolation="bilinear",
        )


class ImageFolderData(ClassificationData):
    """Any ``root/train/<class>/*.jpg`` + ``root/val/<class>/*.jpg`` tree (ImageNet's layout).

    Training: random resized crop and flip; validation: resize to ``image_size / crop_pct`` and
    centre-crop ``image_size``, as the model's pretrained weights were evaluated. The preprocessing
    settings left at None are taken from the model (:meth:`use_model_preprocessing`, which train.py
    calls with the model's ``pretrained_cfg``), else ImageNet's.

    Args:
        mean, std: Per-channel normalization of images scaled to [0, 1].
        crop_pct: Fraction of the resized image that the validation centre crop keeps, in (0, 1].
        interpolation: Resizing filter, one of :data:`INTERPOLATIONS`.
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike | None,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        pin_memory: bool = False,
    ):
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.settings = _check_preprocessing(
            {"mean": mean, "std": std, "crop_pct": crop_pct, "interpolation": interpolation}, "data"
        )
        if root is None:
            raise FileNotFoundError("data.root is not set: pass data.root=DIR, a folder with train/ and val/ inside")
        self.root = Path(root).expanduser()
        hint = "expected root/train/<class>/<image> and root/val/<class>/<image>"
        train_dir = _require_dir(self.root / "train", "train/ folder", hint)
        _require_dir(self.root / "val", "val/ folder", hint)
        self.classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"data.root: {train_dir} has no class folders ({hint})")
        self.num_classes = _check_num_classes(len(self.classes), f"data.root: {train_dir} holds {self.classes}")

    def use_model_preprocessing(self, pretrained_cfg: Mapping) -> None:
        model_settings = {key: pretrained_cfg.get(key) for key in self.settings}
        model_settings = _check_preprocessing(model_settings, "the model's pretrained_cfg")
        self.settings = {key: model_settings[key] if value is None else value for key, value in self.settings.items()}

    @property
    def class_names(self) -> list[str]:
        # The folder names, sorted: torchvision's ImageFolder numbers the classes in this order.
        return list(self.classes)

    @property
    def preprocessing(self) -> dict[str, object]:
        imagenet = {
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "crop_pct": IMAGENET_CROP_PCT,
            "interpolation": "bilinear",
        }
        settings = {key: imagenet[key] if value is None else value for key, value in self.settings.items()}
        return preprocessing_dict(in_chans=self.in_chans, image_size=self.image_size, **settings)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        from torchvision import datasets
        from torchvision.transforms import InterpolationMode, v2

        settings = self.preprocessing
        interpolation = InterpolationMode(settings["interpolation"])
        normalize = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(settings["mean"], settings["std"]),
        ]
        train = v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size, interpolation=interpolation, antialias=True),
                v2.RandomHorizontalFlip(),
                *normalize,
            ]
        )
        val = eval_transform(settings)
        self.train_set = datasets.ImageFolder(self.root / "train", transform=train, loader=load_rgb_image)
        self.val_set = datasets.ImageFolder(self.root / "val", transform=val, loader=load_rgb_image)
        self.calibration_set = datasets.ImageFolder(self.root / "train", transform=val, loader=load_rgb_image)
        if self.val_set.classes != self.train_set.classes:
            raise FileNotFoundError(f"data.root: val/ and train/ under {self.root} hold different class folders")


def load_rgb_image(path: str | os.PathLike):
    """Read an image file as an RGB ``PIL.Image``, for ``ImageFolder``.

    Raises:
        ValueError: The file is not an image PIL can read, or is cut short; one line naming the file.
            (PIL's own errors do not say which file, and reach the user from a DataLoader worker.)
    """
    return load_image(path, "RGB", what="data.root")


def load_image(path: str | os.PathLike, mode: str, *, what: str):
    """Read an image file as a ``PIL.Image`` in ``mode`` (``"RGB"``, ``"L"``); ``what`` starts the error message.

    Raises:
        ValueError: The file is not an image PIL can read, or is cut short; one line naming the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            return upright_image(image, mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises for bad files
        raise ValueError(f"{what}: cannot read image {path}: {err}") from None


# PIL's integer modes and the largest value of each: 16-bit PNGs and TIFFs open as "I;16*" (older Pillows
# as "I"). PIL's convert() clips them at 255, which turns every pixel above 1/257 of full scale white.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def upright_image(image, mode: str):
    """``image`` as a person sees it, in ``mode``: its EXIF orientation applied, 16-bit pixels scaled to 8 bits.

    A phone stores a photo as its sensor read it and an EXIF tag saying how to turn it; viewers
    obey the tag, so the model must too (a "7" taken sideways is otherwise a "4"). A 16-bit
    image (``"I;16"``; ``"I"``, read as 16-bit) is scaled by 255 / 65535, not clipped at 255.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    full_scale = _WIDE_MODES.get(image.mode)
    if full_scale is not None:
        # In 32-bit integers, scaled and rounded (+ 0.5: point() truncates); convert() then clips to 0..255.
        image = image.convert("I").point(lambda value: value * (255 / full_scale) + 0.5).convert("L")
    return image.convert(mode)


def _check_preprocessing(settings: Mapping[str, object], where: str) -> dict[str, object]:
    """``settings`` (mean, std, crop_pct, interpolation; None = not set) checked, sequences as lists."""
    checked = dict(settings)
    for key in ("mean", "std"):
        value = settings.get(key)
        if value is None:
            continue
        numbers = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        if not numbers or len(numbers) != 3 or not all(isinstance(x, int | float) for x in numbers):
            raise ValueError(f"{where}.{key} must be 3 numbers (one per RGB channel), got {value!r}")
        if key == "std" and min(numbers) <= 0:
            raise ValueError(f"{where}.std must be positive, got {value!r}")
        checked[key] = [float(x) for x in numbers]
    crop_pct = settings.get("crop_pct")
    if crop_pct is not None and not (isinstance(crop_pct, int | float) and 0 < crop_pct <= 1):
        raise ValueError(f"{where}.crop_pct must be a fraction in (0, 1], got {crop_pct!r}")
    interpolation = settings.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}.interpolation must be one of {', '.join(INTERPOLATIONS)}; got {interpolation!r}")
    return checked


class FakeData(ClassificationData):
    """torchvision's ``FakeData`` (random images): for smoke tests of the whole pipeline."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        image_size: int = 32,
        train_size: int = 64,
        val_size: int = 32,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(image_size=image_size, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        self.num_classes = _check_num_classes(num_classes, "data.num_classes")
        self.train_size, self.val_size = train_size, val_size

    @property
    def preprocessing(self) -> dict[str, object]:
        # Random pixels scaled to [0, 1] and not normalized; nothing is resized.
        return preprocessing_dict(
            in_chans=3,
            image_size=self.image_size,
            mean=[0.0] * 3,
            std=[1.0] * 3,
            crop_pct=1.0,
            interpolation="bilinear",
        )

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        from torchvision import datasets
        from torchvision.transforms import v2

        shape = (3, self.image_size, self.image_size)
        to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        fake = dict(image_size=shape, num_classes=self.num_classes, transform=to_tensor)
        self.train_set = datasets.FakeData(size=self.train_size, random_offset=0, **fake)
        self.val_set = datasets.FakeData(size=self.val_size, random_offset=1_000_000, **fake)
        self.calibration_set = self.train_set  # nothing is augmented


# The data sets a saved config may name. A checkpoint is data, not code: its data set is rebuilt
# from this table, never by importing whatever ``_target_`` a file names. The second half holds
# the names that checkpoints written before the library was split into packages carry.
DATASETS: dict[str, type[ClassificationData]] = {
    **{f"{__name__}.{cls.__name__}": cls for cls in (DigitsData, Cifar10Data, ImageFolderData, FakeData)},
    "repblocks.data.DigitsDataModule": DigitsData,
    "repblocks.data.Cifar10DataModule": Cifar10Data,
    "repblocks.data.ImageFolderDataModule": ImageFolderData,
    "repblocks.data.FakeDataModule": FakeData,
}


# Settings renamed since checkpoints were first written: old name -> new name.
_RENAMED = {"crop_fraction": "crop_pct"}


def build_data(config: Mapping, *, allow_download: bool = False) -> ClassificationData:
    """Rebuild a data set from a saved data config (``{"_target_": ..., **kwargs}``).

    Args:
        config: The config, typically read back from a checkpoint's hyper-parameters.
        allow_download: Keep a ``download: true`` of the config. Off by default: a file that
            names a data set must not make this process fetch data into a path of its choosing.

    Raises:
        ValueError: If ``_target_`` is not one of :data:`DATASETS`, or an argument is not one it takes.
        FileNotFoundError: If the data set is not where the config says.
    """
    kwargs = {_RENAMED.get(key, key): value for key, value in config.items() if not str(key).startswith("_")}
    target = config.get("_target_")
    if target not in DATASETS:
        raise ValueError(f"unknown data set {target!r}; known: {', '.join(DATASETS)}")
    if not allow_download and kwargs.get("download"):
        kwargs["download"] = False
    try:
        return DATASETS[target](**kwargs)
    except TypeError as err:  # a key the class does not take: the config is not one of ours
        raise ValueError(f"data config for {target} does not fit it: {err}") from None
