"""UniRepLKNet against its authors' code (AILab-CVC/UniRepLKNet): the whole block and the network, both forms.

The DilatedReparamBlock alone is a case of tests/test_upstream_blocks.py. Here: upstream's UniRepLKNetBlock
(dwconv, BN, SE, GRN FFN, layer scale) loads exactly into ours in train form and, fused on reading, in deploy
form; our fold equals upstream's ``reparameterize()``; our weights go back in its layout. The committed files
(tests/fixtures/upstream/unireplknet_block_*.safetensors) hold what upstream's code computed, so these run
without it; with the mirror, the same is checked against the code, and the whole network too.
"""

import pytest
import torch

import repblocks
from repblocks.layouts import convert_layout, detect_layout
from repblocks.models.unireplknet import UNIREPLKNET_CONFIGS, UniRepLKNetBlock
from repblocks.numerics import max_errors, randomize_bn_

from .upstream_blocks import (
    UNIREPLKNET_BLOCKS,
    read_fixture,
    unireplknet_block,
    unireplknet_deploy_copy,
    upstream_modules,
)

FLOAT64 = 1e-12  # relative: float64 sums the same terms in another order


def _rel(expected, actual) -> float:
    return max_errors(expected, actual)[1]


def _ours(name: str, *, deploy: bool) -> UniRepLKNetBlock:
    dim, kernel = UNIREPLKNET_BLOCKS[name]
    return UniRepLKNetBlock(dim, kernel, deploy=deploy).double().eval()


def _load(name, weights, *, deploy):
    return repblocks.load_weights(_ours(name, deploy=deploy), weights).eval()


@pytest.mark.parametrize("name", UNIREPLKNET_BLOCKS)
@torch.no_grad()
def test_upstream_block_files_load_exactly_in_both_forms(name):
    fixture = read_fixture(name)
    x = fixture["input"]
    assert detect_layout(fixture["train"]) == detect_layout(fixture["deploy"]) == "unireplknet"
    train = _load(name, fixture["train"], deploy=False)
    assert _rel(fixture["output.train"], train(x)) < FLOAT64
    assert _rel(fixture["output.train"], _load(name, fixture["train"], deploy=True)(x)) < FLOAT64  # fused on reading
    assert _rel(fixture["output.deploy"], _load(name, fixture["deploy"], deploy=True)(x)) < FLOAT64
    folded = train.deploy_form().module  # ours, folded: what upstream's reparameterize() computes
    assert _rel(fixture["output.deploy"], folded(x)) < FLOAT64
    assert folded.state_dict().keys() == _ours(name, deploy=True).state_dict().keys()


@pytest.mark.parametrize("name", UNIREPLKNET_BLOCKS)
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_our_block_weights_go_back_in_upstream_keys(name, form):
    fixture = read_fixture(name)
    ours = _load(name, fixture[form], deploy=form == "deploy")
    back = convert_layout(ours.state_dict(), "unireplknet")
    assert back.keys() == fixture[form].keys()
    assert all(torch.equal(back[key], fixture[form][key]) for key in back)


# --- against the upstream code itself, where it is mirrored -----------------------------------------


@pytest.mark.parametrize("name", UNIREPLKNET_BLOCKS)
@torch.no_grad()
def test_the_block_files_are_what_the_upstream_code_computes(name):
    fixture = read_fixture(name)
    theirs = unireplknet_block(upstream_modules("unireplknet"), name, seed=1)
    theirs.load_state_dict(fixture["train"])
    assert _rel(fixture["output.train"], theirs(fixture["input"])) < FLOAT64
    deployed = unireplknet_deploy_copy(theirs)
    assert deployed.state_dict().keys() == fixture["deploy"].keys()
    assert _rel(fixture["output.deploy"], deployed(fixture["input"])) < FLOAT64


def _upstream_tiny(modules, *, seed: int):
    cfg = UNIREPLKNET_CONFIGS["unireplknet_tiny"]
    network = modules.unireplknet.UniRepLKNet(
        num_classes=10, depths=cfg.depths, dims=cfg.dims, kernel_sizes=cfg.kernel_sizes, attempt_use_lk_impl=False
    )
    network = randomize_bn_(network.double(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for name, param in network.named_parameters():  # GRN's zeros and the 1e-6 layer scales would hide a mix-up
        if name.endswith(("act.1.gamma", "act.1.beta", ".gamma")):
            param.data.copy_(0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype) + 0.2)
    return network.eval()


@torch.no_grad()
def test_upstream_network_loads_into_ours_both_ways_in_both_forms():
    """unireplknet_tiny is upstream's UniRepLKNet with its depths, widths and kernels: every weight has a place."""
    theirs = _upstream_tiny(upstream_modules("unireplknet"), seed=2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = theirs(x)
    ours = repblocks.load_weights(
        repblocks.create_model("unireplknet_tiny", num_classes=10).double(), theirs.state_dict()
    )
    assert _rel(expected, ours.eval()(x)) < FLOAT64
    fused = repblocks.load_weights(
        repblocks.create_model("unireplknet_tiny", num_classes=10, deploy=True).double(), theirs.state_dict()
    )
    assert _rel(expected, fused.eval()(x)) < FLOAT64
    theirs_deployed = unireplknet_deploy_copy(theirs)
    from_deployed = repblocks.load_weights(
        repblocks.create_model("unireplknet_tiny", num_classes=10, deploy=True).double(), theirs_deployed.state_dict()
    )
    assert _rel(theirs_deployed(x), from_deployed.eval()(x)) < FLOAT64
    ours_deployed = repblocks.switch_to_deploy(ours)
    assert _rel(theirs_deployed(x), ours_deployed(x)) < FLOAT64
    back = _upstream_tiny(upstream_modules("unireplknet"), seed=3)
    back.load_state_dict(convert_layout(ours.state_dict(), "unireplknet"))  # strict
    assert _rel(expected, back(x)) < FLOAT64
    back_deployed = unireplknet_deploy_copy(_upstream_tiny(upstream_modules("unireplknet"), seed=4))
    back_deployed.load_state_dict(convert_layout(ours_deployed.state_dict(), "unireplknet"))  # strict
    assert _rel(expected, back_deployed(x)) < FLOAT64


@pytest.mark.slow
@pytest.mark.parametrize("name,millions", [("unireplknet_a", 4.4), ("unireplknet_f", 6.2)])
def test_parameter_counts_match_the_paper(name, millions):
    """UniRepLKNet paper, Table 2 (ImageNet-1K): A 4.4M, F 6.2M parameters (deploy form, as upstream counts)."""
    model = repblocks.create_model(name, deploy=True)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
