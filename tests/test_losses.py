"""repblocks.losses: R-Drop against a hand computation; rep_l2 against the blocks' equivalent kernels."""

import pytest
import torch

import repblocks
from repblocks.numerics import randomize_bn_
from repblocks.train.losses import RDropLoss, rep_l2, rep_l2_parameters

BATCH, CLASSES = 4, 5


def _hand_rdrop(logits_a, logits_b, target_probs, alpha):
    """Eq. 3 of the R-Drop paper per sample, written out with explicit sums, then the batch mean."""
    log_p_a, log_p_b = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
    p_a, p_b = log_p_a.exp(), log_p_b.exp()
    nll = -(target_probs * log_p_a).sum(-1) - (target_probs * log_p_b).sum(-1)  # (B,)
    kl_ab = (p_a * (log_p_a - log_p_b)).sum(-1)  # KL(p_a || p_b), (B,)
    kl_ba = (p_b * (log_p_b - log_p_a)).sum(-1)
    return (nll + alpha * 0.5 * (kl_ab + kl_ba)).mean()


def _logits():
    return torch.randn(BATCH, CLASSES, dtype=torch.float64), torch.randn(BATCH, CLASSES, dtype=torch.float64)


def test_rdrop_matches_hand_computation_with_index_targets():
    logits_a, logits_b = _logits()
    target = torch.tensor([0, 3, 4, 1])
    one_hot = torch.nn.functional.one_hot(target, CLASSES).double()
    loss = RDropLoss(alpha=0.7)(logits_a, logits_b, target)
    torch.testing.assert_close(loss, _hand_rdrop(logits_a, logits_b, one_hot, alpha=0.7))


def test_rdrop_matches_hand_computation_with_soft_targets():
    logits_a, logits_b = _logits()
    soft = torch.rand(BATCH, CLASSES, dtype=torch.float64).softmax(-1)  # like timm's Mixup targets
    loss = RDropLoss(alpha=2.0)(logits_a, logits_b, soft)
    torch.testing.assert_close(loss, _hand_rdrop(logits_a, logits_b, soft, alpha=2.0))


def test_rdrop_label_smoothing_smooths_both_target_kinds_like_cross_entropy():
    logits_a, logits_b = _logits()
    target = torch.tensor([0, 3, 4, 1])
    smoothed = 0.9 * torch.nn.functional.one_hot(target, CLASSES).double() + 0.1 / CLASSES
    expected = _hand_rdrop(logits_a, logits_b, smoothed, alpha=1.0)
    torch.testing.assert_close(RDropLoss(label_smoothing=0.1)(logits_a, logits_b, target), expected)
    soft = torch.nn.functional.one_hot(target, CLASSES).double()
    torch.testing.assert_close(RDropLoss(label_smoothing=0.1)(logits_a, logits_b, soft), expected)


def test_rdrop_with_alpha_zero_is_the_sum_of_the_two_cross_entropies():
    logits_a, logits_b = _logits()
    target = torch.tensor([2, 2, 0, 1])
    ce = torch.nn.functional.cross_entropy
    expected = ce(logits_a, target) + ce(logits_b, target)
    torch.testing.assert_close(RDropLoss(alpha=0.0)(logits_a, logits_b, target), expected)


def test_rdrop_is_symmetric_and_records_its_parts():
    logits_a, logits_b = _logits()
    target = torch.tensor([1, 0, 4, 4])
    loss_fn = RDropLoss(alpha=3.0)
    loss_ab = loss_fn(logits_a, logits_b, target)
    ce, kl = loss_fn.last_parts
    torch.testing.assert_close(loss_fn(logits_b, logits_a, target), loss_ab)
    torch.testing.assert_close(ce + 3.0 * kl, loss_ab.detach())
    assert kl > 0 and not ce.requires_grad


def test_rdrop_kl_vanishes_for_equal_logits():
    logits, _ = _logits()
    loss_fn = RDropLoss()
    loss_fn(logits, logits.clone(), torch.tensor([0, 1, 2, 3]))
    assert loss_fn.last_parts.kl.abs() < 1e-12


@pytest.mark.parametrize("kwargs", [dict(alpha=-1.0), dict(label_smoothing=1.0)])
def test_rdrop_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RDropLoss(**kwargs)


def _tiny_model():
    # Random BN statistics and affine parameters: fresh BNs (scale 1, shift 0) would hide mistakes.
    return randomize_bn_(repblocks.create_model("repvgg_tiny"), seed=1)


def test_rep_l2_is_the_sum_of_squared_equivalent_kernels():
    model = _tiny_model()
    blocks = [module for module in model.modules() if isinstance(module, repblocks.RepBlock)]
    assert any(block.identity is not None for block in blocks)
    expected = sum(block.get_equivalent_kernel_bias()[0].pow(2).sum() for block in blocks)
    penalty = rep_l2(model)
    assert penalty.dim() == 0 and penalty.requires_grad
    torch.testing.assert_close(penalty, expected)


def test_rep_l2_gradient_reaches_branch_kernels_and_bn_weights_only():
    model = _tiny_model()
    rep_l2(model).backward()
    block = next(module for module in model.modules() if isinstance(module, repblocks.RepBlock) and module.identity)
    for param in (block.conv_kxk.conv.weight, block.conv_1x1.conv.weight, block.conv_kxk.bn.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert block.identity.weight.grad.abs().sum() > 0
    assert block.conv_kxk.bn.bias.grad is None  # BN shifts move the bias, not the kernel
    covered = rep_l2_parameters(model)
    with_grad = {id(param) for param in model.parameters() if param.grad is not None}
    assert with_grad == covered


def test_rep_l2_counts_deploy_form_blocks_by_their_fused_kernel():
    model = _tiny_model().eval()
    expected = rep_l2(model).detach()
    blocks = [module for module in model.modules() if isinstance(module, repblocks.RepBlock)]
    blocks[0].switch_to_deploy()  # a model half converted
    torch.testing.assert_close(rep_l2(model), expected)
    assert id(blocks[0].reparam.weight) in rep_l2_parameters(model)
    torch.testing.assert_close(rep_l2(repblocks.switch_to_deploy(model)), expected)


def test_rep_l2_of_a_model_without_rep_blocks_is_zero():
    penalty = rep_l2(torch.nn.Linear(3, 2))
    assert penalty.item() == 0.0 and penalty.dim() == 0
