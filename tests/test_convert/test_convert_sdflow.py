"""d2c_tools.convert_sdflow, d2c_convert.sdflow_convert_util: the official SDFlow files -> one SDFlow checkpoint.

No released weights are available here. The tests carry their own compact re-implementation of
the official modules (``HRFlow``, ``LRImageEncoderFM``, ``ContentFlow``, ``DegFlow`` and their
layers), written from a reading of github.com/sunwj/sdflow with the official module and attribute
names, so that their state dicts have the official keys; their widths and depths can be made
small. Every zero-initialised convolution, every ActNorm and the 1x1 convolutions get random
values, so no layer is the identity. The four parts are saved as .pth files, converted, and the
converted SDFlow is compared with the reference in float64: HR likelihood, SR (temperature 0 and
above, with the same noise), LR encoder, LR flow both ways, degradation likelihood and sampling.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_pairs, write_yaml
from torch import nn
from torch.nn import functional as F

from d2c_arch import D2CNet, SDFlow
from d2c_arch.dan_arch import DAN
from d2c_convert import sdflow_convert_util as sc
from d2c_tools import convert_sdflow

# the reference's sizes: the release's, and a small one for the forward comparisons
FULL = dict(
    nf=64,
    hidden=64,
    flow_steps=16,
    hf_steps=8,
    hf_blocks=8,
    deg_steps=8,
    deg_blocks=4,
    enc_blocks=16,
    mf_convs=8,
    gaussians=16)
SMALL = dict(
    nf=16,
    hidden=16,
    flow_steps=3,
    hf_steps=3,
    hf_blocks=1,
    deg_steps=3,
    deg_blocks=1,
    enc_blocks=2,
    mf_convs=2,
    gaussians=5)
SMALL_OPTIONS = dict(
    num_feat=16, hidden_channels=16, flow_steps=3, hf_steps=3, hf_blocks=1, encoder_blocks=2, encoder_mod_convs=2)
LOG_2PI = math.log(2 * math.pi)
VARIANCE_EPS = 1e-6  # the official gaussian_logp adds it to the variance; a test sets it to 0 to see exact parity


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared; one thread avoids contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The official modules, re-implemented (official names; ``ldj`` is the running log-determinant)
# ----------------------------------------------------------------------------------------------
def gaussian_logp(x, mean=None, log_std=None):
    """The official density: with a log-std, the variance in the denominator gets + 1e-6."""
    if log_std is None:
        return -0.5 * ((x if mean is None else x - mean)**2 + LOG_2PI)
    return -0.5 * (2 * log_std + (x - mean)**2 / (torch.exp(2 * log_std) + VARIANCE_EPS) + LOG_2PI)


def checkerboard(z, reverse=False):
    """Space to depth by 2, channel 4c + 2dy + dx (by slicing: no reshape shared with the code under test)."""
    if not reverse:
        return torch.stack([z[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=2).flatten(1, 2)
    n, c, h, w = z.shape
    quads = z.view(n, c // 4, 4, h, w)
    out = z.new_zeros(n, c // 4, 2 * h, 2 * w)
    for dy in (0, 1):
        for dx in (0, 1):
            out[:, :, dy::2, dx::2] = quads[:, :, 2 * dy + dx]
    return out


def bounded(raw):
    return 0.318 * torch.atan(2 * raw)


def cross_split(out):
    """The official 'cross' split: even channels scale, odd ones shift."""
    n, c, h, w = out.shape
    pairs = out.view(n, c // 2, 2, h, w)
    return bounded(pairs[:, :, 0]), pairs[:, :, 1]


class ActNorm(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_scale = nn.Parameter(torch.ones(1, c, 1, 1))
        self.register_buffer('initialized', torch.tensor(1, dtype=torch.uint8))

    def forward(self, z, ldj, reverse=False):
        step = z.shape[2] * z.shape[3] * self.log_scale.sum()
        if reverse:
            return z / torch.exp(self.log_scale) - self.loc, None if ldj is None else ldj - step
        return torch.exp(self.log_scale) * (self.loc + z), None if ldj is None else ldj + step


class Inv1x1Conv2d(nn.Module):

    def __init__(self, c):
        super().__init__()
        p, low, up = torch.linalg.lu(torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))[0])
        diag = torch.diagonal(up)
        upper_mask = torch.ones(c, c).triu(1)
        self.register_buffer('w_p', p.float())
        self.register_buffer('u_mask', upper_mask)
        self.register_buffer('l_mask', upper_mask.t().contiguous())
        self.register_buffer('s_sign', diag.sign().float())
        self.register_buffer('l_eye', torch.eye(c))
        self.w_l = nn.Parameter(low.float())  # unit diagonal included: the mask takes it away
        self.w_s = nn.Parameter(diag.abs().log().float())
        self.w_u = nn.Parameter(up.triu(1).float())

    def forward(self, z, ldj, reverse=False):
        lower = self.w_l * self.l_mask + self.l_eye
        upper = self.w_u * self.u_mask + torch.diag(self.s_sign * self.w_s.exp())
        weight = self.w_p @ lower @ upper
        step = z.shape[2] * z.shape[3] * self.w_s.sum()
        if reverse:
            return torch.einsum('oc,nchw->nohw', torch.linalg.inv(weight), z), None if ldj is None else ldj - step
        return torch.einsum('oc,nchw->nohw', weight, z), ldj + step


class Conv2d(nn.Module):
    """The coupling networks' convolution: reflect padding, then ``conv2d``."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv2d = nn.Conv2d(cin, cout, k)

    def forward(self, x):
        pad = self.conv2d.kernel_size[0] // 2
        return self.conv2d(F.pad(x, [pad] * 4, mode='reflect') if pad else x)


