"""Predict with what deploy.py wrote: the file's own preprocessing, its own engine, top-k with class names.

>>> predictor = Predictor("outputs/deploy/RUN/model.onnx")
>>> predictor.predict("photos/", topk=3)  # a folder: its images, sorted; other files skipped and counted
[Prediction(image='photos/cat.jpg', classes=[3, 5, 2], probabilities=[0.91, 0.05, 0.01], names=['cat', 'dog', 'bird'])]

The engine is chosen by the file's suffix, never by anything the file says: the suffixes of the
engines' registry (:data:`repblocks.deploy.engines.ENGINES`), each opened by its engine's
:meth:`~repblocks.deploy.engines.base.Engine.open`:

* ``.onnx`` (``model.onnx``, ``model_int8.onnx``): onnxruntime on the CPU;
* ``.xml`` (``model.xml``, ``model_int8.xml``, each with its ``.bin``): OpenVINO on the CPU (extra ``[openvino]``);
* ``.safetensors``: deploy-form weights (deploy.py's ``model.safetensors``, train.py's
  ``deploy/<model>_deploy.safetensors``), rebuilt in deploy form through the registry and run by torch;
* ``.pte`` (ExecuTorch) and ``.tflite`` (LiteRT) (extras ``[executorch]``, ``[litert]``);
* refused, in one line: ``.pt2`` (see :data:`REFUSED`) and ``.mlpackage`` (Core ML runs on macOS only).

Every file deploy.py writes carries the deploy metadata (:func:`repblocks.run_checkpoint.deploy_metadata`):
the model's classes and input channels, its preprocessing (input size, mean, std, crop, interpolation)
and, when the training data named them, the class names. It is read as every file's metadata is
(:func:`repblocks.run_checkpoint.spec_from_deploy_metadata`, :func:`~repblocks.run_checkpoint.check_class_names`),
and one blank image goes through the engine when the file is opened: a model that disagrees with
its metadata (another number of classes or channels) is one line before any image is read. Image
files are prepared as train.py validates and deploy.py verifies (:func:`repblocks.datasets.eval_transform`:
resize to size / crop_pct, centre crop, normalize); a prepared tensor is taken as it is.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import repblocks.deploy.preprocessing as preprocessing  # the module, not the package: the package imports this one
from repblocks.checkpoint import DEPLOY_FORM
from repblocks.datasets import IMAGE_SUFFIXES, ImageFiles, eval_transform, load_image, upright_image
from repblocks.deploy.engines import ENGINES as _REGISTRY
from repblocks.deploy.engines import by_suffix, engine
from repblocks.deploy.engines.base import runtime_output
from repblocks.errors import UserError
from repblocks.files import atomic_path, check_not_an_input, check_writable_dir
from repblocks.run_checkpoint import class_names_from_metadata, spec_from_deploy_metadata
from repblocks.threads import choose_threads, use_threads

__all__ = [
    "BATCH_SIZE",
    "ENGINES",
    "REFUSED",
    "SPREADSHEET_FORMULA_START",
    "Prediction",
    "Predictor",
    "check_csv_target",
    "image_files",
    "model_files",
    "printable",
    "write_csv",
]

log = logging.getLogger(__name__)

# Suffix -> the engine that runs it; suffixes deploy.py writes that predict does not run, and why.
ENGINES = {e.suffix: e.name for e in _REGISTRY if e.suffix and engine(e.name).refused is None}
REFUSED = {e.suffix: engine(e.name).refused for e in _REGISTRY if e.suffix and engine(e.name).refused}
BATCH_SIZE = 32  # images read, prepared and run at a time: a folder of any size fits in memory
# What makes a spreadsheet read a cell as a formula (OWASP's CSV injection): such a cell gets a leading "'".
SPREADSHEET_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most likely first."""

    image: str  # the file, or "image N" for the N-th PIL image or tensor row given
    classes: list[int]  # class indices
    probabilities: list[float]  # softmax of the logits, for those classes
    names: list[str] | None = None  # their names, when the training run recorded them


