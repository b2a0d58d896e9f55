"""Classify images with a file deploy.py wrote, prepared as its metadata says; print the top-k, write a CSV.

    python predict.py model=outputs/deploy/RUN/model.onnx images=cat.jpg
    python predict.py model=outputs/deploy/RUN/model_int8.xml images=photos/ topk=3   # + photos_predictions.csv
    python predict.py model=outputs/train/RUN/deploy/repvgg_a0_deploy.safetensors images=photos/ csv=out.csv

Settings, each ``key=value`` (as deploy.py takes them): ``model`` (``.onnx``, ``.xml``, ``.safetensors``,
``.pte``, ``.tflite``), ``images`` (an image file or a folder, searched recursively; files that are not
images are skipped, each named), ``topk`` (default 5), ``csv`` (a file to write one row per image
into; for a folder it defaults to ``<folder name>_predictions.csv`` in the working directory, never
inside the deploy output, which deploy.py replaces whole), ``batch_size`` (images read and run at a
time, default 32: memory grows with it), ``threads`` (from 1 to 4 per CPU; default: ``OMP_NUM_THREADS``
if set, else the cores other processes leave free, as train.py and deploy.py choose).
``repblocks.deploy.Predictor`` does the work; this script parses the settings, prints one line per
image and turns bad input into one line on stderr and exit status 1 (Ctrl-C and SIGTERM: one line
and status 130). Images are read as a viewer shows them: EXIF orientation applied, 16-bit scaled.
The CSV is written whole, at the end, or not at all; a CSV that could not be written, or that
names the model or an image (it would destroy what is read), is refused before any work. File
names are printed with control characters escaped. The engines' own lines (LiteRT's XNNPACK note,
ExecuTorch's cpuinfo lines) are kept off stderr, and shown if opening or running the file fails;
``REPBLOCKS_RUNTIME_LOGS=1`` in the environment lets them through as written.
"""

# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP: as deploy.py
# OpenMP reads OMP_NUM_THREADS once, when torch loads it, and a bad value is lines of its own on stderr: it is held
# back until torch is loaded, then put back for repblocks.threads.check_threads to judge, before any work.
omp_num_threads = os.environ.pop("OMP_NUM_THREADS", None)

from repblocks.offline import disable_telemetry

disable_telemetry()  # before any engine loads: onnxruntime reads its switch once, on import

from repblocks.cli import exit_on_user_error, sigterm_as_interrupt
from repblocks.errors import UserError
from repblocks.threads import check_threads

if omp_num_threads is not None:
    os.environ["OMP_NUM_THREADS"] = omp_num_threads  # torch's thread count is set from it (repblocks.threads)

SETTINGS = ("model", "images", "topk", "csv", "batch_size", "threads")
REQUIRED = ("model", "images")


@dataclass(frozen=True)
class PredictSettings:
    """What the command line asks for, checked."""

    model: Path
    images: Path
    topk: int = 5
    csv: Path | None = None
    batch_size: int | None = None  # None: repblocks.deploy.predict.BATCH_SIZE (not imported here: it loads torch)
    threads: int | None = None

    @classmethod
    def parse(cls, argv: Sequence[str]) -> "PredictSettings":
        """From ``key=value`` arguments.

        Raises:
            UserError: An argument that is not ``key=value``, an unknown or repeated key, a missing
                required key, or a number that is not one.
        """
        given: dict[str, str] = {}
        for arg in argv:
            key, sep, value = arg.partition("=")
            if not sep or not key:
                raise UserError(f"arguments are key=value ({', '.join(SETTINGS)}), got {arg!r}")
            if key not in SETTINGS:
                raise UserError(f"unknown setting {key!r}; settings: {', '.join(SETTINGS)}")
            if key in given:
                raise UserError(f"{key} is given twice")
            given[key] = value
        missing = [key for key in REQUIRED if not given.get(key)]
        if missing:
            raise UserError(f"give {' and '.join(f'{key}=...' for key in missing)} (settings: {', '.join(SETTINGS)})")
        return cls(
            model=Path(given["model"]).expanduser(),
            images=Path(given["images"]).expanduser(),
            topk=_positive_int("topk", given.get("topk", "5")),
            csv=Path(given["csv"]).expanduser() if given.get("csv") else None,
            batch_size=_positive_int("batch_size", given["batch_size"]) if given.get("batch_size") else None,
            threads=check_threads(given.get("threads"), setting="threads"),  # and OMP_NUM_THREADS, as train.py does
        )

    def csv_path(self) -> Path | None:
        """Where the CSV goes: ``csv``, else for a folder ``<folder name>_predictions.csv`` here, else nowhere."""
        if self.csv is not None:
            return self.csv
        if self.images.is_dir():
            return Path(f"{self.images.resolve().name or 'images'}_predictions.csv")
        return None


