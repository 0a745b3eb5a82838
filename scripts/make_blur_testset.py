#!/usr/bin/env python
"""Make blind-SR test sets with known blur kernels: Gaussian8 (DANv2 setting 1) and DIV2KRK-style (setting 2).

Both modes read every image of ``--input`` (not its subfolders; PNG, JPEG, BMP, TIFF, WebP; gray,
RGB, RGBA, 8 or 16 bit: each is made 8-bit 3-channel, as BasicSR's reader would), crop it at the
bottom/right to a multiple of ``--scale`` (mod-crop) and write folders that BasicSR's
``PairedImageDataset`` reads directly (``dataroot_gt`` / ``dataroot_lq``), plus the kernel of
every LR image as ``<stem>.npy`` (float32 (l, l), sums to 1) and a picture ``<stem>.png``
(:func:`d2c_data.degradations.kernel_picture`) in a ``kernels*`` folder named like the LR folder,
which ``DANModel`` reads as ``dataroot_kernel`` to report the kernel error.

**gaussian8** (setting 1; the test sets of DAN's tables): for each of 8 widths
``sigma = np.linspace(*GAUSSIAN8_SIGMAS[scale], 8)`` (x2 0.80-1.60, x3 1.35-2.40, x4 1.80-3.20) the
HR image is blurred with the isotropic kernel of side 21 and downscaled by
:func:`d2c_data.degradations.degrade` (BasicSR's filter2D with reflect padding, MATLAB-style
bicubic, 8-bit rounding: the official degradation)::

    <out>/HR/<name>.png                        mod-cropped HR, once per image
    <out>/LR_sigma<s>/<name>.png               LR of width <s> (e.g. LR_sigma1.80), 8 folders
    <out>/kernels_sigma<s>/<name>.npy, .png    its kernel (21, 21)
    <out>/LR/<name>_s<s>.png                   all 8 widths in one folder ...
    <out>/HR_all/<name>_s<s>.png               ... with their HR (hard links to HR/<name>.png)
    <out>/kernels/<name>_s<s>.npy, .png
    <out>/make_blur_testset.json               what was made: exact widths, images, skipped files

One ``PairedImageDataset`` on ``HR_all`` + ``LR`` gives the number of DAN's tables (the mean over
every image and width); one per ``LR_sigma<s>`` (with ``dataroot_gt: <out>/HR``) gives the
breakdown. ``<s>`` has 2 decimals; the x2 widths are not round (0.9142857...): the exact values are
in the json and the .npy kernels. The official ``generate_mod_blur_LR_bic.py`` does not run as
published (a syntax error), hard-codes the x4 widths whatever the scale, and writes 8 identical HR
copies per image; here the widths follow ``--scale``, and the duplicates in ``HR_all`` are hard
links (copies only where the file system has none).

**div2krk** (setting 2; KernelGAN's DIV2KRK, Bell-Kligler et al. 2019, is the benchmark: download
it for published numbers, this makes a set of the same kind, e.g. from DIV2K's 100 validation
images): one random kernel per image::

    <out>/HR/<name>.png,  <out>/LR/<name>.png,  <out>/kernels/<name>.npy, .png,  <out>/make_blur_testset.json

The kernel follows KernelGAN's paper as its authors restate it (sefibk/KernelGAN issues #59, #52):
an 11x11 anisotropic Gaussian with sigma_x, sigma_y ~ U(0.6, 5), theta ~ U(-pi, pi), every tap
times 1 + U(0, 0.25), normalised (exactly DANv2's setting-2 distribution); x4 applies the x2
kernel twice, which is one 31x31 kernel ``k4[2b + a] += k[b] k[a]`` with 4-fold decimation (hence
DAN's 31x31 kernels at x4). The public generator they point to (assafshocher/BlindSR_dataset_generator)
has other defaults (covariance eigenvalues, not widths, in [0.175 s, 2.5 s]; noise 1 + U(-0.4, 0.4)).

``--downsample decimate`` (default) downscales as KernelGAN does: blur, then keep every s-th pixel.
The kernel's centre of mass is placed (s-1)/2 pixels right and down of the centre tap (the mean of
the Gaussian is solved for, so truncation and noise do not move it), so that LR pixel i sits at HR
(i + 1/2) s - 1/2, where bicubic puts it: with an isotropic sigma-2 kernel the decimated LR matches
the bicubic one to 62 dB at x2 with this offset, 36 dB with none or with s/2. The public generator
aims its centre of mass at s/2, as far as we read it, and the released DIV2KRK kernels reportedly
do not reproduce its LR images (sefibk/KernelGAN#33, raised by DAN's author): so this is a set of
the same kind, not a copy. The saved kernel is the one that gives the LR with
``degrade(hr, k, s, 'decimate')``, off-centre by (s-1)/2; DAN estimates centred kernels for bicubic
downscaling, so its kernel error against these is not meaningful. ``--downsample bicubic`` makes
DANv2's setting-2 training degradation instead: a centred kernel of side 11 (x2) / 21 (x3) / 31 (x4)
from :func:`d2c_data.degradations.sample_kernels`, blur + bicubic; there the kernel error is meaningful.

**kernels** (Gaussian8 sets in the official naming): DAN's ``generate_mod_blur_LR_bic.py`` writes
``HR/x<s>/sig<sigma>_<name>.png`` and ``LRblur/x<s>/sig<sigma>_<name>.png`` (``sigma`` as Python prints
the linspace value: ``sig1.8_baby.png``, ``sig2.4000000000000004_baby.png``), which ``PairedImageDataset``
pairs as they are (same names in both folders). This mode reads such an LR folder and writes the
kernel of every image (isotropic, the width from its name, side ``--kernel-size``) and, per width,
the list of its images for ``meta_info_file`` (the per-width breakdown)::

    <out>/<stem>.npy, .png                     kernel of <stem>.png (dataroot_kernel)
    <out>/meta_info_sigma<s>.txt               the file names of width <s> (2 decimals)
    <out>/make_blur_testset.json

Images smaller than the kernel (after the mod-crop) and unreadable files are skipped with a
warning and listed at the end (exit status 1); the others are written. Everything is written into
``<out>.tmp-<pid>`` next to ``<out>`` and moved into place when complete, so an interrupted or failed
run leaves no half-made set. ``--force`` replaces an existing output only if this script made it
(it has ``make_blur_testset.json``); other non-empty folders are never replaced.

Exit status: 0 all images written; 1 some (or all) images skipped, listed; 2 bad flag, missing
input, no images, or an output folder in the way (one line naming it; nothing written).

Examples::

    python scripts/make_blur_testset.py gaussian8 --input datasets/Set5/GTmod12 --scale 4 \\
        --output datasets/Set5_gaussian8_x4
    python scripts/make_blur_testset.py div2krk --input datasets/DIV2K/DIV2K_valid_HR --scale 4 \\
        --output datasets/DIV2KRK_gen_x4 --seed 0
    python scripts/make_blur_testset.py kernels --input datasets/Set5/LRblur/x4 --output datasets/Set5/kernels_x4
"""
import argparse
import json
import math
import os
import os.path as osp
import re
import shutil
import signal
import sys

