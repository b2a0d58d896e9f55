"""How far YOLOv6 weights land from YOLOv6's own outputs once loaded into RepBlocks (the BatchNorm eps question).

YOLOv6's ``initialize_weights`` (meituan/YOLOv6, yolov6/utils/torch_utils.py) sets every BatchNorm's
eps to 1e-3; a state dict does not carry eps. This builds a stack of YOLOv6's RepVGGBlock,
QARepVGGBlock and QARepVGGBlockV2 (tests/yolov6_layout.py, re-created from YOLOv6's code), gives
its BatchNorms random statistics (once with running variances in [0.5, 2], once in [1e-4, 1e-2], as
trained networks have in some channels), loads its train-form weights into our blocks (train form,
and deploy form: fused on loading) and prints the largest output difference, in float64.

    python -m benchmarks.yolov6_bn_eps          # from the repository root
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

import repblocks
from repblocks.blocks import RepBlock
from repblocks.numerics import max_errors, randomize_bn_
from tests import yolov6_layout as yolov6

QA = dict(scale_branch="conv", identity_branch="plain", post_bn=True)
BLOCKS = [  # YOLOv6's block, ours with the same branches, in, out, stride
    (yolov6.RepVGGBlock, {}, 8, 8, 1),
    (yolov6.QARepVGGBlock, QA, 8, 8, 1),
    (yolov6.QARepVGGBlockV2, dict(QA, avg_pool_branch=True), 8, 8, 1),
    (yolov6.QARepVGGBlock, QA, 8, 16, 2),
    (yolov6.RepVGGBlock, {}, 16, 16, 1),
]
TAKES_BN_EPS = "bn_eps" in inspect.signature(RepBlock).parameters  # False before bn_eps existed
STATES_KIND = "branches" in inspect.signature(repblocks.load_weights).parameters  # the QA kind, stated
# A YOLOv6 network holds one kind of QA block: the stack is measured without the v1 block that has an identity.
STACK = [row for row in BLOCKS if row != (yolov6.QARepVGGBlock, QA, 8, 8, 1)]


def yolov6_stack(blocks=BLOCKS) -> nn.Sequential:
    stack = nn.Sequential(*(block(cin, cout, stride=stride) for block, _, cin, cout, stride in blocks))
    for module in stack.modules():  # what YOLOv6's initialize_weights does to every nn.BatchNorm2d
        if type(module) is nn.BatchNorm2d:
            module.eps, module.momentum = 1e-3, 0.03
    return stack


def qa_kind(blocks) -> str:
    """The QA blocks' kind, which YOLOv6's keys cannot tell and load_weights must be told (branches=)."""
    return "qarepvgg_v2" if any(block is yolov6.QARepVGGBlockV2 for block, *_ in blocks) else "qarepvgg"


def our_stack(blocks=BLOCKS, **kwargs) -> nn.Sequential:
    if TAKES_BN_EPS:
        kwargs["bn_eps"] = 1e-3
    return nn.Sequential(*(RepBlock(cin, cout, stride=s, **kw, **kwargs) for _, kw, cin, cout, s in blocks))


@torch.no_grad()
def measure(var_range: tuple[float, float], blocks=BLOCKS, seed: int = 0) -> dict[str, tuple[float, float]]:
    torch.manual_seed(seed)  # the convolutions' random init: the same figures on every run
    theirs = randomize_bn_(yolov6_stack(blocks), seed=seed).double().eval()
    generator = torch.Generator().manual_seed(seed)
    for module in theirs.modules():
        if isinstance(module, nn.BatchNorm2d):
            low, high = var_range
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) * (high - low) + low)
    inputs = torch.randn(4, blocks[0][2], 24, 24, dtype=torch.float64, generator=generator)
    expected = theirs(inputs)
    results = {}
    for form, kwargs in (("train -> train", {}), ("train -> deploy", {"deploy": True})):
        stated = {"branches": qa_kind(blocks), "bn_eps": 1e-3} if STATES_KIND else {}
        ours = repblocks.load_weights(our_stack(blocks, **kwargs).double(), theirs.state_dict(), **stated).eval()
        results[form] = max_errors(expected, ours(inputs))
    return results


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    print(f"our blocks take bn_eps: {TAKES_BN_EPS}")
    for var_range in ((0.5, 2.0), (1e-4, 1e-2)):
        for form, (abs_err, rel_err) in measure(var_range, STACK).items():
            print(
                f"stack of {len(STACK)}, running_var in {var_range}: {form}: max abs err {abs_err:.2e}, rel {rel_err:.2e}"
            )
        # One block at a time: activations stay near the input's scale, so the absolute error reads as it is.
        single = [measure(var_range, [row]) for row in BLOCKS]
        for form in single[0]:
            abs_err, rel_err = max(errors[form][0] for errors in single), max(errors[form][1] for errors in single)
            print(
                f"worst single block, running_var in {var_range}: {form}: max abs err {abs_err:.2e}, rel {rel_err:.2e}"
            )


if __name__ == "__main__":
    main()