class ZeroConv2d(nn.Module):

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3)
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return self.conv(F.pad(x, [1, 1, 1, 1])) * torch.exp(3 * self.logs)


class FCN(nn.Module):

    def __init__(self, cin, cout, hidden):
        super().__init__()
        self.conv1 = Conv2d(cin, hidden, 3)
        self.conv2 = Conv2d(hidden, hidden, 1)
        self.conv3 = ZeroConv2d(hidden, cout)

    def forward(self, x):
        return self.conv3(F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.01)), 0.01))


class AffineCoupling(nn.Module):

    def __init__(self, c, hidden, cond=None):
        super().__init__()
        self.ca = int(c * 0.5)
        self.net = FCN(self.ca + (cond or 0), 2 * (c - self.ca), hidden)

    def forward(self, z, ldj, u=None, reverse=False):
        za, zb = z[:, :self.ca], z[:, self.ca:]
        scale, shift = cross_split(self.net(za if u is None else torch.cat([za, u], 1)))
        if reverse:
            zb, sign = zb * torch.exp(-scale) - shift, -1
        else:
            zb, sign = (zb + shift) * torch.exp(scale), 1
        return torch.cat([za, zb], 1), None if ldj is None else ldj + sign * scale.sum((1, 2, 3))


class AffineInjector(nn.Module):

    def __init__(self, c, hidden, cond):
        super().__init__()
        self.net = FCN(cond, 2 * c, hidden)

    def forward(self, z, ldj, u, reverse=False):
        scale, shift = cross_split(self.net(u))
        if reverse:
            return z * torch.exp(-scale) - shift, None if ldj is None else ldj - scale.sum((1, 2, 3))
        return (z + shift) * torch.exp(scale), ldj + scale.sum((1, 2, 3))


class FlowStep(nn.Module):

    def __init__(self, c, hidden, cond=None, is_last=False):
        super().__init__()
        self.actnorm = ActNorm(c)
        self.permute = Inv1x1Conv2d(c)
        if cond is not None:
            self.affine_injector = AffineInjector(c, hidden, cond)
        if not is_last:
            self.affine_coulping = AffineCoupling(c, hidden, cond)

    def forward(self, z, ldj, u=None, reverse=False):
        layers = [(self.actnorm, False), (self.permute, False)]
        if u is not None:
            layers.append((self.affine_injector, True))
        if hasattr(self, 'affine_coulping'):
            layers.append((self.affine_coulping, True))
        for layer, takes_u in (layers[::-1] if reverse else layers):
            z, ldj = layer(z, ldj, u, reverse=reverse) if takes_u else layer(z, ldj, reverse=reverse)
        return z, ldj


class TransitionStep(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.actnorm = ActNorm(c)
        self.inv_conv = Inv1x1Conv2d(c)


class TransitionBlock(nn.Module):

    def __init__(self, c):
        super().__init__()
        self.transitions = nn.ModuleList([TransitionStep(c) for _ in range(2)])

    def forward(self, z, ldj, reverse=False):
        layers = [m for t in self.transitions for m in (t.actnorm, t.inv_conv)]
        for layer in (layers[::-1] if reverse else layers):
            z, ldj = layer(z, ldj, reverse=reverse)
        return z, ldj


class ResidualDenseBlock5C(nn.Module):

    def __init__(self, nf, gc=32):
        super().__init__()
        for i in range(5):
            setattr(self, f'conv{i + 1}', nn.Conv2d(nf + i * gc, gc if i < 4 else nf, 3, padding=1))

    def forward(self, x):
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f'conv{i}')(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):

    def __init__(self, nf):
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = (ResidualDenseBlock5C(nf) for _ in range(3))

    def forward(self, x):
        return x + 0.2 * self.RDB3(self.RDB2(self.RDB1(x)))


class ConditionNet(nn.Module):

    def __init__(self, cin, nf, nb):
        super().__init__()
        self.in_conv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(cin, nf, 3))
        self.trunk = nn.Sequential(*[RRDB(nf) for _ in range(nb)])
        self.trans = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3))
        self.out_conv = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3), nn.LeakyReLU(0.2), nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3))

    def forward(self, x):
        x = self.in_conv(x)
        return self.out_conv(x + self.trans(self.trunk(x)))


