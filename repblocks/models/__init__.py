"""Model families; importing this package registers every model."""

from repblocks.models import mobileone, repvgg, tv  # noqa: F401  (registers MobileOne, RepVGG, torchvision)
