"""Normalizing-flow layers (Glow-style), the building blocks of SDFlow (sdflow_arch.py).

Every layer maps ``z`` to ``z'`` invertibly and keeps a running log-determinant of the Jacobian:

    forward:  z' = f(z),      logdet += log|det df/dz|
    reverse:  z  = f^-1(z'),  logdet -= log|det df/dz|   (so forward then reverse leaves it unchanged)

One signature for all of them, ``layer(z, logdet=None, cond=None, reverse=False) -> (z, logdet)``:
``z`` is (N, C, H, W), ``logdet`` a (N,) tensor or None (not tracked), ``cond`` the conditioning
features (N, F, H, W) of the conditional layers (ignored by the others). :class:`FlowSequence` runs
a list of layers forward, or backward in reverse order.

The affine maps and the 1x1 convolution run in float32 even under autocast: a log-determinant
summed over 10^5 elements and an inverse that must undo the forward exactly do not survive bf16/fp16.
The sub-networks that only predict scales and shifts (and the RRDB feature extractors) follow the
ambient autocast.
"""
import math

import torch
import torch.distributed as dist
from torch import nn as nn
from torch.nn import functional as F

from basicsr.archs.rrdbnet_arch import RRDB

# the affine scale is bounded to (-SCALE_BOUND * pi / 2, SCALE_BOUND * pi / 2) = (-0.5, 0.5) per step, so
# no coupling can blow a value up (or down) by more than e^0.5; 0.318 ~ 1/pi is the official constant
SCALE_BOUND = 0.318


def bounded_scale(raw):
    """Log-scale ``s = 0.318 * atan(2 raw)``, in (-0.5, 0.5); the same for any dtype of ``raw``."""
    return SCALE_BOUND * torch.atan(2 * raw)


