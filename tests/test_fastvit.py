"""FastViT against timm's own classes: weights both ways, train and reparameterized form, and the folds.

timm's ``FastVit`` is built with each registered variant's config (timm's registered name for the published
ones, which also checks our table), given random BN statistics and layer scales, and compared with ours:
its train-form state dict loads into ours and gives the same logits, ours exported to timm's keys loads
into timm's, timm's ``reparameterize_model`` equals our deploy form, and timm's reparameterized state dict
loads into our deploy-form model (its FFN Conv+BN and attention norms, which timm leaves unfused, are folded
on the way). The big variants run under ``slow``, at 32x32.
"""

from functools import partial

import pytest
import torch

import repblocks
from repblocks.errors import FoldError
from repblocks.layouts import convert_layout, detect_layout
from repblocks.models.fastvit import FASTVIT_CONFIGS, AttentionBlock, RepConditionalPosEnc, RepMixer
from repblocks.numerics import max_errors, randomize_bn_

timm_fastvit = pytest.importorskip("timm.models.fastvit")
from timm.utils.model import reparameterize_model  # noqa: E402

BIG = ["fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12"]
NAMES = ["fastvit_tiny", *[pytest.param(name, marks=pytest.mark.slow) for name in BIG]]
INPUT = (2, 3, 64, 64)  # 2x2 tokens in the last stage: attention over more than one token


