"""RDN (Zhang et al., "Residual Dense Network for Image Super-Resolution", CVPR 2018).

BasicSR has no RDN. :class:`RDB` is also the basic module of D2C-RDN (``RDNBranch``).
"""
import torch
from torch import nn as nn

from basicsr.archs.arch_util import Upsample
from basicsr.utils.registry import ARCH_REGISTRY
from .arch_util import ConcatFusionChain, reject_unknown_options


class RDB(nn.Module):
    """Residual dense block: densely connected conv-ReLU layers, local feature fusion, local residual.

    Layer ``i`` sees the block input and all earlier layers' outputs (``F + i*G`` channels)
    and adds ``G`` channels; a 1x1 conv fuses the ``F + C*G`` channels back to ``F``
    (local feature fusion) and the block input is added (local residual learning).

    Args:
        num_feat (int): F (G0 in the paper), channels in and out.
        num_grow_ch (int): G, the growth rate.
        num_layer (int): C, conv layers per block.

    Shapes: ``(N, F, H, W)`` -> ``(N, F, H, W)``.
    """

    def __init__(self, num_feat, num_grow_ch, num_layer):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(num_feat + i * num_grow_ch, num_grow_ch, 3, 1, 1), nn.ReLU(inplace=True))
            for i in range(num_layer)
        ])
        self.fusion = nn.Conv2d(num_feat + num_layer * num_grow_ch, num_feat, 1)

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return self.fusion(torch.cat(feats, dim=1)) + x


class GlobalFeatureFusion(ConcatFusionChain):
    """RDN's global feature fusion: the outputs of all RDBs, concatenated, through 1x1 and 3x3 convs.

    Shapes: ``(N, F, H, W)`` -> ``(N, F, H, W)``.
    """

    def __init__(self, num_feat, num_grow_ch, num_layer, num_block):
        super().__init__()
        self.blocks = nn.ModuleList([RDB(num_feat, num_grow_ch, num_layer) for _ in range(num_block)])
        self.fusion = nn.Sequential(
            nn.Conv2d(num_block * num_feat, num_feat, 1), nn.Conv2d(num_feat, num_feat, 3, 1, 1))


@ARCH_REGISTRY.register()
class RDN(nn.Module):
    """Residual dense network.

    Two shallow convs (the first one's output is the global residual), ``num_block`` RDBs,
    global feature fusion, the residual, then the sub-pixel upsampler and an output conv.
    The paper's standard network is ``num_block=16, num_layer=8, num_grow_ch=64`` (22.3M
    parameters at x4); D2C-SR's Table 3 compares against a 6.02M RDN, which the option files
    there reach with ``num_block=20, num_layer=6, num_grow_ch=32`` (configuration "A" of the
    reference EDSR-PyTorch code).

    Args:
        num_in_ch (int): Input channels. Default: 3.
        num_out_ch (int): Output channels. Default: 3.
        num_feat (int): F (G0), channels between blocks. Default: 64.
        num_block (int): D, the number of RDBs. Default: 16.
        num_layer (int): C, conv layers per RDB. Default: 8.
        num_grow_ch (int): G, growth rate. Default: 64.
        upscale (int): 2, 3, 4 or 8. Default: 4.

    Shapes: ``(N, C, H, W)`` in [0, 1] -> ``(N, num_out_ch, upscale*H, upscale*W)``.
    """

    def __init__(self,
                 num_in_ch=3,
                 num_out_ch=3,
                 num_feat=64,
                 num_block=16,
                 num_layer=8,
                 num_grow_ch=64,
                 upscale=4,
                 **unknown):
        reject_unknown_options(type(self), unknown)
        super().__init__()
        self.upscale = upscale  # what inference and the summary read (D2CNet, DAN and SDFlow have it too)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.conv_second = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.body = GlobalFeatureFusion(num_feat, num_grow_ch, num_layer, num_block)
        self.upsample = Upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)

    def forward(self, x):
        shallow = self.conv_first(x)
        feat = self.body(self.conv_second(shallow)) + shallow
        return self.conv_last(self.upsample(feat))
