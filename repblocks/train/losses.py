"""Training losses: R-Drop's consistency loss and RepVGG's L2 penalty on the equivalent kernels.

* :class:`RDropLoss`: Liang et al., "R-Drop: Regularized Dropout for Neural Networks",
  NeurIPS 2021, https://arxiv.org/abs/2106.14448. Two forward passes of the same batch (two
  dropout masks) are trained on the labels and pulled towards each other by a symmetric KL.
* :func:`rep_l2`: the "custom L2" of the official RepVGG code (Ding et al., CVPR 2021,
  https://github.com/DingXiaoH/RepVGG): weight decay taken on the kernel each block will have
  after deployment instead of on the branch kernels it trains with.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from repblocks.blocks import RepBlock

__all__ = ["RDropLoss", "RDropParts", "rep_l2", "rep_l2_parameters"]


class RDropParts(NamedTuple):
    """The two terms of the last :class:`RDropLoss` call, detached, for logging."""

    ce: Tensor  # CE(a) + CE(b), batch mean
    kl: Tensor  # 0.5 * (KL(p_a || p_b) + KL(p_b || p_a)), batch mean, before alpha


class RDropLoss(nn.Module):
    """R-Drop: cross-entropy on two forward passes plus ``alpha`` times their symmetric KL divergence.

    For each sample ``i`` this is the paper's Eq. 3,
    ``L_i = CE(a_i, y_i) + CE(b_i, y_i) + alpha * 0.5 * (KL(p_a,i || p_b,i) + KL(p_b,i || p_a,i))``,
    where each KL sums over the classes; the result is the mean of ``L_i`` over the batch. So both
    cross-entropy terms are batch means (``F.cross_entropy``'s default) and the KL is a batch mean
    too (``F.kl_div(..., reduction="batchmean")``), and ``alpha`` means what it means in the paper,
    independently of the batch size.

    The official code (github.com/dropreg/R-Drop) reduces differently, which changes what a given
    alpha means: its image-classification (ViT) code adds two batch-mean cross-entropies to
    ``alpha_vit * (KL_ab + KL_ba)`` with both KLs *summed over the batch and the classes*
    (``kl_div(..., reduction="none").sum()``); its README example takes
    ``0.5 * (CE_a + CE_b) + alpha_readme * 0.5 * (KL_ab + KL_ba)``, KLs again summed over the batch.
    At batch size ``B`` both therefore equal ``alpha = 2 * B * alpha_vit`` (or ``2 * B * alpha_readme``,
    with the README's total halved) here.

    Targets may be class indices ``(B,)`` or probabilities ``(B, C)`` (soft targets, e.g. from
    timm's ``Mixup``); ``F.cross_entropy`` takes both. ``label_smoothing`` is passed to it, so it
    also smooths probability targets; timm's ``Mixup`` already smooths its targets, so leave it at 0
    there. The KL term never sees the targets.

    After each call, :attr:`last_parts` holds the detached terms (:class:`RDropParts`) for logging.

    Args:
        alpha: Weight of the symmetric KL term (the paper's alpha; 0 gives CE(a) + CE(b)).
        label_smoothing: Label smoothing of both cross-entropy terms.
    """

    def __init__(self, alpha: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        if alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {alpha}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.last_parts: RDropParts | None = None

    def forward(self, logits_a: Tensor, logits_b: Tensor, target: Tensor) -> Tensor:
        """The loss of one batch seen twice.

        Args:
            logits_a: Logits of the first forward pass, ``(B, C)``.
            logits_b: Logits of the second forward pass (other dropout masks), ``(B, C)``.
            target: Class indices ``(B,)`` or class probabilities ``(B, C)``.

        Returns:
            The scalar loss, averaged over the batch.
        """
        if logits_a.shape != logits_b.shape:
            raise ValueError(
                f"the two passes' logits differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}"
            )
        ce = F.cross_entropy(logits_a, target, label_smoothing=self.label_smoothing) + F.cross_entropy(
            logits_b, target, label_smoothing=self.label_smoothing
        )
        kl = _symmetric_kl(logits_a, logits_b)
        self.last_parts = RDropParts(ce.detach(), kl.detach())
        return ce + self.alpha * kl

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, label_smoothing={self.label_smoothing}"


def _symmetric_kl(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """``0.5 * (KL(p_a || p_b) + KL(p_b || p_a))`` of the softmax distributions, summed over classes, batch mean."""
    log_p_a = F.log_softmax(logits_a, dim=-1)  # (B, C)
    log_p_b = F.log_softmax(logits_b, dim=-1)
    # kl_div(input, target) is KL(target || input); log_target keeps both sides in log space (no log(0)).
    kl_ab = F.kl_div(log_p_b, log_p_a, reduction="batchmean", log_target=True)
    kl_ba = F.kl_div(log_p_a, log_p_b, reduction="batchmean", log_target=True)
    return 0.5 * (kl_ab + kl_ba)


def rep_l2(model: nn.Module) -> Tensor:
    """RepVGG's "custom L2": the sum of squares of every :class:`RepBlock`'s equivalent kernel.

    Sums ``K.pow(2).sum()`` over the kernels ``K`` of ``get_equivalent_kernel_bias()``: the kernel
    the block becomes when deployed, differentiable with respect to the branch conv kernels and the
    BatchNorm weights (the biases do not enter the kernel). Add it to the loss as
    ``weight_decay / 2 * rep_l2(model)``, the official code's scaling, so that its gradient with
    respect to the equivalent kernel ``K`` is ``weight_decay * K`` like plain weight decay; and take
    the parameters of :func:`rep_l2_parameters` out of the optimizer's weight decay, so they are not
    decayed twice (the official code does the same).

    Differences from the official ``get_custom_L2``, which we do not copy:

    * The identity branch is part of the equivalent kernel here. The official code leaves it out
      (RepVGG issue #99), so its penalty is not that of the deployed kernel.
    * The official code detaches the BN scales, takes plain L2 on the ring of the kxk kernel and
      divides the centre by ``t_kxk**2 + t_1x1**2`` to keep the coefficient comparable with plain
      L2. Here the BN scales ``gamma / sqrt(running_var + eps)`` multiply the kernels unnormalized
      and receive gradient, so the penalty also pulls the branch BN weights towards zero.

    Blocks already in deploy form contribute their fused kernel. The kernels are formed in float64
    (see :mod:`repblocks.fusion`) and the sum is returned in the model's dtype.

    Returns:
        A 0-dim tensor that requires grad when any covered parameter does; zero without RepBlocks.

    Raises:
        ValueError: ``model`` holds no parameters at all (nothing to put the zero on).
    """
    total = None
    for block in _rep_blocks(model):
        kernel, _ = block.get_equivalent_kernel_bias()  # (C_out, C_in / groups, k, k)
        square_sum = kernel.pow(2).sum()
        total = square_sum if total is None else total + square_sum
    if total is not None:
        return total
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError(f"rep_l2 needs a model with parameters, got a {type(model).__name__} with none")
    return first.new_zeros(())


def rep_l2_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters :func:`rep_l2` decays: pass them to ``param_groups(..., skip=...)``.

    For a block in training form: its branch conv kernels and the weights (gammas) of its branch,
    identity and post-sum BatchNorms; for a block in deploy form: its fused kernel (and a kept post-sum BN's
    weight): :meth:`RepBlock.kernel_parameters`. The BN weights are 1-D
    and so never decayed by :func:`repblocks.train.optim.param_groups` anyway; they are listed because
    the penalty reaches them. BN biases and the fused bias do not enter the kernel and are not listed.
    """
    return {id(param) for block in _rep_blocks(model) for param in block.kernel_parameters()}


def _rep_blocks(model: nn.Module) -> list[RepBlock]:
    return [module for module in model.modules() if isinstance(module, RepBlock)]
