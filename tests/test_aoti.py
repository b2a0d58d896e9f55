"""AOTInductor (``export.formats=[aoti]``, ``bench.backends=[aoti]``): the engine added through the protocol alone."""

import numpy as np
import pytest
import torch

from repblocks.deploy import Predictor
from repblocks.deploy.engines import DEFAULT_BACKENDS, DEFAULT_EXPORTS, aoti, by_suffix
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.runners import applicable
from repblocks.errors import UserError

NO_BENCH = {"device": "cpu", "batch_sizes": []}


def test_it_is_opt_in_and_predict_knows_its_files():
    assert "aoti" not in DEFAULT_EXPORTS and "aoti" not in DEFAULT_BACKENDS
    assert by_suffix("model.aoti.pt2").name == "aoti" and by_suffix("model.pt2").name == "torch_export"


def test_without_a_compiler_it_is_one_line_and_the_export_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    reason = aoti.ENGINE.missing()
    assert "no compiler was found" in reason and "\n" not in reason
    assert applicable("aoti", "fp32", torch.device("cpu")) == reason
    settings = {"model": "repvgg_tiny", "out_dir": str(tmp_path / "out"), "bench": NO_BENCH}
    with pytest.raises(UserError, match=r"^export.formats=\[aoti\] needs AOTInductor, but AOTInductor builds C\+\+"):
        run_deploy(DeployConfig.from_dict({**settings, "export": {"formats": ["aoti"]}}))
    assert not (tmp_path / "out").exists()


def test_it_is_timed_on_the_cpu_in_float32_only():
    assert "timed on the CPU" in applicable("aoti", "fp32", torch.device("cuda"))
    assert applicable("aoti", "bf16", torch.device("cpu")) is not None


@pytest.mark.slow
@pytest.mark.skipif(aoti.ENGINE.missing() is not None, reason=f"{aoti.ENGINE.missing()}")
def test_deploy_exports_checks_and_times_the_package_and_predict_runs_it(tmp_path):
    first = tmp_path / "first"  # the deploy form's weights: the timed run then compiles one form, not two
    run_deploy(DeployConfig.from_dict({"model": "repvgg_tiny", "out_dir": str(first), "bench": NO_BENCH,
                                       "export": {"formats": ["safetensors"]}}))  # fmt: skip
    out = tmp_path / "out"
    bench = {"device": "cpu", "image_size": 32, "batch_sizes": [2], "rounds": 2, "warmup": 1, "backends": ["aoti"]}
    settings = {"ckpt": str(first / "model.safetensors"), "out_dir": str(out), "export": {"formats": ["aoti"]}}
    report = run_deploy(DeployConfig.from_dict({**settings, "bench": bench}))
    export = report["exports"]["aoti"]
    assert export["path"] == str(out / "model.aoti.pt2") and export["max_rel_err"] < 1e-4
    assert {(row["form"], row["backend"], row["dtype"]) for row in report["benchmark"]} == {("deploy", "aoti", "fp32")}

    predictor = Predictor(out / "model.aoti.pt2", threads=1)
    reference = Predictor(first / "model.safetensors", threads=1)
    images = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert predictor.engine == "aoti" and predictor.metadata["model"] == "repvgg_tiny"
    same = {key: value for key, value in reference.preprocessing.items() if key != "source"}  # source: the file's name
    assert {key: predictor.preprocessing[key] for key in same} == same
    np.testing.assert_allclose(predictor.logits(images), reference.logits(images), rtol=1e-4, atol=1e-4)
