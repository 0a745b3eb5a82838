"""Scoring helpers shared by validation, the demo and inference."""
import math

import torch

from basicsr.metrics import calculate_psnr, calculate_ssim


def oracle_fusion(branches, gt):
    """Ideal per-pixel fusion (paper Sec. 4.6): every pixel from the branch closest to HR.

    Args:
        branches (Tensor): (N, P, C, H, W) predictions.
        gt (Tensor): (N, C, H, W) ground truth, same range.

    Returns:
        Tensor: (N, C, H, W); "closest" is the smallest squared error summed over channels.
    """
    best = (branches - gt.unsqueeze(1)).pow(2).sum(dim=2).argmin(dim=1)  # (N, H, W)
    index = best[:, None, None].expand(-1, 1, branches.size(2), -1, -1)
    return torch.gather(branches, 1, index)[:, 0]


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
    return (calculate_psnr(img, gt, crop_border=crop_border, test_y_channel=True),
            calculate_ssim(img, gt, crop_border=crop_border, test_y_channel=True))
