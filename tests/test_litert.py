"""LiteRT: the .tflite export of each tiny deploy form runs in LiteRT's interpreter like the model, carries its metadata
inside, and is a timed backend (or listed as skipped with why)."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import repblocks
from repblocks.deploy.engines import litert
from repblocks.deploy.engines.base import Check
from repblocks.deploy.runners import RunnerSpec, applicable, build_runner
from repblocks.numerics import max_errors
from tests.helpers import ROOT, read_tflite_standard_metadata

needs_litert = pytest.mark.skipif(litert.missing() is not None, reason=f"{litert.missing()}")
NAMES = ["cat", "dog", "=bird", "emu", "fox", "gnu", "hen", "ibis", "jay", "koi"]
METADATA = {
    "model": "repvgg_tiny",
    "num_classes": "10",
    "in_chans": "3",
    "mean": "[0.485, 0.456, 0.406]",
    "std": "[0.229, 0.224, 0.225]",
    "interpolation": '"bilinear"',
    "class_names": json.dumps(NAMES),
    "model_kwargs": '{"drop_rate": 0.0, "bn_eps": 1e-05}',  # not in sorted order: it reads back as written
}


def _deploy_form(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights at every call: a test compares a file with the model that wrote it
    return repblocks.switch_to_deploy(repblocks.create_model(name, num_classes=10)).eval()


@pytest.fixture(scope="module")
def tflite(tmp_path_factory):
    """repvgg_tiny's export, written once for the tests that read a file."""
    path = tmp_path_factory.mktemp("litert") / "model.tflite"
    litert.ENGINE.export(
        _deploy_form("repvgg_tiny"), path, torch.randn(2, 3, 32, 32), METADATA, check=Check(1e-4, 1e-4)
    )
    return path


@pytest.mark.slow
@needs_litert
@pytest.mark.parametrize("name", ["repvgg_tiny", "mobileone_tiny", "qarepvgg_tiny"])
def test_the_export_runs_in_litert_and_matches_the_model(tmp_path, name):
    model = _deploy_form(name)
    info = litert.ENGINE.export(
        model, tmp_path / "model.tflite", torch.randn(2, 3, 32, 32), {}, check=Check(1e-4, 1e-4)
    )
    assert info["max_rel_err"] < 1e-4 and info["checked_batch_sizes"] == [1, 3]
    assert [path.name for path in tmp_path.iterdir()] == ["model.tflite"]  # no temporary file left beside it
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # NCHW float32, as the model takes
    logits = litert.load(tmp_path / "model.tflite", threads=1)(images.numpy())
    with torch.inference_mode():
        assert max_errors(model(images), torch.from_numpy(logits))[1] < 1e-4


@pytest.mark.slow
@needs_litert
def test_the_metadata_is_inside_the_file_and_read_back(tflite):
    takes = {
        "input_layout": "NHWC",
        "input_dtype": "float32",
        "input_shape": "[1, 32, 32, 3]",
        "output_dtype": "float32",
    }
    assert litert.read_metadata(tflite) == {**METADATA, **takes}
    assert not (tflite.parent / "model.tflite.json").exists()


