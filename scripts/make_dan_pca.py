#!/usr/bin/env python
"""Make the kernel PCA matrix of DANv2: the map from a blur kernel to the Restorer's code.

DAN's Restorer does not see the kernel itself but its code ``c = vec(k) @ P`` (t numbers), where
``P`` (l*l, t) holds the first t principal directions of kernels drawn from the training
distribution. This script draws ``--num-kernels`` kernels of one setting and scale with
:func:`d2c_data.degradations.sample_kernels` (30000 as in the official ``creat_PCA.py``), computes
``P`` with :func:`d2c_data.degradations.pca_matrix` (SVD of the centred kernels) and writes::

    torch.save({'pca_matrix': P,                 # (l*l, t) float32, orthonormal columns
                'setting': 1 | 2, 'scale': 2 | 3 | 4, 'kernel_size': l,
                'sigma_range': [low, high], 'noise': float (setting 2),
                'num_kernels': N, 'seed': int,
                'explained_variance': (t,) float32,    # fraction of the kernels' variance per direction
                'mean_kernel': (l, l) float32,         # m, to decode a code: m + (c - m P) P^T
                'heldout_error': (t,) float32},        # see below
               output)

It prints, per component i = 1..t, the fraction of the variance it explains, the cumulative
fraction, and the reconstruction error of ``--holdout`` freshly drawn kernels from their code when
the first i components are kept: ``mean |k - k_i|`` over all taps, ``k_i = m + (k P_i - m P_i) P_i^T``
with ``m`` the mean kernel. The encoding is **without** mean subtraction (``c = vec(k) P``, as the
official code), which loses nothing: every kernel sums to 1, so the centred kernels and hence the
columns of ``P`` sum to 0, and ``m P`` is a constant offset of every code. The flip side: ``(k P) P^T``
alone is no reconstruction (it sums to 0, not 1; its error is about 100% of mean |k|, printed once
for reference); a decoder must add ``m`` back, which is why ``mean_kernel`` is saved too.

Official files: the DAN repository's ``pca_matrix/DANv2/*.pth`` are a bare tensor (l*l, t)
(``pca_matrix.pth`` 441x10 isotropic; ``pca_aniso_matrix_x2.pth`` 121x10; ``pca_aniso_matrix_x4.pth``
961x15). The project's DAN arch (``network_g.pca_matrix``) reads either form: a bare tensor or a
dict with ``pca_matrix``. A network trained with one matrix must be tested with the same one
(directions and signs of an SVD are not unique); converted checkpoints carry theirs.

Defaults follow DANv2's released configurations: setting 1 (isotropic, l = 21, sigma in
[0.2, scale]) with t = 10; setting 2 (anisotropic, sigma_x, sigma_y in [0.6, 5], theta in
[-pi, pi], multiplicative noise 0.25; l = 11 at x2, 31 at x4) with t = 10 at x2 and t = 15 at x4.

Exit status: 0 written; 2 bad flag or output (one line naming it; nothing written).

Examples::

    python scripts/make_dan_pca.py --setting 1 --scale 4 -o experiments/pca/dan_pca_setting1_x4.pth
    python scripts/make_dan_pca.py --setting 2 --scale 4 -o experiments/pca/dan_pca_setting2_x4.pth  # l 31, t 15
"""
import argparse
import os.path as osp
import sys

import numpy as np
import torch
from tqdm import tqdm

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout too
from d2c_data import degradations  # noqa: E402
from d2c_utils.errors import UserError, report_user_error  # noqa: E402
from d2c_utils.output_util import atomic_write  # noqa: E402

