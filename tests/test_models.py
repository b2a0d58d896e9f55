"""Every registered model, generated from the registry: train form vs deploy form and the model surface.

Equivalence in float32 runs for every model in the default run (about a second each at 32x32);
float64 and the other checks run for the tiny models by default and for the large ones under the
``slow`` marker, which CI runs too.
"""

import pytest
import torch

import repblocks
from repblocks.numerics import max_errors, randomize_bn_
from repblocks.profile import count_params

from .conftest import LARGE_MODELS, TINY_MODELS

ALL_MODELS = TINY_MODELS + LARGE_MODELS
TINY_THEN_SLOW = TINY_MODELS + [pytest.param(name, marks=pytest.mark.slow) for name in LARGE_MODELS]


def _block_modes(name: str) -> tuple[str, ...]:
    """The block modes a model is built in: its pretrained_cfg's ``block_modes`` (a family whose branches have
    no online form says so there, and refuses "online"), else both."""
    return tuple(repblocks.get_pretrained_cfg(name).get("block_modes", ("offline", "online")))


ONLINE_TINY = [name for name in TINY_MODELS if "online" in _block_modes(name)]
ONLINE_LARGE = [name for name in LARGE_MODELS if "online" in _block_modes(name)]
INPUT = (2, 3, 32, 32)


