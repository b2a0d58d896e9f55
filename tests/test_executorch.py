"""ExecuTorch (``export.formats=[executorch]``): the ``.pte`` runs here, reproduces the model, carries its metadata.

Every lowering takes seconds on two cores, so one repvgg_tiny export is shared by the fast tests and the
rest are marked slow. No test asserts what int8 keeps of top-1 (that depends on the CPU's int8 kernels):
the gate tests force a pass (``max_drop`` 100) or a failure (an int8 model made to predict wrongly).
"""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import repblocks
from repblocks.deploy.engines import executorch
from repblocks.deploy.engines.base import Check
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.runners import applicable
from repblocks.errors import UserError
from repblocks.numerics import max_errors, randomize_bn_
from tests.helpers import accurate_model, write_checkpoint

pytestmark = pytest.mark.skipif(executorch.missing() is not None, reason="the [executorch] extra is not installed")

DIGITS = {"_target_": "repblocks.datasets.DigitsData", "image_size": 32}
METADATA = {"model": "repvgg_tiny", "num_classes": "10", "mean": json.dumps([0.5, 0.5, 0.5])}
FAST_INT8 = {"precision": "int8", "engines": ["onnxruntime"], "calibration_images": 16, "eval_images": 64}
NO_BENCH = {"device": "cpu", "batch_sizes": []}


@functools.cache
def _plain(name: str) -> torch.nn.Module:
    """The deploy form of ``name`` with random weights and BN statistics, the same on every call."""
    torch.manual_seed(0)
    return repblocks.switch_to_deploy(randomize_bn_(repblocks.create_model(name, num_classes=10), seed=0).eval())


def _export(name: str, path: Path) -> dict:
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return executorch.ENGINE.export(_plain(name), path, example, METADATA, check=Check(1e-4, 1e-4))


