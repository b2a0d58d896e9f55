"""ACNet's asymmetric convolution block, re-created from DingXiaoH/ACNet (acnet/acb.py, MIT licence).

Commit 748fb0c734b41c48eacaacf7fc5e851e33a63ce8 (2023-02-10). ``ACBlock`` as published: a kxk ``square_conv``
+ ``square_bn``, a kx1 ``ver_conv`` + ``ver_bn`` and a 1xk ``hor_conv`` + ``hor_bn``, padded so that their
windows align with the kxk's centre (Fig. 2 of the paper), summed, with no activation; ``switch_to_deploy``
adds the BN-folded 1xk and kx1 kernels into the centre row and column of the kxk one (``fused_conv``). Kept as
upstream wrote it (the cropping path for a padding below ``kernel_size // 2`` included) except:
``init_gamma``/``single_init`` print nothing, and the ``__main__`` demo is left out. Its arithmetic takes the
dtype of the module, so it is exact in float64.
"""

import torch
import torch.nn as nn
import torch.nn.init as init


class ACBlock(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        padding_mode="zeros",
        deploy=False,
        use_affine=True,
        reduce_gamma=False,
        gamma_init=None,
    ):
        super().__init__()
        self.deploy = deploy
        if deploy:
            self.fused_conv = nn.Conv2d(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=(kernel_size, kernel_size),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=True,
                padding_mode=padding_mode,
            )
        else:
            self.square_conv = nn.Conv2d(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=(kernel_size, kernel_size),
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
                padding_mode=padding_mode,
            )
            self.square_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)

            if padding - kernel_size // 2 >= 0:
                #   Common use case. E.g., k=3, p=1 or k=5, p=2
                self.crop = 0
                #   Compared to the KxK layer, the padding of the 1xK layer and Kx1 layer should be adjust to align the sliding windows (Fig 2 in the paper)
                hor_padding = [padding - kernel_size // 2, padding]
                ver_padding = [padding, padding - kernel_size // 2]
            else:
                #   A negative "padding" (padding - kernel_size//2 < 0, which is not a common use case) is cropping.
                #   Since nn.Conv2d does not support negative padding, we implement it manually
                self.crop = kernel_size // 2 - padding
                hor_padding = [0, padding]
                ver_padding = [padding, 0]

            self.ver_conv = nn.Conv2d(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=(kernel_size, 1),
                stride=stride,
                padding=ver_padding,
                dilation=dilation,
                groups=groups,
                bias=False,
                padding_mode=padding_mode,
            )

            self.hor_conv = nn.Conv2d(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=(1, kernel_size),
                stride=stride,
                padding=hor_padding,
                dilation=dilation,
                groups=groups,
                bias=False,
                padding_mode=padding_mode,
            )
            self.ver_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)
            self.hor_bn = nn.BatchNorm2d(num_features=out_channels, affine=use_affine)

            if reduce_gamma:
                self.init_gamma(1.0 / 3)

            if gamma_init is not None:
                assert not reduce_gamma
                self.init_gamma(gamma_init)

    def _fuse_bn_tensor(self, conv, bn):
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return conv.weight * t, bn.bias - bn.running_mean * bn.weight / std

    def _add_to_square_kernel(self, square_kernel, asym_kernel):
        asym_h = asym_kernel.size(2)
        asym_w = asym_kernel.size(3)
        square_h = square_kernel.size(2)
        square_w = square_kernel.size(3)
        square_kernel[
            :,
            :,
            square_h // 2 - asym_h // 2 : square_h // 2 - asym_h // 2 + asym_h,
            square_w // 2 - asym_w // 2 : square_w // 2 - asym_w // 2 + asym_w,
        ] += asym_kernel

    def get_equivalent_kernel_bias(self):
        hor_k, hor_b = self._fuse_bn_tensor(self.hor_conv, self.hor_bn)
        ver_k, ver_b = self._fuse_bn_tensor(self.ver_conv, self.ver_bn)
        square_k, square_b = self._fuse_bn_tensor(self.square_conv, self.square_bn)
        self._add_to_square_kernel(square_k, hor_k)
        self._add_to_square_kernel(square_k, ver_k)
        return square_k, hor_b + ver_b + square_b

    def switch_to_deploy(self):
        deploy_k, deploy_b = self.get_equivalent_kernel_bias()
        self.deploy = True
        self.fused_conv = nn.Conv2d(
            in_channels=self.square_conv.in_channels,
            out_channels=self.square_conv.out_channels,
            kernel_size=self.square_conv.kernel_size,
            stride=self.square_conv.stride,
            padding=self.square_conv.padding,
            dilation=self.square_conv.dilation,
            groups=self.square_conv.groups,
            bias=True,
            padding_mode=self.square_conv.padding_mode,
        )
        self.__delattr__("square_conv")
        self.__delattr__("square_bn")
        self.__delattr__("hor_conv")
        self.__delattr__("hor_bn")
        self.__delattr__("ver_conv")
        self.__delattr__("ver_bn")
        self.fused_conv.weight.data = deploy_k
        self.fused_conv.bias.data = deploy_b

    def init_gamma(self, gamma_value):
        init.constant_(self.square_bn.weight, gamma_value)
        init.constant_(self.ver_bn.weight, gamma_value)
        init.constant_(self.hor_bn.weight, gamma_value)

    def single_init(self):
        init.constant_(self.square_bn.weight, 1.0)
        init.constant_(self.ver_bn.weight, 0.0)
        init.constant_(self.hor_bn.weight, 0.0)

    def forward(self, input):
        if self.deploy:
            return self.fused_conv(input)
        else:
            square_outputs = self.square_conv(input)
            square_outputs = self.square_bn(square_outputs)
            if self.crop > 0:
                ver_input = input[:, :, :, self.crop : -self.crop]
                hor_input = input[:, :, self.crop : -self.crop, :]
            else:
                ver_input = input
                hor_input = input
            vertical_outputs = self.ver_conv(ver_input)
            vertical_outputs = self.ver_bn(vertical_outputs)
            horizontal_outputs = self.hor_conv(hor_input)
            horizontal_outputs = self.hor_bn(horizontal_outputs)
            result = square_outputs + vertical_outputs + horizontal_outputs
            return result


# Our RepBlock's names for ACBlock's modules (ours: repblocks.blocks.BRANCH_SETS["acnet"]).
_RENAMES = {
    "square_conv.": "conv_kxk.conv.",
    "square_bn.": "conv_kxk.bn.",
    "hor_conv.": "conv_1xk.conv.",
    "hor_bn.": "conv_1xk.bn.",
    "ver_conv.": "conv_kx1.conv.",
    "ver_bn.": "conv_kx1.bn.",
    "fused_conv.": "reparam.",
}


def to_repblocks(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ACBlock's state dict with our RepBlock's keys."""
    renamed = {}
    for key, value in state_dict.items():
        prefix = next(old for old in _RENAMES if key.startswith(old))
        renamed[_RENAMES[prefix] + key[len(prefix) :]] = value
    return renamed