class Predictor:
    """A model file deploy.py (or train.py) wrote, ready to classify images as it was trained to see them.

    Args:
        path: ``.onnx``, ``.xml``, ``.safetensors``, ``.pte`` or ``.tflite`` with deploy metadata.
        threads: Threads of the engine; None: ``OMP_NUM_THREADS``, else the cores other processes leave
            free, as train.py and deploy.py choose (:func:`repblocks.threads.choose_threads`).
        batch_size: Images read and run at a time.

    Attributes:
        engine: What runs the file (a value of :data:`ENGINES`).
        metadata: The deploy metadata as the file holds it (strings).
        num_classes, in_chans: What the metadata says, checked against the model when the file is opened.
        preprocessing: ``input_size`` ``[C, H, W]``, ``mean``, ``std``, ``crop_pct``, ``interpolation``
            and ``source`` (where each came from: the file's metadata, else ImageNet's defaults).
        class_names: The name of each class, by index; None when the file records none (or odd ones).

    Raises:
        UserError: A missing file, a format predict does not run (the message lists those it runs),
            a file that is not of its format or has no deploy metadata, an engine that is not
            installed, or a model that disagrees with its metadata.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, batch_size: int = BATCH_SIZE):
        self.path = Path(path)
        suffix = _check_model_path(self.path)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        self.engine = ENGINES[suffix]
        self.threads = choose_threads(threads, setting="threads").threads  # the one way every command chooses
        self.batch_size = batch_size
        what = str(self.path)
        self._runner = _open(self.engine, self.path, self.threads)
        self.metadata = self._runner.metadata
        if self.metadata.get("form") != DEPLOY_FORM:
            raise UserError(
                f"{self.path} holds no repblocks deploy metadata (model, num_classes, preprocessing): "
                "predict reads the files deploy.py writes"
            )
        try:
            spec = spec_from_deploy_metadata(self.metadata, what=what)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.model_name, self.num_classes, self.in_chans = spec.name, spec.num_classes, spec.in_chans
        self.preprocessing = preprocessing.resolve(
            in_chans=spec.in_chans,
            found=[(f"{self.path.name}'s metadata", preprocessing.from_metadata(self.metadata))],
            what=what,
        )
        missing = [key for key in preprocessing.KEYS if key not in self.metadata]
        if missing:
            log.warning("%s records no %s: ImageNet's defaults are used", self.path, ", ".join(missing))
        self._check_model()  # first: a file whose metadata is not its model's says only that
        self.class_names = class_names_from_metadata(self.metadata, num_classes=spec.num_classes, what=what)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one prepared image."""
        channels, height, width = self.preprocessing["input_size"]
        return channels, height, width

    def predict(self, images, *, topk: int = 5) -> list[Prediction]:
        """The ``topk`` most likely classes of each image (fewer when the model has fewer classes).

        Args:
            images: An image file, a folder (its image files, sorted, searched recursively; other
                files are skipped and counted in a warning), a ``PIL.Image``, a list of those, or a
                prepared float tensor / array ``(B, C, H, W)`` or ``(C, H, W)``, taken as it is.

        Raises:
            UserError: A path that does not exist, a file that is not an image, a tensor of another
                shape than the model's, or ``topk`` below 1.
        """
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise UserError(f"topk must be an integer of at least 1, got {topk!r}")
        count = min(topk, self.num_classes)
        predictions = []
        for labels, logits in self._logits_by_batch(images):
            probabilities = _softmax(logits)
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
            for label, classes, row in zip(labels, order, probabilities, strict=True):
                names = [self.class_names[i] for i in classes] if self.class_names else None
                predictions.append(Prediction(label, classes.tolist(), row[classes].tolist(), names))
        return predictions

    def logits(self, images) -> np.ndarray:
        """The model's logits ``(N, classes)`` for ``images`` (anything :meth:`predict` takes), in order."""
        batches = [logits for _, logits in self._logits_by_batch(images)]
        return np.concatenate(batches) if batches else np.zeros((0, self.num_classes), np.float32)

    def _logits_by_batch(self, images) -> Iterator[tuple[list[str], np.ndarray]]:
        if isinstance(images, Tensor | np.ndarray):
            prepared = self._check_prepared(images)
            for start in range(0, len(prepared), self.batch_size):
                batch = prepared[start : start + self.batch_size]
                yield [f"image {start + i}" for i in range(len(batch))], self._run(batch)
            return
        sources = _sources(images)
        transform = eval_transform(self.preprocessing)
        for start in range(0, len(sources), self.batch_size):
            chunk = sources[start : start + self.batch_size]
            prepared = [transform(self._image(source)) for _, source in chunk]  # each (C, H, W)
            yield [label for label, _ in chunk], self._run(torch.stack(prepared).numpy())

    def _image(self, source):
        mode = {3: "RGB", 1: "L"}.get(self.in_chans)
        if mode is None:
            raise UserError(
                f"{self.path} takes {self.in_chans}-channel images; image files are read as RGB or grey: "
                "pass prepared tensors (B, C, H, W) instead"
            )
        if isinstance(source, Path):
            try:
                return load_image(source, mode, what="images")
            except ValueError as err:
                raise UserError(printable(str(err))) from None
        return upright_image(source, mode)  # as a file is read: its EXIF orientation, 16 bits scaled

    def _check_prepared(self, images: Tensor | np.ndarray) -> np.ndarray:
        array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != self.input_shape or not np.issubdtype(array.dtype, np.floating):
            raise UserError(
                f"prepared images must be floats of shape (B, {', '.join(map(str, self.input_shape))}) for {self.path}, "
                f"got {array.dtype} {tuple(array.shape)}"
            )
        return np.ascontiguousarray(array, dtype=np.float32)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with use_threads(self.threads), torch.inference_mode(), runtime_output(f"running {self.path.name}"):
            return np.asarray(self._runner(torch.from_numpy(batch)), dtype=np.float32)

    def _check_model(self) -> None:
        """One blank image through the engine: its input and output must be what the metadata says."""
        shape = "x".join(map(str, self.input_shape))
        try:
            logits = self._run(np.zeros((1, *self.input_shape), np.float32))
        except Exception as err:  # each engine raises its own types for an input of the wrong shape
            raise UserError(
                f"{self.path}: the model does not take the {shape} images its metadata describes "
                f"(in_chans={self.in_chans}, input_size): {_one_line(err)}"
            ) from None
        if logits.ndim != 2 or logits.shape != (1, self.num_classes):
            raise UserError(
                f"{self.path}: the model gives outputs of shape {tuple(logits.shape)} for one image, but its metadata "
                f"says num_classes={self.num_classes}: the model and its metadata do not belong together"
            )