def full_precision(x):
    """``x`` in float32 if it is in a reduced precision (float16/bfloat16), else unchanged (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _float32(device_type):
    """Autocast switched off: the context the exact parts of a flow run in."""
    return torch.autocast(device_type, enabled=False)


class ActNorm(nn.Module):
    """Per-channel affine map ``z' = (z + bias) * exp(log_scale)``; logdet = H W sum(log_scale).

    Data-dependent initialisation: the first forward call in training mode sets ``bias`` and
    ``log_scale`` so that the batch leaves the layer with zero mean and unit variance per channel.
    In a distributed run the statistics are taken over the batches of all ranks (all-reduce of
    the means, then of the variances around the global mean), so every rank starts from the same
    parameters and the result equals one process seeing the whole batch (equal batch sizes per rank).
    The ``initialized`` buffer is saved with the weights: loaded checkpoints are not re-initialised.
    A forward in eval mode never initialises (a validation image must not set the parameters).

    Args:
        num_channels (int): C.
    """

    def __init__(self, num_channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer('initialized', torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def initialize(self, z):
        """Set bias = -mean and log_scale = -log(std) from ``z`` (N, C, H, W), across ranks if distributed."""
        z = full_precision(z.detach())
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        mean = z.mean(dim=(0, 2, 3), keepdim=True)
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        var = ((z - mean)**2).mean(dim=(0, 2, 3), keepdim=True)
        if world > 1:
            dist.all_reduce(var)
            var /= world
        # a constant channel (zero variance) keeps scale 1 instead of an infinite one
        var = torch.where(var < 1e-4, torch.ones_like(var), var)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-0.5 * torch.log(var))
        self.initialized.fill_(1)

    def forward(self, z, logdet=None, cond=None, reverse=False):
        if not reverse and self.training and not self.initialized:
            self.initialize(z)
        with _float32(z.device.type):
            z = full_precision(z)
            step = z.shape[2] * z.shape[3] * self.log_scale.sum()
            if not reverse:
                z = (z + self.bias) * torch.exp(self.log_scale)
                return z, None if logdet is None else logdet + step
            z = z * torch.exp(-self.log_scale) - self.bias
            return z, None if logdet is None else logdet - step


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution in LU form: ``W = P (L + I) (U + diag(sign * exp(log_s)))``.

    P (a permutation) and ``sign`` are fixed buffers; L (strictly lower), U (strictly upper) and
    ``log_s`` are learned, so log|det W| = sum(log_s) costs nothing and W never becomes singular.
    logdet = H W sum(log_s). Initialised from a random rotation (|det W| = 1).

    Args:
        num_channels (int): C.
    """

    def __init__(self, num_channels):
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))
        perm, lower, upper = torch.linalg.lu(rotation)
        diag = torch.diagonal(upper)
        self.register_buffer('perm', perm.float())
        self.register_buffer('sign_s', torch.sign(diag).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())

    def weight(self):
        """W, (C, C)."""
        eye = torch.eye(self.perm.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper

    def forward(self, z, logdet=None, cond=None, reverse=False):
        with _float32(z.device.type):
            z = full_precision(z)
            weight = self.weight()
            step = z.shape[2] * z.shape[3] * self.log_s.sum()
            if not reverse:
                z = F.conv2d(z, weight[:, :, None, None])
                return z, None if logdet is None else logdet + step
            z = F.conv2d(z, torch.linalg.inv(weight)[:, :, None, None])
            return z, None if logdet is None else logdet - step


class ZeroConv2d(nn.Conv2d):
    """3x3 convolution (zero padding) starting at zero, its output multiplied by ``exp(3 log_gain)``.

    The last layer of every scale/shift network: a new coupling starts as the identity, and the
    learned gain lets the output grow faster than the weights (Glow's zero-initialised convolution).
    """

    def __init__(self, in_channels, out_channels, gain_factor=3.0):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.gain_factor = gain_factor
        self.log_gain = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        return super().forward(x) * torch.exp(self.log_gain * self.gain_factor)


class AffineParamNet(nn.Module):
    """Scale/shift predictor: 3x3 conv (reflect) - LReLU(0.01) - 1x1 conv - LReLU(0.01) - ZeroConv2d.

    Output channels alternate: even ones are raw log-scales, odd ones shifts.

    Shapes: (N, in_channels, H, W) -> (N, 2 * out_channels, H, W).
    """

    def __init__(self, in_channels, out_channels, hidden_channels=64):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, padding_mode='reflect')
        self.conv_hidden = nn.Conv2d(hidden_channels, hidden_channels, 1)
        self.conv_out = ZeroConv2d(hidden_channels, 2 * out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        for conv in (self.conv_in, self.conv_hidden):
            nn.init.xavier_normal_(conv.weight)
            conv.weight.data *= 0.1
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        """(log_scale, shift), each (N, out_channels, H, W) float32; |log_scale| < 0.5."""
        out = full_precision(self.conv_out(self.act(self.conv_hidden(self.act(self.conv_in(x))))))
        return bounded_scale(out[:, 0::2]), out[:, 1::2]


class AffineCoupling(nn.Module):
    """Affine coupling: ``z = [a, b]``, ``b' = (b + t) * exp(s)`` with ``(s, t) = net([a, cond])``.

    ``a`` (the first ``channels // 2`` channels) passes unchanged, so the inverse
    ``b = b' * exp(-s) - t`` needs the same ``net(a)``; logdet = sum(s) over C, H, W.

    Args:
        num_channels (int): C of z.
        cond_channels (int): F of cond (0: unconditional).
        hidden_channels (int): Width of the scale/shift network.
    """

    def __init__(self, num_channels, cond_channels=0, hidden_channels=64):
        super().__init__()
        self.channels_a = num_channels // 2
        self.cond_channels = cond_channels
        self.net = AffineParamNet(self.channels_a + cond_channels, num_channels - self.channels_a, hidden_channels)

    def forward(self, z, logdet=None, cond=None, reverse=False):
        if (cond is None) != (self.cond_channels == 0):
            raise ValueError(f'AffineCoupling made for {self.cond_channels} condition channels got '
                             f'{"none" if cond is None else cond.shape[1]}')
        z_a, z_b = z[:, :self.channels_a], z[:, self.channels_a:]
        log_scale, shift = self.net(z_a if cond is None else torch.cat([z_a, cond.to(z_a.dtype)], dim=1))
        step = log_scale.sum(dim=(1, 2, 3))
        with _float32(z.device.type):
            if not reverse:
                z_b = (full_precision(z_b) + shift) * torch.exp(log_scale)
                logdet = None if logdet is None else logdet + step
            else:
                z_b = full_precision(z_b) * torch.exp(-log_scale) - shift
                logdet = None if logdet is None else logdet - step
            return torch.cat([full_precision(z_a), z_b], dim=1), logdet


class AffineInjector(nn.Module):
    """Conditional affine map of all channels: ``z' = (z + t) * exp(s)`` with ``(s, t) = net(cond)``.

    Injects the condition into every channel (the coupling only changes half of them); logdet =
    sum(s) over C, H, W.

    Args:
        num_channels (int): C of z.
        cond_channels (int): F of cond.
        hidden_channels (int): Width of the scale/shift network.
    """

    def __init__(self, num_channels, cond_channels, hidden_channels=64):
        super().__init__()
        self.net = AffineParamNet(cond_channels, num_channels, hidden_channels)

    def forward(self, z, logdet=None, cond=None, reverse=False):
        if cond is None:
            raise ValueError('AffineInjector needs cond')
        log_scale, shift = self.net(cond)
        step = log_scale.sum(dim=(1, 2, 3))
        with _float32(z.device.type):
            if not reverse:
                return (full_precision(z) + shift) * torch.exp(log_scale), None if logdet is None else logdet + step
            return full_precision(z) * torch.exp(-log_scale) - shift, None if logdet is None else logdet - step


class CheckerboardSqueeze(nn.Module):
    """Space to depth by 2: (N, C, H, W) -> (N, 4C, H/2, W/2), channel ``4c + 2dy + dx``; logdet 0.

    This is ``pixel_unshuffle(2)``; the reverse is ``pixel_shuffle(2)``. H and W must be even.
    """

    def forward(self, z, logdet=None, cond=None, reverse=False):
        if reverse:
            return F.pixel_shuffle(z, 2), logdet
        if z.shape[2] % 2 or z.shape[3] % 2:
            raise ValueError(f'CheckerboardSqueeze needs an even height and width, got {z.shape[3]}x{z.shape[2]}')
        return F.pixel_unshuffle(z, 2), logdet


class FlowSequence(nn.ModuleList):
    """Layers run in order forward and in reverse order backward, all with the same ``cond``."""

    def forward(self, z, logdet=None, cond=None, reverse=False):
        for layer in (reversed(self) if reverse else self):
            z, logdet = layer(z, logdet, cond, reverse)
        return z, logdet


class FlowStep(FlowSequence):
    """One step: ActNorm -> InvConv1x1 -> [AffineInjector if conditional] -> [AffineCoupling].

    Args:
        num_channels (int): C.
        cond_channels (int): F of the condition (0: unconditional step, no injector).
        hidden_channels (int): Width of the scale/shift networks.
        coupling (bool): False for the last step of a conditional flow (the official design).
    """

    def __init__(self, num_channels, cond_channels=0, hidden_channels=64, coupling=True):
        layers = [ActNorm(num_channels), InvConv1x1(num_channels)]
        if cond_channels:
            layers.append(AffineInjector(num_channels, cond_channels, hidden_channels))
        if coupling:
            layers.append(AffineCoupling(num_channels, cond_channels, hidden_channels))
        super().__init__(layers)


def transition(num_channels, num_pairs=2):
    """``num_pairs`` x (ActNorm, InvConv1x1): mixes channels after a squeeze or before an unsqueeze."""
    return FlowSequence(
        [layer for _ in range(num_pairs) for layer in (ActNorm(num_channels), InvConv1x1(num_channels))])


def split(z, num_keep):
    """Split (N, C, H, W) into the first ``num_keep`` channels and the rest (the inverse is ``torch.cat``)."""
    if not 0 < num_keep < z.shape[1]:
        raise ValueError(f'split: cannot keep {num_keep} of {z.shape[1]} channels')
    return z[:, :num_keep], z[:, num_keep:]


def gaussian_log_prob(x, mean=None, log_std=None):
    """Element-wise log N(x; mean, exp(log_std)^2); None means 0 (the standard normal)."""
    log_prob = -0.5 * math.log(2 * math.pi)
    if mean is not None:
        x = x - mean
    if log_std is None:
        return log_prob - 0.5 * x**2
    return log_prob - log_std - 0.5 * x**2 * torch.exp(-2 * log_std)


class ConditionEncoder(nn.Module):
    """Conditional feature extractor: conv - RRDBs - conv + long skip - conv, LReLU(0.2), conv.

    BasicSR's ``RRDB`` (growth 32) in the trunk; the other convolutions pad by reflection.

    Args:
        in_channels (int): Channels of the condition (e.g. the 3-channel content latent).
        num_feat (int): Width and output channels.
        num_block (int): RRDBs.

    Shapes: (N, in_channels, H, W) -> (N, num_feat, H, W).
    """

    def __init__(self, in_channels, num_feat=64, num_block=8):
        super().__init__()

        def conv(cin, cout):
            return nn.Conv2d(cin, cout, 3, padding=1, padding_mode='reflect')

        self.conv_first = conv(in_channels, num_feat)
        self.body = nn.Sequential(*[RRDB(num_feat, 32) for _ in range(num_block)])
        self.conv_body = conv(num_feat, num_feat)
        self.conv_hr = conv(num_feat, num_feat)
        self.conv_last = conv(num_feat, num_feat)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        for layer in (self.conv_first, self.conv_body, self.conv_hr, self.conv_last):
            nn.init.xavier_normal_(layer.weight)
            layer.weight.data *= 0.1
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))
