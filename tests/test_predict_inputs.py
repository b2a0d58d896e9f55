"""predict reads images as a viewer shows them, never destroys what it reads, and prints file names safely.

One deploy-form ``.safetensors`` of the tiny model trained on the digits (no deploy run: the file as
train.py writes it) serves the module. No test asserts an accuracy: a rotated or 16-bit image must
give what its upright 8-bit original gives, whatever that is.
"""

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict as predict_py
import repblocks
from repblocks.datasets import DigitsData, eval_transform, load_image
from repblocks.deploy import Predictor
from repblocks.deploy.predict import Prediction, write_csv
from repblocks.errors import UserError
from repblocks.run_checkpoint import deploy_metadata
from repblocks.weights import save_weights
from tests.helpers import ROOT, accurate_model, open_to_everyone, read_only_dir, unprivileged

PREPROCESSING = DigitsData(image_size=32).preprocessing  # mean and std 0.5, no crop
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FORMULAS = ["=1+1", "+SUM(A1)", "-2+3", "@SUM(A1)"]  # what a spreadsheet runs when a cell starts so
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW_TO_VIEW = 6  # EXIF: the stored pixels must be turned 90 degrees clockwise to be seen upright


def _deploy_file(path: Path, class_names: list[str]) -> Path:
    model = repblocks.switch_to_deploy(_trained())
    metadata = deploy_metadata(
        model="repvgg_tiny",
        num_classes=10,
        in_chans=3,
        model_kwargs={},
        preprocessing=PREPROCESSING,
        class_names=class_names,
    )
    return save_weights(model, path, metadata=metadata)


_TRAINED: list = []


