"""Metrics of d2c-sr; importing this package registers them in BasicSR's ``METRIC_REGISTRY``.

``calculate_psnr_d2c`` / ``calculate_ssim_d2c``: the D2C-SR authors' evaluation protocol
(see :mod:`.d2c_metric`), for comparing with the numbers of their paper and release.
"""
import d2c_compat

d2c_compat.apply()  # must run before the first ``import basicsr``

from .d2c_metric import calculate_psnr_d2c, calculate_ssim_d2c  # noqa: E402

__all__ = ['calculate_psnr_d2c', 'calculate_ssim_d2c']
