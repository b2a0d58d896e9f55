"""Model families; importing this package registers every model."""

from repblocks.models import fastvit, mobileone, repvgg, tv  # noqa: F401  (registers FastViT, MobileOne, RepVGG, torchvision)
