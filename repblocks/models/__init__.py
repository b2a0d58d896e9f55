"""Model families; importing this package registers every model."""

from repblocks.models import mobileone, repghost, repvgg, tv  # noqa: F401  (registers MobileOne, RepGhost, RepVGG, torchvision)