@pytest.fixture(scope="module")
def tiny_pte(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("pte") / "model.pte"
    return path, _export("repvgg_tiny", path)


@torch.inference_mode()
def _check_round_trip(name: str, path: Path, info: dict) -> None:
    assert info["format"] == "executorch" and info["checked_batch_sizes"] == [1, 3] and info["max_rel_err"] < 1e-4
    assert info["max_batch"] == executorch.BATCH
    run = executorch.load(path)
    for batch_size in (1, 5):  # five images: five calls of the program
        images = torch.randn(batch_size, 3, 32, 32)
        logits = run(images.numpy())
        assert isinstance(logits, np.ndarray) and logits.shape == (batch_size, 10) and logits.dtype == np.float32
        assert max_errors(_plain(name)(images), torch.from_numpy(logits))[1] < 1e-4
    takes = {
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_shape": "[1, 3, 32, 32]",
        "output_dtype": "float32",
    }
    assert executorch.read_metadata(path) == {**METADATA, **takes}  # and what a phone app feeds it


def test_pte_runs_in_executorch_and_reads_back_its_metadata(tiny_pte):
    _check_round_trip("repvgg_tiny", *tiny_pte)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobileone_tiny", "qarepvgg_tiny"])
def test_other_tiny_models_round_trip(tmp_path, name):
    path = tmp_path / "model.pte"
    _check_round_trip(name, path, _export(name, path))


def test_images_of_another_size_are_refused(tiny_pte):
    run = executorch.load(tiny_pte[0])
    with pytest.raises(ValueError, match=r"model\.pte takes images of 3x32x32, got 3x40x32"):
        run(np.zeros((1, 3, 40, 32), dtype=np.float32))


@pytest.mark.parametrize("content", ["empty", "not a program", "truncated"])
def test_a_bad_pte_is_a_one_line_value_error(tiny_pte, tmp_path, content):
    data = {"empty": b"", "not a program": b"ir_version: 8\n" * 64, "truncated": tiny_pte[0].read_bytes()[:4096]}
    path = tmp_path / "bad.pte"
    path.write_bytes(data[content])
    for read in (executorch.load, executorch.read_metadata):
        with pytest.raises(ValueError, match=r"bad\.pte is not an ExecuTorch program \(\.pte\), or it is truncated"):
            read(path)
    with pytest.raises(ValueError) as err:
        executorch.load(path)
    assert "\n" not in str(err.value)


def test_without_the_extra_the_backend_is_skipped_and_the_export_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(
        executorch, "missing", lambda: "executorch is not installed (pip install 'repblocks[executorch]')"
    )
    assert "repblocks[executorch]" in applicable("executorch", "fp32", torch.device("cpu"))
    settings = {"model": "repvgg_tiny", "out_dir": str(tmp_path / "out"), "bench": NO_BENCH}
    with pytest.raises(UserError, match=r"export.formats=\[executorch\] needs ExecuTorch, but executorch is not"):
        run_deploy(DeployConfig.from_dict({**settings, "export": {"formats": ["executorch"]}}))
    assert not (tmp_path / "out").exists()
    assert applicable("executorch", "bf16", torch.device("cpu")) is not None


@pytest.fixture(scope="module")
def accurate_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.ckpt", accurate_model(), data=DIGITS)


@pytest.mark.slow
def test_deploy_writes_the_pte_and_times_the_backend(accurate_ckpt, tmp_path):
    out = tmp_path / "out"
    bench = {"device": "cpu", "image_size": 32, "batch_sizes": [2], "rounds": 2, "warmup": 1}
    bench["backends"] = ["eager", "executorch"]
    settings = {"ckpt": str(accurate_ckpt), "out_dir": str(out), "export": {"formats": ["executorch"]}, "bench": bench}
    report = run_deploy(DeployConfig.from_dict(settings))
    export = report["exports"]["executorch"]
    assert export["path"] == str(out / "model.pte") and export["max_batch"] == executorch.BATCH
    assert executorch.read_metadata(out / "model.pte")["model"] == "repvgg_tiny"
    timed = {(row["form"], row["backend"], row["dtype"]) for row in report["benchmark"]}
    assert {("deploy", "executorch", "fp32"), ("train", "executorch", "fp32")} <= timed
    assert report["environment"]["executorch_threads"] == report["environment"]["threads"]  # as onnxruntime's
    assert not [name for name in (p.name for p in out.iterdir()) if name.endswith(".tmp")]


@pytest.mark.slow
def test_a_pte_that_does_not_match_stops_the_run_and_leaves_nothing(accurate_ckpt, tmp_path, monkeypatch):
    real = executorch.runner

    def off_by_one_percent(*args, **kwargs):
        run = real(*args, **kwargs)
        wrong = lambda images: run(images) * 1.01  # noqa: E731
        wrong.planned_batch = run.planned_batch
        return wrong

    monkeypatch.setattr(executorch, "runner", off_by_one_percent)
    out = tmp_path / "out"
    settings = {"ckpt": str(accurate_ckpt), "out_dir": str(out), "bench": NO_BENCH}
    with pytest.raises(UserError, match=r"ExecuTorch reading model\.pte does not reproduce the model") as err:
        run_deploy(DeployConfig.from_dict({**settings, "export": {"formats": ["safetensors", "executorch"]}}))
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor its staging folder, nor a temporary .pte


def _wrong(runner):
    """An int8 runner whose model predicts the least likely class: a failure at the gate on any CPU."""
    return lambda model: lambda images: -runner(model)(images)


@pytest.mark.slow
def test_int8_pte_passes_the_gate_and_is_written_with_its_metadata(accurate_ckpt, tmp_path):
    out = tmp_path / "out"
    bench = {"device": "cpu", "image_size": 32, "batch_sizes": [1], "rounds": 2, "warmup": 1}
    bench["backends"] = ["executorch"]
    settings = {"ckpt": str(accurate_ckpt), "out_dir": str(out), "export": {"formats": ["executorch"]}, "bench": bench}
    report = run_deploy(DeployConfig.from_dict({**settings, "quantize": {**FAST_INT8, "max_drop": 100.0}}))
    result = report["int8"]["engines"]["executorch"]  # added to quantize.engines by export.formats
    assert result["passed"] and result["method"].startswith("PT2E XNNPACKQuantizer")
    export = report["exports"]["executorch_int8"]
    assert export["path"] == str(out / "model_int8.pte") and export["format"] == "executorch int8"
    assert executorch.read_metadata(out / "model_int8.pte")["precision"] == "int8"
    assert executorch.read_metadata(out / "model_int8.pte")["input_shape"] == "[1, 3, 32, 32]"
    timed = {(row["form"], row["backend"], row["dtype"]) for row in report["benchmark"]}
    assert {("deploy", "executorch", "fp32"), ("deploy", "executorch", "int8")} <= timed


@pytest.mark.slow
def test_int8_pte_that_fails_the_gate_stops_the_run(accurate_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(executorch, "_int8_run", _wrong(executorch._int8_run))
    out = tmp_path / "out"
    settings = {"ckpt": str(accurate_ckpt), "out_dir": str(out), "export": {"formats": ["executorch"]}}
    int8 = {**FAST_INT8, "engines": ["executorch"]}
    with pytest.raises(UserError, match=r"int8 loses more top-1 than quantize.max_drop=1 allows: .*executorch") as err:
        run_deploy(DeployConfig.from_dict({**settings, "bench": NO_BENCH, "quantize": int8}))
    assert "nothing was written" in str(err.value) and not out.exists()