import cv2
import numpy as np
import torch
from tqdm import tqdm

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout too
from basicsr.data.degradations import mesh_grid, pdf2, sigma_matrix2  # noqa: E402
from d2c_data import degradations  # noqa: E402
from d2c_utils.errors import ImageError, UserError, report_user_error  # noqa: E402
from d2c_utils.img_util import read_image  # noqa: E402

PROG = 'make_blur_testset.py'
MANIFEST = 'make_blur_testset.json'
IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
NUM_SIGMAS = 8
GAUSSIAN8_KERNEL = 21  # DAN's setting-1 kernel side
DIV2KRK_BASE = 11  # KernelGAN's x2 kernel side; x4 composes it to 3 * 11 - 2 = 31
NEWTON_STEPS = 50
# DAN's official Gaussian8 file names: sig<sigma>_<name> ('{}'.format of the linspace value)
OFFICIAL_NAME = re.compile(r'sig(?P<sigma>\d+(?:\.\d+)?)_(?P<name>.+)')


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Make blind-SR test sets with known blur kernels for BasicSR: gaussian8 (DANv2 setting 1, '
        'isotropic) or div2krk (setting 2, one random anisotropic kernel per image).',
        epilog='layouts, conventions and the reasons: see the docstring at the top of this script.\n'
        'exit codes: 0 written, 1 some images skipped (listed; the others written), 2 usage error (nothing written)',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest='mode', metavar='MODE', required=True)
    widths = ', '.join(f'x{s} {lo:.2f}-{hi:.2f}' for s, (lo, hi) in sorted(degradations.GAUSSIAN8_SIGMAS.items()))
    g8 = modes.add_parser(
        'gaussian8',
        help='8 isotropic Gaussian widths per image (setting 1; deterministic, no seed)',
        description=f'Blur every HR image with 8 isotropic Gaussians (widths evenly spread: {widths}), '
        'bicubic-downscale, write per-width folders and one folder with all 8.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='output: <out>/HR, <out>/LR_sigma<s>, <out>/kernels_sigma<s> (8 widths), <out>/LR + <out>/HR_all + '
        '<out>/kernels (all widths, names <name>_s<s>.png), <out>/make_blur_testset.json')
    _common(g8)
    g8.add_argument('--sigma-min', type=float, help='lowest width (default: per scale, see above)')
    g8.add_argument('--sigma-max', type=float, help='highest width (default: per scale, see above)')
    g8.add_argument(
        '--kernel-size', type=int, default=GAUSSIAN8_KERNEL, help=f'kernel side, odd (default {GAUSSIAN8_KERNEL})')
    rk = modes.add_parser(
        'div2krk',
        help='one random anisotropic kernel per image (setting 2, KernelGAN\'s DIV2KRK kind)',
        description='Blur every HR image with its own random anisotropic Gaussian kernel with multiplicative '
        'noise and downscale it (KernelGAN\'s DIV2KRK recipe by default).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='output: <out>/HR, <out>/LR, <out>/kernels (<name>.npy, <name>.png), <out>/make_blur_testset.json\n'
        'decimate (x2, x4): 11x11 kernel (x4: applied twice = one 31x31 kernel), every s-th pixel, aligned with '
        'bicubic; bicubic (x2, x3, x4): centred kernel of side 11/21/31, MATLAB bicubic (DANv2\'s training)')
    _common(rk)
    rk.add_argument(
        '--downsample',
        choices=('decimate', 'bicubic'),
        default='decimate',
        help='decimate: KernelGAN\'s DIV2KRK (default); bicubic: DANv2\'s setting-2 training degradation')
    rk.add_argument(
        '--sigma-min',
        type=float,
        default=degradations.ANISO_SIGMA[0],
        help=f'lowest sigma (default {degradations.ANISO_SIGMA[0]})')
    rk.add_argument(
        '--sigma-max',
        type=float,
        default=degradations.ANISO_SIGMA[1],
        help=f'highest sigma (default {degradations.ANISO_SIGMA[1]})')
    rk.add_argument(
        '--noise',
        type=float,
        default=degradations.ANISO_NOISE,
        help=f'every tap times 1 + U(0, noise) (default {degradations.ANISO_NOISE})')
    rk.add_argument('--seed', type=int, default=0, help='random seed: the same seed gives the same set (default 0)')
    kn = modes.add_parser(
        'kernels',
        help='kernels of a Gaussian8 set in the official naming (sig<sigma>_<name>), for the kernel error',
        description='Write the isotropic kernel of every LR image of a Gaussian8 set in the official naming '
        '(DAN\'s generate_mod_blur_LR_bic.py: sig<sigma>_<name>.png, the width in the name) and per width the '
        'list of its images, so that DANModel reports the kernel error and the per-width breakdown.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='output: <out>/<stem>.npy and .png per LR image (dataroot_kernel), <out>/meta_info_sigma<s>.txt '
        '(meta_info_file of one width), <out>/make_blur_testset.json')
    kn.add_argument('--input', '-i', required=True, help='folder of LR images named sig<sigma>_<name>.<ext>')
    kn.add_argument('--output', '-o', required=True, help='kernel folder to write (must not exist or be empty)')
    kn.add_argument(
        '--kernel-size', type=int, default=GAUSSIAN8_KERNEL, help=f'kernel side, odd (default {GAUSSIAN8_KERNEL})')
    kn.add_argument(
        '--force', action='store_true', help='replace an output folder made by this script (after the new one is made)')
    return parser