def image_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The image files under ``folder`` (by suffix, searched recursively, sorted), and the other files it holds."""
    found = ImageFiles(folder)
    return found.files, found.skipped_files


def model_files(path: str | os.PathLike) -> list[Path]:
    """The files a model file is read from: itself, and an OpenVINO ``.xml``'s weights (``.bin`` beside it)."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]


def check_csv_target(path: str | os.PathLike, *, inputs: Sequence[str | os.PathLike]) -> Path:
    """Refuse, before any work, a CSV that cannot be written or that would replace a file predict reads.

    Args:
        path: Where the CSV will go.
        inputs: The files the run reads (:func:`model_files`, the images).

    Raises:
        UserError: ``path`` is a folder, its folder is missing or not writable, or it is one of ``inputs``.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"csv: {printable(str(path))} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"csv: the folder {printable(str(path.parent))} does not exist")
    try:
        check_writable_dir(path.parent, "csv: the folder")
    except ValueError as err:
        raise UserError(printable(str(err))) from None
    check_not_an_input(path, inputs, "csv")
    return path


def printable(text: str) -> str:
    """``text`` with its control and other unprintable characters escaped (``\\n``, ``\\x1b``): safe to print.

    A file name may hold a newline or a terminal's escape sequence; printed raw, it would break a
    one-line-per-image listing or recolour (or retitle) the user's terminal.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def write_csv(predictions: Sequence[Prediction], path: str | os.PathLike) -> Path:
    """Write one row per image (image, then class, name when known, and probability per rank), atomically.

    A text cell that a spreadsheet would run as a formula (it starts with one of
    :data:`SPREADSHEET_FORMULA_START`: a class name a file recorded, an image's name) is written
    with a leading ``'``, which spreadsheets show as text (OWASP's advice on CSV injection).

    Raises:
        UserError: ``path`` is a folder, its folder does not exist, or it cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"csv: {printable(str(path))} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"csv: the folder {printable(str(path.parent))} does not exist")
    ranks = max((len(p.classes) for p in predictions), default=0)
    named = any(p.names for p in predictions)
    header = ["image"]
    for rank in range(1, ranks + 1):
        header += [f"class_{rank}", *([f"name_{rank}"] if named else []), f"probability_{rank}"]
    try:
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for prediction in predictions:
                row = [_as_text(prediction.image)]
                for rank, (index, probability) in enumerate(
                    zip(prediction.classes, prediction.probabilities, strict=True)
                ):
                    name = [_as_text(prediction.names[rank]) if prediction.names else ""] if named else []
                    row += [index, *name, f"{probability:.6f}"]
                writer.writerow(row)
    except OSError as err:  # made read-only, or removed, since it was checked: one line, nothing half-written
        raise UserError(f"csv: cannot write {printable(str(path))}: {err.strerror or err}") from None
    return path


def _as_text(cell: str) -> str:
    """``cell`` as a spreadsheet shows it as text, never runs it: a leading ``'`` when it starts like a formula."""
    return f"'{cell}" if cell.startswith(SPREADSHEET_FORMULA_START) else cell


