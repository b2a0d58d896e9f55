"""int8 with an accuracy gate (``quantize=int8``) and the OpenVINO backend, end to end on the tiny model and digits.

The model is trained for three epochs first (under 2 s), so fp32 top-1 is far above chance and a
drop is visible. A model made hostile to int8 has one channel of its last block with a huge constant output that
the head ignores: per-tensor activation quantization then rounds every other feature to zero.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import repblocks
from repblocks.datasets import DigitsData
from repblocks.deploy import openvino
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.errors import UserError
from repblocks.numerics import randomize_bn_
from tests.test_deploy import _checkpoint

pytestmark = pytest.mark.skipif(openvino.missing() is not None, reason="the [openvino] extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {"_target_": "repblocks.datasets.DigitsData", "image_size": 32}
FAST = {"calibration_images": 64, "eval_images": 120, "worst_layers": 3}
NO_BENCH = {"device": "cpu", "batch_sizes": []}


def _accurate_model(*, hostile: bool = False) -> torch.nn.Module:
    """repvgg_tiny trained for three epochs on the digits (under 2 s on 2 cores: about 90% top-1)."""
    torch.manual_seed(0)
    data = DigitsData(image_size=32, augment=False)
    data.setup()
    images, labels = data.calibration_set.images, data.calibration_set.labels
    model = repblocks.create_model("repvgg_tiny", num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(len(labels)).split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    if hostile:
        with torch.no_grad():
            model.stages[-1][-1].conv_kxk.bn.bias[0] = 1e4  # after ReLU, a channel of about 1e4 everywhere ...
            model.head.fc.weight[:, 0] = 0.0  # ... which the head ignores: fp32 is unchanged
    return model


@pytest.fixture(scope="module")
def accurate_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "last.ckpt", _accurate_model(), data=DIGITS)


@pytest.fixture(scope="module")
def hostile_ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("hostile") / "last.ckpt", _accurate_model(hostile=True), data=DIGITS)


def _deploy(out_dir: Path, **settings) -> dict:
    config = {"out_dir": str(out_dir), "bench": NO_BENCH, "export": {"formats": []}, **settings}
    return run_deploy(DeployConfig.from_dict(config))


def test_int8_passes_the_gate_and_its_files_reproduce_the_gated_accuracy(accurate_ckpt, tmp_path):
    out = tmp_path / "out"
    report = _deploy(out, ckpt=str(accurate_ckpt), quantize={"precision": "int8", **FAST})
    int8 = report["int8"]
    assert int8["evaluation"]["images"] == 120 and int8["calibration"]["images"] == 64
    assert int8["evaluation"]["fp32_top1"] > 80
    for engine in ("openvino", "onnxruntime"):
        result = int8["engines"][engine]
        assert result["passed"] and result["drop"] <= 1.0 and result["top1_agreement"] > 0.9
    assert [layer["sqnr_db"] for layer in int8["engines"]["onnxruntime"]["worst_layers"]] == sorted(
        layer["sqnr_db"] for layer in int8["engines"]["onnxruntime"]["worst_layers"]
    )
    assert {"model_int8.xml", "model_int8.bin", "model_int8.onnx"} <= {p.name for p in out.iterdir()}
    # The file on disk, read by onnxruntime, classifies the gated images as the report says.
    data = DigitsData(image_size=32)
    data.setup()
    images, labels = data.val_set.images, data.val_set.labels
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:120]
    session = onnxruntime.InferenceSession(str(out / "model_int8.onnx"))
    logits = session.run(None, {"images": images[keep].numpy()})[0]
    top1 = 100 * float(np.mean(logits.argmax(1) == labels[keep].numpy()))
    assert top1 == pytest.approx(int8["engines"]["onnxruntime"]["top1"])
    metadata = {p.key: p.value for p in __import__("onnx").load(out / "model_int8.onnx").metadata_props}
    assert metadata["precision"] == "int8" and json.loads(metadata["mean"]) == report["preprocessing"]["mean"]
    assert "## int8" in (out / "report.md").read_text()


def test_int8_that_loses_accuracy_stops_the_run_and_writes_nothing(hostile_ckpt, tmp_path):
    out = tmp_path / "out"
    quantize = {"precision": "int8", "accuracy_control": False, **FAST}
    with pytest.raises(
        UserError, match=r"int8 loses more top-1 than quantize.max_drop=1 allows: fp32 \d+\.\d+%"
    ) as err:
        _deploy(out, ckpt=str(hostile_ckpt), quantize=quantize, export={"formats": ["onnx"]})
    assert "nothing was written" in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.slow
def test_accuracy_control_keeps_the_costly_layers_in_fp32(hostile_ckpt, tmp_path):
    quantize = {"precision": "int8", "engines": ["openvino"], **FAST}
    result = _deploy(tmp_path / "out", ckpt=str(hostile_ckpt), quantize=quantize)["int8"]["engines"]["openvino"]
    assert result["passed"] and result["fp32_layers"] and result["method"].startswith("NNCF accuracy control")


def test_calibration_from_a_folder_of_images(accurate_ckpt, tmp_path):
    from PIL import Image

    folder = tmp_path / "calibration" / "nested"
    folder.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    settings = {"precision": "int8", "engines": ["onnxruntime"], "calibration": str(tmp_path / "calibration"), **FAST}
    report = _deploy(tmp_path / "out", ckpt=str(accurate_ckpt), quantize=settings)
    assert report["int8"]["calibration"] == {"source": str(tmp_path / "calibration"), "images": 5}


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        ({"precision": "int4"}, "unknown quantize.precision 'int4'; known: int8"),
        (
            {"precision": "int8", "engines": ["tflite"]},
            "unknown quantize engine 'tflite'; known: openvino, onnxruntime",
        ),
        ({"precision": "int8", "max_drop": -1}, "quantize.max_drop must be at least 0"),
        ({"precision": "int8", "calibration": "/nonexistent/images"}, "/nonexistent/images is not a folder of images"),
    ],
)
def test_bad_quantize_settings_are_one_line(accurate_ckpt, tmp_path, quantize, message):
    with pytest.raises(UserError, match=message) as err:
        _deploy(tmp_path / "out", ckpt=str(accurate_ckpt), quantize=quantize)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_quantizing_without_the_runs_data_says_what_is_needed(tmp_path):
    with pytest.raises(UserError, match="names no data set: deploy a train.py checkpoint or run folder"):
        _deploy(tmp_path / "out", model="repvgg_tiny", quantize="int8")


def test_openvino_export_and_backend(accurate_ckpt, tmp_path):
    out = tmp_path / "out"
    bench = {"device": "cpu", "image_size": 32, "batch_sizes": [2], "rounds": 2, "warmup": 1}
    report = _deploy(out, ckpt=str(accurate_ckpt), export={"formats": ["openvino"]}, bench=bench)
    export = report["exports"]["openvino"]
    assert export["max_rel_err"] < 1e-5 and {p.name for p in out.iterdir()} >= {"model.xml", "model.bin"}
    model = openvino.load(out / "model.xml")
    assert json.loads(model.get_rt_info(["repblocks", "input_size"]).astype(str)) == [3, 32, 32]
    timed = {(row["form"], row["backend"]) for row in report["benchmark"]}
    assert {("deploy", "openvino"), ("train", "openvino"), ("deploy", "openvino_throughput")} <= timed
    skipped = {item["what"]: item["reason"] for item in report["skipped"]}
    assert "NVIDIA GPUs only" in skipped["tensorrt fp32"] and "NVIDIA GPUs only" in skipped["onnxruntime_trt fp32"]


def test_an_openvino_export_that_does_not_match_leaves_no_file(tmp_path, monkeypatch):
    from repblocks.deploy import export

    real_compile = openvino.compile_model

    def bf16_compile(ov_model, **kwargs):  # what OpenVINO's default precision would do on a bf16 CPU, made worse
        compiled = real_compile(ov_model, **kwargs)
        return _Scaled(compiled)

    monkeypatch.setattr(openvino, "compile_model", bf16_compile)
    model = repblocks.switch_to_deploy(randomize_bn_(repblocks.create_model("repvgg_tiny"), seed=0).eval())
    with pytest.raises(ValueError, match="OpenVINO .* does not reproduce the model"):
        export.export_openvino(model, tmp_path / "model.xml", torch.randn(2, 3, 32, 32), atol=1e-4, rtol=1e-4)
    assert list(tmp_path.iterdir()) == []


class _Scaled:
    """A compiled model whose outputs are off by 1%."""

    def __init__(self, compiled):
        self.compiled = compiled

    def create_infer_request(self):
        request = self.compiled.create_infer_request()

        class Request:
            def infer(self, inputs):
                return [np.array(request.infer(inputs)[0]) * 1.01]

        return Request()


def test_deploy_without_openvino_skips_it_with_the_reason(accurate_ckpt, tmp_path):
    """The [deploy] extra alone: OpenVINO hidden, the defaults leave it out and say why; asking for it is one line."""
    code = f"""
