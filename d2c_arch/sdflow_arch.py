"""SDFlow: unpaired many-to-many real-world SR and downscaling with normalizing flows.

Paper: Sun and Chen, "Learning Many-to-Many Mapping for Unpaired Real-World Image
Super-resolution and Downscaling" (TPAMI 2024, arXiv 2310.04964). Notation: HR x (N, 3, H, W),
LR y (N, 3, h, w), h = H / 4; inside the flows images are in [-1, 1] (``2 img - 1``).

    HR flow:      f_HR(x) = [z_c, z_h]     z_c (3, h, w) content, z_h (45, h, w) high frequencies
    HF flow:      u_h = f_HF(z_h | sg(z_c))           u_h ~ N(0, I)
    LR encoder:   c = E(y)                            (3, h, w), the content of a real LR image
    LR flow:      z_y = f_LR(y) = c + z_d             z_d: what the content lacks (the degradation)
    deg flow:     u_d = f_deg(z_d | c)                u_d ~ per-element mixture of K Gaussians

Super-resolution: ``x = f_HR^-1([E(y), f_HF^-1(tau eps | E(y))])``; tau = 0 gives the
deterministic SR of the zero latent. Downscaling: ``y = f_LR^-1(z_c + f_deg^-1(u_d | z_c))``
with ``z_c`` the content of x and ``u_d`` drawn from the mixture at temperature tau.

The four networks live in one module (one checkpoint): ``hr_flow`` (with the HF flow),
``lr_encoder``, and, unless ``downscaler: false``, ``lr_flow`` and ``deg_flow``. Sizes follow the
official code (x4 only): 10.05 M parameters on the SR path, 12.32 M on the downscaling path.
"""
import math

import torch
from torch import nn as nn

from basicsr.utils.registry import ARCH_REGISTRY
from d2c_utils.errors import UserError
from .arch_util import reject_unknown_options
from .flow_util import (
    CheckerboardSqueeze,
    ConditionEncoder,
    FlowSequence,
    FlowStep,
    full_precision,
    gaussian_log_prob,
    split,
    transition,
)

CONTENT_CHANNELS = 3
MIXTURE_SAMPLING = ('element', 'image')


def _noise(shape, temperature, like, generator=None):
    """``temperature * N(0, I)`` of ``shape`` on ``like``'s device (zeros at temperature 0, no draw)."""
    if temperature == 0:
        return torch.zeros(shape, device=like.device, dtype=like.dtype)
    return temperature * torch.randn(shape, device=like.device, dtype=like.dtype, generator=generator)


class FlowLevel(nn.Module):
    """Squeeze -> transition -> ``num_steps`` flow steps [-> transition -> unsqueeze].

    Args:
        in_channels (int): C before the squeeze (4C after it).
        num_steps (int): Unconditional flow steps at 4C channels.
        hidden_channels (int): Width of the coupling networks.
        unsqueeze (bool): Undo the squeeze at the end (the LR flow keeps the image's shape).

    Shapes: (N, C, H, W) -> (N, 4C, H/2, W/2), or (N, C, H, W) with ``unsqueeze``.
    """

    def __init__(self, in_channels, num_steps, hidden_channels=64, unsqueeze=False):
        super().__init__()
        channels = 4 * in_channels
        self.squeeze = CheckerboardSqueeze()
        self.transition_in = transition(channels)
        self.steps = FlowSequence([FlowStep(channels, 0, hidden_channels) for _ in range(num_steps)])
        self.unsqueeze = unsqueeze
        if unsqueeze:
            self.transition_out = transition(channels)

    def forward(self, z, logdet=None, cond=None, reverse=False):
        if not reverse:
            z, logdet = self.squeeze(z, logdet)
            z, logdet = self.transition_in(z, logdet)
            z, logdet = self.steps(z, logdet)
            if self.unsqueeze:
                z, logdet = self.transition_out(z, logdet)
                z, logdet = self.squeeze(z, logdet, reverse=True)
            return z, logdet
        if self.unsqueeze:
            z, logdet = self.squeeze(z, logdet)
            z, logdet = self.transition_out(z, logdet, reverse=True)
        z, logdet = self.steps(z, logdet, reverse=True)
        z, logdet = self.transition_in(z, logdet, reverse=True)
        return self.squeeze(z, logdet, reverse=True)


