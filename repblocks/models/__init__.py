"""Model families; importing this package registers every model."""

from repblocks.models import mobileone, repvgg, tv, unireplknet  # noqa: F401  (each registers its family)
