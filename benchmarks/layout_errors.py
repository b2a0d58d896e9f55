"""The README's fp64 errors of timm's newer families loaded into ours: train form, and our deploy form vs timm's fused.

For each of FastViT-T8, RepViT-M0.9, RepGhostNet-1.0x and GhostNetV3-1.0x: timm's own class with random
weights and random BatchNorm statistics, in float64, batch 2 at 64x64. Printed: the layout recognised; the
relative error of ours (timm's train-form weights loaded) against timm's; of our deploy form against timm's
``reparameterize_model``; and of timm's fused weights loaded into our deploy-form model.

    python -m benchmarks.layout_errors
"""

import copy

import timm
import torch

import repblocks
from repblocks.layouts import detect_layout
from repblocks.numerics import max_errors, randomize_bn_

MODELS = ["fastvit_t8", "repvit_m0_9", "repghostnet_100", "ghostnetv3_100"]


def _timm_fused(model: torch.nn.Module) -> torch.nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm's fused layers are made in the default dtype
    try:
        return timm.utils.reparameterize_model(copy.deepcopy(model)).eval()
    finally:
        torch.set_default_dtype(default)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    for name in MODELS:
        theirs = randomize_bn_(timm.create_model(name, num_classes=10)).double().eval()
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        ours = repblocks.load_weights(repblocks.create_model(name, num_classes=10).double(), theirs.state_dict()).eval()
        fused = _timm_fused(theirs)
        deployed = repblocks.switch_to_deploy(ours)
        fused_in = repblocks.create_model(name, num_classes=10, deploy=True).double()
        fused_in = repblocks.load_weights(fused_in, fused.state_dict()).eval()
        print(
            f"{name} ({detect_layout(theirs.state_dict())}): train form {max_errors(theirs(x), ours(x))[1]:.1e}; "
            f"our deploy form vs timm's fused {max_errors(fused(x), deployed(x))[1]:.1e}; "
            f"timm's fused into our deploy form {max_errors(fused(x), fused_in(x))[1]:.1e}"
        )


if __name__ == "__main__":
    main()