class ConditionalFlow(nn.Module):
    """``compute_log_prob``: the standard-normal prior inside (the HF flow); else the latent is the caller's."""

    def __init__(self, c, cond, is_squeeze, n_steps, nb, nf, hidden, compute_log_prob):
        super().__init__()
        self.is_squeeze, self.compute_log_prob = is_squeeze, compute_log_prob
        if is_squeeze:
            self.cond_net = nn.Sequential(
                ConditionNet(cond, nf, nb), nn.PixelUnshuffle(2), nn.Conv2d(4 * nf, nf, 1), nn.LeakyReLU(0.2))
            self.squeeze_transition = TransitionBlock(4 * c)
            c *= 4
        else:
            self.cond_net = ConditionNet(cond, nf, nb)
        self.z_channels = c
        self.additional_flow_steps = nn.ModuleList(
            [FlowStep(c, hidden, nf, is_last=i == n_steps - 1) for i in range(n_steps)])

    def forward(self, z, ldj, cond, tau=0.0, reverse=False, eps=None):
        u = self.cond_net(cond)
        if not reverse:
            if self.is_squeeze:
                z, ldj = self.squeeze_transition(checkerboard(z), ldj)
            for step in self.additional_flow_steps:
                z, ldj = step(z, ldj, u)
            if self.compute_log_prob:
                zeros = torch.zeros_like(z)
                ldj = ldj + gaussian_logp(z, zeros, zeros).sum((1, 2, 3))
            return z, ldj
        if self.compute_log_prob:  # official gaussian_sample: the mean at tau < 1e-6, else mean + (std + 1e-6) tau eps
            shape = (u.shape[0], self.z_channels, *u.shape[2:])
            z = u.new_zeros(shape) if tau < 1e-6 else (1 + 1e-6) * tau * eps
        for step in self.additional_flow_steps[::-1]:
            z, ldj = step(z, ldj, u, reverse=True)
        if self.is_squeeze:
            z, ldj = self.squeeze_transition(z, ldj, reverse=True)
            z = checkerboard(z, reverse=True)
        return z, ldj


class SplitFlow(nn.Module):

    def __init__(self, c, keep, n_steps, nb, nf, hidden):
        super().__init__()
        self.keep = keep
        self.conditional_flow = ConditionalFlow(c - keep, keep, False, n_steps, nb, nf, hidden, True)

    def forward(self, z, ldj, tau=0.0, reverse=False, eps=None):
        if not reverse:
            _, ldj = self.conditional_flow(z[:, self.keep:], ldj, z[:, :self.keep].detach())
            return z[:, :self.keep], ldj
        zb, ldj = self.conditional_flow(None, ldj, z, tau, reverse=True, eps=eps)
        return torch.cat([z, zb], 1), ldj


class FlowBlock(nn.Module):

    def __init__(self, c, hidden, n_steps, is_expand=False, split=None):
        super().__init__()
        self.squeeze_transition = TransitionBlock(4 * c)
        self.steps = nn.ModuleList([FlowStep(4 * c, hidden) for _ in range(n_steps)])
        if is_expand:
            self.expand_transition = TransitionBlock(4 * c)
        if split is not None:
            self.split = SplitFlow(4 * c, 3, **split)

    def forward(self, z, ldj, tau=0.0, reverse=False, eps=None):
        if not reverse:
            z, ldj = self.squeeze_transition(checkerboard(z), ldj)
            for step in self.steps:
                z, ldj = step(z, ldj)
            if hasattr(self, 'expand_transition'):
                z, ldj = self.expand_transition(z, ldj)
                z = checkerboard(z, reverse=True)
            if hasattr(self, 'split'):
                z, ldj = self.split(z, ldj, tau)
            return z, ldj
        if hasattr(self, 'split'):
            z, ldj = self.split(z, ldj, tau, reverse=True, eps=eps)
        if hasattr(self, 'expand_transition'):
            z, ldj = self.expand_transition(checkerboard(z), ldj, reverse=True)
        for step in self.steps[::-1]:
            z, ldj = step(z, ldj, reverse=True)
        z, ldj = self.squeeze_transition(z, ldj, reverse=True)
        return checkerboard(z, reverse=True), ldj


class HRFlow(nn.Module):

    def __init__(self, nf, hidden, flow_steps, hf_steps, hf_blocks, **_):
        super().__init__()
        split = dict(n_steps=hf_steps, nb=hf_blocks, nf=nf, hidden=hidden)
        self.blocks = nn.ModuleList([FlowBlock(3, hidden, flow_steps), FlowBlock(12, hidden, flow_steps, split=split)])

    def forward(self, z, ldj, tau=0.0, reverse=False, eps=None):
        for block in (self.blocks[::-1] if reverse else self.blocks):
            z, ldj = block(z, ldj, tau, reverse=reverse, eps=eps)
        return z, ldj


class ContentFlow(nn.Module):

    def __init__(self, hidden, flow_steps, **_):
        super().__init__()
        self.blocks = nn.ModuleList([FlowBlock(3, hidden, flow_steps, is_expand=True)])

    def forward(self, z, ldj, reverse=False):
        return self.blocks[0](z, ldj, reverse=reverse)


