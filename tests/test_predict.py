"""predict.py and ``repblocks.deploy.Predictor`` on what a deploy run wrote, and class names from training to every export.

One deploy of the tiny model trained on the digits (safetensors, ONNX, OpenVINO, and int8 with an
accuracy gate that passes whatever the CPU's int8 kernels do) is shared by the module: every
format must agree with the fp32 model on the run's own validation images. No test asserts an
accuracy: int8 files must reproduce what the gate measured and reported, nothing more.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import predict as predict_py
from repblocks.checkpoint import read_safetensors_metadata
from repblocks.datasets import CIFAR10_CLASSES, DigitsData, FakeData, ImageFolderData, evaluation_loader
from repblocks.deploy import Predictor
from repblocks.deploy.engines import openvino
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.predict import REFUSED, write_csv
from repblocks.errors import UserError
from repblocks.numerics import max_errors
from repblocks.run_checkpoint import MAX_CLASS_NAME, check_class_names, class_names_from_metadata, deploy_metadata
from tests.helpers import ROOT, accurate_model, write_checkpoint

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # not the digits' own
DIGITS = {"_target_": "repblocks.datasets.DigitsData", "image_size": 32}
PREPROCESSING = DigitsData(image_size=32).preprocessing  # as train.py records it: mean and std 0.5, no crop
OPENVINO = openvino.missing() is None
FP32_FILES = ["model.safetensors", "model.onnx", "model.xml"]
INT8_FILES = {"model_int8.onnx": "onnxruntime", "model_int8.xml": "openvino"}
GATE = {"precision": "int8", "calibration_images": 64, "eval_images": 120, "worst_layers": 0, "max_drop": 100.0}
GATE_BATCH = 64  # the digits loader's batch size: int8 is fed in the batches the gate measured


@dataclass
class Deployed:
    out: Path
    report: dict
    model: torch.nn.Module  # the trained fp32 model (train form)
    val_images: torch.Tensor  # the run's validation images, prepared (N, 3, 32, 32)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Deployed:
    folder = tmp_path_factory.mktemp("predict")
    model = accurate_model()
    ckpt = write_checkpoint(folder / "last.ckpt", model, data=DIGITS, preprocessing=PREPROCESSING, class_names=NAMES)
    formats = ["safetensors", "onnx", *(["openvino"] if OPENVINO else [])]
    config = {
        "out_dir": str(folder / "out"),
        "ckpt": str(ckpt),
        "bench": {"device": "cpu", "batch_sizes": []},
        "export": {"formats": formats},
        "quantize": GATE,
    }
    report = run_deploy(DeployConfig.from_dict(config))
    data = DigitsData(image_size=32)
    data.setup()
    return Deployed(folder / "out", report, model, data.val_set.images)


def _file(deployed: Deployed, name: str) -> Path:
    path = deployed.out / name
    if not path.exists():
        pytest.skip(f"{name} was not written here (OpenVINO: {openvino.missing()})")
    return path


# ---- every format agrees with the fp32 model -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", FP32_FILES)
def test_fp32_formats_agree_with_the_fp32_model_and_name_the_classes(deployed, name):
    predictor = Predictor(_file(deployed, name), threads=1)
    with torch.inference_mode():
        expected = deployed.model(deployed.val_images)  # (N, 10)
    logits = torch.from_numpy(predictor.logits(deployed.val_images))
    assert max_errors(expected, logits)[1] < 1e-4
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    predictions = predictor.predict(deployed.val_images, topk=3)
    assert [p.classes[0] for p in predictions] == expected.argmax(1).tolist()
    for prediction in predictions[:20]:
        assert prediction.names == [NAMES[index] for index in prediction.classes]
        assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert predictor.class_names == NAMES and predictor.preprocessing["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.slow
@pytest.mark.parametrize("name", INT8_FILES)
def test_int8_files_predict_what_the_gate_measured(deployed, name):
    """On the gate's own images, in its batches: top-1 and agreement with fp32 are those the report gives."""
    engine = INT8_FILES[name]
    predictor = Predictor(_file(deployed, name), threads=1, batch_size=GATE_BATCH)
    data = DigitsData(image_size=32)
    data.setup()
    images, labels = (torch.cat(parts) for parts in zip(*evaluation_loader(data, GATE["eval_images"]), strict=True))
    logits = torch.from_numpy(predictor.logits(images))
    with torch.inference_mode():
        fp32 = deployed.model(images)
    gated = deployed.report["int8"]["engines"][engine]
    assert gated["passed"]
    assert 100 * (logits.argmax(1) == labels).float().mean().item() == pytest.approx(gated["top1"])
    assert (logits.argmax(1) == fp32.argmax(1)).float().mean().item() == pytest.approx(gated["top1_agreement"])
    assert predictor.predict(images[:2], topk=1)[0].names is not None