def _common(sub):
    sub.add_argument('--input', '-i', required=True, help='folder of HR images (its subfolders are not read)')
    sub.add_argument('--output', '-o', required=True, help='output folder (must not exist or be empty)')
    sub.add_argument('--scale', type=int, required=True, choices=(2, 3, 4), help='SR scale')
    sub.add_argument(
        '--force', action='store_true', help='replace an output folder made by this script (after the new one is made)')


def resolve(args):
    """Check the flags and folders; return the plan (dict). Raise UserError naming the flag or path."""
    plan = {'mode': args.mode, 'scale': args.scale}
    if args.mode == 'gaussian8':
        low, high = degradations.GAUSSIAN8_SIGMAS[args.scale]
        low = args.sigma_min if args.sigma_min is not None else low
        high = args.sigma_max if args.sigma_max is not None else high
        if not 0 < low <= high:
            raise UserError(f'--sigma-min {low} / --sigma-max {high}: need 0 < sigma-min <= sigma-max')
        if args.kernel_size < 3 or args.kernel_size % 2 != 1:
            raise UserError(f'--kernel-size {args.kernel_size}: use an odd side of at least 3')
        sigmas = [float(s) for s in np.linspace(low, high, NUM_SIGMAS)]
        tags = [f'{s:.2f}' for s in sigmas]
        if len(set(tags)) != len(tags):
            raise UserError(f'--sigma-min {low} / --sigma-max {high}: the 8 widths {tags} are not distinct at 2 '
                            'decimals (folder names); widen the range')
        plan.update(sigmas=sigmas, tags=tags, kernel_size=args.kernel_size, downsample='bicubic')
    else:
        if args.downsample == 'decimate' and args.scale not in (2, 4):
            raise UserError(f'--scale {args.scale} with --downsample decimate: DIV2KRK\'s kernels exist for x2 and x4 '
                            '(x4 = the x2 kernel twice); use --downsample bicubic for x3')
        if not 0 < args.sigma_min <= args.sigma_max:
            raise UserError(f'--sigma-min {args.sigma_min} / --sigma-max {args.sigma_max}: need 0 < sigma-min <= '
                            'sigma-max')
        if args.noise < 0:
            raise UserError(f'--noise {args.noise} must be >= 0')
        size = (3 * DIV2KRK_BASE - 2 if args.scale == 4 else DIV2KRK_BASE) if args.downsample == 'decimate' else \
            degradations.KERNEL_SIZE[(2, args.scale)]
        plan.update(
            downsample=args.downsample,
            kernel_size=size,
            sigma_range=[args.sigma_min, args.sigma_max],
            noise=args.noise,
            seed=args.seed)
    plan.update(_resolve_folders(args))
    return plan