class DegFlow(nn.Module):

    def __init__(self, nf, hidden, deg_steps, deg_blocks, gaussians, **_):
        super().__init__()
        self.means = nn.Parameter(torch.randn(gaussians))
        self.log_stds = nn.Parameter(torch.zeros(gaussians))
        self.deg_net = ConditionalFlow(3, 3, True, deg_steps, deg_blocks, nf, hidden, False)

    def forward(self, z, ldj, u):
        """log-likelihood: per element, an equal-weight mixture of the scalar Gaussians."""
        z, ldj = self.deg_net(z, ldj, u)
        logps = torch.stack([gaussian_logp(z, self.means[k], self.log_stds[k]) for k in range(len(self.means))])
        return z, ldj + (torch.logsumexp(logps, 0) - math.log(len(self.means))).flatten(1).sum(1)

    def sample(self, u, tau, generator):
        """The official sampler: one component per image; component first, then the noise, from ``generator``."""
        n, _, h, w = u.shape
        shape = (n, self.deg_net.z_channels, h // 2, w // 2)
        idx = torch.randint(len(self.means), (n, ), generator=generator)
        mean = self.means[idx].view(n, 1, 1, 1).expand(shape)
        if tau < 1e-6:
            z = mean
        else:
            eps = torch.randn(shape, generator=generator, dtype=u.dtype)
            z = mean + (torch.exp(self.log_stds[idx]).view(n, 1, 1, 1) + 1e-6) * tau * eps
        return self.deg_net(z, None, u, reverse=True)[0]


class FeatureModulation(nn.Module):

    def __init__(self, nf):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.affine = nn.Conv2d(nf, 2 * nf, 1)

    def forward(self, feat, mfeat):
        s, b = self.affine(mfeat).chunk(2, 1)
        bound = self.log_scale.exp()
        return feat * (torch.tanh(s / (bound + 1e-6)) * bound) + b


class FeatureModulatedResBlock(nn.Module):

    def __init__(self, nf):
        super().__init__()
        self.fm1 = FeatureModulation(nf)
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3), nn.LeakyReLU(0.2))
        self.fm2 = FeatureModulation(nf)
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3))

    def forward(self, feat, mfeat):
        return feat + 0.1 * self.conv2(self.fm2(self.conv1(self.fm1(feat, mfeat)), mfeat))


class LRImageEncoderFM(nn.Module):

    def __init__(self, nf, enc_blocks, mf_convs, with_uncertainty=False, **_):
        super().__init__()
        self.in_conv = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(3, nf, 3), nn.LeakyReLU(0.2))
        self.trunk = nn.ModuleList([FeatureModulatedResBlock(nf) for _ in range(enc_blocks)])
        self.out_conv = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3), nn.LeakyReLU(0.2), nn.Conv2d(nf, 3, 1))
        self.mf_conv = nn.Sequential(
            *[m for _ in range(mf_convs) for m in (nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3), nn.LeakyReLU(0.2))])
        if with_uncertainty:
            self.uncertain_conv = nn.Sequential(
                nn.ReflectionPad2d(1), nn.Conv2d(nf, nf, 3), nn.LeakyReLU(0.2), ZeroConv2d(nf, 3))

    def forward(self, x):
        x = self.in_conv(x)
        mf, out = self.mf_conv(x), x
        for block in self.trunk:
            out = block(out, mf)
        return self.out_conv(x + out)


def randomise(module, gen):
    """Random values where the official initialisation leaves a layer the identity (or a plain rotation)."""

    def rnd(t, scale):
        return torch.randn(t.shape, generator=gen) * scale

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ZeroConv2d):
                m.conv.weight.copy_(rnd(m.conv.weight, 0.02))
                m.conv.bias.copy_(rnd(m.conv.bias, 0.05))
                m.logs.copy_(rnd(m.logs, 0.1))
            elif isinstance(m, ActNorm):
                m.loc.copy_(rnd(m.loc, 0.3))
                m.log_scale.copy_(rnd(m.log_scale, 0.1))
            elif isinstance(m, Inv1x1Conv2d):
                # junk where the masks cut (it must not matter); a small change to the factors (a large
                # one makes the triangular factors ill-conditioned and the inverse flows explode)
                m.w_l.add_(rnd(m.w_l, 0.02) * m.l_mask + rnd(m.w_l, 1.0) * (1 - m.l_mask))
                m.w_u.add_(rnd(m.w_u, 0.02) * m.u_mask + rnd(m.w_u, 1.0) * (1 - m.u_mask))
                m.w_s.add_(rnd(m.w_s, 0.2))
            elif isinstance(m, FeatureModulation):
                m.log_scale.copy_(rnd(m.log_scale, 0.3))
            elif isinstance(m, DegFlow):
                m.log_stds.copy_(rnd(m.log_stds, 0.3))
    return module


