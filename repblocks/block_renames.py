"""Renaming the keys below one block: for layouts whose names depend on the block around them.

:mod:`repblocks.unireplknet_layout` and :mod:`repblocks.ultralytics_layout` first tell each block's kind from
its keys, then rename what lies below it with this.
"""

from __future__ import annotations

__all__ = ["rename_below"]


def rename_below(names: dict[str, str], block: str, renames: list[tuple[str, str]]) -> None:
    """Rename, in place, each name below ``block`` (a key prefix, "" or ending in a dot) that starts with one of
    ``renames``' old parts: the first that fits, ``block + old + rest`` -> ``block + new + rest``.

    ``names`` maps each original key to its name so far, so renames apply in steps.
    """
    for key, name in names.items():
        for old, new in renames:
            if name.startswith(block + old):
                names[key] = block + new + name[len(block + old) :]
                break