def _resolve_folders(args, what='HR'):
    """Check --input (images, distinct stems) and --output (free, or ours with --force); return input, output, files."""
    src = osp.abspath(args.input)
    if not osp.isdir(src):
        raise UserError(f'--input {args.input} is not a folder (give the folder of {what} images)')
    files = sorted(
        e.name for e in os.scandir(src)
        if e.is_file() and not e.name.startswith('.') and osp.splitext(e.name)[1].lower() in IMG_EXTENSIONS)
    if not files:
        subdirs = sorted(e.name for e in os.scandir(src) if e.is_dir())
        hint = f'; its subfolders: {", ".join(subdirs[:8])} (point --input at one of them)' if subdirs else ''
        raise UserError(f'--input {args.input} holds no images ({", ".join(IMG_EXTENSIONS)}){hint}')
    stems = {}
    for name in files:
        stem = osp.splitext(name)[0]
        if stem in stems:
            raise UserError(f'--input {args.input}: {stems[stem]} and {name} would both be written as {stem}.png; '
                            'rename or remove one')
        stems[stem] = name
    out = osp.abspath(args.output)
    if osp.lexists(out):
        if not osp.isdir(out):
            raise UserError(f'--output {args.output} exists and is not a folder')
        if os.listdir(out):
            if not args.force:
                raise UserError(f'--output {args.output} is not empty; pass --force to replace a set made by this '
                                'script, or choose another folder')
            if not osp.isfile(osp.join(out, MANIFEST)):
                raise UserError(f'--output {args.output} is not empty and was not made by {PROG} (no {MANIFEST}); '
                                'not replacing it even with --force: remove it yourself or choose another folder')
    if osp.commonpath([src, out]) == out:
        raise UserError(f'--input {args.input} lies inside --output {args.output}, which would be replaced; choose '
                        'another --output')
    return {'input': src, 'output': out, 'files': files}


