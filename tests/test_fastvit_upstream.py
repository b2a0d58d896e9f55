"""apple's FastViT (apple/ml-fastvit) weights load exactly into ours, train and reparameterized form.

From a committed file made by apple's own code (:mod:`tests.apple_fastvit_upstream`); with the mirror of
apple's repository, its code is also run to check that it still gives the file's outputs from the file's weights.
"""

import pytest
import torch

import repblocks
from repblocks.layouts import detect_layout
from repblocks.models.fastvit import FastViT, FastViTConfig
from repblocks.numerics import max_errors

from .apple_fastvit_upstream import TINY, apple_fastvit_modules, read_fixture, tiny_apple_fastvit

CONFIG = FastViTConfig(**TINY, pos_embs=(False, False, False, True))


@pytest.fixture(scope="module")
def fixture():
    return read_fixture()


@pytest.mark.parametrize("form", ["train", "deploy"])
@torch.no_grad()
def test_apples_weights_load_exactly_into_ours(fixture, form):
    """apple's reparameterized form keeps its FFN Conv+BN and attention norm: they are folded on loading."""
    weights = fixture[form]
    assert detect_layout(weights) == "apple_fastvit"
    ours = FastViT(CONFIG, num_classes=10, deploy=form == "deploy").double().eval()
    repblocks.load_weights(ours, weights)  # strict
    _, rel_err = max_errors(fixture[f"output.{form}"], ours(fixture["input"]))
    assert rel_err < 1e-12, f"{form}: {rel_err:.2e}"


@torch.no_grad()
def test_our_deploy_form_of_apples_train_weights_equals_apples_reparameterized_model(fixture):
    ours = repblocks.load_weights(FastViT(CONFIG, num_classes=10).double(), fixture["train"])
    deployed = repblocks.switch_to_deploy(ours)
    _, rel_err = max_errors(fixture["output.deploy"], deployed(fixture["input"]))
    assert rel_err < 1e-10, f"{rel_err:.2e}"


@torch.no_grad()
def test_apples_code_still_gives_the_fixtures_outputs(fixture):
    modules = apple_fastvit_modules()  # skips without the mirror
    theirs = tiny_apple_fastvit(modules).double().eval()
    theirs.load_state_dict(fixture["train"])
    assert torch.equal(theirs(fixture["input"]), fixture["output.train"])
    deployed = modules.mobileone.reparameterize_model(theirs)
    assert deployed.state_dict().keys() == fixture["deploy"].keys()
    assert max_errors(fixture["output.deploy"], deployed(fixture["input"]))[1] < 1e-12
