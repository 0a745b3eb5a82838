"""Super-resolving image files with a D2CNet: what ``d2c-infer`` does, as library functions.

One image file in, its outputs written: the SR image in the input's kind (gray, RGB, RGBA; 8
or 16 bit), optionally every branch, the weight maps and a grid picture, and Y-PSNR/SSIM (and,
on request, LPIPS/DISTS) against a reference image.
"""
import csv
import io
import sys
from os import path as osp

import numpy as np
import torch
from tqdm import tqdm

from basicsr.utils import tensor2img
from d2c_data.degradations import kernel_picture
from d2c_metrics.perceptual_metric import calculate_dists, calculate_lpips, dists_network, lpips_network
from d2c_utils.errors import ImageError, UserError
from d2c_utils.eval_util import bicubic_upscale, oracle_fusion, psnr_ssim_y
from d2c_utils.img_util import image_kind, read_image, split_input, write_image
from d2c_utils.output_util import atomic_write_bytes
from d2c_utils.precision_util import cpu_has_native_bf16, resolve_precision
# the options and the earlier outputs need no torch: the numpy path (array_infer_util) shares them
from .array_infer_util import InputImage, OutputOptions, earlier_outputs, write_outputs  # noqa: F401
from .tile_util import super_resolve


def nonfinite_weights(net):
    """Names of the first floating-point tensors of ``net`` that hold NaN/inf (''; '' for exported models)."""
    if not isinstance(net, torch.nn.Module):
        return ''
    names = [
        name for name, tensor in net.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    return ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')


def select_device(name):
    """'auto' | 'cpu' | 'cuda' -> torch.device; UserError if CUDA is asked for but missing."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: CUDA is not available here (torch.cuda.is_available() is False); '
                        'use --device cpu or auto')
    return torch.device(name)


def select_precision(precision, device, warn):
    """The autocast dtype (None = fp32) for ``--precision`` on ``device``.

    Args:
        precision (str): 'auto', 'fp32', 'bf16' or 'fp16'.
        device (torch.device): Where the network runs.
        warn (callable): ``warn(message)`` for a precision that will be slow here.
    """
    if precision == 'bf16' and device.type == 'cpu' and not cpu_has_native_bf16():
        warn('this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and likely slower than '
             '--precision fp32')
    try:
        return resolve_precision(precision, device.type, purpose='infer')
    except ValueError as err:
        raise UserError(f'--precision {precision}: {err}') from None


# d2c-infer --perceptual: name -> (BasicSR metric on uint8 BGR images, the function building its network)
PERCEPTUAL_METRICS = ('lpips', 'dists')
_PERCEPTUAL = {'lpips': (calculate_lpips, lpips_network), 'dists': (calculate_dists, dists_network)}


def prepare_perceptual(names, device):
    """Build the networks of the perceptual metrics ``names`` on ``device`` now (their defaults: LPIPS alex v0.1).

    Raises:
        UserError: the package is not installed or a weight file is missing (one line naming it).
    """
    for name in names:
        _PERCEPTUAL[name][1](device=str(device))


def reference_metrics(ref_path, lq, sr, branches, scale, perceptual=()):
    """Y-PSNR/SSIM (BasicSR, crop_border = scale) of bicubic, each branch, fused and oracle.

    Args:
        ref_path (str): Ground-truth image, size (sH, sW).
        lq (Tensor): (1, 3, H, W) input; sr (1, 3, sH, sW); branches (1, P, 3, sH, sW).
        perceptual (sequence[str]): Also these metrics of :data:`PERCEPTUAL_METRICS`, on the whole
            image (no border shaved), networks on the device of ``sr``.

    Returns:
        dict[str, tuple[float, ...]]: method -> (psnr, ssim, *perceptual), in the order bicubic,
        branch1..P, fused, oracle (bicubic and fused only when ``branches`` is None: DAN).
        Images are compared as 8-bit BGR, as BasicSR does.
    """
    hr, _ = split_input(read_image(ref_path))
    if hr.shape[2:] != sr.shape[2:]:
        raise ImageError(f'reference {ref_path} is {hr.shape[3]}x{hr.shape[2]}, the output '
                         f'{sr.shape[3]}x{sr.shape[2]} (WxH); no metrics for this image')
    hr8 = tensor2img(hr)
    images = [('bicubic', bicubic_upscale(lq, scale))]
    if branches is None:
        images.append(('fused', tensor2img(sr)))
    else:
        images += [(f'branch{i + 1}', tensor2img(branches[:, i])) for i in range(branches.size(1))]
        images += [('fused', tensor2img(sr)), ('oracle', tensor2img(oracle_fusion(branches, hr)))]
    device = str(sr.device)
    return {
        name:
        psnr_ssim_y(img, hr8, crop_border=scale) + tuple(_PERCEPTUAL[metric][0](img, hr8, device=device)
                                                         for metric in perceptual)
        for name, img in images
    }


class SingleOutputNetwork(torch.nn.Module):
    """A plain SR network (one output) behind D2CNet's call, which the tiling code makes.

    Shapes: lq (N, C, h, w) in [0, 1] -> SR (N, C', sh, sw); ``upscale`` is the network's.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.upscale = net.upscale

    def forward(self, lq, return_branches=False):
        if return_branches:
            raise UserError(f'{type(self.net).__name__} has no branches or weight maps')
        return self.net(lq)


def process_image(path, net, options, device, forward, prog='d2c-infer', per_image=None):
    """Super-resolve one file and write its outputs.

    Args:
        path (str): The input image.
        net (D2CNet): In eval mode, on ``device``.
        options (OutputOptions): What to write.
        device (torch.device): Where tiles are computed.
        forward (callable): ``forward(net, lq, return_branches)`` (a ``GuardedForward``).
        prog (str): Prefix of the warnings printed on stderr.
        per_image (callable | None): ``per_image(net, lq, options, device, forward) -> (net, kernel)``: a
            method's step before tiling (DAN: one kernel estimate per image, the tiles restored with it);
            the returned network has no branches.

    Returns:
        dict | None: the metrics (see :func:`reference_metrics`) if a reference was found.

    Raises:
        ImageError: the input cannot be used (the caller skips it).
    """
    img = read_image(path, options.max_pixels)
    kind, max_value = image_kind(img)
    lq, alpha = split_input(img)
    scale = net.upscale
    ref_path = None
    if options.reference:
        ref_path = osp.join(options.reference, osp.basename(path))
        if not osp.isfile(ref_path):
            tqdm.write(f'{prog}: warning: no reference {ref_path} for {path}; no metrics for it', file=sys.stderr)
            ref_path = None
    need_branches = options.save_branches or options.save_weights or ref_path is not None
    kernel = None
    if per_image is not None:
        net, kernel = per_image(net, lq, options, device, forward)
        need_branches = False
    sr, branches, weights = super_resolve(
        net,
        lq,
        scale,
        tile=options.tile,
        tile_pad=options.tile_pad,
        pre_pad=options.pre_pad,
        device=device,
        return_branches=need_branches,
        forward=forward)

    # the writer of the exported path: the same files, names and kinds from either
    image = InputImage(path, lq.numpy(), alpha, kind, max_value)
    write_outputs(image, tuple(None if t is None else t.numpy() for t in (sr, branches, weights)), scale, options, prog)
    if kernel is not None and options.save_kernel:
        stem = osp.splitext(osp.basename(path))[0]
        kernel = kernel.cpu().numpy()
        write_image(options.target(f'{stem}_kernel.png', path), kernel_picture(kernel))
        buffer = io.BytesIO()
        np.save(buffer, kernel)
        atomic_write_bytes(options.target(f'{stem}_kernel.npy', path), buffer.getvalue())
    if ref_path is None:
        return None
    try:
        return reference_metrics(ref_path, lq, sr, branches, scale, options.perceptual)
    except ImageError as err:
        tqdm.write(f'{prog}: warning: {err}', file=sys.stderr)
        return None


def write_metrics(out_dir, rows, perceptual=()):
    """Print a table of Y-PSNR/SSIM (and the perceptual metrics) per image and the mean; write ``metrics.csv``.

    Args:
        rows (list[tuple[str, dict]]): (image file name, method -> (psnr, ssim, *perceptual)).
        perceptual (sequence[str]): Names of the values after (psnr, ssim), e.g. ('lpips', 'dists').
    """
    methods = list(rows[0][1])
    keys = ('psnr_y', 'ssim_y') + tuple(perceptual)
    means = {m: tuple(float(np.mean([r[m][j] for _, r in rows])) for j in range(len(keys))) for m in methods}
    csv_path = osp.join(out_dir, 'metrics.csv')
    text = io.StringIO(newline='')
    writer = csv.writer(text)
    writer.writerow(['image'] + [f'{m}_{k}' for m in methods for k in keys])
    for name, row in rows + [('mean', means)]:
        writer.writerow([name] + [f'{row[m][j]:.4f}' for m in methods for j in range(len(keys))])
    atomic_write_bytes(csv_path, text.getvalue().encode('utf-8'))
    width = max(12, max(len(name) for name, _ in rows) + 1)
    cell = 16 + 7 * len(perceptual)
    names = [name.upper() for name in perceptual]
    note = f' ({", ".join(names)}: whole image, lower is better)' if names else ''
    print(f'\nY-channel PSNR (dB) / SSIM{"".join(" / " + n for n in names)}, BasicSR, border of `scale` pixels '
          f'shaved{note} ({len(rows)} image(s)):')
    print(f'{"image":{width}s}' + ''.join(f'{m:>{cell}s}' for m in methods))
    for name, row in rows + [('mean', means)]:
        cells = [f'{row[m][0]:.2f}/{row[m][1]:.4f}' + ''.join(f'/{v:.4f}' for v in row[m][2:]) for m in methods]
        print(f'{name:{width}s}' + ''.join(c.rjust(cell) for c in cells))
    print(f'Metrics written to {csv_path}')