def resolve_kernels(args):
    """The plan of the kernels mode: every --input file with its width; UserError for an unnamed one."""
    if args.kernel_size < 3 or args.kernel_size % 2 != 1:
        raise UserError(f'--kernel-size {args.kernel_size}: use an odd side of at least 3')
    plan = {'mode': 'kernels', 'kernel_size': args.kernel_size, **_resolve_folders(args, 'LR')}
    sigmas, unnamed = {}, []
    for name in plan['files']:
        match = OFFICIAL_NAME.fullmatch(osp.splitext(name)[0])
        if match is None or float(match['sigma']) <= 0:
            unnamed.append(name)
        else:
            sigmas[name] = float(match['sigma'])
    if unnamed:
        raise UserError(f'--input {args.input}: {len(unnamed)} file(s) not named sig<sigma>_<name> (the official '
                        f'Gaussian8 naming), e.g. {unnamed[0]}; sets made by this script\'s gaussian8 mode have their '
                        'kernels already')
    plan['sigmas'] = sigmas
    return plan


def make_kernels(plan):
    """Write the kernels, the per-width meta_info files and the manifest of the kernels mode into the output."""
    out = plan['output']
    staging = f'{out}.tmp-{os.getpid()}'
    if osp.lexists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    writer, firsts, widths = Writer(staging), {}, {}
    try:
        for name in tqdm(plan['files'], desc='kernels', unit='image'):
            sigma, stem = plan['sigmas'][name], osp.splitext(name)[0]
            first = firsts.setdefault(sigma, stem)
            writer.kernel(stem, degradations.isotropic_kernel(sigma, plan['kernel_size']),
                          None if first == stem else first)
            widths.setdefault(f'{sigma:.2f}', []).append(name)
        if len(widths) != len(firsts):
            raise UserError(f'--input {plan["input"]}: widths {sorted(firsts)} are not distinct at 2 decimals (the '
                            'meta_info file names)')
        for tag, names in widths.items():
            with open(osp.join(staging, f'meta_info_sigma{tag}.txt'), 'w', encoding='utf-8') as f:
                f.write(''.join(f'{name}\n' for name in names))
        manifest = {
            'tool': PROG,
            'mode': 'kernels',
            'input': plan['input'],
            'kernel_size': plan['kernel_size'],
            'sigmas': plan['sigmas'],
            'meta_info': {
                tag: f'meta_info_sigma{tag}.txt'
                for tag in widths
            }
        }
        with open(osp.join(staging, MANIFEST), 'w', encoding='utf-8') as f:
            json.dump(manifest, f, indent=1)
        commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return widths


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------
def aligned_anisotropic_kernel(rng, size, sigma_range, noise, offset):
    """An anisotropic Gaussian with multiplicative noise whose centre of mass is ``offset`` px right and down.

    sigma_x, sigma_y ~ U(sigma_range), theta ~ U(-pi, pi) (BasicSR's ``sigma_matrix2``), taps times
    1 + U(0, noise). The mean of the Gaussian is solved for (Newton steps; the Jacobian of the
    centre of mass with respect to the mean is Cov_k Sigma^-1, exactly, since the noise does not
    move) so that the noisy, truncated kernel's centre of mass lands at ``offset``: a kernel cut off
    by the grid or tilted by the noise would otherwise shift the LR image.

    Returns:
        tuple[np.ndarray, dict]: kernel (size, size) float64 summing to 1, and its parameters.
    """
    sig_x, sig_y = rng.uniform(*sigma_range), rng.uniform(*sigma_range)
    theta = rng.uniform(-math.pi, math.pi)
    field = 1 + rng.uniform(0, noise, (size, size))
    grid, xx, yy = mesh_grid(size)
    cov_matrix = sigma_matrix2(sig_x, sig_y, theta)
    precision = np.linalg.inv(cov_matrix)
    target = np.array([offset, offset], np.float64)
    mean = target.copy()
    for _ in range(NEWTON_STEPS):
        kernel = pdf2(cov_matrix, grid - mean) * field
        kernel /= kernel.sum()
        centre = np.array([(kernel * xx).sum(), (kernel * yy).sum()])
        error = target - centre
        if np.abs(error).max() < 1e-9:
            break
        dx, dy = xx - centre[0], yy - centre[1]
        spread = np.array([[(kernel * dx * dx).sum(), (kernel * dx * dy).sum()],
                           [(kernel * dx * dy).sum(), (kernel * dy * dy).sum()]])
        mean = mean + np.linalg.solve(spread @ precision, error)
    else:
        raise RuntimeError(f'kernel centring did not converge (sigma {sig_x:.3f}, {sig_y:.3f}, theta {theta:.3f})')
    return kernel, {'sigma_x': sig_x, 'sigma_y': sig_y, 'theta': theta, 'mean': mean.tolist()}


