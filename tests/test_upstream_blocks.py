"""DBB's, ACNet's and OREPA's files load exactly with ``load_weights`` and go back with ``convert_layout``.

Each case (tests/upstream_blocks.py) is a block of the upstream code, run at a pinned commit: its train
form and deploy form, as files saved from it, load into the equivalent RepBlock (train form into train
and deploy form, deploy form into deploy form) and give its outputs in float64; ours convert back to its
keys. The committed files hold what the upstream code computed, so these run without it; with the
upstream code mirrored (``REPBLOCKS_UPSTREAM_MIRRORS``), the same is checked against the code itself.
"""

import copy
import logging

import pytest
import torch

import repblocks
from repblocks.layouts import convert_layout, detect_layout
from repblocks.numerics import max_errors

from .upstream_blocks import CASES, deploy_copy, randomized, read_fixture, upstream_modules

FLOAT64 = 1e-12  # relative: float64 sums the same terms in another order
# DBB builds its average kernel in float32 (transV_avg) whatever the model's dtype: its own deploy form is
# off from its train form by about 1e-8 in a float64 model. Ours is compared with its train form at FLOAT64.
UPSTREAM_DEPLOY = {"dbb": 1e-7}


def _rel(expected, actual) -> float:
    return max_errors(expected, actual)[1]


def _load(case, weights, *, deploy):
    return repblocks.load_weights(case.our_block(deploy=deploy), weights).eval()


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_upstream_train_form_loads_exactly(name, caplog):
    case, fixture = CASES[name], read_fixture(name)
    x, expected = fixture["input"], fixture["output.train"]
    assert detect_layout(fixture["train"]) == ("orepa" if case.family == "orepa" else case.family)
    with caplog.at_level(logging.INFO, logger="repblocks.weights"):
        fused = _load(case, fixture["train"], deploy=True)
    assert f"{detect_layout(fixture['train'])} layout" in caplog.text
    assert _rel(expected, fused(x)) < FLOAT64
    if case.train_into_train:
        assert _rel(expected, _load(case, fixture["train"], deploy=False)(x)) < FLOAT64
    else:  # no branch set holds OREPA's branch parameters: its kernel is generated and fused on reading
        with pytest.raises(ValueError, match=r"OREPA's train form is read as its fused conv.*deploy=True"):
            _load(case, fixture["train"], deploy=False)


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_upstream_deploy_form_loads_exactly(name):
    case, fixture = CASES[name], read_fixture(name)
    ours = _load(case, fixture["deploy"], deploy=True)
    assert _rel(fixture["output.deploy"], ours(fixture["input"])) < FLOAT64
    assert _rel(fixture["output.train"], ours(fixture["input"])) < UPSTREAM_DEPLOY.get(case.family, FLOAT64)


@pytest.mark.parametrize("name", CASES)
def test_convert_layout_writes_the_upstream_keys_back(name):
    case, fixture = CASES[name], read_fixture(name)
    deployed = _load(case, fixture["deploy"], deploy=True)
    back = convert_layout(deployed.state_dict(), case.layout_name)
    assert back.keys() == fixture["deploy"].keys()
    assert all(torch.equal(back[key], fixture["deploy"][key]) for key in back)
    if case.train_into_train and case.layout_name == case.family:
        back = convert_layout(_load(case, fixture["train"], deploy=False).state_dict(), case.layout_name)
        assert back.keys() == fixture["train"].keys()
        assert all(torch.equal(back[key], fixture["train"][key]) for key in back)


def test_orepa_train_form_is_not_written_in_its_layout():
    ours = CASES["orepa"].our_block(deploy=False)
    with pytest.raises(ValueError, match=r"only the deploy form is written.*repblocks\.switch_to_deploy"):
        convert_layout(ours.state_dict(), "orepa")


def test_dbb_branch_set_has_no_1x1_branch_where_dbb_has_none():
    """DBB builds dbb_1x1 only where groups < out_channels: a depthwise block has none, and neither has ours."""
    assert CASES["dbb_depthwise"].our_block(deploy=False).conv_1x1 is None
    assert CASES["dbb_dense"].our_block(deploy=False).conv_1x1 is not None


# --- against the upstream code itself, where it is mirrored -----------------------------------------


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_the_files_are_what_the_upstream_code_computes(name):
    case, fixture = CASES[name], read_fixture(name)
    theirs = randomized(case.build(upstream_modules(case.family)), seed=1)
    theirs.load_state_dict(fixture["train"])
    assert _rel(fixture["output.train"], theirs(fixture["input"])) < FLOAT64
    deployed = deploy_copy(theirs)
    assert deployed.state_dict().keys() == fixture["deploy"].keys()
    assert _rel(fixture["output.deploy"], deployed(fixture["input"])) < FLOAT64


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [1])
@torch.no_grad()
def test_upstream_blocks_both_ways_in_both_forms(name, seed):
    """Fresh random weights through the upstream code, in eval and in training mode (batch statistics)."""
    case = CASES[name]
    theirs = randomized(case.build(upstream_modules(case.family)), seed=seed)
    x = torch.randn(2, *fixture_shape(case), dtype=torch.float64)
    fused = _load(case, theirs.state_dict(), deploy=True)
    assert _rel(theirs(x), fused(x)) < FLOAT64
    if case.train_into_train:
        ours = _load(case, theirs.state_dict(), deploy=False)
        assert _rel(theirs(x), ours(x)) < FLOAT64
        # Training mode (batch statistics, running ones updated) on copies: the rest reads the weights as loaded.
        theirs_training, ours_training = copy.deepcopy(theirs).train(), copy.deepcopy(ours).train()
        assert _rel(theirs_training(x), ours_training(x)) < FLOAT64
        if case.layout_name == case.family:
            back = randomized(case.build(upstream_modules(case.family)), seed=seed + 10)
            back.load_state_dict(convert_layout(ours.state_dict(), case.layout_name))  # strict
            assert _rel(theirs(x), back(x)) < FLOAT64
    theirs_deploy = deploy_copy(theirs)
    back_deploy = deploy_copy(randomized(case.build(upstream_modules(case.family)), seed=seed + 20))
    back_deploy.load_state_dict(convert_layout(fused.state_dict(), case.layout_name))  # strict
    assert _rel(theirs_deploy(x), back_deploy(x)) < UPSTREAM_DEPLOY.get(case.family, FLOAT64)
    assert _rel(theirs(x), back_deploy(x)) < FLOAT64


def fixture_shape(case) -> tuple[int, int, int]:
    return case.input_shape[1:]
