"""VDSR (Kim et al., "Accurate Image Super-Resolution Using Very Deep Convolutional Networks", CVPR 2016).

BasicSR has no VDSR; this is the paper's network, used as the original of D2C-VDSR (Table 3 of
D2C-SR).
"""
from torch import nn as nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from .arch_util import reject_unknown_options


@ARCH_REGISTRY.register()
class VDSR(nn.Module):
    """VDSR: 20 conv layers on the bicubic-upsampled image, learning the residual.

    ``conv(num_in_ch -> F) + ReLU``, ``num_block`` times ``conv(F -> F) + ReLU``, ``conv(F ->
    num_out_ch)``, added to the bicubic interpolation of the input (the global residual).
    The paper's network has 20 weight layers: ``num_block=18``, ``num_feat=64`` (0.668M
    parameters). Unlike the paper (which feeds the pre-upsampled image, Y channel only), the
    interpolation happens inside, so BasicSR's paired LR/HR data sets drive it like any other
    network and all three colour channels are restored.

    Args:
        num_in_ch (int): Input channels. Default: 3.
        num_out_ch (int): Output channels (must equal ``num_in_ch``: the input is added back). Default: 3.
        num_feat (int): Feature channels. Default: 64.
        num_block (int): Hidden conv-ReLU layers between the first and the last. Default: 18.
        upscale (int): Scale factor (any positive integer). Default: 4.

    Shapes: ``(N, C, H, W)`` in [0, 1] -> ``(N, C, upscale*H, upscale*W)``, not clamped.
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_block=18, upscale=4, **unknown):
        reject_unknown_options(type(self), unknown)
        super().__init__()
        if num_in_ch != num_out_ch:
            raise ValueError(f'VDSR: num_in_ch={num_in_ch} and num_out_ch={num_out_ch} must be equal '
                             '(the interpolated input is added to the output).')
        self.upscale = upscale
        layers = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.ReLU(inplace=True)]
        for _ in range(num_block):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(num_feat, num_out_ch, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        upsampled = F.interpolate(x, scale_factor=self.upscale, mode='bicubic', align_corners=False)
        return self.body(upsampled) + upsampled