def compose_twice(kernel):
    """The one kernel of "blur with k, keep every 2nd pixel, twice": ``k4[2b + a] += k[b] k[a]``, side 3l - 2.

    With ``filter2D`` (cross-correlation about the centre tap) and decimation, two x2 steps with k
    equal one x4 step with this kernel (away from the borders, where the padding differs).
    """
    size = kernel.shape[0]
    out = np.zeros((3 * size - 2, 3 * size - 2))
    for b_y in range(size):
        for b_x in range(size):
            out[2 * b_y:2 * b_y + size, 2 * b_x:2 * b_x + size] += kernel[b_y, b_x] * kernel
    return out


def div2krk_kernel(rng, plan):
    """One setting-2 kernel (float32 (l, l), sums to 1) for the plan's downsampling, and its parameters."""
    if plan['downsample'] == 'bicubic':
        kernels, params = degradations.sample_kernels(
            1, 2, plan['kernel_size'], plan['sigma_range'], plan['noise'], rng=rng)
        return kernels[0], dict(zip(('sigma_x', 'sigma_y', 'theta'), map(float, params[0])))
    # x2: centre of mass (2-1)/2 = 0.5 px off; x4: the x2 kernel twice, 2 * 0.5 + 0.5 = 1.5 = (4-1)/2
    base, params = aligned_anisotropic_kernel(rng, DIV2KRK_BASE, plan['sigma_range'], plan['noise'], 0.5)
    kernel = base if plan['scale'] == 2 else compose_twice(base)
    return (kernel / kernel.sum()).astype(np.float32), params


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------
def load_hr(path, scale, min_side):
    """Read an image as 8-bit BGR (H, W, 3), mod-cropped to ``scale``. Raise ImageError to skip it."""
    img = read_image(path)
    if img.dtype == np.uint16:  # BasicSR's 8-bit pipeline (and DAN's) would read 8 bits
        img = np.rint(img.astype(np.float64) / 257).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = img[..., :3]  # BasicSR reads colour images without alpha
    height, width = img.shape[0] // scale * scale, img.shape[1] // scale * scale
    if min(height, width) < min_side:
        raise ImageError(
            f'{img.shape[1]}x{img.shape[0]} is too small: after the mod-crop to {width}x{height} it is '
            f'smaller than the {min_side}x{min_side} kernel', 'too small')
    return np.ascontiguousarray(img[:height, :width])