class ConditionalFlow(nn.Module):
    """Flow of z given a condition image: ``num_steps`` conditional steps (the last without coupling).

    The condition passes through a :class:`ConditionEncoder` (``num_block`` RRDBs). With
    ``squeeze``, z is squeezed (C -> 4C at half size, then a transition) and the condition
    features are brought to that size by pixel-unshuffle and a 1x1 convolution.

    Args:
        num_channels (int): C of z.
        cond_channels (int): Channels of the condition image.
        num_steps (int): Conditional flow steps.
        num_block (int): RRDBs of the condition encoder.
        num_feat (int): Condition feature width.
        hidden_channels (int): Width of the coupling/injector networks.
        squeeze (bool): Squeeze z first.

    Shapes: z (N, C, H, W), cond (N, cond_channels, H, W) -> (N, C, H, W), or (N, 4C, H/2, W/2)
    with ``squeeze``.
    """

    def __init__(self,
                 num_channels,
                 cond_channels,
                 num_steps=8,
                 num_block=8,
                 num_feat=64,
                 hidden_channels=64,
                 squeeze=False):
        super().__init__()
        self.squeeze = squeeze
        encoder = ConditionEncoder(cond_channels, num_feat, num_block)
        if squeeze:
            self.cond_net = nn.Sequential(encoder, nn.PixelUnshuffle(2), nn.Conv2d(4 * num_feat, num_feat, 1),
                                          nn.LeakyReLU(0.2, inplace=True))
            self.squeeze_layers = FlowSequence([CheckerboardSqueeze(), transition(4 * num_channels)])
            num_channels *= 4
        else:
            self.cond_net = encoder
            self.squeeze_layers = FlowSequence()
        self.latent_channels = num_channels
        self.steps = FlowSequence(
            [FlowStep(num_channels, num_feat, hidden_channels, coupling=i < num_steps - 1) for i in range(num_steps)])

    def forward(self, z, logdet=None, cond=None, reverse=False):
        feat = self.cond_net(cond)
        if not reverse:
            z, logdet = self.squeeze_layers(z, logdet)
            return self.steps(z, logdet, feat)
        z, logdet = self.steps(z, logdet, feat, reverse=True)
        return self.squeeze_layers(z, logdet, reverse=True)

    def latent_shape(self, cond):
        """(N, C', h', w') of the latent for a condition image ``cond``."""
        n, _, h, w = cond.shape
        return (n, self.latent_channels, h // 2, w // 2) if self.squeeze else (n, self.latent_channels, h, w)


class MixturePrior(nn.Module):
    """Equal-weight mixture of K scalar Gaussians, applied to every element independently.

    log p(u) = sum_i log( (1/K) sum_k N(u_i; mu_k, sigma_k^2) ). Means start at N(0, 1) draws,
    log-sigmas at 0.

    Args:
        num_components (int): K.
    """

    def __init__(self, num_components=16):
        super().__init__()
        self.means = nn.Parameter(torch.randn(num_components))
        self.log_stds = nn.Parameter(torch.zeros(num_components))

    def log_prob(self, u):
        """log p(u) summed over all but the batch dimension: (N, ...) -> (N,)."""
        u = full_precision(u)
        per_component = gaussian_log_prob(u.unsqueeze(-1), self.means, self.log_stds)  # (N, ..., K)
        return (torch.logsumexp(per_component, dim=-1) - math.log(self.means.numel())).flatten(1).sum(dim=1)

    def sample(self, shape, temperature=1.0, generator=None, mode='element', device=None):
        """Draw u of ``shape`` (N, ...): ``mu_k + temperature * sigma_k * eps``.

        ``mode='element'`` draws a component per element (the density :meth:`log_prob` scores);
        ``'image'`` one component per image (the official sampler). The component is random
        even at temperature 0.
        """
        if mode not in MIXTURE_SAMPLING:
            raise ValueError(f'mixture sampling {mode!r}; use one of {MIXTURE_SAMPLING}')
        device = device or self.means.device
        count = shape[0] if mode == 'image' else int(torch.Size(shape).numel())
        index = torch.randint(self.means.numel(), (count, ), device=device, generator=generator)
        if mode == 'image':
            index = index.view(-1, *[1] * (len(shape) - 1)).expand(shape)
        else:
            index = index.view(shape)
        eps = _noise(shape, temperature, self.means, generator)
        return self.means[index] + torch.exp(self.log_stds[index]) * eps


class DegradationFlow(nn.Module):
    """f_deg with its prior: z_d (N, 3, h, w) given the content c (N, 3, h, w) <-> u_d (N, 12, h/2, w/2)."""

    def __init__(self, num_steps=8, num_block=4, num_feat=64, hidden_channels=64, num_components=16):
        super().__init__()
        self.flow = ConditionalFlow(
            CONTENT_CHANNELS, CONTENT_CHANNELS, num_steps, num_block, num_feat, hidden_channels, squeeze=True)
        self.prior = MixturePrior(num_components)

    def log_prob(self, z_d, content):
        """log p(z_d | c) = log pi(f_deg(z_d | c)) + log|det J_deg|, (N,)."""
        u, logdet = self.flow(z_d, z_d.new_zeros(z_d.shape[0]), content)
        return self.prior.log_prob(u) + logdet

    def sample(self, content, temperature, generator=None, mode='element'):
        """z_d (N, 3, h, w) for the content (h, w even)."""
        u = self.prior.sample(self.flow.latent_shape(content), temperature, generator, mode, content.device)
        z_d, _ = self.flow(u, None, content, reverse=True)
        return z_d


class HRFlow(nn.Module):
    """f_HR with the HF flow: x (N, 3, H, W) <-> content z_c (N, 3, H/4, W/4) and u_h (N, 45, H/4, W/4)."""

    def __init__(self, num_steps=16, hf_steps=8, hf_blocks=8, num_feat=64, hidden_channels=64):
        super().__init__()
        self.levels = FlowSequence([
            FlowLevel(3, num_steps, hidden_channels),
            FlowLevel(12, num_steps, hidden_channels),
        ])
        self.hf_flow = ConditionalFlow(48 - CONTENT_CHANNELS, CONTENT_CHANNELS, hf_steps, hf_blocks, num_feat,
                                       hidden_channels)

    def log_prob(self, x):
        """(z_c, log p(x | z_c)): the content and log N(u_h; 0, I) + log|det J| of f_HR and f_HF, (N,).

        The HF flow is conditioned on ``sg(z_c)``, so its likelihood shapes the content only through
        the HR flow's own Jacobian.
        """
        z, logdet = self.levels(x, x.new_zeros(x.shape[0]))
        content, z_h = split(z, CONTENT_CHANNELS)
        u_h, logdet = self.hf_flow(z_h, logdet, content.detach())
        return content, logdet + gaussian_log_prob(u_h).flatten(1).sum(dim=1)

    def content(self, x):
        """z_c of x without the HF flow (what downscaling needs)."""
        z, _ = self.levels(x)
        return z[:, :CONTENT_CHANNELS]

    def decode(self, content, temperature, generator=None):
        """x for the content z_c and ``u_h = temperature * eps``."""
        content = full_precision(content)
        u_h = _noise((content.shape[0], self.hf_flow.latent_channels, *content.shape[2:]), temperature, content,
                     generator)
        z_h, _ = self.hf_flow(u_h, None, content.detach(), reverse=True)
        x, _ = self.levels(torch.cat([content, z_h], dim=1), None, reverse=True)
        return x


class FeatureModulation(nn.Module):
    """``feat * gamma + beta`` with ``[gamma, beta] = conv1x1(mod)``, gamma bounded to (-a, a), a = exp(learned)."""

    def __init__(self, num_feat, mod_feat):
        super().__init__()
        self.log_bound = nn.Parameter(torch.zeros(1))
        self.affine = nn.Conv2d(mod_feat, 2 * num_feat, 1)

    def forward(self, feat, mod):
        gamma, beta = self.affine(mod).chunk(2, dim=1)
        bound = torch.exp(self.log_bound)
        return feat * torch.tanh(gamma / (bound + 1e-6)) * bound + beta


class ModulatedResBlock(nn.Module):
    """Residual block whose two convolutions see modulated features: ``x + 0.1 conv(mod(lrelu(conv(mod(x)))))``."""

    def __init__(self, num_feat, res_scale=0.1):
        super().__init__()
        self.mod1 = FeatureModulation(num_feat, num_feat)
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, padding=1, padding_mode='reflect')
        self.mod2 = FeatureModulation(num_feat, num_feat)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, padding=1, padding_mode='reflect')
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        self.res_scale = res_scale

    def forward(self, feat, mod):
        out = self.lrelu(self.conv1(self.mod1(feat, mod)))
        return feat + self.conv2(self.mod2(out, mod)) * self.res_scale


