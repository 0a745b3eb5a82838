"""The tails of D2CNet's leaves: how each backbone goes from LR features to the SR image.

``upsampler`` names follow BasicSR's SwinIR option of the same name, so a swapped SwinIR keeps
its value:

==================== ====================================================================
``pixelshuffle``     BasicSR's ``Upsample`` (conv + pixel shuffle per factor 2, or one for x3)
                     and an output conv: EDSR, RCAN, SRResNet, RDN, SwinIR classical, D2C-SR.
``pixelshuffledirect`` one conv to ``C * s^2`` channels + pixel shuffle (BasicSR's
                     ``UpsampleOneStep``): IMDN, lightweight SwinIR.
``nearest+conv``     per factor, nearest interpolation + conv + LeakyReLU, then conv-LeakyReLU
                     and an output conv: RRDBNet (ESRGAN), real-world SwinIR.
``interpolate``      the LR image is bicubic-interpolated *before* the network, so the tail
                     is only the output conv: VDSR.
==================== ====================================================================
"""
from torch import nn as nn
from torch.nn import functional as F

from basicsr.archs.arch_util import Upsample
from basicsr.archs.swinir_arch import UpsampleOneStep

UPSAMPLERS = ('pixelshuffle', 'pixelshuffledirect', 'nearest+conv', 'interpolate')


def scale_factors(scale):
    """Per-step factors of a scale: powers of two in steps of 2, 3 in one step; else None."""
    if scale == 3:
        return [3]
    if scale >= 2 and scale & (scale - 1) == 0:
        return [2] * (scale.bit_length() - 1)
    return None


class NearestConvUpsample(nn.Module):
    """RRDBNet's tail: nearest interpolation + conv + LeakyReLU per factor, conv_hr, conv_last.

    Shapes: ``(N, F, H, W)`` -> ``(N, num_out_ch, s*H, s*W)``.
    """

    def __init__(self, scale, num_feat, num_out_ch):
        super().__init__()
        self.factors = scale_factors(scale)
        self.up_convs = nn.ModuleList([nn.Conv2d(num_feat, num_feat, 3, 1, 1) for _ in self.factors])
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x):
        for factor, conv in zip(self.factors, self.up_convs):
            x = self.lrelu(conv(F.interpolate(x, scale_factor=factor, mode='nearest')))
        return self.conv_last(self.lrelu(self.conv_hr(x)))


def build_tail(upsampler, scale, num_feat, num_out_ch):
    """One leaf's tail: features ``(N, F, H, W)`` -> image ``(N, num_out_ch, s*H, s*W)``.

    With ``interpolate`` the features are already at the output size and the tail is one conv.
    """
    if upsampler not in UPSAMPLERS:
        raise ValueError(f'D2CNet: upsampler={upsampler!r} is not known; use one of {UPSAMPLERS}.')
    if upsampler == 'interpolate':
        return nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
    if scale_factors(scale) is None:
        raise ValueError(f'D2CNet: upsampler={upsampler!r} cannot scale by {scale}; use 2, 3, 4 or 8.')
    if upsampler == 'pixelshuffle':
        return nn.Sequential(Upsample(scale, num_feat), nn.Conv2d(num_feat, num_out_ch, 3, 1, 1))
    if upsampler == 'pixelshuffledirect':
        return UpsampleOneStep(scale, num_feat, num_out_ch)
    return NearestConvUpsample(scale, num_feat, num_out_ch)


def upsampler_scale(conv_out_channels, num_feat):
    """The scale of BasicSR's ``Upsample`` from the output channels of its convs, in order.

    x2: one conv F -> 4F; x3: one conv F -> 9F; x4: two and x8: three convs F -> 4F (each
    followed by PixelShuffle). Used for D2CNet's tails and for the authors' tails in the converter.

    Args:
        conv_out_channels (sequence[int]): Output channels of the upsampler's convs, in order.
        num_feat (int): F, the features entering the upsampler.

    Returns:
        int | None: 2, 3, 4 or 8; None if the convs fit none of them.
    """
    outs = [int(c) for c in conv_out_channels]
    if outs == [9 * num_feat]:
        return 3
    if 1 <= len(outs) <= 3 and outs == [4 * num_feat] * len(outs):
        return 2**len(outs)
    return None


def read_tail(tail_state, num_feat, num_ch):
    """What one leaf's tail weights say: upsampler kind, scale, output channels.

    Args:
        tail_state (dict[str, Tensor]): The keys of ``tails.0.`` with that prefix removed.
        num_feat (int): F.
        num_ch (int): Image channels (D2CNet's input and output channels are equal).

    Returns:
        dict: ``upsampler`` and ``num_out_ch``, and ``upscale`` where the weights tell it:
        ``interpolate`` tails carry no scale, and a one-step ``nearest+conv`` tail looks the
        same at x2 and x3.
    """
    if 'conv_hr.weight' in tail_state:
        steps = len({k.split('.')[1] for k in tail_state if k.startswith('up_convs.')})
        found = {'upsampler': 'nearest+conv', 'num_out_ch': tail_state['conv_last.weight'].shape[0]}
        if steps > 1:
            found['upscale'] = 2**steps
        return found
    if set(tail_state) <= {'weight', 'bias'}:
        return {'upsampler': 'interpolate', 'num_out_ch': tail_state['weight'].shape[0]}
    if set(tail_state) <= {'0.weight', '0.bias'}:  # UpsampleOneStep: one conv to C * s^2, pixel shuffle
        found = {'upsampler': 'pixelshuffledirect', 'num_out_ch': num_ch}
        ratio = tail_state['0.weight'].shape[0] // num_ch
        if ratio in (4, 9, 16, 64):
            found['upscale'] = int(round(ratio**0.5))
        return found
    found = {'upsampler': 'pixelshuffle'}
    # BasicSR's Upsample: its convs sit at even indices, a PixelShuffle after each
    up_convs = sorted({int(k.split('.')[1]) for k in tail_state if k.startswith('0.')})
    scale = upsampler_scale([tail_state[f'0.{i}.weight'].shape[0] for i in up_convs], num_feat)
    if scale is not None:
        found['upscale'] = scale
    if '1.weight' in tail_state:
        found['num_out_ch'] = tail_state['1.weight'].shape[0]
    return found