def to_tensor(img):
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]; channel order kept (blur and resize act per channel)."""
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float() / 255.


def to_image(tensor):
    """(1, 3, h, w) in [0, 1] on 8-bit levels -> (h, w, 3) uint8."""
    return np.clip(np.rint(tensor[0].permute(1, 2, 0).numpy() * 255), 0, 255).astype(np.uint8)


def low_res(hr, kernel, scale, downsample):
    """LR uint8 image of an HR uint8 image: exactly ``degradations.degrade`` (8-bit rounding included)."""
    return to_image(degradations.degrade(to_tensor(hr), torch.from_numpy(kernel)[None], scale, downsample))


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
class Writer:
    """Writes into the staging folder; a repeated file becomes a hard link to the first copy."""

    def __init__(self, root):
        self.root = root
        self.made = set()

    def _path(self, rel):
        path = osp.join(self.root, rel)
        folder = osp.dirname(path)
        if folder not in self.made:
            os.makedirs(folder, exist_ok=True)
            self.made.add(folder)
        return path

    def image(self, rel, img):
        ok, buf = cv2.imencode('.png', img)
        if not ok:
            raise RuntimeError(f'OpenCV could not encode {rel}')
        buf.tofile(self._path(rel))
        return rel

    def array(self, rel, array):
        with open(self._path(rel), 'wb') as f:
            np.save(f, array)
        return rel

    def link(self, rel, existing):
        """``rel`` as a hard link to the already written ``existing`` (a copy where links are unsupported)."""
        src, dst = osp.join(self.root, existing), self._path(rel)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        return rel

    def kernel(self, rel_stem, kernel, first=None):
        """``<rel_stem>.npy`` and ``.png``; linked to ``first`` (a stem written before) when given."""
        if first is not None:
            self.link(rel_stem + '.npy', first + '.npy')
            self.link(rel_stem + '.png', first + '.png')
        else:
            self.array(rel_stem + '.npy', kernel.astype(np.float32))
            self.image(rel_stem + '.png', degradations.kernel_picture(kernel))
        return rel_stem


def make_gaussian8(hr, stem, plan, writer, first_kernels):
    """Write the HR image, its 8 LR images and their kernels (both layouts)."""
    writer.image(f'HR/{stem}.png', hr)
    for sigma, tag in zip(plan['sigmas'], plan['tags']):
        kernel = degradations.isotropic_kernel(sigma, plan['kernel_size'])
        lr = low_res(hr, kernel, plan['scale'], 'bicubic')
        writer.image(f'LR_sigma{tag}/{stem}.png', lr)
        writer.link(f'LR/{stem}_s{tag}.png', f'LR_sigma{tag}/{stem}.png')
        writer.link(f'HR_all/{stem}_s{tag}.png', f'HR/{stem}.png')
        first = first_kernels.setdefault(tag, f'kernels_sigma{tag}/{stem}')
        writer.kernel(f'kernels_sigma{tag}/{stem}', kernel, None if first == f'kernels_sigma{tag}/{stem}' else first)
        writer.kernel(f'kernels/{stem}_s{tag}', kernel, first)


def make_div2krk(hr, stem, plan, writer, rng):
    """Write the HR image, its LR image and its kernel; return the kernel's parameters."""
    kernel, params = div2krk_kernel(rng, plan)
    writer.image(f'HR/{stem}.png', hr)
    writer.image(f'LR/{stem}.png', low_res(hr, kernel, plan['scale'], plan['downsample']))
    writer.kernel(f'kernels/{stem}', kernel)
    return params


