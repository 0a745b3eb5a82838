"""SDFlow checkpoints in ``d2c-infer``: loading, SR samples at a temperature, downscaling HR photos.

SR: ``--samples N`` draws N SR images per input (seeds ``seed .. seed + N - 1``, so a run is
reproducible), writes each, and with N > 1 also their per-pixel mean and a heatmap of their
per-pixel spread (standard deviation over the samples, mean over RGB; blue 0, red the image's
maximum, which is printed). Tiling works as for D2CNet: every tile draws its own latent noise,
which is what one whole-image draw does anyway (the latent is i.i.d. per position).
Downscaling (``--downscale``): N realistic LR images per HR photo (sides multiples of 4), whole
images (the flows are convolutional; no tiling).
"""
import sys
from os import path as osp

import numpy as np
import torch
from torch import nn as nn
from tqdm import tqdm

from d2c_utils.errors import ImageError
from d2c_utils.img_util import compose_output, image_kind, output_ext, read_image, split_input, to_bgr, write_image
from d2c_utils.precision_util import autocast
from d2c_utils.visual_util import weight_heatmap
from .tile_util import super_resolve


class SampledSR(nn.Module):
    """SDFlow's SR at a fixed temperature and noise generator, with D2CNet's call signature (for tiling)."""

    def __init__(self, net, temperature, generator=None):
        super().__init__()
        self.net, self.temperature, self.generator = net, temperature, generator
        self.upscale = net.upscale
        # an exported SDFlow (d2c_deploy.runtime_util.SDFlowRuntimeModel): the tiling code calls run()
        self.runs_exported = getattr(net, 'runs_exported', False)

    def forward(self, lq, return_branches=False):
        return self.net.super_resolve(lq, self.temperature, self.generator)

    def run(self, lq, return_branches=False, dtype=None):
        """What :func:`d2c_inference.tile_util.run_network` calls for an exported SDFlow (float32 on the host)."""
        return self.net.super_resolve(lq, self.temperature, self.generator, dtype)


def _generator(device, seed):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def process_sdflow_image(path, net, options, device, forward, prog='d2c-infer'):
    """SR samples (or, with ``options.downscale``, LR samples) of one file, written to ``options.output``.

    Args:
        path (str): The input image (an LR photo, or an HR photo to downscale).
        net (SDFlow): In eval mode, on ``device``.
        options (OutputOptions): ``samples``, ``temperature`` (None: the network's), ``seed``,
            ``downscale`` and the usual output options.
        forward (GuardedForward): Its ``dtype`` is the autocast dtype of the condition networks.

    Raises:
        ImageError: the input cannot be used (the caller skips it; nothing is written for it).
    """
    img = read_image(path, options.max_pixels)
    kind, max_value = image_kind(img)
    src, alpha = split_input(img)
    temperature = net.temperature if options.temperature is None else options.temperature
    dtype = getattr(forward, 'dtype', None)
    height, width = src.shape[2:]
    if options.downscale and (height % 4 or width % 4):
        raise ImageError(f'{osp.basename(path)} is {width}x{height}; downscaling x4 needs both sides to be multiples '
                         f'of 4: crop it to {width // 4 * 4}x{height // 4 * 4}')
    ext, note = output_ext(options.ext, path, kind, max_value)
    if note:
        tqdm.write(f'{prog}: note: {osp.basename(path)}: {note}', file=sys.stderr)
    stem = osp.splitext(osp.basename(path))[0]
    total = total_sq = None
    for i in range(options.samples):
        gen = _generator(device, options.seed + i)
        if options.downscale and getattr(net, 'runs_exported', False):
            out = net.downscale(src, temperature, gen, dtype)
        elif options.downscale:
            with torch.no_grad(), autocast(device.type, dtype):
                out = net.downscale(src.to(device), temperature, gen).float().cpu()
        else:
            out, _, _ = super_resolve(
                SampledSR(net, temperature, gen),
                src,
                net.upscale,
                tile=options.tile,
                tile_pad=options.tile_pad,
                pre_pad=options.pre_pad,
                device=device,
                forward=forward)
        if not torch.isfinite(out).all():
            raise ImageError(f'{osp.basename(path)}: sample {i} has NaN/inf values at temperature {temperature}; '
                             'lower --temperature')
        out = out.clamp(0, 1)
        total = out.double() if total is None else total + out
        total_sq = out.double()**2 if total_sq is None else total_sq + out.double()**2
        label = options.suffix if options.samples == 1 else f'{"lr" if options.downscale else "sample"}{i + 1}'
        name = f'{stem}_{label}' if label else stem
        write_image(options.target(f'{name}.{ext}', path), compose_output(to_bgr(out), kind, max_value, alpha))
    if options.samples > 1:
        mean = total / options.samples
        spread = (total_sq / options.samples - mean**2).clamp_min(0).sqrt().mean(dim=1)[0].numpy()
        write_image(
            options.target(f'{stem}_mean.{ext}', path), compose_output(to_bgr(mean.float()), kind, max_value, alpha))
        peak = float(spread.max())
        write_image(options.target(f'{stem}_spread.png', path), weight_heatmap(spread, max(peak, 1e-6)))
        tqdm.write(
            f'{prog}: {osp.basename(path)}: {options.samples} samples at temperature {temperature}; '
            f'spread (per-pixel std) mean {float(np.mean(spread)):.4f}, max {peak:.4f}',
            file=sys.stderr)
    return None
