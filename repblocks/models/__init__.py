"""Model families; importing this package registers every model."""

from repblocks.models import fastvit, mobileone, repghost, repvgg, repvit, tv  # noqa: F401  (registers every family)
