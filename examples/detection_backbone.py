"""A RepVGG backbone in torchvision's Faster R-CNN: train it, deploy the whole detector, get the same detections.

python examples/detection_backbone.py

The backbone is ``create_model(..., features_only=True)``; torchvision's FeaturePyramidNetwork sits on
the levels it returns (``feature_info.channels()``). After training, ``switch_to_deploy(detector)``
turns every RepBlock of the detector into one conv, and the deploy form detects the same boxes.
"""

import sys
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import repblocks
from repblocks.numerics import randomize_bn_


class RepVGGWithFPN(nn.Module):
    """A features_only RepVGG and a feature pyramid: the ``backbone`` (with ``out_channels``) torchvision needs.

    torchvision's own BackboneWithFPN cannot take the stage outputs (``stages.1``...): its
    IntermediateLayerGetter reaches only direct children.
    """

    def __init__(self, name: str, *, out_indices=(1, 2, 3, 4), out_channels: int = 32):
        super().__init__()
        self.body = repblocks.create_model(name, features_only=True, out_indices=out_indices)
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels, LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> "OrderedDict[str, Tensor]":
        features = self.body(images)  # one map per out_indices level: strides 4, 8, 16, 32 here
        return self.fpn(OrderedDict((str(i), feature) for i, feature in enumerate(features)))


torch.manual_seed(0)
backbone = RepVGGWithFPN("repvgg_tiny")
cfg = backbone.body.pretrained_cfg  # the backbone's preprocessing, for the detector's own normalization
detector = FasterRCNN(
    backbone,
    num_classes=3,  # background and two object classes
    min_size=64,  # small images: a few seconds on a CPU
    max_size=64,
    image_mean=list(cfg["mean"]),
    image_std=list(cfg["std"]),
    box_score_thresh=0.0,  # keep every detection, so the comparison below has something to compare
)

# One training step on synthetic images with two boxes each.
images = [torch.rand(3, 64, 64) for _ in range(2)]
targets = [
    {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 18.0, 60.0, 50.0]]), "labels": torch.tensor([1, 2])}
    for _ in images
]
detector.train()
losses = detector(images, targets)
loss = sum(losses.values())
optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
loss.backward()
optimizer.step()
print(f"one training step: loss {loss.item():.3f} ({', '.join(losses)})")

# One step leaves BatchNorm statistics near their defaults, which would hide folding errors: randomize
# them, as a long training run would. Compare in float64, so that no near-tie between two boxes'
# scores can flip their order in non-maximum suppression: any difference is then the conversion's.
randomize_bn_(detector)
detector = detector.eval().double()
deployed = repblocks.switch_to_deploy(detector)  # the whole detector: a copy, every RepBlock fused
images = [image.double() for image in images]
with torch.inference_mode():
    expected, actual = detector(images), deployed(images)

worst = 0.0
for want, got in zip(expected, actual, strict=True):
    if len(want["boxes"]) == 0 or not torch.equal(want["labels"], got["labels"]):
        sys.exit("the deploy form detects other objects than the train form (or nothing was detected)")
    worst = max(
        worst, (want["boxes"] - got["boxes"]).abs().max().item(), (want["scores"] - got["scores"]).abs().max().item()
    )
blocks = [m for m in deployed.modules() if isinstance(m, repblocks.RepBlock)]
if not all(block.deploy for block in blocks):
    sys.exit("some RepBlocks of the deployed detector were not fused")
print(f"deployed: {len(blocks)} RepBlocks fused; {len(expected[0]['boxes'])} detections per image")
print(f"deploy vs train form: same labels, boxes and scores within {worst:.1e}")
if worst > 1e-9:
    sys.exit("the deploy form's boxes or scores differ from the train form's")
