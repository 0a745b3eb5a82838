"""Scores and reference images shared by validation, the demo, inference and the benchmarks.

The one bicubic baseline (:func:`bicubic_upscale`), the one oracle fusion
(:func:`oracle_fusion`) and the one tensor PSNR (:func:`tensor_psnr`) of the project.
"""
import math

import cv2
import numpy as np
import torch

from basicsr.metrics import calculate_psnr, calculate_ssim
from .img_util import to_bgr


def oracle_fusion(branches, gt):
    """Ideal per-pixel fusion (paper Sec. 4.6): every pixel from the branch closest to HR.

    The branches are clamped to [0, 1] first, so the oracle chooses among the branch images as
    they are written and scored (``tensor2img`` clamps too).

    Args:
        branches (Tensor): (N, P, C, H, W) predictions, range about [0, 1].
        gt (Tensor): (N, C, H, W) ground truth in [0, 1].

    Returns:
        Tensor: (N, C, H, W) in [0, 1]; "closest" is the smallest squared error summed over channels.
    """
    branches = branches.clamp(0, 1)
    best = (branches - gt.unsqueeze(1)).pow(2).sum(dim=2).argmin(dim=1)  # (N, H, W)
    index = best[:, None, None].expand(-1, 1, branches.size(2), -1, -1)
    return torch.gather(branches, 1, index)[:, 0]


def bicubic_upscale(lq, scale):
    """The metric baseline: the input upscaled with cv2 INTER_CUBIC in float.

    Args:
        lq (Tensor): (1, 3, H, W) or (3, H, W) RGB in [0, 1].
        scale (int): Scale factor s.

    Returns:
        ndarray: uint8 BGR (sH, sW, 3), as ``tensor2img`` gives for network outputs.
    """
    lr = to_bgr(lq)
    up = cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
    return (np.clip(up, 0, 1) * 255).round().astype(np.uint8)


def tensor_psnr(img, ref):
    """PSNR in dB (peak 1) between two float tensors of the same shape, accumulated in float64.

    Used for agreement between two outputs of the same network (precisions, layouts, tiling);
    ``inf`` for identical tensors. Scores against ground truth use :func:`psnr_ssim_y`.
    """
    mse = float(((img.double() - ref.double())**2).mean())
    return float('inf') if mse == 0 else 10 * math.log10(1. / mse)


def psnr_ssim_y(img, gt, crop_border):
    """BasicSR's PSNR and SSIM on the Y channel with ``crop_border`` pixels shaved (the paper's protocol).

    Args:
        img, gt (ndarray): uint8 images (H, W, 3), BGR as from ``tensor2img`` / ``cv2.imread``.
    """
    return (calculate_psnr(img, gt, crop_border=crop_border,
                           test_y_channel=True), calculate_ssim(img, gt, crop_border=crop_border, test_y_channel=True))
