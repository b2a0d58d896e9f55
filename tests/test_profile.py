"""Parameter and MAC counts used for the README's model table."""

from torch import nn

import repblocks
from repblocks.profile import count_macs, count_params, model_cost


def test_count_macs_of_a_single_conv_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_macs(conv, (1, 3, 10, 10)) == 8 * 3 * 9 * 10 * 10


def test_count_macs_leaves_training_mode_alone():
    model = repblocks.create_model("repvgg_tiny").train()
    count_macs(model, (1, 3, 32, 32))
    assert model.training


def test_model_cost_deploy_form_is_smaller_with_the_same_head():
    cost = model_cost("repvgg_tiny", image_size=64)
    assert cost.deploy_params < cost.train_params and cost.deploy_macs > 0
    deployed = repblocks.switch_to_deploy(repblocks.create_model("repvgg_tiny"))
    assert cost.deploy_params == count_params(deployed)
    assert count_macs(deployed, (1, 3, 64, 64)) == cost.deploy_macs


def test_a0_macs_at_224():
    """1.36 GMACs: the paper lists 1.52 "FLOPs (B)"; every variant's figure there is ~11.5% above this count."""
    macs = count_macs(repblocks.create_model("repvgg_a0", deploy=True), (1, 3, 224, 224))
    assert round(macs / 1e9, 2) == 1.36


def test_count_macs_in_half_precision():
    import torch

    model = repblocks.create_model("repvgg_tiny", deploy=True).to(torch.bfloat16)
    assert count_macs(model, (1, 3, 32, 32)) == count_macs(model.float(), (1, 3, 32, 32))