def _input(name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """64x64 for the tiny model; 32x32 (one token in the last stage) keeps the big ones' slow tests short."""
    side = 64 if name == "fastvit_tiny" else 32
    return torch.randn(INPUT[0], 3, side, side, dtype=dtype)


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and layer scales (1e-5 at init would hide a wrong mixer fold)."""
    randomize_bn_(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model.eval()


def _timm_model(name: str, **kwargs) -> torch.nn.Module:
    """timm's FastVit of our variant ``name``: timm's registered variant where it has one, else our config."""
    if name in BIG:
        import timm

        return timm.create_model(name, num_classes=10, **kwargs)
    cfg = FASTVIT_CONFIGS[name]
    pos = partial(timm_fastvit.RepConditionalPosEnc, spatial_shape=(7, 7))
    return timm_fastvit.FastVit(
        layers=cfg.depths,
        embed_dims=cfg.widths,
        mlp_ratios=(cfg.mlp_ratio,) * 4,
        token_mixers=cfg.token_mixers,
        pos_embs=tuple(pos if flag else None for flag in cfg.pos_embs),
        num_classes=10,
        **kwargs,
    )


def _pair(name: str, dtype: torch.dtype = torch.float64):
    theirs = _randomized(_timm_model(name)).to(dtype)
    ours = repblocks.create_model(name, num_classes=10).to(dtype).eval()
    return theirs, ours


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_timm_train_weights_load_exactly_and_export_back(name):
    theirs, ours = _pair(name)
    state = theirs.state_dict()
    assert detect_layout(state) == "timm_fastvit"
    repblocks.load_weights(ours, state)
    x = _input(name)
    assert torch.equal(ours.stem(x), theirs.stem(x))
    _, rel_err = max_errors(theirs(x), ours(x))
    assert rel_err < 1e-12, f"{name}: {rel_err:.2e}"
    exported = convert_layout(ours.state_dict(), "timm_fastvit")
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[key], state[key]) for key in state)
    fresh = _timm_model(name).double().eval()
    fresh.load_state_dict(exported)  # strict
    assert torch.equal(fresh(x), theirs(x))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@torch.no_grad()
def test_deploy_form_equals_timms_reparameterize_model(name, dtype, tolerance):
    theirs, ours = _pair(name, dtype)
    repblocks.load_weights(ours, theirs.state_dict())
    x = _input(name, dtype)
    timm_deployed = reparameterize_model(theirs)
    ours_deployed = repblocks.switch_to_deploy(ours)
    _, rel_err = max_errors(timm_deployed(x), ours_deployed(x))
    assert rel_err < tolerance, f"{name} {dtype}: {rel_err:.2e}"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours_deployed.modules())


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_timms_reparameterized_weights_load_into_our_deploy_form(name):
    """timm's deploy form keeps the FFN's Conv+BN and the attention norm: both are folded on loading."""
    theirs, _ = _pair(name)
    timm_deployed = reparameterize_model(theirs)
    assert detect_layout(f"module.{key}" for key in timm_deployed.state_dict()) == "timm_fastvit"
    ours = repblocks.load_weights(
        repblocks.create_model(name, num_classes=10, deploy=True).double(), timm_deployed.state_dict()
    )
    x = _input(name)
    _, rel_err = max_errors(timm_deployed(x), ours.eval()(x))
    assert rel_err < 1e-10, f"{name}: {rel_err:.2e}"


@torch.no_grad()
def test_deploy_form_refuses_timms_layout_that_has_no_fused_ffn():
    model = repblocks.create_model("fastvit_tiny", num_classes=10)
    deployed = repblocks.switch_to_deploy(model)
    assert detect_layout(model.state_dict()) == detect_layout(deployed.state_dict()) == "repblocks"
    with pytest.raises(ValueError, match="keeps the FFN's depthwise Conv\\+BN .* write the train form"):
        convert_layout(deployed.state_dict(), "timm_fastvit")


def _mixer_input(channels: int = 8) -> torch.Tensor:
    return torch.randn(2, channels, 6, 5, dtype=torch.float64)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RepMixer(8),
        lambda: RepConditionalPosEnc(8),
        lambda: AttentionBlock(32, 64, head_dim=16, act=torch.nn.GELU, bn_eps=1e-5, drop=0.0, deploy=False),
    ],
    ids=["repmixer", "repcpe", "attention"],
)
@torch.no_grad()
def test_each_fold_is_exact_in_float64_and_idempotent(build):
    module = _randomized(build().double())
    x = _mixer_input(module.token_mixer.qkv.in_features if isinstance(module, AttentionBlock) else 8)
    expected = module(x)
    form = module.deploy_form()
    assert form.module is module and module.deploy
    assert max_errors(expected, module(x))[1] < 1e-12
    folded = module.norm if isinstance(module, AttentionBlock) else module  # the FFN's Conv+BN is a RepBlock of its own
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    weights = {key: value.clone() for key, value in module.state_dict().items()}
    module.deploy_form()  # again: nothing changes
    assert all(torch.equal(weights[key], value) for key, value in module.state_dict().items())


@torch.no_grad()
def test_a_wrong_mixer_fold_is_caught_where_it_happens(monkeypatch):
    mixer = _randomized(RepMixer(8).double())
    wrong = RepMixer.get_equivalent_kernel_bias

    def sign_lost(self):  # the norm's BN added instead of subtracted
        kernel, bias = wrong(self)
        return kernel, bias + 2 * self.norm.identity.bias * self.layer_scale.gamma.flatten()

    monkeypatch.setattr(RepMixer, "get_equivalent_kernel_bias", sign_lost)
    with pytest.raises(FoldError, match="RepMixer"):
        mixer.deploy_form()


def test_backbone_levels_and_surface():
    backbone = repblocks.create_model("fastvit_tiny", features_only=True, out_indices=(1, 2, 3, 4))
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == [16, 32, 32, 64]
    features = backbone(torch.randn(INPUT))
    assert [tuple(f.shape[1:]) for f in features] == [(16, 16, 16), (32, 8, 8), (32, 4, 4), (64, 2, 2)]
    assert backbone.final_conv is None and backbone.head is None
    model = repblocks.create_model("fastvit_tiny", num_classes=10).eval()
    x = torch.randn(INPUT)
    final, intermediates = model.forward_intermediates(x)
    assert torch.equal(model.forward_head(final), model(x)) and len(intermediates) == 5
    assert model.num_features == 128 and model.forward_head(final, pre_logits=True).shape == (2, 128)
    model.prune_intermediate_layers([2])
    assert model.final_conv is None and model.num_features == 32 and model(x).shape == (2, 32)


@pytest.mark.slow
def test_parameter_counts_match_timm():
    """timm's registered variants and ours, deploy forms included (t8: 4.0M parameters in the paper, train form)."""
    import timm

    for name in BIG:
        ours = repblocks.create_model(name)
        assert sum(p.numel() for p in ours.parameters()) == sum(
            p.numel() for p in timm.create_model(name).parameters()
        ), name
    assert round(sum(p.numel() for p in repblocks.create_model("fastvit_t8").parameters()) / 1e6, 1) == 4.0
