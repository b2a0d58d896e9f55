"""Model families; importing this package registers every model."""

from repblocks.models import repvgg  # noqa: F401  (registers the RepVGG variants)
