"""docs/phones.md, checked statement by statement against the files its deploy line writes from a tiny model.

The guide's deploy line runs as written (a tiny checkpoint, a temporary run folder, no timing and a
small int8 calibration appended, as tests/test_readme.py does for the README); each row of its table
is then read with the platform's own reader: LiteRT's interpreter and TFLite's metadata schema
(:func:`tests.helpers.read_tflite_standard_metadata`), ExecuTorch's runtime, coremltools' spec reader.
Every ``phones-test:`` marker in the guide has a check here, and every check a marker there.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from repblocks.deploy.engines import coreml, executorch, litert
from repblocks.deploy.engines.base import Check
from tests.helpers import ROOT, read_tflite_standard_metadata, trained_model, write_checkpoint

GUIDE = ROOT / "docs" / "phones.md"
NAMES = ["cat", "dog", "bird", "emu", "fox", "gnu", "hen", "ibis", "jay", "koi"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIDE = 32  # H = W: the tiny checkpoint's input size
TINY = [
    "bench.batch_sizes=[]",
    "verify.real_batches=1",
    "quantize.calibration_images=16",
    "quantize.eval_images=40",
    "quantize.max_drop=100",
]
_MARKER = re.compile(r"<!--\s*phones-test:\s*([\w-]+)\s*-->")
needs_edge = pytest.mark.skipif(
    any(engine.missing() for engine in (litert, coreml, executorch)),
    reason="; ".join(filter(None, (engine.missing() for engine in (litert, coreml, executorch)))),
)


def _guide() -> str:
    return GUIDE.read_text()


def _table() -> list[dict[str, str]]:
    """The rows of the table after the ``table`` marker, by column name."""
    lines = _guide().split("<!-- phones-test: table -->", 1)[1].strip().splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    header, _, *body = rows
    return [dict(zip(header, row, strict=True)) for row in body]


def _file(row: dict[str, str]) -> str:
    return re.fullmatch(r"`([\w.]+)`", row["File"])[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The guide's deploy line, run as written on a tiny checkpoint with class names and ImageNet's normalization."""
    folder = tmp_path_factory.mktemp("phones")
    digits = {"_target_": "repblocks.datasets.DigitsData", "image_size": SIDE}
    preprocessing = {
        "input_size": [3, SIDE, SIDE],
        "mean": MEAN,
        "std": STD,
        "crop_pct": 0.875,
        "interpolation": "bilinear",
    }
    ckpt = write_checkpoint(
        folder / "last.ckpt", trained_model(), data=digits, class_names=NAMES, preprocessing=preprocessing
    )
    (line,) = [line for line in _guide().splitlines() if line.startswith("python deploy.py")]
    words = [word for word in shlex.split(line)[2:] if not word.startswith(("ckpt=", "out_dir="))]
    command = [sys.executable, "deploy.py", f"ckpt={ckpt}", f"out_dir={folder / 'out'}", *words, *TINY]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


# -- the table -----------------------------------------------------------------------------------------------


def _input_claim(cell: str) -> tuple[str, list[int]] | tuple[str, tuple[int, int]]:
    """What an Input cell says: ("float32", the shape it names at H = W = SIDE, C = 3) or ("image RGB", (W, H))."""
    tensor = re.match(r"`float32` `\[1, ([CHW]), ([CHW]), ([CHW])\]` \((NHWC|NCHW), RGB\)$", cell)
    if tensor:
        sizes = {"C": 3, "H": SIDE, "W": SIDE}
        assert "".join(tensor.groups()[:3]) == tensor[4][1:], f"{cell}: the shape and the layout it names disagree"
        return "float32", [1, *(sizes[axis] for axis in tensor.groups()[:3])]
    image = re.match(r"image RGB `W x H`, pixels 0-255 \(`CVPixelBuffer`\)$", cell)
    assert image, f"an Input cell the test does not know: {cell!r}"
    return "image RGB", (SIDE, SIDE)


def _tflite_input(path: Path) -> tuple[str, list[int]]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (source,) = interpreter.get_input_details()
    return np.dtype(source["dtype"]).name, [int(n) for n in source["shape"]]


def _pte_input(path: Path) -> tuple[str, list[int]]:
    from executorch.runtime import Runtime

    meta = Runtime.get().load_program(path.read_bytes()).load_method("forward").metadata.input_tensor_meta(0)
    dtypes = {6: "float32", 1: "int8"}  # c10::ScalarType, as ExecuTorch's runtime reports a tensor's dtype
    return dtypes.get(int(meta.dtype()), str(meta.dtype())), list(meta.sizes())