class LRContentEncoder(nn.Module):
    """E: the content latent of a real LR image, with degradation-dependent feature modulation.

    A modulation branch (``num_mod_convs`` conv + LReLU) reads the degradation from the image
    features and modulates every residual block of the trunk. Reflection padding throughout.

    Shapes: y (N, 3, h, w) in [-1, 1] -> c (N, 3, h, w), unbounded.
    """

    def __init__(self, num_feat=64, num_block=16, num_mod_convs=8):
        super().__init__()

        def conv(cin, cout):
            return nn.Conv2d(cin, cout, 3, padding=1, padding_mode='reflect')

        self.conv_first = conv(3, num_feat)
        self.mod_body = nn.Sequential(
            *[m for _ in range(num_mod_convs) for m in (conv(num_feat, num_feat), nn.LeakyReLU(0.2, inplace=True))])
        self.body = nn.ModuleList([ModulatedResBlock(num_feat) for _ in range(num_block)])
        self.conv_hr = conv(num_feat, num_feat)
        self.conv_last = nn.Conv2d(num_feat, CONTENT_CHANNELS, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, y):
        feat = self.lrelu(self.conv_first(y))
        mod = self.mod_body(feat)
        out = feat
        for block in self.body:
            out = block(out, mod)
        return full_precision(self.conv_last(self.lrelu(self.conv_hr(feat + out))))