def official_parts(size, seed=0, with_uncertainty=False):
    """{part: reference module} of the four official networks, float32 (as released), eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    parts = {
        'hrnet': HRFlow(**size),
        'lrencoder': LRImageEncoderFM(**size, with_uncertainty=with_uncertainty),
        'contentnet': ContentFlow(**size),
        'degnet': DegFlow(**size),
    }
    return {k: randomise(v, gen).eval() for k, v in parts.items()}


def save_parts(parts, folder, wrap=None):
    """The release's files: one state dict per part (``wrap='module'``: DDP prefixes under 'state_dict')."""
    paths = {}
    for name, module in parts.items():
        state = module.state_dict()
        if wrap == 'module':
            state = {'state_dict': {f'module.{k}': v for k, v in state.items()}}
        paths[name] = str(folder / f'{name}.pth')
        torch.save(state, paths[name])
    return paths


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def run_cli(capsys, paths, output, *extra, parts=('hrnet', 'lrencoder', 'contentnet', 'degnet')):
    argv = [a for p in parts for a in (f'--{p}', str(paths[p]))] + ['-o', str(output)] + [str(e) for e in extra]
    rc = convert_sdflow.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('d2c-convert-sdflow: error: '), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def load_converted(path):
    ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
    net = SDFlow(**{k: v for k, v in ckpt['network_g'].items() if k != 'type'})
    net.load_state_dict(ckpt['params'], strict=True)
    return net.double().eval(), ckpt


def max_diff(a, b):
    return (a - b).abs().max().item()


DIFFS = {}  # what the parity checks measured (printed with pytest -s)


def close(name, ours, ref, atol=1e-10, rtol=0.0):
    DIFFS[name] = max_diff(ours, ref)
    assert torch.allclose(ours, ref, rtol=rtol, atol=atol), (name, DIFFS[name])
    print(f'{name}: max |ours - official| = {DIFFS[name]:.3g}')


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """The small official networks (float32, as released) and their files."""
    folder = tmp_path_factory.mktemp('official')
    parts = official_parts(SMALL, seed=0)
    return parts, save_parts(parts, folder)