@pytest.mark.slow
def test_image_files_are_prepared_as_the_metadata_says(deployed, tmp_path):
    """PNGs of validation images, read from a folder (sorted, recursively, other files skipped): mean/std 0.5 applied."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    names = ["b.png", "a.png", "sub/c.png"]
    for name, image in zip(names, deployed.val_images, strict=False):
        pixels = ((image[0] * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").convert("RGB").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    # The same PNGs prepared by hand: [0, 1], then (x - 0.5) / 0.5, the digits' mean and std.
    by_hand = np.stack(
        [np.asarray(Image.open(folder / name).convert("RGB"), np.float32).transpose(2, 0, 1) / 255 for name in names]
    )
    by_hand = (by_hand - 0.5) / 0.5
    predictor = Predictor(_file(deployed, "model.onnx"), threads=1)
    predictions = predictor.predict(folder, topk=2)
    assert [Path(p.image).relative_to(folder).as_posix() for p in predictions] == sorted(names)
    files_logits = predictor.logits(sorted(folder / name for name in names))
    order = [names.index(name) for name in sorted(names)]
    assert max_errors(torch.from_numpy(predictor.logits(by_hand[order])), torch.from_numpy(files_logits))[1] < 1e-4
    pil = predictor.predict([Image.open(folder / "a.png")], topk=2)[0]
    assert pil.image == "image 0" and pil.classes == predictions[0].classes


@pytest.mark.slow
def test_class_names_ride_in_every_export(deployed):
    expected = json.dumps(NAMES)
    assert read_safetensors_metadata(deployed.out / "model.safetensors")["class_names"] == expected
    for name in ("model.onnx", "model_int8.onnx"):
        metadata = {p.key: p.value for p in onnx.load(deployed.out / name).metadata_props}
        assert metadata["class_names"] == expected
    if OPENVINO:
        for name in ("model.xml", "model_int8.xml"):
            assert openvino.read_metadata(openvino.load(deployed.out / name))["class_names"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["executorch", "litert"])
def test_edge_formats_agree_with_the_fp32_model(deployed, tmp_path, engine):
    module = pytest.importorskip(f"repblocks.deploy.engines.{engine}")
    if module.missing():
        pytest.skip(module.missing())
    ckpt = write_checkpoint(
        tmp_path / "last.ckpt", deployed.model, data=DIGITS, preprocessing=PREPROCESSING, class_names=NAMES
    )
    config = {"out_dir": str(tmp_path / "out"), "ckpt": str(ckpt), "bench": {"device": "cpu", "batch_sizes": []}}
    report = run_deploy(DeployConfig.from_dict({**config, "export": {"formats": [engine]}}))
    predictor = Predictor(report["exports"][engine]["path"], threads=1)
    images = deployed.val_images[:16]
    with torch.inference_mode():
        expected = deployed.model(images)
    logits = torch.from_numpy(predictor.logits(images))
    assert max_errors(expected, logits)[1] < 1e-4 and torch.equal(logits.argmax(1), expected.argmax(1))
    assert predictor.class_names == NAMES


# ---- predict.py ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_py_prints_topk_and_writes_the_csv_of_a_folder(deployed, tmp_path):
    folder = tmp_path / "digits"
    folder.mkdir()
    for index, image in enumerate(deployed.val_images[:3]):
        pixels = ((image[0] * 0.5 + 0.5) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    (folder / "README").write_text("not an image")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            f"model={deployed.out / 'model.onnx'}",
            f"images={folder}",
            "topk=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines[:3]] == [str(folder / f"{i}.png") for i in range(3)]
    assert all(line.count("%") == 3 and any(name in line for name in NAMES) for line in lines[:3])
    assert "skipped 1 file" in done.stdout
    csv_path = tmp_path / "digits_predictions.csv"  # the default: <folder name>_predictions.csv, here
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "image,class_1,name_1,probability_1,class_2,name_2,probability_2,class_3,name_3,probability_3"
    assert len(rows) == 4 and rows[1].startswith(str(folder / "0.png"))


@pytest.mark.slow
def test_predict_py_one_image_and_an_explicit_csv(deployed, tmp_path, capsys, monkeypatch):
    image = tmp_path / "one.png"
    Image.new("RGB", (40, 40), "white").save(image)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    predict_py.main([f"model={deployed.out / 'model.safetensors'}", f"images={image}", "topk=2", "csv=out.csv"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"{image}: ") and printed.count("%") == 2
    assert (work / "out.csv").read_text().count("\n") == 2  # header and one row, in the working directory


@pytest.mark.slow
def test_predict_py_warns_once_of_class_names_it_cannot_use_and_predicts_indices(deployed, tmp_path):
    odd = tmp_path / "odd_names.onnx"
    _edited_onnx(deployed.out / "model.onnx", odd, class_names=json.dumps(NAMES[:9]))
    image = tmp_path / "one.png"
    Image.new("RGB", (32, 32)).save(image)
    done = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), f"model={odd}", f"images={image}", "topk=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stderr
        == f"warning: {odd}: ignoring class_names (9 names for 10 classes); predictions will give class indices only\n"
    )
    assert done.stdout.startswith(f"{image}: [") and done.stdout.count("%") == 2  # indices, no names


def _bad_inputs(deployed: Deployed, folder: Path) -> dict[str, tuple[list[str], str]]:
    """name: (arguments, what the one line must say)."""
    onnx_file = deployed.out / "model.onnx"
    good_images = folder / "good.png"
    Image.new("RGB", (32, 32)).save(good_images)
    (folder / "not_an_image.png").write_text("hello")
    (folder / "weights.bin").write_bytes(b"\0" * 64)
    (folder / "model.pt2").write_bytes(b"PK")
    (folder / "model.mlpackage").mkdir()
    (folder / "junk.onnx").write_bytes(b"not a protobuf at all")
    (folder / "truncated.onnx").write_bytes(onnx_file.read_bytes()[:2000])
    _edited_onnx(onnx_file, folder / "five_classes.onnx", num_classes="5")
    _edited_onnx(onnx_file, folder / "grey.onnx", in_chans="1", mean="[0.5]", std="[0.5]")
    _edited_onnx(onnx_file, folder / "no_metadata.onnx", drop=True)
    images = f"images={good_images}"
    return {
        "not an image": ([f"model={onnx_file}", f"images={folder / 'not_an_image.png'}"], "cannot read image"),
        "unknown format": ([f"model={folder / 'weights.bin'}", images], "predict runs .safetensors, .onnx, .xml"),
        "torch.export program": ([f"model={folder / 'model.pt2'}", images], "unpickles"),
        "core ml": ([f"model={folder / 'model.mlpackage'}", images], "Core ML runs on macOS only"),
        "not onnx": ([f"model={folder / 'junk.onnx'}", images], "not an ONNX model"),
        "truncated onnx": ([f"model={folder / 'truncated.onnx'}", images], "truncated.onnx"),
        "classes mismatch": ([f"model={folder / 'five_classes.onnx'}", images], "num_classes=5"),
        "channels mismatch": ([f"model={folder / 'grey.onnx'}", images], "does not take the 1x32x32 images"),
        "no metadata": ([f"model={folder / 'no_metadata.onnx'}", images], "holds no repblocks deploy metadata"),
        "missing model": ([f"model={folder / 'nope.onnx'}", images], "model file not found"),
        "missing images": ([f"model={onnx_file}", f"images={folder / 'nope'}"], "no image or folder at"),
        "unknown setting": ([f"model={onnx_file}", images, "top=3"], "unknown setting 'top'; settings: model"),
        "topk not a number": ([f"model={onnx_file}", images, "topk=abc"], "topk must be an integer"),
        "csv is a folder": ([f"model={onnx_file}", images, f"csv={folder}"], "is a folder"),
    }


def _edited_onnx(source: Path, target: Path, *, drop: bool = False, **changes: str) -> None:
    proto = onnx.load(source)
    metadata = {} if drop else {p.key: p.value for p in proto.metadata_props} | changes
    del proto.metadata_props[:]
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in metadata.items())
    onnx.save(proto, target)


@pytest.fixture(scope="module")
def bad_runs(deployed, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("bad")
    cases = _bad_inputs(deployed, folder)
    # As a process, the cases of each kind: a library error and a settings error (the rest: same path, in process).
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "predict.py"), *cases[name][0]],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("classes mismatch", "unknown setting")
    }
    results = {}
    for name, (argv, _) in cases.items():
        if name in processes:
            continue
        try:
            predict_py.main(argv)
        except SystemExit as exit:
            results[name] = (1 if isinstance(exit.code, str) else exit.code, f"{exit.code}\n")
        else:
            results[name] = (0, "")
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stderr)
    return folder, {name: (*results[name], cases[name][1]) for name in cases}


BAD_INPUTS = [
    "not an image",
    "unknown format",
    "torch.export program",
    "core ml",
    "not onnx",
    "truncated onnx",
    "classes mismatch",
    "channels mismatch",
    "no metadata",
    "missing model",
    "missing images",
    "unknown setting",
    "topk not a number",
    "csv is a folder",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_1(bad_runs, name):
    folder, results = bad_runs
    returncode, stderr, expected = results[name]
    assert returncode == 1
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expected in stderr, stderr
    assert not list(folder.glob("*.csv")) and not list(folder.glob(".*.tmp"))  # nothing written


# ---- without a deploy run: refusals, settings, class names ---------------------------------------------------


@pytest.mark.parametrize("suffix", list(REFUSED))
def test_formats_predict_does_not_run_are_refused_with_the_reason(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"anything")
    with pytest.raises(UserError, match=REFUSED[suffix].split(" (")[0]):
        Predictor(path)


def test_a_safetensors_file_without_deploy_metadata_is_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="holds no repblocks deploy metadata"):
        Predictor(path, threads=1)


def test_settings_parse_and_default_csv_beside_the_working_directory(tmp_path):
    (tmp_path / "photos").mkdir()
    settings = predict_py.PredictSettings.parse([f"model={tmp_path}/m.onnx", f"images={tmp_path / 'photos'}"])
    assert settings.topk == 5 and settings.threads is None
    assert settings.csv_path() == Path("photos_predictions.csv")
    single = predict_py.PredictSettings.parse([f"model={tmp_path}/m.onnx", f"images={tmp_path}/a.png", "topk=1"])
    assert single.csv_path() is None and single.topk == 1
    for argv, message in [
        ([f"images={tmp_path}"], "give model=..."),
        (["model=m.onnx", "images=x", "model=n.onnx"], "model is given twice"),
        (["model.onnx"], "arguments are key=value"),
        (["model=m.onnx", "images=x", "threads=0"], "threads must be a whole number of threads from 1 to "),
    ]:
        with pytest.raises(UserError, match=message):
            predict_py.PredictSettings.parse(argv)


def test_csv_rows_without_class_names(tmp_path):
    from repblocks.deploy.predict import Prediction

    path = write_csv([Prediction("a.png", [2, 0], [0.75, 0.25])], tmp_path / "p.csv")
    assert path.read_text().splitlines() == [
        "image,class_1,probability_1,class_2,probability_2",
        "a.png,2,0.750000,0,0.250000",
    ]


def test_data_sets_name_their_classes(tmp_path):
    assert DigitsData().class_names == [str(digit) for digit in range(10)]
    assert FakeData().class_names is None
    assert len(CIFAR10_CLASSES) == 10
    for split in ("train", "val"):
        for name in ("tabby cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    assert ImageFolderData(root=tmp_path).class_names == ["dog", "tabby cat"]  # sorted: ImageFolder's indices


@pytest.mark.parametrize(
    "names, reason",
    [
        ("0123456789", "a str, not a list"),
        (NAMES[:9], "9 names for 10 classes"),
        ([*NAMES[:9], 9], "9 is not a printable string"),
        ([*NAMES[:9], "\x1b[31mred"], "is not a printable string"),
        ([*NAMES[:9], "x" * (MAX_CLASS_NAME + 1)], "is not a printable string"),
        ([*NAMES[:9], ""], "is not a printable string"),
    ],
)
def test_odd_class_names_from_a_file_are_dropped_with_one_warning(caplog, names, reason):
    with caplog.at_level("WARNING"):
        assert check_class_names(names, num_classes=10, what="f.ckpt") is None
    assert len(caplog.records) == 1 and reason in caplog.text and "f.ckpt" in caplog.text


def test_class_names_in_deploy_metadata_round_trip():
    metadata = deploy_metadata(model="repvgg_tiny", num_classes=10, in_chans=3, model_kwargs={}, class_names=NAMES)
    assert class_names_from_metadata(metadata, num_classes=10, what="m") == NAMES
    assert "class_names" not in deploy_metadata(model="repvgg_tiny", num_classes=10, in_chans=3, model_kwargs={})
    assert class_names_from_metadata({"class_names": "[oops"}, num_classes=10, what="m") is None


def test_a_checkpoint_without_class_names_reads_without_a_warning(tmp_path, caplog):
    """Runs written before class names were recorded (or on data without names) still read: no names, no warning."""
    from repblocks.run_checkpoint import read_run_checkpoint
    from tests.helpers import trained_model

    ckpt = write_checkpoint(tmp_path / "last.ckpt", trained_model())
    with caplog.at_level("WARNING"):
        assert read_run_checkpoint(ckpt).class_names is None
    assert not caplog.records
