"""Blur kernels of DANv2's two settings, the blur + downscaling degradation, and the kernel PCA.

Kernels come from BasicSR's ``bivariate_Gaussian`` (basicsr/data/degradations.py, the grid
``-(l-1)/2 .. (l-1)/2``), images are blurred with BasicSR's ``filter2D`` (per-channel
cross-correlation, reflect padding) and downscaled with BasicSR's MATLAB-style ``imresize``
(bicubic with antialiasing), as DAN's official code does; the paper's model, s-fold decimation of
the blurred image, is the option ``downsample='decimate'``.

* **Setting 1** (isotropic): sigma ~ U(0.2, s) for x2/x3/x4 (the author's statement; the
  official training files use U(0.2, 4.0) at every scale), kernel side 21.
* **Setting 2** (anisotropic): sigma_x, sigma_y ~ U(0.6, 5), theta ~ U(-pi, pi), then every tap
  multiplied by 1 + U(0, 0.25) and the kernel renormalised; kernel side 11 at x2, 31 at x4.

The PCA matrix ``P`` (l*l, t) holds the first t principal directions of flattened kernels; a
kernel's code is ``vec(k) @ P`` without subtracting the mean (as the official code encodes).
"""
import math

import numpy as np
import torch

from basicsr.data.degradations import bivariate_Gaussian, mesh_grid
from basicsr.utils.img_process_util import filter2D
from basicsr.utils.matlab_functions import imresize
from d2c_utils.errors import UserError

SETTINGS = (1, 2)
DOWNSAMPLES = ('bicubic', 'decimate')
# DANv2's kernel sides: setting 1 always 21; setting 2 11 at x2 and 31 at x4 (the released test files)
KERNEL_SIZE = {(1, 2): 21, (1, 3): 21, (1, 4): 21, (2, 2): 11, (2, 3): 21, (2, 4): 31}
# Gaussian8 test kernels: 8 widths evenly spread over these ranges (DAN's papers, per scale)
GAUSSIAN8_SIGMAS = {2: (0.80, 1.60), 3: (1.35, 2.40), 4: (1.80, 3.20)}
ANISO_SIGMA = (0.6, 5.0)
ANISO_NOISE = 0.25


def default_kernel_options(setting, scale):
    """The sampling options of a setting at a scale (what the option files write out)."""
    if setting not in SETTINGS:
        raise UserError(f'kernel setting {setting!r}: use 1 (isotropic) or 2 (anisotropic)')
    if scale not in (2, 3, 4):
        raise UserError(f'scale {scale!r}: DANv2 has settings for x2, x3 and x4')
    opt = {'setting': setting, 'kernel_size': KERNEL_SIZE[(setting, scale)]}
    if setting == 1:
        opt['sigma_range'] = [0.2, float(scale)]
    else:
        opt.update(sigma_range=list(ANISO_SIGMA), noise=ANISO_NOISE)
    return opt


def isotropic_kernel(sigma, size):
    """(size, size) float32 Gaussian of width ``sigma`` (pixels), summing to 1."""
    return bivariate_Gaussian(size, sigma, sigma, 0, isotropic=True).astype(np.float32)


