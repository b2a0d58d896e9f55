"""train.py's own checkpoint through deploy: the contract between the two, with nothing fabricated."""

import json

import onnxruntime
import pytest
import torch

import repblocks
from repblocks.checkpoint import read_safetensors_metadata
from repblocks.deploy import Predictor
from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.sources import load_network
from repblocks.numerics import max_errors
from tests.helpers import compose_train
from train import train


def test_one_step_training_run_deploys_to_every_export(tmp_path):
    overrides = ["model=repvgg_tiny", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "ema_decay=0.9"]
    metrics = train(compose_train(tmp_path / "train", *overrides))  # digits: the validation images are real
    assert metrics["global_step"] == 1

    report = run_deploy(
        DeployConfig.from_dict(
            {"ckpt": str(tmp_path / "train"), "out_dir": str(tmp_path / "deploy"), "bench": {"batch_sizes": []}}
        )
    )
    assert report["model"] == "repvgg_tiny" and report["top1_agreement"] == 1.0
    real = report["verify"]["real_images"]
    assert real["images"] > 0 and real["top1_agreement"] == 1.0  # the run's own digits validation set

    trained = load_network(ckpt=metrics["best_ckpt"]).model  # the EMA weights: what was validated
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained(images)
        plain = repblocks.create_model("repvgg_tiny", num_classes=10, deploy=True)
        repblocks.load_weights(plain, report["exports"]["safetensors"]["path"])
        assert max_errors(expected, plain.eval()(images))[1] < 1e-5
        session = onnxruntime.InferenceSession(report["exports"]["onnx"]["path"], providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": images.numpy()})
        assert max_errors(expected, torch.from_numpy(logits))[1] < 1e-5
        program = torch.export.load(report["exports"]["torch_export"]["path"]).module()
        assert max_errors(expected, program(images))[1] < 1e-5
    # The end-of-training deploy check wrote weights equal to deploy.py's export.
    ours = repblocks.read_state_dict(metrics["deploy_weights"])
    exported = repblocks.read_state_dict(report["exports"]["safetensors"]["path"])
    assert ours.keys() == exported.keys() and all(torch.equal(ours[key], exported[key]) for key in ours)
    # The digits' class names, recorded by train.py, ride in both files' metadata and come out of a prediction.
    digits = [str(digit) for digit in range(10)]
    for weights in (metrics["deploy_weights"], report["exports"]["safetensors"]["path"]):
        assert json.loads(read_safetensors_metadata(weights)["class_names"]) == digits
    prediction = Predictor(report["exports"]["onnx"]["path"], threads=1).predict(images[:1], topk=2)[0]
    assert prediction.names == [digits[index] for index in prediction.classes]


EVERY_FORMAT = ["safetensors", "onnx", "torch_export", "openvino", "executorch", "litert", "coreml"]


@pytest.mark.slow  # a training step and every export but AOTInductor's (a C++ build) per family: ~40 s each on 2 cores
@pytest.mark.parametrize(
    "model", ["fastvit_tiny", "repvit_tiny", "repghostnet_tiny", "ghostnetv3_tiny", "unireplknet_tiny"]
)
def test_each_newer_family_trains_and_deploys(tmp_path, model):
    overrides = [f"model={model}", "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    metrics = train(compose_train(tmp_path / "train", *overrides))  # the digits: real validation images
    report = run_deploy(
        DeployConfig.from_dict(
            {
                "ckpt": str(tmp_path / "train"),
                "out_dir": str(tmp_path / "deploy"),
                "bench": {"batch_sizes": []},
                "export": {"formats": EVERY_FORMAT},
            }
        )
    )
    assert report["model"] == model and report["not_converted"] == {}  # every converter takes every family
    assert report["verify"]["real_images"]["top1_agreement"] == 1.0 and report["max_rel_err"] < 1e-5
    assert set(report["exports"]) == {*EVERY_FORMAT, "coreml_fp16"}
    # The exported weights are the run's own deploy check's, tensor for tensor.
    ours, exported = (
        repblocks.read_state_dict(metrics["deploy_weights"]),
        repblocks.read_state_dict(report["exports"]["safetensors"]["path"]),
    )
    assert ours.keys() == exported.keys() and all(torch.equal(ours[key], exported[key]) for key in ours)