# ----------------------------------------------------------------------------------------------
# 1. The converted network computes the official functions
# ----------------------------------------------------------------------------------------------
def test_converted_sdflow_matches_the_official_networks(tmp_path, capsys, monkeypatch, small):
    parts, paths = small
    out_pth, out_yml = tmp_path / 'out' / 'sdflow.pth', tmp_path / 'sdflow_test.yml'
    rc, out, err = run_cli(capsys, paths, out_pth, '--opt-out', out_yml)
    assert rc == 0, err
    assert 'type: SDFlow' in out and 'sha256' in out and 'downscaling path' in out and 'dropped' in out
    net, ckpt = load_converted(out_pth)
    want = dict(
        type='SDFlow',
        upscale=4,
        **SMALL_OPTIONS,
        downscaler=True,
        deg_steps=3,
        deg_blocks=1,
        mixture_components=5,
        temperature=0.8,
        mixture_sampling='image')
    assert ckpt['network_g'] == want and ckpt['converted_from']['network_g'] == want
    assert sorted(ckpt['converted_from']['files']) == ['contentnet', 'degnet', 'hrnet', 'lrencoder']
    assert all(v.item() == 1 for k, v in ckpt['params'].items() if k.endswith('initialized'))
    with open(out_yml) as f:
        opt = yaml.safe_load(f)
    assert opt['model_type'] == 'SDFlowModel' and opt['scale'] == 4 and opt['network_g'] == want
    assert opt['path']['pretrain_network_g'] == str(out_pth) and opt['path']['param_key_g'] == 'params'

    ref = {k: v.double() for k, v in parts.items()}
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 24, generator=gen, dtype=torch.float64) * 2 - 1  # HR in [-1, 1]
    y = torch.rand(2, 3, 8, 6, generator=gen, dtype=torch.float64) * 2 - 1  # LR
    zeros = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        # (a) HR flow with the HF flow: content and log-likelihood (the HF prior's + 1e-6: relative 1e-6)
        ref_content, ref_logp = ref['hrnet'](x, zeros)
        content, logp = net.hr_flow.log_prob(x)
        close('HR content z_c', content, ref_content)
        close('HR log p(x | z_c)', logp, ref_logp, rtol=1e-5)
        assert logp.abs().min() > 1  # not trivially zero
        monkeypatch.setattr(sys.modules[__name__], 'VARIANCE_EPS', 0.0)  # without the official + 1e-6: exact
        close('HR log p(x | z_c), no +1e-6', logp, ref['hrnet'](x, zeros)[1], atol=1e-9)
        monkeypatch.undo()

        # (c) LR encoder, (b) SR at temperature 0 and at 0.8 with the same noise
        close('LR encoder E(y)', net.lr_encoder(y), ref['lrencoder'](y))
        ref_sr0, _ = ref['hrnet'](ref['lrencoder'](y), None, 0.0, reverse=True)
        close('SR tau=0', net.sr_flow_space(y, 0.0), ref_sr0)
        eps = torch.randn(2, 45, 8, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        sr = net.sr_flow_space(y, 0.8, generator=torch.Generator().manual_seed(7))
        # the official latent is (1 + 1e-6) tau eps: with that factor taken out of eps the two agree to rounding
        ref_sr, _ = ref['hrnet'](ref['lrencoder'](y), None, 0.8, reverse=True, eps=eps / (1 + 1e-6))
        close('SR tau=0.8 (same latent)', sr, ref_sr)
        ref_sr, _ = ref['hrnet'](ref['lrencoder'](y), None, 0.8, reverse=True, eps=eps)
        close('SR tau=0.8 (same noise)', sr, ref_sr, atol=1e-5 * ref_sr.abs().max().item())
        assert max_diff(ref_sr, ref_sr0) > 1e-1

        # (d) LR flow, both ways, with the log-determinant
        ref_z, ref_ldj = ref['contentnet'](y, zeros)
        z, ldj = net.lr_flow(y, zeros)
        close('LR flow forward', z, ref_z)
        close('LR flow log-det', ldj, ref_ldj)
        close('LR flow reverse', net.lr_flow(z, None, reverse=True)[0], ref['contentnet'](z, None, reverse=True)[0])

        # (e) degradation flow: mixture log-likelihood (official + 1e-6 in the variance) and reverse on a given u
        c = ref['lrencoder'](y)
        z_d = z - c
        _, ref_deg = ref['degnet'](z_d, zeros, c)
        log_p_deg = net.deg_flow.log_prob(z_d, c)
        close('deg log p(z_d | c)', log_p_deg, ref_deg, rtol=1e-5)
        monkeypatch.setattr(sys.modules[__name__], 'VARIANCE_EPS', 0.0)
        # SDFlow's MixturePrior takes log K in float32 (torch.tensor(K)): 3e-8 per element in float64
        k = len(ref['degnet'].means)
        log_k_rounding = abs(math.log(k) - torch.tensor(float(k)).log().item()) * z_d[0].numel()
        close('deg log p(z_d | c), no +1e-6', log_p_deg, ref['degnet'](z_d, zeros, c)[1], atol=log_k_rounding + 1e-9)
        monkeypatch.undo()
        u = torch.randn(2, 12, 4, 3, generator=gen, dtype=torch.float64)
        close('deg reverse on u',
              net.deg_flow.flow(u, None, c, reverse=True)[0], ref['degnet'].deg_net(u, None, c, reverse=True)[0])

        # the whole downscaling at 0.8: official sampler (one component per image) with the same draws
        def official_ds(tau, seed):
            z_c, _ = ref['hrnet'](x, zeros)
            deg = ref['degnet'].sample(z_c, tau, torch.Generator().manual_seed(seed))
            return ref['contentnet'](z_c + deg, None, reverse=True)[0]

        close(
            'downscale tau=0.8 (same draws)',
            net.downscale_flow_space(x, 0.8,
                                     torch.Generator().manual_seed(3)),
            official_ds(0.8, 3),
            atol=1e-5)
        close('downscale tau=0 (same component)', net.downscale_flow_space(x, 0.0,
                                                                           torch.Generator().manual_seed(4)),
              official_ds(0.0, 4))
        # and through the [0, 1] API
        close('super_resolve [0, 1]', net.super_resolve((y + 1) / 2, 0.0), (ref_sr0.clamp(-1, 1) + 1) / 2)


def test_option_file_runs_in_the_test_pipeline(tmp_path, capsys, small):
    """The --opt-out file, pointed at a tiny paired set, runs through d2c-test (SDFlowModel, the checkpoint)."""
    _, paths = small
    out_pth, out_yml = tmp_path / 'sdflow.pth', tmp_path / 'test.yml'
    rc, _, err = run_cli(capsys, paths, out_pth, '--opt-out', out_yml)
    assert rc == 0, err
    hr_dir, lr_dir = make_pairs(str(tmp_path / 'data'), num=2, hr_size=32)
    with open(out_yml) as f:
        opt = yaml.safe_load(f)
    opt['num_gpu'] = 0
    opt['datasets']['test_1'].update(dataroot_gt=hr_dir, dataroot_lq=lr_dir)
    opt['val']['pbar'] = False
    write_yaml(tmp_path / 'run.yml', opt)
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.test', '-opt',
                             str(tmp_path / 'run.yml')],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    folder = tmp_path / 'results' / opt['name'] / 'visualization' / 'RealSR_x4_test'
    assert sorted(os.listdir(folder)) == [f'img{i}_{opt["name"]}.png' for i in range(2)]
    log = next((tmp_path / 'results' / opt['name']).glob('*.log')).read_text()
    assert 'psnr' in log and 'Network [SDFlow] is created' in log
    assert f'Loading {out_pth} [params] into SDFlow' in log + result.stdout + result.stderr


def test_sr_only_conversion_with_ddp_prefixes(tmp_path, capsys):
    parts = official_parts(SMALL, seed=2)
    parts = {k: parts[k] for k in ('hrnet', 'lrencoder')}
    paths = save_parts(parts, tmp_path, wrap='module')
    rc, out, err = run_cli(capsys, paths, tmp_path / 'sr.pth', parts=('hrnet', 'lrencoder'))
    assert rc == 0, err
    assert "under 'state_dict'" in out and 'SR path only' in out and 'downscaling path' not in out
    net, ckpt = load_converted(tmp_path / 'sr.pth')
    assert ckpt['network_g'] == dict(type='SDFlow', upscale=4, **SMALL_OPTIONS, downscaler=False, temperature=0.8)
    assert not net.has_downscaler
    y = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        ref = {k: v.double() for k, v in parts.items()}
        close('SR-only tau=0 (odd size)', net.sr_flow_space(y, 0.0),
              ref['hrnet'](ref['lrencoder'](y), None, 0.0, reverse=True)[0])