@pytest.mark.slow
@needs_litert
def test_a_truncated_file_is_one_line_naming_it(tmp_path, tflite):
    cut = tmp_path / "cut.tflite"
    cut.write_bytes(tflite.read_bytes()[: tflite.stat().st_size // 2])
    for read in (litert.read_metadata, litert.load):
        with pytest.raises(ValueError, match=rf"^{cut} is truncated or damaged: [^\n]*$"):
            read(cut)


@needs_litert
def test_a_file_of_another_format_is_one_line_naming_it(tmp_path):
    other = tmp_path / "model.tflite"
    other.write_bytes(b"\x08\x07" + bytes(64))  # an ONNX protobuf's first bytes
    for read in (litert.read_metadata, litert.load):
        with pytest.raises(ValueError, match=rf"^{other} is not a TFLite model \(no TFL3 identifier\)$"):
            read(other)


@pytest.mark.slow
@needs_litert
def test_a_batch_of_the_wrong_image_size_is_refused(tflite):
    with pytest.raises(ValueError, match=r"takes images of \(3, 32, 32\)"):
        litert.load(tflite)(np.zeros((1, 3, 48, 48), dtype=np.float32))


def test_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert litert.missing() == "litert_torch is not installed (pip install 'repblocks[litert]')"
    assert applicable("litert", "fp32", torch.device("cpu")) == litert.missing()


@needs_litert
def test_the_backend_is_timed_in_fp32_on_the_cpu_only():
    assert applicable("litert", "fp32", torch.device("cpu")) is None
    assert applicable("litert", "bf16", torch.device("cpu")) == "the LiteRT export is float32"
    assert applicable("litert", "fp32", torch.device("cuda")) == "LiteRT is timed on the CPU; this run times the GPU"


@pytest.mark.slow
@needs_litert
def test_the_timed_backend_runs_the_export(tmp_path):
    model = _deploy_form("mobileone_tiny")
    runner = build_runner(model, RunnerSpec("deploy", "litert", "fp32"), torch.device("cpu"), tmp_path, (3, 32, 32))
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert max_errors(model(images), runner(images))[1] < 1e-4


def test_importing_deployment_imports_no_mobile_converter():
    code = (
        "import sys, repblocks.deploy.pipeline, repblocks.deploy.runners\n"
        "print(sorted(m for m in ('litert_torch', 'ai_edge_litert', 'coremltools', 'jax') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


# Converts as deploy does, with deploy's logging (Hydra's: the root logger at INFO, to stdout), and prints what the
# converter left behind: the root logger's handlers and level, and the progress switch it reads from the environment.
_CONVERT_UNDER_DEPLOYS_LOG = """
import logging, os, sys, torch, repblocks
from repblocks.deploy.engines import litert
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(name)s %(message)s")
model = repblocks.switch_to_deploy(repblocks.create_model("repvgg_tiny", num_classes=10)).eval()
litert.convert(model, torch.randn(1, 3, 32, 32), {})
print("AFTER", len(logging.root.handlers), logging.getLevelName(logging.root.level),
      os.environ.get("LITERT_TORCH_SHOW_PROGRESS"), logging.getLogger("jax").level)
"""


@pytest.mark.slow
@needs_litert
def test_the_converter_neither_floods_deploys_log_nor_takes_it_over():
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT_UNDER_DEPLOYS_LOG], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "AFTER 1 INFO None 0"  # deploy's one handler, its level, nothing left set
    assert [line for line in lines[:-1] if not line.startswith("LOG repblocks")] == []  # no progress, no op notes


@pytest.mark.slow
@needs_litert
def test_int8_through_litert_is_gated_and_its_file_reproduces_the_gated_model(tmp_path):
    from repblocks.deploy.pipeline import DeployConfig, run_deploy
    from tests.helpers import trained_model, write_checkpoint

    digits = {"_target_": "repblocks.datasets.DigitsData", "image_size": 32}
    ckpt = write_checkpoint(tmp_path / "last.ckpt", trained_model(), data=digits)
    quantize = {"precision": "int8", "engines": ["litert"], "calibration_images": 16, "eval_images": 40}
    config = {"out_dir": str(tmp_path / "out"), "ckpt": str(ckpt), "bench": {"device": "cpu", "batch_sizes": []}}
    config |= {"export": {"formats": ["litert"]}, "quantize": {**quantize, "max_drop": 100.0, "worst_layers": 0}}
    report = run_deploy(DeployConfig.from_dict(config))
    gated = report["int8"]["engines"]["litert"]
    assert gated["passed"] and "PT2E" in gated["method"]
    saved = report["exports"]["litert_int8"]  # read back and run, equal to the gated int8 model's outputs
    assert saved["path"].endswith("model_int8.tflite") and saved["max_abs_err"] == 0.0
    path = tmp_path / "out" / "model_int8.tflite"
    assert litert.read_metadata(path)["precision"] == "int8"
    assert litert.read_metadata(path)["input_layout"] == "NHWC"
    # LiteRT's own view: quantized inside, float32 NHWC at the edges, as a phone app feeds it
    assert _interpreter_io(path) == (([1, 32, 32, 3], np.float32), ([1, 10], np.float32))
    logits = litert.load(path)(np.zeros((2, 3, 32, 32), dtype=np.float32))  # float32 in and out, as every export
    assert logits.dtype == np.float32 and logits.shape == (2, 10)


def _interpreter_io(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    return (list(source["shape"]), source["dtype"]), (list(target["shape"]), target["dtype"])


@pytest.mark.slow
@needs_litert
def test_the_file_takes_nhwc_float32_images_by_default_as_a_phone_gives_them(tflite):
    (in_shape, in_dtype), (out_shape, out_dtype) = _interpreter_io(tflite)  # LiteRT's own view of the file
    assert (in_shape, in_dtype, out_shape, out_dtype) == ([1, 32, 32, 3], np.float32, [1, 10], np.float32)
    model, images = _deploy_form("repvgg_tiny"), torch.randn(1, 3, 32, 32)
    logits = litert.load(tflite)(images.numpy())  # NCHW, as every runner takes: transposed for the file
    with torch.inference_mode():
        assert max_errors(model(images), torch.from_numpy(logits))[1] < 1e-4


@pytest.mark.slow
@needs_litert
def test_nchw_on_request(tmp_path):
    path = tmp_path / "model.tflite"
    litert.ENGINE.export(
        _deploy_form("repvgg_tiny"), path, torch.randn(2, 3, 32, 32), {}, check=Check(1e-4, 1e-4, layout="nchw")
    )
    assert _interpreter_io(path)[0] == ([1, 3, 32, 32], np.float32)
    assert litert.read_metadata(path)["input_layout"] == "NCHW"


def _metadata_entry(path, name):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(path.read_bytes(), 0)
    for index in range(model.MetadataLength()):
        if model.Metadata(index).Name() == name.encode():
            return model.Buffers(model.Metadata(index).Buffer()).DataAsNumpy().tobytes()
    return None


@pytest.mark.slow
@needs_litert
def test_our_entry_is_json_values_not_json_strings_inside_json(tflite):
    stored = json.loads(_metadata_entry(tflite, litert.METADATA_NAME))
    assert stored["mean"] == [0.485, 0.456, 0.406] and stored["num_classes"] == 10 and stored["class_names"] == NAMES
    assert stored["interpolation"] == "bilinear" and stored["model"] == "repvgg_tiny"


@pytest.mark.slow
@needs_litert
def test_a_file_written_before_still_reads(tmp_path, tflite):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite.read_bytes()), 0)
    old = json.dumps(METADATA).encode()  # format 1: a JSON object of JSON strings
    (entry,) = [e for e in model.metadata if e.name == litert.METADATA_NAME.encode()]
    model.buffers[entry.buffer].data = np.frombuffer(old, dtype=np.uint8)
    path = tmp_path / "old.tflite"
    path.write_bytes(litert._pack(model, len(old)))
    assert litert.read_metadata(path) == METADATA


@pytest.mark.slow
@needs_litert
def test_tflites_standard_metadata_names_the_model_its_normalization_and_labels(tflite):
    found = read_tflite_standard_metadata(tflite)
    assert found["name"] == "repvgg_tiny" and "10 classes" in found["description"] and "NHWC" in found["description"]
    assert found["input_content"] == 2 and found["color_space"] == 1  # an RGB image
    assert found["mean"] == pytest.approx([123.675, 116.28, 103.53], rel=1e-6)  # 0-255 pixels, the convention's unit
    assert found["std"] == pytest.approx([58.395, 57.12, 57.375], rel=1e-6)
    assert found["output_files"] == [("labels.txt", 2)]  # TENSOR_AXIS_LABELS
    with zipfile.ZipFile(tflite) as packed:  # the convention packs associated files as a zip after the flatbuffer
        assert packed.read("labels.txt").decode().splitlines() == NAMES
    assert litert.read_labels(tflite) == NAMES


@pytest.mark.slow
@needs_litert
def test_tflite_supports_own_schema_reads_the_standard_metadata(tflite):
    # tflite-support 0.4.4 (pip install tflite-support): its generated schema module imports without its C++ parts
    schema = pytest.importorskip("tensorflow_lite_support.metadata.metadata_schema_py_generated")
    buffer = _metadata_entry(tflite, litert.STANDARD_NAME)
    assert schema.ModelMetadata.ModelMetadataBufferHasIdentifier(buffer, 0)
    metadata = schema.ModelMetadataT.InitFromObj(schema.ModelMetadata.GetRootAs(buffer, 0))
    (subgraph,) = metadata.subgraphMetadata
    (image,), (logits,) = subgraph.inputTensorMetadata, subgraph.outputTensorMetadata
    assert metadata.name == b"repvgg_tiny" and list(image.processUnits[0].options.std) == pytest.approx(
        [58.395, 57.12, 57.375]
    )
    assert logits.associatedFiles[0].name == b"labels.txt"


def test_float_io_puts_quantize_and_dequantize_at_the_edges():
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT()
    graph = schema.SubGraphT()
    tensors = []
    for name in (b"in", b"out"):
        tensor = schema.TensorT()
        tensor.name, tensor.shape, tensor.type = name, [1, 4], schema.TensorType.INT8
        tensors.append(tensor)
    relu = schema.OperatorCodeT()
    relu.builtinCode = relu.deprecatedBuiltinCode = schema.BuiltinOperator.RELU
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [1], [op]
    model.subgraphs, model.operatorCodes, model.buffers, model.version = [graph], [relu], [schema.BufferT()], 3
    fixed = schema.ModelT.InitFromPackedBuf(bytearray(litert.float_io(litert._pack(model, 0))), 0)
    (graph,) = fixed.subgraphs
    codes = [fixed.operatorCodes[op.opcodeIndex].builtinCode for op in graph.operators]
    assert codes == [schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.RELU, schema.BuiltinOperator.DEQUANTIZE]
    assert [graph.tensors[i].type for i in (*graph.inputs, *graph.outputs)] == [schema.TensorType.FLOAT32] * 2
    assert [graph.tensors[i].name for i in (*graph.inputs, *graph.outputs)] == [b"in", b"out"]


def test_the_layout_setting_defaults_to_nhwc_and_refuses_others():
    from repblocks.deploy.config import DeployConfig
    from repblocks.errors import UserError

    assert DeployConfig.from_dict({"model": "repvgg_tiny"}).export.layout == "nhwc"  # what a phone's camera gives
    with pytest.raises(UserError, match=r"^unknown export.layout 'nwhc'; known: nhwc, nchw$"):
        DeployConfig.from_dict({"model": "repvgg_tiny", "export": {"layout": "nwhc"}})
