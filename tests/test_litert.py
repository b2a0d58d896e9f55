"""LiteRT: the .tflite export of each tiny deploy form runs in LiteRT's interpreter like the model, carries its metadata
inside, and is a timed backend (or listed as skipped with why)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import repblocks
from repblocks.deploy.engines import litert
from repblocks.deploy.engines.base import Check
from repblocks.deploy.runners import RunnerSpec, applicable, build_runner
from repblocks.numerics import max_errors
from tests.helpers import ROOT

needs_litert = pytest.mark.skipif(litert.missing() is not None, reason=f"{litert.missing()}")
METADATA = {"model": "repvgg_tiny", "num_classes": "10", "class_names": '["cat", "dog"]'}


def _deploy_form(name: str) -> torch.nn.Module:
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
    assert litert.read_metadata(tflite) == METADATA
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
    logits = litert.load(path)(np.zeros((2, 3, 32, 32), dtype=np.float32))  # float32 in and out, as every export
    assert logits.dtype == np.float32 and logits.shape == (2, 10)