def commit(staging, output):
    """Move the finished staging folder to ``output``, replacing an empty folder or an earlier set of ours."""
    if not osp.lexists(output):
        os.rename(staging, output)
        return
    if not os.listdir(output):
        os.rmdir(output)
        os.rename(staging, output)
        return
    old = f'{output}.old-{os.getpid()}'
    os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the clean-up below


def main(argv=None):
    """Run the tool; return the exit status (argparse's own errors exit 2 through SystemExit)."""
    args = build_parser().parse_args(argv)
    try:
        if args.mode == 'kernels':
            plan = resolve_kernels(args)
            widths = make_kernels(plan)
            print(f'wrote the kernels of {len(plan["files"])} image(s) ({len(widths)} widths: {", ".join(widths)}) '
                  f'to {args.output}')
            return 0
        plan = resolve(args)
    except UserError as err:
        return report_user_error(PROG, err)
    scale, out = plan['scale'], plan['output']
    min_side = plan['kernel_size']
    rng = np.random.default_rng(plan.get('seed'))
    staging = f'{out}.tmp-{os.getpid()}'
    if osp.lexists(staging):  # left by a dead process that had our pid
        shutil.rmtree(staging)
    os.makedirs(staging)
    writer = Writer(staging)
    written, skipped, params, first_kernels = [], [], {}, {}
    old_handler = signal.signal(signal.SIGTERM, _terminate)
    committed = False
    try:
        for name in tqdm(plan['files'], desc=f'{plan["mode"]} x{scale}', unit='image'):
            path = osp.join(plan['input'], name)
            stem = osp.splitext(name)[0]
            try:
                hr = load_hr(path, scale, min_side)
            except ImageError as err:
                tqdm.write(f'warning: skipping {path}: {err}', file=sys.stderr)
                skipped.append([name, str(err)])
                continue
            if plan['mode'] == 'gaussian8':
                make_gaussian8(hr, stem, plan, writer, first_kernels)
            else:
                params[stem] = make_div2krk(hr, stem, plan, writer, rng)
            written.append(name)
        if not written:
            print(
                f'error: none of the {len(plan["files"])} images could be used (listed above); nothing was '
                f'written',
                file=sys.stderr)
            return 1
        manifest = {
            'tool': PROG,
            'command': [PROG] + list(sys.argv[1:] if argv is None else argv),
            **{
                k: v
                for k, v in plan.items() if k not in ('files', 'output', 'tags')
            },
            'images': written,
            'skipped': skipped,
        }
        if plan['mode'] == 'gaussian8':
            manifest['layout'] = {
                'per_sigma': {
                    t: {
                        'dataroot_gt': 'HR',
                        'dataroot_lq': f'LR_sigma{t}',
                        'dataroot_kernel': f'kernels_sigma{t}'
                    }
                    for t in plan['tags']
                },
                'all': {
                    'dataroot_gt': 'HR_all',
                    'dataroot_lq': 'LR',
                    'dataroot_kernel': 'kernels'
                },
            }
        else:
            manifest['kernel_params'] = params
            manifest['layout'] = {'dataroot_gt': 'HR', 'dataroot_lq': 'LR', 'dataroot_kernel': 'kernels'}
        with open(osp.join(staging, MANIFEST), 'w', encoding='utf-8') as f:
            json.dump(manifest, f, indent=1)
        commit(staging, out)
        committed = True
    except KeyboardInterrupt:
        print(f'\ninterrupted; {args.output} is untouched', file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)

    if plan['mode'] == 'gaussian8':
        folders = f'HR, LR_sigma<s> + kernels_sigma<s> for s in {", ".join(plan["tags"])}; LR + HR_all + kernels'
    else:
        folders = 'HR, LR, kernels'
    print(f'wrote {len(written)} image(s) to {args.output}: {folders}')
    if skipped:
        print(f'skipped {len(skipped)} file(s):', file=sys.stderr)
        for name, reason in skipped:
            print(f'  {osp.join(args.input, name)}: {reason}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
