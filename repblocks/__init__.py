"""repblocks: re-parameterizable conv blocks, the RepVGG zoo, and exact deploy conversion.

>>> import repblocks
>>> model = repblocks.create_model("repvgg_a0", num_classes=10)
>>> plain = repblocks.switch_to_deploy(model)  # a copy: one 3x3 conv + ReLU per block
>>> backbone = repblocks.create_model("repvgg_a0", features_only=True, out_indices=(2, 3, 4))
>>> backbone.feature_info.channels()
[96, 192, 1280]
"""

from repblocks import models as _models  # noqa: F401  (registers the zoo)
from repblocks.blocks import ConvBN, RepBlock, SqueezeExcite
from repblocks.checkpoint import read_checkpoint, read_state_dict
from repblocks.convert import fold_conv_bn, switch_to_deploy
from repblocks.expand import Expansion, expand
from repblocks.layouts import convert_layout
from repblocks.online import OnlineRepBlock
from repblocks.registry import create_model, get_pretrained_cfg, list_models, register_model
from repblocks.weights import load_weights, save_weights

__all__ = [
    "ConvBN",
    "Expansion",
    "OnlineRepBlock",
    "RepBlock",
    "SqueezeExcite",
    "convert_layout",
    "create_model",
    "expand",
    "fold_conv_bn",
    "get_pretrained_cfg",
    "list_models",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "register_model",
    "save_weights",
    "switch_to_deploy",
]
__version__ = "0.1.0"