def test_release_size_every_key_accounted_for():
    """The release's sizes: every official key mapped (once) or dropped, the result is exactly SDFlow()."""
    parts = official_parts(FULL, seed=3)
    states = {k: v.state_dict() for k, v in parts.items()}
    state_dict, net_opt, notes = sc.convert_state_dicts(states)
    with torch.device('meta'):
        expected = SDFlow().state_dict()  # the defaults: the release's layout
    assert list(state_dict) == list(expected)
    assert all(tuple(state_dict[k].shape) == tuple(v.shape) for k, v in expected.items())
    assert net_opt == dict(
        type='SDFlow',
        upscale=4,
        num_feat=64,
        hidden_channels=64,
        flow_steps=16,
        hf_steps=8,
        hf_blocks=8,
        encoder_blocks=16,
        encoder_mod_convs=8,
        downscaler=True,
        deg_steps=8,
        deg_blocks=4,
        mixture_components=16,
        temperature=0.8,
        mixture_sampling='image')
    invconvs = {p: sum(isinstance(m, Inv1x1Conv2d) for m in parts[p].modules()) for p in parts}
    assert notes['dropped'] == {p: 3 * invconvs[p] for p in parts}
    assert sum(notes['mapped'].values()) == len(state_dict)
    assert sum(p.numel() for m in parts.values() for p in m.parameters()) == 14_099_319
    # every value travelled unchanged (the LU factors up to the masks the official weight applies)
    for part, state in states.items():
        for key, value in state.items():
            target = sc.sdflow_key(part, key)
            if target == sc.DROPPED:
                assert key.rsplit('.', 1)[1] in ('u_mask', 'l_mask', 'l_eye')
                continue
            if key.endswith('w_l'):
                value = value.tril(-1)
            elif key.endswith('w_u'):
                value = value.triu(1)
            assert torch.equal(state_dict[target], value), (part, key, target)
    assert sc.sdflow_key('hrnet', 'blocks.1.split.conditional_flow.additional_flow_steps.2.affine_coulping.net.conv3'
                         '.logs') == 'hr_flow.hf_flow.steps.2.3.net.conv_out.log_gain'
    assert sc.sdflow_key('hrnet', 'blocks.0.squeeze_transition.transitions.1.inv_conv.w_s') == \
        'hr_flow.levels.0.transition_in.3.log_s'
    assert sc.sdflow_key('lrencoder', 'mf_conv.22.weight') == 'lr_encoder.mod_body.14.weight'
    assert sc.sdflow_key('lrencoder', 'mf_conv.21.weight') is None  # a padding holds no weights
    assert sc.sdflow_key('degnet', 'deg_net.cond_net.0.trunk.3.RDB2.conv5.bias') == \
        'deg_flow.flow.cond_net.0.body.3.rdb2.conv5.bias'


# ----------------------------------------------------------------------------------------------
# 2. What is refused
# ----------------------------------------------------------------------------------------------
class _RunsCommand:

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command, )