def _mlpackage_input(path: Path) -> tuple[str, tuple[int, int]]:
    (image,) = coreml._spec(path).description.input
    assert image.type.WhichOneof("Type") == "imageType", f"{path.name}'s input is not an image"
    colour = "RGB" if image.type.imageType.colorSpace == image.type.imageType.RGB else "other"
    return f"image {colour}", (image.type.imageType.width, image.type.imageType.height)


def _mlpackage_program(path: Path) -> tuple[list, dict]:
    function = coreml._spec(path).mlProgram.functions["main"]
    operations = function.block_specializations[function.opset].operations
    consts = {op.outputs[0].name: op.attributes["val"] for op in operations if op.type == "const"}
    return [op for op in operations if op.type != "const"], consts


def _floats(value) -> list[float]:
    """A MIL const's values: float32 inline, float16 as raw bytes."""
    tensor = value.immediateValue.tensor
    if tensor.WhichOneof("value") == "bytes":
        return np.frombuffer(tensor.bytes.values, dtype=np.float16).astype(float).tolist()
    return list(tensor.floats.values)


def _check_normalization(path: Path, cell: str) -> None:
    suffix = path.suffix
    if cell.startswith("inside the model"):
        assert suffix == ".mlpackage"
        ops, consts = _mlpackage_program(path)
        ops = [op for op in ops if op.type != "cast"][:3]  # fp16: the scaled image is cast to fp16 after the scale
        values = [_floats(consts[op.inputs["y"].arguments[0].name]) for op in ops]
        assert [op.type for op in ops] == ["mul", "sub", "mul"] and ops[0].inputs["x"].arguments[0].name == "image"
        assert values[0] == pytest.approx([1 / 255])
        tolerance = 1e-3 if path.name.endswith("fp16.mlpackage") else 1e-6  # half precision keeps ~3 digits
        assert values[1] == pytest.approx(MEAN, rel=tolerance)
        assert values[2] == pytest.approx([1 / s for s in STD], rel=tolerance)
        return
    assert cell.startswith("by the app")
    if "TFLITE_METADATA" in cell:
        standard = read_tflite_standard_metadata(path)
        assert standard["mean"] == pytest.approx([255 * m for m in MEAN], rel=1e-6)
        assert standard["std"] == pytest.approx([255 * s for s in STD], rel=1e-6)
    if "repblocks_metadata" in cell:
        metadata = executorch.read_metadata(path)
        assert json.loads(metadata["mean"]) == MEAN and json.loads(metadata["std"]) == STD


def _check_names(path: Path, cell: str) -> None:
    if cell.startswith("`labels.txt`"):
        with zipfile.ZipFile(path) as packed:
            assert packed.read("labels.txt").decode().splitlines() == NAMES
        if "TENSOR_AXIS_LABELS" in cell:
            assert read_tflite_standard_metadata(path)["output_files"] == [("labels.txt", 2)]
    elif cell.startswith("`class_names` in the `repblocks_metadata` method"):
        assert json.loads(executorch.read_metadata(path)["class_names"]) == NAMES
    else:
        assert cell.startswith("the classifier's labels: output `classLabel`")
        spec = coreml._spec(path)
        assert spec.description.predictedFeatureName == "classLabel"
        assert coreml.read_labels(path) == NAMES
        if "`classLabel_probs`" in cell:
            assert spec.description.predictedProbabilitiesName == "classLabel_probs"


_RUNTIMES = {
    ".tflite": ("LiteRT", _tflite_input),
    ".pte": ("ExecuTorch", _pte_input),
    ".mlpackage": ("Core ML", _mlpackage_input),
}


@pytest.mark.slow
@needs_edge
@pytest.mark.parametrize("row", _table(), ids=_file)
def test_each_row_of_the_table_holds_for_its_file(out, row):
    path = out / _file(row)
    assert path.exists(), f"the guide's deploy line wrote no {path.name}"
    runtime, read_input = _RUNTIMES[path.suffix]
    assert row["Runtime"].startswith(runtime)
    assert read_input(path) == _input_claim(row["Input"])
    if path.suffix == ".tflite" and "RGB" in row["Input"]:
        assert read_tflite_standard_metadata(path)["color_space"] == 1  # ColorSpaceType.RGB
    _check_normalization(path, row["Normalization"])
    _check_names(path, row["Class names"])