def _positive_int(key: str, value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"{key} must be an integer of at least 1, got {value!r}")
    return int(value)


def describe(prediction) -> str:
    """``path: name [index] 97.12%, ...``: one line per image (control characters in the path escaped)."""
    from repblocks.deploy.predict import printable  # loads torch: only once the settings are checked

    parts = []
    for rank, (index, probability) in enumerate(zip(prediction.classes, prediction.probabilities, strict=True)):
        name = f"{prediction.names[rank]} " if prediction.names else ""
        parts.append(f"{name}[{index}] {100 * probability:.2f}%")
    return f"{printable(prediction.image)}: {', '.join(parts)}"


def predict(settings: PredictSettings) -> list:
    """Open the model, classify the images, print them and write the CSV; return the predictions."""
    from repblocks.datasets import IMAGE_SUFFIXES
    from repblocks.deploy.predict import (
        BATCH_SIZE,
        Predictor,
        check_csv_target,
        image_files,
        model_files,
        printable,
        write_csv,
    )

    if not settings.images.exists():
        raise UserError(f"images: no image or folder at {printable(str(settings.images))}")
    images, skipped = [settings.images], []
    if settings.images.is_dir():
        images, skipped = image_files(settings.images)
        if not images:
            raise UserError(f"images: {printable(str(settings.images))} holds no image files")
    csv_path = settings.csv_path()
    if csv_path is not None:  # before any work: a mistake found after it wastes it, or destroys an input
        check_csv_target(csv_path, inputs=[*model_files(settings.model), *images])
    predictor = Predictor(settings.model, threads=settings.threads, batch_size=settings.batch_size or BATCH_SIZE)
    predictions = predictor.predict(images, topk=settings.topk)
    for prediction in predictions:
        print(describe(prediction))
    for path in skipped:
        why = f"its suffix {path.suffix!r} is not an image's" if path.suffix else "it has no suffix"
        print(f"skipped {printable(str(path))}: {printable(why)}")
    if skipped:
        count = f"{len(skipped)} file{'' if len(skipped) == 1 else 's'}"
        print(f"skipped {count} in {printable(str(settings.images))}: images are {', '.join(IMAGE_SUFFIXES)} files")
    if csv_path is not None:
        write_csv(predictions, csv_path)
        print(f"wrote {len(predictions)} predictions to {printable(str(csv_path))}")
    return predictions


def main(argv: Sequence[str]) -> None:
    """``predict.py`` without the process around it: user mistakes end in ``SystemExit("error: ...")``."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    with exit_on_user_error():
        predict(PredictSettings.parse(argv))


def quiet_library_warnings() -> None:
    """Drop the libraries' Python warnings (torch's deprecations); show the log's warnings as ``warning: ...`` lines.

    So that stderr carries what went wrong and what the user should know (class names a file records
    that cannot be used), and nothing else. For the process only: :func:`main` leaves logging alone.
    """
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(logging.NullHandler())
    logging.getLogger("py.warnings").propagate = False
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


if __name__ == "__main__":
    quiet_library_warnings()
    # SIGTERM (a scheduler, `kill`, `timeout`) is handled as Ctrl-C: a CSV being written is removed on the way out.
    with sigterm_as_interrupt():
        main(sys.argv[1:])