def _check_model_path(path: Path) -> str:
    """The suffix of a model file predict runs; one line for anything else."""
    entry = by_suffix(path.name)
    suffix = entry.suffix if entry else path.suffix.lower()
    if suffix in REFUSED:
        raise UserError(f"cannot predict with {path}: {REFUSED[suffix]}")
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if suffix not in ENGINES or not path.is_file():
        what = "a folder" if path.is_dir() else f"a {suffix or 'suffix-less'} file"
        raise UserError(
            f"cannot predict with {path}: it is {what}; predict runs {', '.join(ENGINES)} files (as deploy.py writes them)"
        )
    return suffix


def _sources(images) -> list[tuple[str, object]]:
    """``(label, Path or PIL image)`` of each image ``images`` names, folders expanded."""
    from PIL import Image

    if isinstance(images, str | os.PathLike | Image.Image):
        images = [images]
    sources: list[tuple[str, object]] = []
    for index, item in enumerate(images):
        if isinstance(item, Image.Image):
            sources.append((f"image {index}", item))
            continue
        if not isinstance(item, str | os.PathLike):
            raise UserError(f"images: expected paths, PIL images or a prepared tensor, got a {type(item).__name__}")
        path = Path(item)
        if path.is_dir():
            files, skipped = image_files(path)
            if skipped:
                log.warning(
                    "%s: skipped %d file%s that are not images (%s)",
                    printable(str(path)),
                    len(skipped),
                    "" if len(skipped) == 1 else "s",
                    ", ".join(printable(file.name) for file in skipped),
                )
            if not files:
                raise UserError(f"images: {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            sources += [(str(file), file) for file in files]
        elif path.is_file():
            sources.append((str(path), path))
        else:
            raise UserError(f"images: no image or folder at {path}")
    return sources


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)  # float64: no overflow, sums to 1
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _open(name: str, path: Path, threads: int):
    """``path`` opened by the engine ``name`` (installed, or one line saying what to install)."""
    opener = engine(name)
    reason = opener.missing()
    if reason:
        raise UserError(f"cannot predict with {path}: {reason}")
    try:
        with runtime_output(f"opening {path.name}"):
            return opener.open(path, threads)
    except ValueError as err:  # a file that is not of its format: the engine's one line
        raise UserError(str(err)) from None