def _model(name, **kwargs):
    model = randomize_bn_(repblocks.create_model(name, num_classes=10, **kwargs)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # online blocks' branch scales (all 1 at init), like the BN statistics: not trivial
        for param_name, param in model.named_parameters():
            if param_name.endswith(".scale"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def _equivalence_params():
    for name in ALL_MODELS:
        yield pytest.param(name, torch.float32, 1e-5, "offline", id=f"fp32-{name}")
    for name in TINY_MODELS:
        yield pytest.param(name, torch.float64, 1e-10, "offline", id=f"fp64-{name}")
    for name in LARGE_MODELS:
        yield pytest.param(name, torch.float64, 1e-10, "offline", id=f"fp64-{name}", marks=pytest.mark.slow)
    # Online mode (repblocks.online): the same deploy form from another training form, every family.
    for name in ONLINE_TINY:
        yield pytest.param(name, torch.float32, 1e-5, "online", id=f"fp32-online-{name}")
        yield pytest.param(name, torch.float64, 1e-10, "online", id=f"fp64-online-{name}")
    for name in ONLINE_LARGE:
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            yield pytest.param(
                name, dtype, tolerance, "online", id=f"{str(dtype)[6:]}-online-{name}", marks=pytest.mark.slow
            )


@pytest.mark.parametrize("name,dtype,tolerance,block_mode", list(_equivalence_params()))
@torch.no_grad()
def test_deploy_form_equals_train_form(name, dtype, tolerance, block_mode):
    model = _model(name, block_mode=block_mode).to(dtype)
    train_keys = list(model.state_dict())
    x = torch.randn(INPUT, dtype=dtype)
    expected = model(x)
    deployed = repblocks.switch_to_deploy(model)
    _, rel_err = max_errors(expected, deployed(x))
    assert rel_err < tolerance, f"{name} {dtype}: relative error {rel_err:.2e}"
    assert torch.equal(deployed(x).argmax(1), expected.argmax(1))
    assert list(model.state_dict()) == train_keys, "the input model must be left untouched"  # a RepViT stem: 2 blocks
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())


def _with_block_modes():
    """(name, block_mode) for every model and mode it is built in; the large models under the slow marker."""
    for name in TINY_MODELS + LARGE_MODELS:
        marks = [pytest.mark.slow] if name in LARGE_MODELS else []
        for block_mode in _block_modes(name):
            yield pytest.param(name, block_mode, marks=marks, id=f"{block_mode}-{name}")


@pytest.mark.parametrize("name,block_mode", list(_with_block_modes()))
def test_forward_backward(name, block_mode):
    model = repblocks.create_model(name, num_classes=10, block_mode=block_mode).train()
    logits = model(torch.randn(INPUT))
    assert logits.shape == (INPUT[0], 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY_THEN_SLOW)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_half_precision_model_converts_no_less_accurately_than_it_runs(name, dtype):
    """A whole fp16/bf16 model on the CPU: the deploy form, in the same dtype, is as close to the float64
    truth as the train form is (one fused conv rounds once where three branches round three times)."""
    model = _model(name)
    x = torch.randn(INPUT)
    peak = _peak_activation(model.double(), x.double())
    truth = model(x.double())
    half = model.to(dtype)
    deployed = repblocks.switch_to_deploy(half)
    assert all(p.dtype == dtype for p in deployed.parameters())
    train_out = half(x.to(dtype))
    # MobileOne-S0: four branches a block with random BN statistics reach 1.4e5 in stage 3, past fp16's 65504.
    # Only then (the float64 truth itself holds values the dtype cannot) is there nothing to compare.
    if peak > torch.finfo(dtype).max:
        assert not torch.isfinite(train_out).all() or not torch.isfinite(deployed(x.to(dtype))).all()
        pytest.skip(f"{name}'s activations reach {peak:.1e} at random init, past {dtype}'s range: nothing to compare")
    train_err = max_errors(truth, train_out)[1]
    deploy_err = max_errors(truth, deployed(x.to(dtype)))[1]
    assert deploy_err <= 2 * train_err, f"{name} {dtype}: deploy {deploy_err:.2e} vs train form {train_err:.2e}"


def _peak_activation(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The largest magnitude any module outputs on ``x``."""
    peaks = [0.0]

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            peaks.append(output.abs().max().item())

    handles = [module.register_forward_hook(record) for module in model.modules()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return max(peaks)


@pytest.mark.parametrize("name", TINY_THEN_SLOW)
@torch.no_grad()
def test_converting_a_converted_model_in_place_changes_nothing(name):
    plain = repblocks.switch_to_deploy(_model(name), inplace=True)
    tensors = {key: value.data_ptr() for key, value in plain.state_dict().items()}
    x = torch.randn(INPUT)
    expected = plain(x)
    assert repblocks.switch_to_deploy(plain, inplace=True) is plain
    assert {key: value.data_ptr() for key, value in plain.state_dict().items()} == tensors  # nothing re-made
    assert torch.equal(plain(x), expected)


@pytest.mark.parametrize("name,block_mode", list(_with_block_modes()))
@torch.no_grad()
def test_deploy_weights_round_trip_into_a_deploy_model(name, block_mode, tmp_path):
    deployed = repblocks.switch_to_deploy(_model(name, block_mode=block_mode))
    path = repblocks.save_weights(deployed, tmp_path / f"{name}.safetensors")
    fresh = repblocks.load_weights(repblocks.create_model(name, num_classes=10, deploy=True), path).eval()
    x = torch.randn(INPUT)
    assert torch.equal(fresh(x), deployed(x))


@torch.no_grad()
def test_model_surface():
    model = _model("repvgg_tiny")
    x = torch.randn(INPUT)
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, 1, 1)
    assert torch.equal(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) and model.num_classes == 0
    with pytest.raises(ValueError, match="num_classes must be an integer >= 0, got -3"):
        model.reset_classifier(-3)


def test_in_chans_and_dropout_are_configurable():
    model = repblocks.create_model("repvgg_tiny", in_chans=1, num_classes=3, drop_rate=0.5).train()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert model.head.drop.p == 0.5


@pytest.mark.parametrize("name,deploy_params", [("repvgg_a0", 8_309_384), ("repvgg_b3", 110_960_872)])
def test_parameter_counts_match_the_paper(name, deploy_params):
    """Paper, Table 3: RepVGG-A0 8.30M and RepVGG-B3 110.96M parameters in deploy form."""
    assert count_params(repblocks.create_model(name, deploy=True)) == deploy_params


def test_grouped_variants_use_groups_on_even_layers_as_the_official_code():
    model = repblocks.create_model("repvgg_b1g4")
    groups = [block.groups for stage in model.stages for block in stage]
    assert groups[:4] == [1, 4, 1, 4] and groups[-1] == 1 and groups.count(4) == 13


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"foo": 1},
            r"repvgg_tiny got unknown argument foo; it accepts: act, block_mode, bn_eps, deploy, drop_rate, .*pretrained",
        ),
        ({"foo": 1, "bar": 2}, "unknown arguments bar, foo"),
        ({"act": "gelux"}, r"unknown activation 'gelux'; known activations: relu, .*silu"),
        ({"num_classes": -1}, "num_classes must be an integer >= 0, got -1"),
        ({"num_classes": "10"}, "num_classes must be an integer >= 0, got '10'"),
        ({"in_chans": 0}, "in_chans must be an integer >= 1, got 0"),
        ({"drop_rate": 1.5}, r"drop_rate must be in \[0, 1\), got 1.5"),
        ({"drop_rate": "0.1"}, r"drop_rate must be in \[0, 1\), got '0.1'"),
        ({"pretrained": 3}, "pretrained must be True, False or a path"),
    ],
)
def test_bad_model_arguments_raise_one_line_errors(kwargs, match):
    """What a config's `+model.foo=1` or `model.num_classes=-1` ends in: one line naming what exists."""
    with pytest.raises(ValueError, match=match) as err:
        repblocks.create_model("repvgg_tiny", **kwargs)
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_activation_by_name_builds_the_same_model_as_by_factory():
    """`+model.act=gelu` arrives as a string: it must build what act=nn.GELU builds."""
    by_name = _model("repvgg_tiny", act="gelu")
    by_factory = _model("repvgg_tiny", act=torch.nn.GELU)
    relu = _model("repvgg_tiny")
    by_factory.load_state_dict(by_name.state_dict())
    relu.load_state_dict(by_name.state_dict())
    x = torch.randn(INPUT)
    assert torch.equal(by_name(x), by_factory(x))
    assert not torch.equal(by_name(x), relu(x)), "the activation must change the output"
    assert max_errors(by_name(x), repblocks.switch_to_deploy(by_name)(x))[1] < 1e-5


def test_a_model_without_an_online_form_refuses_it_in_one_line():
    offline_only = [name for name in TINY_MODELS if "online" not in _block_modes(name)]
    for name in offline_only:
        with pytest.raises(ValueError, match="online") as err:
            repblocks.create_model(name, block_mode="online")
        assert "\n" not in str(err.value)


def test_unknown_model_lists_what_exists():
    with pytest.raises(ValueError, match=r"unknown model 'repvgg_z9'.*repvgg_a0"):
        repblocks.create_model("repvgg_z9")


def test_registry_refuses_duplicates_and_filters():
    with pytest.raises(ValueError, match="already registered"):
        repblocks.register_model("repvgg_a0", lambda **kwargs: None)
    assert repblocks.list_models("repvgg_b3*") == ["repvgg_b3", "repvgg_b3g2", "repvgg_b3g4"]


@pytest.mark.parametrize("name", TINY_THEN_SLOW)
@torch.no_grad()
def test_bn_eps_reaches_every_batchnorm_and_the_deploy_form_stays_exact(name):
    """Weights trained with another BatchNorm eps (YOLOv6's 1e-3) need a model built with it, stem included."""
    model = _model(name, bn_eps=1e-3).double()
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    x = torch.randn(INPUT, dtype=torch.float64)
    expected = model(x)
    _, rel_err = max_errors(expected, repblocks.switch_to_deploy(model)(x))
    assert rel_err < 1e-10