PROG = 'make_dan_pca.py'
NUM_KERNELS = 30000  # the official creat_PCA.py
CHUNK = 1000  # kernels drawn per progress-bar step (the draws are the same as in one call)
# code length t of the released DANv2 models: 15 for setting 2 x4 (961x15), else 10
DEFAULT_LENGTH = {(2, 4): 15}


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Draw blur kernels of a DANv2 setting and write their PCA matrix P (l*l, t) for '
        'network_g.pca_matrix.',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='defaults per setting/scale: kernel size ' +
        ', '.join(f's{s} x{x}: {side}' for (s, x), side in sorted(degradations.KERNEL_SIZE.items())) +
        '; sigma range s1: [0.2, scale], s2: [0.6, 5]; t 10 (s2 x4: 15).\n'
        'exit codes: 0 written, 2 bad flag or output (nothing written)')
    parser.add_argument('--setting', type=int, default=1, choices=(1, 2), help='1 isotropic, 2 anisotropic (default 1)')
    parser.add_argument('--scale', type=int, default=4, choices=(2, 3, 4), help='SR scale (default 4)')
    parser.add_argument('--kernel-size', type=int, help='kernel side l, odd (default: per setting/scale, see below)')
    parser.add_argument('--sigma-min', type=float, help='lowest kernel width (default: per setting/scale)')
    parser.add_argument('--sigma-max', type=float, help='highest kernel width (default: per setting/scale)')
    parser.add_argument(
        '--noise', type=float, help=f'setting 2: every tap times 1 + U(0, noise) (default {degradations.ANISO_NOISE})')
    parser.add_argument('--length', '-t', type=int, help='code length t (default 10; setting 2 x4: 15)')
    parser.add_argument(
        '--num-kernels', type=int, default=NUM_KERNELS, help=f'kernels for the PCA (default {NUM_KERNELS})')
    parser.add_argument(
        '--holdout', type=int, default=2000, help='further kernels for the reconstruction error (default 2000)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    parser.add_argument('-o', '--output', required=True, help='the .pth to write')
    parser.add_argument('--force', action='store_true', help='replace an existing --output')
    return parser


def resolve_options(args):
    """Fill the per-setting defaults and check every flag; raise UserError naming the flag."""
    opt = degradations.default_kernel_options(args.setting, args.scale)
    size = args.kernel_size if args.kernel_size is not None else opt['kernel_size']
    if size < 3 or size % 2 != 1:
        raise UserError(f'--kernel-size {size}: use an odd side of at least 3 (a kernel has a centre tap)')
    low = args.sigma_min if args.sigma_min is not None else opt['sigma_range'][0]
    high = args.sigma_max if args.sigma_max is not None else opt['sigma_range'][1]
    if not 0 < low <= high:
        raise UserError(f'--sigma-min {low} / --sigma-max {high}: need 0 < sigma-min <= sigma-max')
    if args.setting == 1 and args.noise is not None:
        raise UserError('--noise applies to setting 2 (anisotropic kernels) only')
    noise = args.noise if args.noise is not None else degradations.ANISO_NOISE
    if noise < 0:
        raise UserError(f'--noise {noise} must be >= 0')
    length = args.length if args.length is not None else DEFAULT_LENGTH.get((args.setting, args.scale), 10)
    if not 1 <= length <= size * size:
        raise UserError(f'--length {length}: the code length must be between 1 and the {size * size} taps of a '
                        f'{size}x{size} kernel (--kernel-size {size})')
    if args.num_kernels <= length:
        raise UserError(f'--num-kernels {args.num_kernels} must exceed --length {length} (30000 is the official count)')
    if args.holdout < 1:
        raise UserError(f'--holdout {args.holdout} must be >= 1')
    output = osp.abspath(args.output)
    if osp.isdir(output):
        raise UserError(f'--output {args.output} is a folder; give the .pth file to write')
    if osp.lexists(output) and not args.force:
        raise UserError(f'--output {args.output} exists; pass --force to replace it or choose another name')
    return dict(
        kernel_size=size, sigma_range=[float(low), float(high)], noise=float(noise), length=length, output=output)


def draw(num, setting, opt, rng, desc):
    """``num`` kernels (num, l, l) in chunks, so that a progress bar can follow."""
    chunks = []
    with tqdm(total=num, desc=desc, unit='kernel', leave=False) as pbar:
        for start in range(0, num, CHUNK):
            count = min(CHUNK, num - start)
            kernels, _ = degradations.sample_kernels(
                count, setting, opt['kernel_size'], opt['sigma_range'], opt['noise'], rng=rng)
            chunks.append(kernels)
            pbar.update(count)
    return np.concatenate(chunks)


def heldout_errors(kernels, matrix, mean_kernel):
    """How well the code keeps held-out kernels, for i = 1..t components.

    Args:
        kernels (np.ndarray): (M, l, l).
        matrix (Tensor): P (l*l, t).
        mean_kernel (np.ndarray): m (l, l), the mean of the kernels P was made from.

    Returns:
        tuple: errors (t,) float32, ``mean |k - (m + (k P_i - m P_i) P_i^T)|`` per i; the error of
        the bare ``(k P) P^T`` (all t components); mean |k|.
    """
    flat = torch.from_numpy(kernels.reshape(len(kernels), -1)).double()
    mean = torch.from_numpy(mean_kernel.reshape(1, -1)).double()
    matrix = matrix.double()
    errors = []
    for i in range(1, matrix.shape[1] + 1):
        part = matrix[:, :i]
        decoded = mean + (flat @ part - mean @ part) @ part.T
        errors.append(float((flat - decoded).abs().mean()))
    bare = float((flat - flat @ matrix @ matrix.T).abs().mean())
    return torch.tensor(errors, dtype=torch.float32), bare, float(flat.abs().mean())


def main(argv=None):
    """Run the tool; return the exit status (argparse's own errors exit 2 through SystemExit)."""
    args = build_parser().parse_args(argv)
    try:
        opt = resolve_options(args)
    except UserError as err:
        return report_user_error(PROG, err)
    rng = np.random.default_rng(args.seed)
    size, length = opt['kernel_size'], opt['length']
    what = (f'setting {args.setting} x{args.scale}: {size}x{size} kernels, sigma in {opt["sigma_range"]}' +
            (f', noise {opt["noise"]}' if args.setting == 2 else ''))
    print(f'{what}; {args.num_kernels} kernels for the PCA, {args.holdout} held out; t = {length}')
    kernels = draw(args.num_kernels, args.setting, opt, rng, 'Draw kernels')
    heldout = draw(args.holdout, args.setting, opt, rng, 'Draw held-out kernels')
    matrix, explained = degradations.pca_matrix(kernels, length)
    mean_kernel = kernels.mean(axis=0, dtype=np.float64)
    errors, bare, mean_abs = heldout_errors(heldout, matrix, mean_kernel)

    print(f'\n{"component":>9}  {"explained":>9}  {"cumulative":>10}  held-out mean |k - (m + (kP - mP) P^T)|')
    cumulative = torch.cumsum(explained.double(), 0)
    for i in range(length):
        print(f'{i + 1:9d}  {float(explained[i]):9.5f}  {float(cumulative[i]):10.5f}  {float(errors[i]):.3e} '
              f'({float(errors[i]) / mean_abs:.2%} of mean |k|)')
    print(f'mean |k| of the held-out kernels: {mean_abs:.3e}. The code is vec(k) P without mean subtraction (as '
          f'DAN); P\'s columns sum to 0, so (k P) P^T alone misses the mean kernel m: its error is {bare:.3e} '
          f'({bare / mean_abs:.0%}).')

    payload = {
        'pca_matrix': matrix.float().contiguous(),
        'setting': args.setting,
        'scale': args.scale,
        'kernel_size': size,
        'sigma_range': opt['sigma_range'],
        'num_kernels': args.num_kernels,
        'seed': args.seed,
        'explained_variance': explained.float(),
        'mean_kernel': torch.from_numpy(mean_kernel.astype(np.float32)).reshape(size, size),
        'heldout_error': errors,
    }
    if args.setting == 2:
        payload['noise'] = opt['noise']
    atomic_write(opt['output'], lambda tmp: torch.save(payload, tmp))
    print(f'wrote {args.output}: pca_matrix {tuple(matrix.shape)} (l*l, t) float32; set network_g.pca_matrix to it '
          f'with kernel_size: {size}, code_length: {length}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