def _refusal_case(kind, small, tmp_path):
    """(paths, parts passed, needles) for one refusal."""
    parts, paths = small
    paths = dict(paths)
    states = {k: v.state_dict() for k, v in parts.items()}

    def replace(part, obj):
        paths[part] = str(tmp_path / f'bad_{part}.pth')
        torch.save(obj, paths[part])

    given = ('hrnet', 'lrencoder', 'contentnet', 'degnet')
    if kind == 'pickled':
        marker = tmp_path / 'pwned'
        replace('hrnet', dict(states['hrnet'], extra=_RunsCommand(f'touch {marker}')))
        needles = ['refusing to load', 'bad_hrnet.pth', 'pickled Python object']
    elif kind == 'corrupt':
        paths['degnet'] = str(tmp_path / 'junk.pth')
        (tmp_path / 'junk.pth').write_bytes(b'\x00 not a checkpoint')
        needles = ['cannot read', 'junk.pth']
    elif kind == 'dan':
        replace('hrnet', {'params': DAN(num_feat=8, num_group=1, num_block=1, estimator_feat=8).state_dict()})
        needles = ['bad_hrnet.pth is a DAN checkpoint', '--hrnet expects the official hrnet.pth']
    elif kind == 'd2cnet':
        replace('hrnet', {'params': D2CNet(num_feat=8, num_group=1, num_block=1, reduction=4).state_dict()})
        needles = ['D2CNet checkpoint', '--hrnet expects']
    elif kind == 'swapped':
        paths['hrnet'], paths['lrencoder'] = paths['lrencoder'], paths['hrnet']
        needles = ['lrencoder.pth looks like the official lrencoder.pth', 'passed as --hrnet', 'pass it as --lrencoder']
    elif kind == 'converted':
        replace('hrnet', {'params': SDFlow(**SMALL_OPTIONS, downscaler=False).state_dict()})
        needles = ['already in this project', 'needs no conversion']
    elif kind == 'leftover':
        replace('degnet', dict(states['degnet'], **{'deg_net.prior.3.conv.weight': torch.zeros(1)}))
        needles = ['bad_degnet.pth: 1 key(s) match no module of DegFlow', 'deg_net.prior.3.conv.weight']
    elif kind == 'missing':
        state = dict(states['hrnet'])
        del state['blocks.1.steps.2.affine_coulping.net.conv3.logs']
        replace('hrnet', state)
        needles = ['1 SDFlow key(s) no file gave', 'hr_flow.levels.1.steps.2.2.net.conv_out.log_gain (--hrnet)']
    elif kind == 'resized':
        replace(
            'contentnet',
            dict(states['contentnet'],
                 **{'blocks.0.expand_transition.transitions.0.actnorm.loc': torch.zeros(1, 3, 1, 1)}))
        needles = ['shape mismatch', 'blocks.0.expand_transition.transitions.0.actnorm.loc (1, 3, 1, 1)']
    elif kind == 'uncertainty':
        enc = randomise(LRImageEncoderFM(**SMALL, with_uncertainty=True), torch.Generator().manual_seed(0))
        replace('lrencoder', enc.state_dict())
        needles = ['uncertainty head', 'uncertain_conv.1.weight', 'tanh']
    elif kind == 'uninitialised':
        state = dict(states['degnet'])
        state['deg_net.additional_flow_steps.1.actnorm.initialized'] = torch.tensor(0, dtype=torch.uint8)
        replace('degnet', state)
        needles = ['1 ActNorm layer(s) were never initialised', 'deg_net.additional_flow_steps.1.actnorm.initialized']
    elif kind == 'mask':
        state = dict(states['contentnet'])
        state['blocks.0.steps.0.permute.l_mask'] = torch.ones(12, 12).tril()
        replace('contentnet', state)
        needles = ['blocks.0.steps.0.permute.l_mask (12, 12) is not the transpose of u_mask']
    elif kind == 'nan':
        state = {k: v.clone() for k, v in states['lrencoder'].items()}
        state['out_conv.3.bias'][0] = float('nan')
        replace('lrencoder', state)
        needles = ['NaN', 'out_conv.3.bias']
    elif kind == 'steps':
        replace('contentnet', official_parts(dict(SMALL, flow_steps=2), seed=1)['contentnet'].state_dict())
        needles = ['has 2 flow steps but', 'has 3 per level']
    else:
        given = ('hrnet', 'lrencoder', 'contentnet')
        needles = ['--contentnet without --degnet', 'give both']
    return paths, given, needles


REFUSALS = [
    'pickled', 'corrupt', 'dan', 'd2cnet', 'swapped', 'converted', 'leftover', 'missing', 'resized', 'uncertainty',
    'uninitialised', 'mask', 'nan', 'steps', 'half-downscaler'
]


@pytest.mark.parametrize('kind', REFUSALS)
def test_refusals_leave_nothing_behind(tmp_path, capsys, small, kind):
    paths, given, needles = _refusal_case(kind, small, tmp_path)
    out = tmp_path / 'out.pth'
    rc, _, err = run_cli(capsys, paths, out, '--opt-out', tmp_path / 'out.yml', parts=given)
    assert_one_line_error(rc, err, *needles)
    assert not out.exists() and not (tmp_path / 'out.yml').exists() and not (tmp_path / 'pwned').exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_usage_errors(tmp_path, capsys, small):
    _, paths = small
    rc, _, err = run_cli(capsys, dict(paths, hrnet=str(tmp_path / 'nope.pth')), tmp_path / 'c.pth')
    assert_one_line_error(rc, err, 'not found', 'nope.pth', '--hrnet')
    assert_one_line_error(*run_cli(capsys, paths, paths['degnet'], '--force')[::2], 'overwrite the input')
    (tmp_path / 'exists.pth').write_bytes(b'')
    assert_one_line_error(*run_cli(capsys, paths, tmp_path / 'exists.pth')[::2], 'exists', '--force')
    assert_one_line_error(*run_cli(capsys, dict(paths, lrencoder=paths['hrnet']), tmp_path / 'c.pth')[::2],
                          'given as both --hrnet and --lrencoder')
    rc, _, err = run_cli(capsys, paths, tmp_path / 'exists.pth', '--force', parts=('hrnet', 'lrencoder'))
    assert rc == 0, err
    with pytest.raises(sc.UserError, match='--lrencoder missing'):
        sc.convert_state_dicts({'hrnet': {}})
    with pytest.raises(sc.UserError, match='--degnet without --contentnet'):
        sc.convert_state_dicts({'hrnet': {}, 'lrencoder': {}, 'degnet': {}})


def test_console_script(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), 'd2c-convert-sdflow')
    result = subprocess.run([script, '--help'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and '--contentnet' in result.stdout and '--opt-out' in result.stdout
    result = subprocess.run([
        sys.executable, '-m', 'd2c_tools.convert_sdflow', '--hrnet', 'h.pth', '--lrencoder', 'e.pth', '--contentnet',
        'c.pth', '-o',
        str(tmp_path / 'o.pth')
    ],
                            capture_output=True,
                            text=True,
                            timeout=120)
    assert_one_line_error(result.returncode, result.stderr, '--contentnet without --degnet')