import importlib.abc, json, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("openvino", "nncf"):
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)")
sys.meta_path.insert(0, Hide())
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.errors import UserError
config = dict(ckpt={str(accurate_ckpt)!r}, bench=dict(device="cpu", image_size=32, batch_sizes=[2], rounds=1, warmup=0),
              quantize=dict(precision="int8", engines=["openvino", "onnxruntime"], **{FAST!r}))
report = run_deploy(DeployConfig.from_dict(dict(config, out_dir={str(tmp_path / "out")!r})))
try:
    run_deploy(DeployConfig.from_dict(dict(config, export=dict(formats=["openvino"]), out_dir={str(tmp_path / "o2")!r})))
except UserError as err:
    refused = str(err)
print(json.dumps(dict(exports=sorted(report["exports"]), int8=report["int8"]["skipped"], refused=refused,
                      skipped=report["skipped"])))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert "openvino" not in found["exports"] and "onnxruntime_int8" in found["exports"]
    assert (
        found["int8"][0]["what"] == "openvino int8"
        and "pip install 'repblocks[openvino]'" in found["int8"][0]["reason"]
    )
    assert "export.formats=[openvino] needs OpenVINO" in found["refused"]
    assert any(item["what"] == "openvino fp32" and "not installed" in item["reason"] for item in found["skipped"])
