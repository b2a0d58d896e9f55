"""What a backbone's feature levels are, as timm describes them: ``FeatureInfo`` and index resolution.

A model lists every feature level it has (channels, reduction = output stride, module name);
``out_indices`` picks the levels a ``features_only`` model returns. As in timm, the accessors
(``channels()``, ``reduction()``, ``module_name()``, ``get_dicts()``) answer for ``out_indices`` by
default, while ``len()`` and ``info[i]`` address every level, so that code written for timm's
``model.feature_info`` works unchanged on ours.

One difference from timm: indices are resolved once, to absolute, increasing levels, so that
``channels()`` is always in the order the features come out (timm keeps ``(-1, -2)`` as given
while its features come out in network order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FeatureInfo", "resolve_indices"]


def resolve_indices(num_levels: int, indices: int | Sequence[int] | None, *, what: str = "indices") -> list[int]:
    """Absolute, increasing level indices from timm's forms: None (all levels), n (the last n), or a sequence
    of levels where negative ones count from the end.

    Raises:
        ValueError: An index out of range, a repeated index, or indices out of network order.
    """
    if indices is None:
        return list(range(num_levels))
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_levels:
            raise ValueError(f"{what}={indices} asks for the last {indices} levels; there are {num_levels}")
        return list(range(num_levels - indices, num_levels))
    resolved = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -num_levels <= index < num_levels:
            raise ValueError(
                f"{what} must be levels in 0..{num_levels - 1} (or -{num_levels}..-1 from the end), got {tuple(indices)}"
            )
        resolved.append(index % num_levels)
    if not resolved or any(a >= b for a, b in zip(resolved, resolved[1:], strict=False)):
        raise ValueError(
            f"{what} must be distinct levels in network order (features come out in that order), got {tuple(indices)}"
        )
    return resolved


class FeatureInfo:
    """The feature levels of a model and the ones it returns (``out_indices``), with timm's accessors.

    Args:
        levels: One dict per level: ``num_chs``, ``reduction`` and ``module`` (plus ``stage`` and
            ``index``, as in timm).
        out_indices: The levels a ``features_only`` model returns; all of them for a classifier.
    """

    def __init__(self, levels: Sequence[Mapping[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(level) for level in levels]
        self.out_indices = tuple(resolve_indices(len(self.info), out_indices, what="out_indices"))

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of each level in ``out_indices`` (idx None), of level ``idx`` (an int), or of each of ``idx``."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        """Channels of the returned levels (or of level(s) ``idx``)."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        """Output stride of the returned levels (or of level(s) ``idx``): 2 for the stem, 4 to 32 for the stages."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> str | list[str]:
        """Name of the module producing each returned level (or level(s) ``idx``), e.g. ``"stages.1"``."""
        return self.get("module", idx)

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> dict | list[dict]:
        """The level dicts (only ``keys`` of them, if given) for ``out_indices``, or for level(s) ``idx``."""

        def pick(level: dict) -> dict:
            return dict(level) if keys is None else {key: level[key] for key in keys}

        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def __getitem__(self, idx: int) -> dict:
        return self.info[idx]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, levels={self.info})"
