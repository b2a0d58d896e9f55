"""Which convolution feeds which BatchNorm: read from a module's ``torch.fx`` graph, not guessed from names.

Both folding (:func:`repblocks.convert.fold_conv_bn`) and expansion (:func:`repblocks.expand.expand`)
need the Conv->BatchNorm pairs of an arbitrary network. A pair is taken only when the BN's sole input
is the conv's output, the conv's output goes nowhere else, and each module is called once. Networks
that fx cannot trace fall back to pairs that sit next to each other inside an ``nn.Sequential``,
where the data flow is certain.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["conv_bn_pairs", "set_submodule", "shared_module_ids"]

log = logging.getLogger(__name__)

ModuleTest = Callable[[nn.Module], bool]


def conv_bn_pairs(model: nn.Module, *, is_conv: ModuleTest, is_bn: ModuleTest) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` of every module ``is_conv`` accepts whose output only the one ``is_bn`` accepts reads.

    Names are as ``model.named_modules()`` gives them. Modules reachable under two names are never paired:
    changing one use would change the other.
    """
    pairs = _traced_pairs(model, is_conv, is_bn)
    return pairs if pairs is not None else _sequential_pairs(model, is_conv, is_bn)


def shared_module_ids(model: nn.Module) -> set[int]:
    """Modules reachable under more than one name: folding or replacing one use would change the others."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {key for key, count in counts.items() if count > 1}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` (dotted) in ``model``, where a module already is."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, module)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every conv and BN a single graph node, including subclasses defined outside torch.nn
    (timm's ``Conv2dSame``, torchvision's ``FrozenBatchNorm2d``), which fx would otherwise trace into."""

    def __init__(self, is_leaf: ModuleTest):
        super().__init__()
        self.is_leaf = is_leaf

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return self.is_leaf(module) or super().is_leaf_module(module, qualified_name)


def _traced_pairs(model: nn.Module, is_conv: ModuleTest, is_bn: ModuleTest) -> list[tuple[str, str]] | None:
    try:
        graph = _LeafTracer(lambda m: is_conv(m) or is_bn(m)).trace(model)
    except Exception as err:  # fx raises many kinds of errors on dynamic code; any of them means "untraceable"
        log.info(
            "torch.fx cannot trace %s (%s); taking only Conv+BN pairs inside nn.Sequential", type(model).__name__, err
        )
        return None
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    shared = shared_module_ids(model)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_bn(modules[node.target]) or len(node.args) != 1:
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv = modules[source.target]
        if (
            is_conv(conv)
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
            and id(conv) not in shared
            and id(modules[node.target]) not in shared
        ):
            pairs.append((source.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module, is_conv: ModuleTest, is_bn: ModuleTest) -> list[tuple[str, str]]:
    shared = shared_module_ids(model)
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if is_conv(conv) and is_bn(bn) and id(conv) not in shared and id(bn) not in shared:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs
