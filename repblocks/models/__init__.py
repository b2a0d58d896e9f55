"""Model families; importing this package registers every model."""

from repblocks.models import fastvit, mobileone, repghost, repvgg, repvit, tv, unireplknet  # noqa: F401  (each registers its family)
