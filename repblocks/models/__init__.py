"""Model families; importing this package registers every model."""

from repblocks.models import mobileone, repvgg  # noqa: F401  (registers the MobileOne and RepVGG variants)