def sample_kernels(num, setting=1, kernel_size=21, sigma_range=(0.2, 4.0), noise=ANISO_NOISE, rng=None):
    """Random blur kernels of one setting.

    Args:
        num (int): How many.
        setting (int): 1 (isotropic) or 2 (anisotropic with multiplicative noise).
        kernel_size (int): Odd side l.
        sigma_range (sequence[float]): (low, high) of sigma (setting 1) or of sigma_x, sigma_y (setting 2).
        noise (float): Setting 2: every tap times 1 + U(0, noise).
        rng (np.random.Generator | None): Random source (default: a fresh one).

    Returns:
        tuple[np.ndarray, np.ndarray]: kernels (num, l, l) float32, non-negative, each summing to 1,
        and their parameters (num, 3): sigma_x, sigma_y, theta (setting 1: sigma, sigma, 0).
    """
    if kernel_size % 2 != 1:
        raise UserError(f'kernel_size {kernel_size}: blur kernels need an odd side')
    rng = rng or np.random.default_rng()
    low, high = sigma_range
    grid, _, _ = mesh_grid(kernel_size)
    kernels = np.empty((num, kernel_size, kernel_size), np.float32)
    params = np.zeros((num, 3), np.float32)
    for i in range(num):
        if setting == 1:
            sigma = rng.uniform(low, high)
            kernels[i] = bivariate_Gaussian(kernel_size, sigma, sigma, 0, grid=grid, isotropic=True)
            params[i] = (sigma, sigma, 0)
        else:
            sig_x, sig_y, theta = rng.uniform(low, high), rng.uniform(low, high), rng.uniform(-math.pi, math.pi)
            kernel = bivariate_Gaussian(kernel_size, sig_x, sig_y, theta, grid=grid, isotropic=False)
            kernel = kernel * (1 + rng.uniform(0, noise, kernel.shape))
            kernels[i] = kernel / kernel.sum()
            params[i] = (sig_x, sig_y, theta)
    # a Gaussian's far tails are float32 denormals (exp(-100) at sigma 1 in a corner), which make CPU
    # convolutions and their gradients many times slower; they are < 1e-38 of a tap: drop them
    kernels[kernels < np.finfo(np.float32).tiny] = 0
    return kernels, params


def degrade(hr, kernels, scale, downsample='bicubic', quantize=True):
    """LR images from HR images and per-image kernels: blur, downscale, round to 8 bits.

    Args:
        hr (Tensor): (B, C, H, W) in [0, 1]; H and W multiples of ``scale``.
        kernels (Tensor): (B, l, l) or (1, l, l) kernels on the same device.
        scale (int): Downscaling factor s.
        downsample (str): 'bicubic' (MATLAB-style, antialiased: the official code and test sets)
            or 'decimate' (every s-th pixel of the blurred image: the papers' model).
        quantize (bool): Round to 8-bit levels, as an LR image saved to disk would be.

    Returns:
        Tensor: (B, C, H/s, W/s) in [0, 1].
    """
    if downsample not in DOWNSAMPLES:
        raise UserError(f'downsample={downsample!r}; use one of {DOWNSAMPLES}')
    height, width = hr.shape[-2:]
    if height % scale or width % scale:
        raise UserError(f'HR size {width}x{height} is not a multiple of the scale {scale}; crop it (mod-crop) first')
    blurred = filter2D(hr.contiguous(), kernels.to(hr))  # filter2D's .view refuses channels_last
    if downsample == 'decimate':
        lr = blurred[..., ::scale, ::scale]
    else:  # BasicSR's imresize takes one (C, H, W) image at a time
        lr = torch.stack([imresize(img, 1 / scale) for img in blurred])
    lr = lr.clamp(0, 1)
    return (lr * 255).round() / 255 if quantize else lr


def pca_matrix(kernels, length):
    """The first ``length`` principal directions of flattened kernels.

    Args:
        kernels (np.ndarray | Tensor): (N, l, l) or (N, l*l).
        length (int): Code length t.

    Returns:
        tuple[Tensor, Tensor]: P (l*l, t) float32 with orthonormal columns, and the fraction of
        the variance each of the t directions explains (t,).
    """
    flat = torch.as_tensor(np.asarray(kernels), dtype=torch.float64).reshape(len(kernels), -1)
    if length > flat.shape[1]:
        raise UserError(f'code length {length} exceeds the {flat.shape[1]} taps of a kernel')
    centred = flat - flat.mean(dim=0, keepdim=True)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / (singular**2).sum()
    return directions[:length].T.float().contiguous(), explained[:length].float()


def kernel_picture(kernel, zoom=8):
    """A kernel as a viewable uint8 picture (gray, brightest tap white, each tap ``zoom`` pixels)."""
    kernel = np.asarray(kernel, np.float64)
    peak = kernel.max() if kernel.max() > 0 else 1.
    img = np.clip(kernel / peak * 255, 0, 255).round().astype(np.uint8)
    return np.kron(img, np.ones((zoom, zoom), np.uint8))
