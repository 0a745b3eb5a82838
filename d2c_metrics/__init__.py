"""Metrics of d2c-sr; importing this package registers them in BasicSR's ``METRIC_REGISTRY``.

``calculate_psnr_d2c`` / ``calculate_ssim_d2c``: the D2C-SR authors' evaluation protocol
(see :mod:`.d2c_metric`), for comparing with the numbers of their paper and release.
``calculate_lpips`` / ``calculate_dists``: perceptual distances through the ``lpips`` and ``piq``
packages (the extra ``perceptual``; see :mod:`.perceptual_metric`), LPIPS being the paper's Table 2 metric.
"""
import d2c_compat  # noqa: F401,I001  (before the first ``import basicsr``)

from .d2c_metric import calculate_psnr_d2c, calculate_ssim_d2c
from .perceptual_metric import calculate_dists, calculate_lpips

__all__ = ['calculate_psnr_d2c', 'calculate_ssim_d2c', 'calculate_lpips', 'calculate_dists']