@ARCH_REGISTRY.register()
class SDFlow(nn.Module):
    """SDFlow x4: super-resolution and downscaling, both one-to-many, in one module.

    Args:
        upscale (int): 4 (the only scale of the design: two 2x squeezes).
        num_feat (int): Width of the condition encoders and of the LR encoder. Default 64.
        hidden_channels (int): Width of the coupling/injector networks. Default 64.
        flow_steps (int): Steps per level of the HR flow and of the LR flow. Default 16.
        hf_steps, hf_blocks (int): Steps of the HF flow and RRDBs of its condition encoder. 8, 8.
        deg_steps, deg_blocks (int): Steps of the degradation flow and RRDBs of its encoder. 8, 4.
        encoder_blocks, encoder_mod_convs (int): Modulated residual blocks of E and convolutions of
            its modulation branch. 16, 8.
        mixture_components (int): K of the degradation prior. 16.
        temperature (float): Default sampling temperature of ``forward``/``super_resolve``/``downscale``. 0.8.
        downscaler (bool): Build the LR and degradation flows (False: the SR path only, 10.05 M).
        mixture_sampling (str): 'element' (default; the density the prior is trained as) or 'image'
            (one component per image, the official sampler).

    ``forward(lq, temperature=None)``: SR (N, 3, 4h, 4w) in [0, 1] of lq (N, 3, h, w) in [0, 1],
    so BasicSR's test and inference code runs it as any SR network.
    """

    def __init__(self,
                 upscale=4,
                 num_feat=64,
                 hidden_channels=64,
                 flow_steps=16,
                 hf_steps=8,
                 hf_blocks=8,
                 deg_steps=8,
                 deg_blocks=4,
                 encoder_blocks=16,
                 encoder_mod_convs=8,
                 mixture_components=16,
                 temperature=0.8,
                 downscaler=True,
                 mixture_sampling='element',
                 **unknown):
        super().__init__()
        reject_unknown_options(SDFlow, unknown)
        if upscale != 4:
            raise UserError(f'network_g.upscale={upscale}: SDFlow is x4 only (its HR flow squeezes twice by 2); '
                            'set upscale: 4 and scale: 4')
        if mixture_sampling not in MIXTURE_SAMPLING:
            raise UserError(f'network_g.mixture_sampling={mixture_sampling!r}; use one of {MIXTURE_SAMPLING}')
        if temperature < 0:
            raise UserError(f'network_g.temperature={temperature}; use a value >= 0 (0.8 in the paper)')
        self.upscale = upscale
        self.temperature = float(temperature)
        self.mixture_sampling = mixture_sampling
        self.hr_flow = HRFlow(flow_steps, hf_steps, hf_blocks, num_feat, hidden_channels)
        self.lr_encoder = LRContentEncoder(num_feat, encoder_blocks, encoder_mod_convs)
        self.has_downscaler = bool(downscaler)
        if downscaler:
            self.lr_flow = FlowLevel(3, flow_steps, hidden_channels, unsqueeze=True)
            self.deg_flow = DegradationFlow(deg_steps, deg_blocks, num_feat, hidden_channels, mixture_components)

    # ------------------------------------------------------------------------ likelihoods (training)
    def hr_log_prob(self, hr):
        """(z_c, log p(x | z_c)) of HR images (N, 3, H, W) in [-1, 1], H and W multiples of 4."""
        _check_multiple(hr, 4, 'HR image')
        return self.hr_flow.log_prob(hr)

    def lr_log_prob(self, lq, content):
        """log p(y | c) = log p(z_d | c) + log|det J_LR(y)|, z_d = f_LR(y) - c, of LR (N, 3, h, w) in [-1, 1]."""
        self._need_downscaler('the LR likelihood')
        _check_multiple(lq, 2, 'LR image')
        z_y, logdet = self.lr_flow(lq, lq.new_zeros(lq.shape[0]))
        return self.deg_flow.log_prob(z_y - content, content) + logdet

    # ------------------------------------------------------------------------ sampling ([-1, 1] in and out)
    def sr_flow_space(self, lq, temperature, generator=None):
        """SR in flow space: f_HR^-1([E(y), f_HF^-1(temperature eps | E(y))]); lq in [-1, 1]."""
        return self.hr_flow.decode(self.lr_encoder(lq), temperature, generator)

    def downscale_flow_space(self, hr, temperature, generator=None, content=None):
        """LR in flow space: f_LR^-1(z_c + z_d), z_d drawn given z_c; hr (N, 3, H, W) in [-1, 1], H, W % 8 == 0."""
        self._need_downscaler('downscaling')
        if content is None:
            _check_multiple(hr, 8, 'HR image')
            content = self.hr_flow.content(hr)
        z_d = self.deg_flow.sample(content, temperature, generator, self.mixture_sampling)
        lq, _ = self.lr_flow(content + z_d, None, reverse=True)
        return lq

    def training_outputs(self, hr, lq, cycle_temperature=None, generator=None):
        """Everything one unpaired training step needs, in one call (one DDP forward).

        Args:
            hr (Tensor): (N, 3, H, W) HR crops in [-1, 1] (dequantised), H, W multiples of 8.
            lq (Tensor): (M, 3, h, w) LR crops in [-1, 1] (dequantised), unrelated to ``hr``.
            cycle_temperature (float | None): Also downscale ``hr`` (no gradient, 8-bit rounded)
                at this temperature and encode the result (the content-cycle term); None: skip.
            generator (torch.Generator | None): For the downscaling draw.

        Returns:
            dict: ``content_hr`` z_c(x) (N, 3, H/4, W/4); ``log_p_hr`` log p(x | z_c) (N,);
            ``content_lr`` E(y) (M, 3, h, w); ``log_p_lr`` log p(y | sg(E(y))) (M,); with a cycle
            temperature also ``lq_fake`` (N, 3, H/4, W/4) and ``content_fake`` E(lq_fake).
        """
        content_hr, log_p_hr = self.hr_log_prob(hr)
        content_lr = self.lr_encoder(lq)
        # the LR likelihood models what the content leaves out; it must not pull E towards f_LR(y)
        # (E would then absorb the degradation), so E sees it only through the stop-gradient
        out = {
            'content_hr': content_hr,
            'log_p_hr': log_p_hr,
            'content_lr': content_lr,
            'log_p_lr': self.lr_log_prob(lq, content_lr.detach()),
        }
        if cycle_temperature is not None:
            with torch.no_grad():
                fake = self.downscale_flow_space(None, cycle_temperature, generator, content=content_hr.detach())
                out['lq_fake'] = torch.round((fake.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
            out['content_fake'] = self.lr_encoder(out['lq_fake'])
        return out

    # ------------------------------------------------------------------------ public API ([0, 1] images)
    def forward(self, lq, temperature=None, hr=None, **training):
        """SR (N, 3, 4h, 4w) in [0, 1] of lq (N, 3, h, w) in [0, 1] at ``temperature`` (default: the option).

        With ``hr`` (training, [-1, 1] inputs): :meth:`training_outputs` ``(hr, lq, **training)``.
        """
        if hr is not None:
            return self.training_outputs(hr, lq, **training)
        return self.super_resolve(lq, temperature)

    def super_resolve(self, lq, temperature=None, generator=None):
        """One SR sample per image, clamped to [0, 1]; temperature 0 is deterministic."""
        temperature = self.temperature if temperature is None else float(temperature)
        return (self.sr_flow_space(lq * 2 - 1, temperature, generator).clamp(-1, 1) + 1) / 2

    def downscale(self, hr, temperature=None, generator=None):
        """One LR sample (N, 3, H/4, W/4) in [0, 1] of HR (N, 3, H, W) in [0, 1], H and W multiples of 4.

        Sides that are multiples of 4 but not of 8 are reflect-padded by 4 and the result cropped
        (the degradation flow squeezes the H/4 x W/4 content once more).
        """
        _check_multiple(hr, 4, 'HR image')
        temperature = self.temperature if temperature is None else float(temperature)
        height, width = hr.shape[2:]
        pad_h, pad_w = -height % 8, -width % 8
        x = hr * 2 - 1
        if pad_h or pad_w:
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h), mode='reflect')
        lq = self.downscale_flow_space(x, temperature, generator)
        return ((lq[:, :, :height // 4, :width // 4].clamp(-1, 1) + 1) / 2)

    def _need_downscaler(self, what):
        if not self.has_downscaler:
            raise UserError(f'SDFlow built with downscaler: false (the SR path only) cannot do {what}; '
                            'use a checkpoint with lr_flow and deg_flow (d2c-convert-sdflow --contentnet --degnet)')


def _check_multiple(img, multiple, what):
    height, width = img.shape[-2:]
    if height % multiple or width % multiple:
        raise UserError(f'{what} is {width}x{height}; SDFlow needs both sides to be multiples of {multiple} '
                        f'(crop it to {width // multiple * multiple}x{height // multiple * multiple})')


def infer_sdflow_options(state_dict):
    """SDFlow options read from its weights (keys without a ``module.`` prefix).

    Read: num_feat, hidden_channels, flow_steps, hf_steps, hf_blocks, encoder_blocks,
    encoder_mod_convs, downscaler, and with it deg_steps, deg_blocks, mixture_components. Not
    readable: ``temperature`` and ``mixture_sampling`` (sampling settings, no trace in the
    weights; they keep the defaults 0.8 and 'element'); ``upscale`` is always 4.

    Raises:
        ValueError: the keys do not look like SDFlow's.
    """
    keys = list(state_dict)
    if 'lr_encoder.conv_first.weight' not in state_dict or not any(k.startswith('hr_flow.levels.') for k in keys):
        raise ValueError(f'the weights do not look like SDFlow (no lr_encoder / hr_flow); first keys: {keys[:5]}')

    def count(prefix):
        return len({k[len(prefix):].split('.')[0] for k in keys if k.startswith(prefix)})

    opts = {
        'num_feat': state_dict['lr_encoder.conv_first.weight'].shape[0],
        'hidden_channels': state_dict['hr_flow.levels.0.steps.0.2.net.conv_in.weight'].shape[0],
        'flow_steps': count('hr_flow.levels.0.steps.'),
        'hf_steps': count('hr_flow.hf_flow.steps.'),
        'hf_blocks': count('hr_flow.hf_flow.cond_net.body.'),
        'encoder_blocks': count('lr_encoder.body.'),
        'encoder_mod_convs': count('lr_encoder.mod_body.'),  # convolutions only: LReLUs hold no weights
        'downscaler': 'deg_flow.prior.means' in state_dict,
    }
    if opts['downscaler']:
        opts['deg_steps'] = count('deg_flow.flow.steps.')
        opts['deg_blocks'] = count('deg_flow.flow.cond_net.0.body.')
        opts['mixture_components'] = state_dict['deg_flow.prior.means'].shape[0]
    return opts


# what the weights cannot tell (infer_sdflow_options keeps the defaults)
NOT_INFERABLE = ('temperature', 'mixture_sampling')