def test_the_table_names_each_phone_file_deploy_writes():
    from repblocks.deploy.engines import by_name

    files = {name for engine in ("litert", "executorch", "coreml") for name in by_name(engine).files.values()}
    assert {_file(row) for row in _table()} == files


# -- the notes -----------------------------------------------------------------------------------------------


def _note_tflite_nchw(out: Path) -> None:
    path = out.parent / "nchw.tflite"
    model = trained_model()
    litert.ENGINE.export(model, path, torch.randn(2, 3, SIDE, SIDE), {}, check=Check(1e-4, 1e-4, layout="nchw"))
    assert _tflite_input(path) == ("float32", [1, 3, SIDE, SIDE])
    assert litert.read_metadata(path)["input_layout"] == "NCHW"
    assert litert.read_metadata(out / "model.tflite")["input_layout"] == "NHWC"


def _note_tflite_entry(out: Path) -> None:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs((out / "model.tflite").read_bytes(), 0)
    (entry,) = [model.Metadata(i) for i in range(model.MetadataLength()) if model.Metadata(i).Name() == b"repblocks"]
    stored = json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())  # one JSON object, values plain
    assert stored["mean"] == MEAN and stored["std"] == STD and stored["class_names"] == NAMES
    assert stored["input_size"] == [3, SIDE, SIDE] and stored["input_layout"] == "NHWC"
    assert stored["input_shape"] == [1, SIDE, SIDE, 3]


def _note_pte_entry(out: Path) -> None:
    for name in ("model.pte", "model_int8.pte"):
        stored = executorch.read_metadata(out / name)
        assert (stored["input_layout"], stored["input_dtype"]) == ("NCHW", "float32")
        assert json.loads(stored["input_shape"]) == [1, 3, SIDE, SIDE]


def _note_logits(out: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    for name in ("model.tflite", "model_int8.tflite"):
        interpreter = Interpreter(model_path=str(out / name))
        interpreter.allocate_tensors()
        (target,) = interpreter.get_output_details()
        assert (list(target["shape"]), target["dtype"]) == ([1, 10], np.float32)
    for name in ("model.pte", "model_int8.pte"):
        logits = executorch.load(out / name)(np.zeros((1, 3, SIDE, SIDE), dtype=np.float32))
        assert logits.shape == (1, 10) and logits.dtype == np.float32
    ops, _ = _mlpackage_program(out / "model.mlpackage")
    assert [op.type for op in ops[-2:]] == ["softmax", "classify"]  # probabilities, not logits


def _note_coreml_metadata(out: Path) -> None:
    spec = coreml._spec(out / "model.mlpackage")
    stored = coreml.read_metadata(out / "model.mlpackage")
    assert stored["input_type"] == "RGB image, pixels 0-255" and stored["normalization"].startswith("inside the model")
    assert json.loads(stored["class_names"]) == NAMES and spec.description.metadata.shortDescription


def _note_python(out: Path) -> None:
    (code,) = re.findall(r"<!-- phones-test: python -->\n```python\n(.*?)```", _guide(), re.S)
    printed = io.StringIO()
    with contextlib.chdir(out), contextlib.redirect_stdout(printed):
        exec(compile(code, str(GUIDE), "exec"), {})
    first, second, third, fourth = printed.getvalue().splitlines()
    assert first == "NHWC" and second == str(NAMES[:3]) and json.loads(third) == NAMES and fourth == str(NAMES[:3])


NOTES = {
    "tflite-nchw": _note_tflite_nchw,
    "tflite-entry": _note_tflite_entry,
    "pte-entry": _note_pte_entry,
    "logits": _note_logits,
    "coreml-metadata": _note_coreml_metadata,
    "python": _note_python,
}


def test_every_marker_of_the_guide_has_a_check_and_every_check_a_marker():
    assert sorted(_MARKER.findall(_guide())) == sorted(["table", *NOTES])


@pytest.mark.slow
@needs_edge
@pytest.mark.parametrize("note", sorted(NOTES))
def test_each_note_holds(out, note):
    NOTES[note](out)


def test_the_readme_links_the_guide():
    assert "(docs/phones.md)" in (ROOT / "README.md").read_text()
