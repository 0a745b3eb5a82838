"""IMDN (Hui et al., "Lightweight Image Super-Resolution with Information Multi-distillation Network",
ACM MM 2019).

BasicSR has no IMDN. :class:`IMDB` is also the basic module of D2C-IMDN (``IMDNBranch``).
"""
import torch
from torch import nn as nn

from basicsr.archs.swinir_arch import UpsampleOneStep
from basicsr.utils.registry import ARCH_REGISTRY
from .arch_util import ConcatFusionChain, reject_unknown_options

NEGATIVE_SLOPE = 0.05  # IMDN's LeakyReLU


class ContrastChannelAttention(nn.Module):
    """Channel attention driven by each channel's contrast (standard deviation + mean).

    Shapes: ``(N, F, H, W)`` -> ``(N, F, H, W)`` (the input, re-weighted per channel).
    """

    def __init__(self, num_feat, reduction=16):
        super().__init__()
        hidden = max(1, num_feat // reduction)  # narrow test networks keep one channel
        self.excite = nn.Sequential(
            nn.Conv2d(num_feat, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, num_feat, 1), nn.Sigmoid())

    def forward(self, x):
        mean = x.mean(dim=(2, 3), keepdim=True)
        contrast = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
        return x * self.excite(contrast + mean)


class IMDB(nn.Module):
    """Information multi-distillation block.

    Four 3x3 convs in a row; after each of the first three, a quarter of the channels is
    kept ("distilled") and the rest goes on; the three distilled parts and the last conv's
    output (``F/4`` channels each) are concatenated, fused by a 1x1 conv, re-weighted by
    contrast-aware channel attention, and the block input is added.

    Args:
        num_feat (int): F, channels in and out; divisible by 4.
        distillation_rate (float): Share of channels kept at each step. Default: 0.25.

    Shapes: ``(N, F, H, W)`` -> ``(N, F, H, W)``.
    """

    def __init__(self, num_feat, distillation_rate=0.25):
        super().__init__()
        self.distilled = int(num_feat * distillation_rate)
        self.remaining = num_feat - self.distilled
        self.c1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.c2 = nn.Conv2d(self.remaining, num_feat, 3, 1, 1)
        self.c3 = nn.Conv2d(self.remaining, num_feat, 3, 1, 1)
        self.c4 = nn.Conv2d(self.remaining, self.distilled, 3, 1, 1)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)
        self.c5 = nn.Conv2d(4 * self.distilled, num_feat, 1)
        self.cca = ContrastChannelAttention(num_feat)

    def forward(self, x):
        kept = []
        h = x
        for conv in (self.c1, self.c2, self.c3):
            distilled, h = torch.split(self.act(conv(h)), (self.distilled, self.remaining), dim=1)
            kept.append(distilled)
        kept.append(self.c4(h))
        return self.cca(self.c5(torch.cat(kept, dim=1))) + x


class DistillationFusion(ConcatFusionChain):
    """IMDN's body: ``num_block`` IMDBs whose outputs are concatenated, fused by a 1x1 conv with
    LeakyReLU, then a 3x3 conv.

    Shapes: ``(N, F, H, W)`` -> ``(N, F, H, W)`` (without IMDN's skip around the body).
    """

    def __init__(self, num_feat, num_block):
        super().__init__()
        self.blocks = nn.ModuleList([IMDB(num_feat) for _ in range(num_block)])
        self.fusion = nn.Sequential(
            nn.Conv2d(num_block * num_feat, num_feat, 1), nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            nn.Conv2d(num_feat, num_feat, 3, 1, 1))


@ARCH_REGISTRY.register()
class IMDN(nn.Module):
    """Information multi-distillation network.

    A shallow conv, ``num_block`` IMDBs with their distillation fusion and a skip from the
    shallow features, then one conv to ``num_out_ch * upscale^2`` channels and a pixel shuffle
    (BasicSR's ``UpsampleOneStep``). The paper's network: ``num_feat=64, num_block=6`` (0.715M
    parameters at x4).

    Args:
        num_in_ch (int): Input channels. Default: 3.
        num_out_ch (int): Output channels. Default: 3.
        num_feat (int): F, divisible by 4. Default: 64.
        num_block (int): Number of IMDBs. Default: 6.
        upscale (int): Scale factor. Default: 4.

    Shapes: ``(N, C, H, W)`` in [0, 1] -> ``(N, num_out_ch, upscale*H, upscale*W)``.
    """

    def __init__(self, num_in_ch=3, num_out_ch=3, num_feat=64, num_block=6, upscale=4, **unknown):
        reject_unknown_options(type(self), unknown)
        super().__init__()
        if num_feat % 4:
            raise ValueError(f'IMDN: num_feat={num_feat} must be divisible by 4 (a quarter is distilled per step).')
        self.upscale = upscale  # what inference and the summary read (D2CNet, DAN and SDFlow have it too)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = DistillationFusion(num_feat, num_block)
        self.upsample = UpsampleOneStep(upscale, num_feat, num_out_ch)

    def forward(self, x):
        shallow = self.conv_first(x)
        return self.upsample(self.body(shallow) + shallow)
