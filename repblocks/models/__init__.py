"""Model families; importing this package registers every model."""

from repblocks.models import mobileone, repvgg, repvit, tv  # noqa: F401  (registers MobileOne, RepVGG, RepViT, torchvision)