def _trained() -> torch.nn.Module:
    if not _TRAINED:
        _TRAINED.append(accurate_model())
    return _TRAINED[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return _deploy_file(tmp_path_factory.mktemp("model") / "model.safetensors", NAMES)


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A "7" of the digits' validation set as 8-bit grey pixels (32, 32): not symmetric under a quarter turn."""
    data = DigitsData(image_size=32)
    data.setup()
    index = int((data.val_set.labels == 7).nonzero()[0])
    return ((data.val_set.images[index, 0] * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


# ---- images as a viewer shows them ---------------------------------------------------------------------------


def test_a_photo_turned_by_its_exif_tag_is_predicted_as_seen(model_file, digit, tmp_path):
    upright = tmp_path / "upright.png"
    Image.fromarray(digit, mode="L").save(upright)
    # As a phone stores a photo taken sideways: the sensor's pixels, and a tag saying how to turn them.
    sideways = tmp_path / "sideways.png"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW_TO_VIEW
    Image.fromarray(digit, mode="L").transpose(Image.Transpose.ROTATE_90).save(sideways, exif=exif)
    assert Image.open(sideways).getexif()[EXIF_ORIENTATION] == ROTATE_90_CW_TO_VIEW  # the tag is in the file

    predictor = Predictor(model_file, threads=1)
    seen, stored = predictor.logits([upright]), predictor.logits([sideways])
    assert np.array_equal(seen, stored)  # the same pixels, so the same logits, whatever they are
    assert predictor.predict(sideways, topk=1)[0].classes == predictor.predict(upright, topk=1)[0].classes
    # A PIL image given as it was opened is turned too.
    assert np.array_equal(predictor.logits([Image.open(sideways)]), seen)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped_to_white(model_file, digit, tmp_path):
    eight = tmp_path / "eight.png"
    Image.fromarray(digit, mode="L").save(eight)
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(digit.astype(np.uint16) * 257).save(sixteen)  # 0..255 -> 0..65535, full scale to full scale
    assert Image.open(sixteen).mode.startswith("I")  # PIL reads it as 16-bit
    transform = eval_transform(PREPROCESSING)
    expected = transform(load_image(eight, "RGB", what="images"))
    assert torch.equal(transform(load_image(sixteen, "RGB", what="images")), expected)
    predictor = Predictor(model_file, threads=1)
    assert np.array_equal(predictor.logits([sixteen]), predictor.logits([eight]))


# ---- batch_size ----------------------------------------------------------------------------------------------


def test_batch_size_is_a_setting_and_is_checked(model_file, digit, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(np.roll(digit, index, axis=1), mode="L").save(folder / f"{index}.png")
    seen = []
    original = Predictor._run
    monkeypatch.setattr(Predictor, "_run", lambda self, batch: seen.append(len(batch)) or original(self, batch))
    monkeypatch.chdir(tmp_path)
    predict_py.main([f"model={model_file}", f"images={folder}", "batch_size=2", "topk=1"])
    assert seen == [1, 2, 1]  # the blank image that checks the model, then the three images two at a time
    assert capsys.readouterr().out.count("%") == 3
    for value in ("0", "-1", "abc", "1.5"):
        with pytest.raises(SystemExit, match=rf"^error: batch_size must be an integer of at least 1, got '{value}'$"):
            predict_py.main([f"model={model_file}", f"images={folder}", f"batch_size={value}"])
    with pytest.raises(UserError, match="batch_size must be an integer of at least 1"):
        Predictor(model_file, batch_size=0)


# ---- file names printed safely -------------------------------------------------------------------------------


def test_skipped_files_are_named_with_why_and_control_characters_are_escaped(model_file, digit, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(digit, mode="L").save(folder / "line\nbreak.png")
    Image.fromarray(digit, mode="L").save(folder / "\x1b[31mred.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "\x1b[2Jclear\nREADME").write_text("not an image")
    predict_py.main([f"model={model_file}", f"images={folder}", "topk=1", f"csv={tmp_path / 'out.csv'}"])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    lines = out.splitlines()
    assert len(lines) == 2 + 2 + 1 + 1  # two images, two skipped files, the count, the CSV
    assert lines[0].startswith(f"{folder}/\\x1b[31mred.png: ")  # sorted: ESC before "l"
    assert lines[1].startswith(f"{folder}/line\\nbreak.png: ")
    assert lines[2] == f"skipped {folder}/\\x1b[2Jclear\\nREADME: it has no suffix"
    assert lines[3] == f"skipped {folder}/notes.txt: its suffix '.txt' is not an image's"
    assert lines[4].startswith(f"skipped 2 files in {folder}: images are .jpg, ")
    from repblocks.deploy.predict import printable

    assert printable("plain name.png") == "plain name.png"
    # The CSV holds the true names (a CSV reader reads them back), not the escaped ones.
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert [row[0] for row in rows[1:]] == [str(folder / "\x1b[31mred.png"), str(folder / "line\nbreak.png")]


# ---- the CSV never destroys what predict reads ---------------------------------------------------------------


def _refused(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        predict_py.main(argv)
    message = str(exit.value.code)
    assert isinstance(exit.value.code, str) and message.startswith("error: csv: ") and "\n" not in message
    return message


def test_a_csv_naming_the_model_or_an_image_is_refused_before_any_work(model_file, digit, tmp_path, monkeypatch):
    model = tmp_path / "model.safetensors"
    model.write_bytes(model_file.read_bytes())
    image = tmp_path / "seven.png"
    Image.fromarray(digit, mode="L").save(image)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(digit, mode="L").save(folder / "a.png")
    (tmp_path / "link.csv").symlink_to(model)
    os.link(folder / "a.png", tmp_path / "hard.csv")
    before = {path: path.read_bytes() for path in (model, image, folder / "a.png")}
    opened = []
    monkeypatch.setattr(Predictor, "__init__", lambda *args, **kwargs: opened.append(args))  # any work: noted
    cases = {
        "the model": ([f"model={model}", f"images={image}", f"csv={model}"], "is an input"),
        "the image": ([f"model={model}", f"images={image}", f"csv={image}"], "is an input"),
        "an image of the folder": ([f"model={model}", f"images={folder}", f"csv={folder / 'a.png'}"], "is an input"),
        "a symlink to the model": (
            [f"model={model}", f"images={image}", f"csv={tmp_path / 'link.csv'}"],
            f"(the same file as {model})",
        ),
        "a hard link of an image": (
            [f"model={model}", f"images={folder}", f"csv={tmp_path / 'hard.csv'}"],
            f"(the same file as {folder / 'a.png'})",
        ),
        "another path to the model": (
            [f"model={model}", f"images={image}", f"csv={tmp_path / 'photos' / '..' / 'model.safetensors'}"],
            "is an input",
        ),
    }
    for name, (argv, expected) in cases.items():
        assert expected in _refused(argv), name
    assert not opened
    assert {path: path.read_bytes() for path in before} == before
    assert (tmp_path / "link.csv").is_symlink()


def test_an_openvino_model_s_weights_are_an_input_too(tmp_path):
    from repblocks.deploy.predict import check_csv_target, model_files

    (tmp_path / "model.xml").write_text("<net/>")
    (tmp_path / "model.bin").write_bytes(b"\0")
    assert model_files(tmp_path / "model.xml") == [tmp_path / "model.xml", tmp_path / "model.bin"]
    with pytest.raises(UserError, match="is an input"):
        check_csv_target(tmp_path / "model.bin", inputs=model_files(tmp_path / "model.xml"))
    assert check_csv_target(tmp_path / "new.csv", inputs=model_files(tmp_path / "model.xml")) == tmp_path / "new.csv"


def test_a_csv_that_cannot_be_written_is_one_line_before_any_work(model_file, digit, tmp_path, monkeypatch):
    image = tmp_path / "seven.png"
    Image.fromarray(digit, mode="L").save(image)
    opened = []
    monkeypatch.setattr(Predictor, "__init__", lambda *args, **kwargs: opened.append(args))
    assert "is a folder" in _refused([f"model={model_file}", f"images={image}", f"csv={tmp_path}"])
    missing = tmp_path / "nope" / "out.csv"
    assert "does not exist" in _refused([f"model={model_file}", f"images={image}", f"csv={missing}"])
    assert not opened and not (tmp_path / "nope").exists()


@pytest.mark.slow
def test_a_csv_in_a_read_only_folder_is_one_line_before_any_work(model_file, digit):
    """As a user without write access: one line, status 1, no prediction printed (today: all the work, a traceback)."""
    with tempfile.TemporaryDirectory(prefix="repblocks-predict-csv-") as tmp:
        folder = open_to_everyone(Path(tmp))
        model = folder / "model.safetensors"
        model.write_bytes(model_file.read_bytes())
        image = folder / "seven.png"
        Image.fromarray(digit, mode="L").save(image)
        locked = read_only_dir(folder / "locked")
        command = [sys.executable, str(ROOT / "predict.py"), f"model={model}", f"images={image}"]
        command.append(f"csv={locked / 'out.csv'}")
        env = dict(os.environ, HOME=str(folder), PYTHONPATH=str(ROOT))
        done = subprocess.run(unprivileged(command), cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr == f"error: csv: the folder {locked} is not writable: Permission denied\n"
        assert done.stdout == "" and list(locked.iterdir()) == []


# ---- the CSV is safe to open in a spreadsheet ----------------------------------------------------------------


def test_class_names_that_look_like_formulas_are_written_as_text(digit, tmp_path, capsys):
    names = [*FORMULAS, *NAMES[len(FORMULAS) :]]
    model = _deploy_file(tmp_path / "formulas.safetensors", names)
    image = tmp_path / "seven.png"
    Image.fromarray(digit, mode="L").save(image)
    predict_py.main([f"model={model}", f"images={image}", "topk=10", f"csv={tmp_path / 'out.csv'}"])
    capsys.readouterr()
    with open(tmp_path / "out.csv", newline="") as handle:
        header, row = list(csv.reader(handle))
    written = {row[header.index(f"class_{rank}")]: row[header.index(f"name_{rank}")] for rank in range(1, 11)}
    assert {written[str(index)] for index in range(len(FORMULAS))} == {f"'{name}" for name in FORMULAS}
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)
    assert written["7"] == "seven"  # other names as they are


def test_every_text_cell_that_starts_like_a_formula_gets_a_quote(tmp_path):
    predictions = [Prediction("-x.png", [1, 0], [0.75, 0.25], ["\tx", "\rmore"]), Prediction("a.png", [0], [1.0])]
    with open(write_csv(predictions, tmp_path / "p.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[1] == ["'-x.png", "1", "'\tx", "0.750000", "0", "'\rmore", "0.250000"]
    assert rows[2][:4] == ["a.png", "0", "", "1.000000"]
