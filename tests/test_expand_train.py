"""train.py trains a torchvision classifier with branches (model.expand), and deploy.py exports torchvision's own class."""

import pytest
import safetensors.torch
import torch
import torchvision

from repblocks.deploy.pipeline import DeployConfig, run_deploy
from repblocks.deploy.sources import load_network
from repblocks.numerics import max_errors
from tests.test_train import compose_train
from train import train


@pytest.mark.slow  # about a minute on a small CPU: a training run, its deploy check, then deploy.py
def test_expanded_torchvision_run_deploys_to_the_original_class(tmp_path):
    overrides = [
        "model=tv_mobilenet_v3_small",
        "model.expand=repvgg",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "ema_decay=null",
    ]
    metrics = train(compose_train(tmp_path / "train", *overrides))  # digits, 32x32: the end-of-run deploy check too
    assert metrics["global_step"] == 1 and metrics["top1_agreement"] == 1.0

    report = run_deploy(
        DeployConfig.from_dict(
            {
                "ckpt": str(tmp_path / "train"),
                "out_dir": str(tmp_path / "deploy"),
                "export": {"formats": ["safetensors"]},
                "verify": {"real_batches": 1},
                "bench": {"batch_sizes": []},
            }
        )
    )
    assert report["model"] == "tv_mobilenet_v3_small" and report["top1_agreement"] == 1.0
    plain = torchvision.models.mobilenet_v3_small(num_classes=10)
    plain.load_state_dict(safetensors.torch.load_file(report["exports"]["safetensors"]["path"]), strict=True)
    trained = load_network(ckpt=metrics["best_ckpt"]).model  # the expanded network, as trained
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_errors(trained(images), plain.eval()(images))[1] < 1e-5
