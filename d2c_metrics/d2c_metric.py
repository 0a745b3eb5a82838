"""The D2C-SR authors' evaluation protocol as BasicSR metrics.

The authors' ``test.py`` scores every image with ``cal_psnr(sr, hr, scale)`` and ``ssim(sr, hr)``
(``metrics/PSNR.py``, ``metrics/SSIM.py`` of their MegEngine release) and averages over images:

* PSNR: ``sr`` and ``hr`` in [0, 1] are clipped, the difference is turned into luma with the
  weights (65.738, 129.057, 25.064) / 256, ``scale`` pixels are shaved at each border, and
  ``-10 log10(mse)`` (peak 1).
* SSIM: both images are turned into luma with the same weights (no +16 offset), then SSIM with
  an 11x11 Gaussian window (sigma 1.5), **zero padding** ('same' size), C1 = 0.01^2, C2 = 0.03^2
  (data range 1), averaged over the whole map: **no border shave**. (Their file also has an
  ``SSIM`` class working on the colour channels, which ``test.py`` does not use;
  ``test_y_channel=False`` gives that variant.)
* Channel order: the authors read images with ``cv2.imread`` and never convert them, so their
  tensors are BGR and the luma weights 65.738 / 129.057 / 25.064 multiply **B**, G, R, the
  reverse of ITU-R BT.601. ``luma='authors'`` (default) reproduces that; ``luma='bt601'`` puts
  65.738 on R.

BasicSR's validation hands metrics uint8 images (``tensor2img``: clamp to [0, 1], x255, round), so
these functions work on those; the only remaining difference to the authors' float protocol is
that rounding of the SR image (about 0.002-0.005 dB of PSNR at 30-34 dB, see docs/official_weights.md).
The authors' SSIM does not clip the SR image (their PSNR does); ``calculate_ssim_d2c`` clips it
by default, which changes nothing on uint8 inputs, and follows them with ``clip_sr: false``.

BasicSR's own ``calculate_psnr`` / ``calculate_ssim`` with ``test_y_channel: true`` use BT.601 luma
with the +16 offset on correctly ordered channels, and MATLAB-style SSIM on the 'valid' region of
the shaved image, so they give slightly different numbers; see ``docs/official_weights.md``
(which numbers are which).

Both functions are registered in BasicSR's ``METRIC_REGISTRY``, so option files use them as::

    metrics:
      psnr_d2c: {type: calculate_psnr_d2c, crop_border: 4}
      ssim_d2c: {type: calculate_ssim_d2c, crop_border: 4}   # crop_border not applied, see below
"""
import cv2
import numpy as np

from basicsr.metrics.metric_util import reorder_image
from basicsr.utils.registry import METRIC_REGISTRY

# the authors' gray_coeffs / 256, in the order they are applied to the tensor's channels
AUTHORS_LUMA = np.array([65.738, 129.057, 25.064], dtype=np.float64) / 256.
LUMA_MODES = ('authors', 'bt601')
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2  # data range 1
SSIM_C2 = 0.03**2


def _prepare(img, img2, input_order, name, clip_sr=True):
    """Check and reorder a pair; returns float64 HWC images, range [0, 1] (input range [0, 255]).

    ``clip_sr=False`` leaves ``img`` (the SR image) unclipped, as the authors' SSIM does.
    """
    if img.shape != img2.shape:
        raise ValueError(f'{name}: image shapes differ: {img.shape} vs {img2.shape}.')
    if input_order not in ('HWC', 'CHW'):
        raise ValueError(f'{name}: input_order must be "HWC" or "CHW", got {input_order!r}.')
    img = reorder_image(img, input_order=input_order).astype(np.float64)
    img2 = reorder_image(img2, input_order=input_order).astype(np.float64)
    # the authors' PSNR clips both images to [0, 1]; uint8 input is already in range
    return (np.clip(img / 255., 0., 1.) if clip_sr else img / 255.), np.clip(img2 / 255., 0., 1.)


def _luma(img, luma, name):
    """Weighted channel sum, (H, W, 3) BGR in [0, 1] -> (H, W, 1), range [0, 219.859/256]."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'{name}: the luma needs 3-channel BGR images, got shape {img.shape}.')
    if luma == 'authors':
        weights = AUTHORS_LUMA  # channel 0 (B in BasicSR's and the authors' BGR arrays) gets 65.738
    elif luma == 'bt601':
        weights = AUTHORS_LUMA[::-1]  # channel 2 (R) gets 65.738
    else:
        raise ValueError(f'{name}: luma must be one of {LUMA_MODES}, got {luma!r}.')
    return (img @ weights)[..., None]


@METRIC_REGISTRY.register()
def calculate_psnr_d2c(img, img2, crop_border, input_order='HWC', luma='authors', **kwargs):
    """Y-PSNR as the D2C-SR authors compute it (their ``cal_psnr``).

    Args:
        img (ndarray): SR image, range [0, 255] (uint8 from BasicSR's validation), BGR,
            shape (H, W, 3) or (3, H, W) with ``input_order='CHW'``.
        img2 (ndarray): HR image, same shape and range.
        crop_border (int): Pixels shaved at each border; the authors use the scale.
            (0 means no shave; their code would give an empty slice there.)
        input_order (str): 'HWC' or 'CHW'. Default: 'HWC'.
        luma (str): 'authors' (default): weights 65.738, 129.057, 25.064 (/256) on channels 0, 1, 2
            of the BGR array, exactly what their code does with cv2-loaded images; 'bt601': the
            same weights on R, G, B.

    Returns:
        float: PSNR in dB (peak 1 on the luma difference); ``inf`` for identical images.
    """
    img, img2 = _prepare(img, img2, input_order, 'calculate_psnr_d2c')
    diff = _luma(img - img2, luma, 'calculate_psnr_d2c')  # linear, so luma of the difference
    if crop_border:
        diff = diff[crop_border:-crop_border, crop_border:-crop_border]
    mse = np.mean(diff**2)
    if mse == 0:
        return float('inf')
    return float(-10. * np.log10(mse))


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """The authors' window: a normalised 1-D Gaussian, outer product with itself; (size, size), sums to 1.

    Made with ``cv2.getGaussianKernel`` as BasicSR's ``_ssim`` does (float64, the same values as
    the authors' ``exp(-x^2 / 2 sigma^2)`` normalised to sum 1).
    """
    kernel = cv2.getGaussianKernel(size, sigma)
    return np.outer(kernel, kernel.transpose())


def _filter_zero_pad(img, window):
    """'same'-size correlation with zero padding, like ``conv2d(padding=size // 2)``; (H, W) float64."""
    return cv2.filter2D(img, cv2.CV_64F, window, borderType=cv2.BORDER_CONSTANT)


def ssim_map_d2c(img, img2):
    """SSIM map of two single-channel float images in [0, 1] as the authors compute it.

    Args:
        img, img2 (ndarray): (H, W) float64.

    Returns:
        ndarray: (H, W) SSIM map; the window reaches into zero padding near the borders.
    """
    window = gaussian_window()
    mu1, mu2 = _filter_zero_pad(img, window), _filter_zero_pad(img2, window)
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = _filter_zero_pad(img * img, window) - mu1_sq
    sigma2_sq = _filter_zero_pad(img2 * img2, window) - mu2_sq
    sigma12 = _filter_zero_pad(img * img2, window) - mu1_mu2
    return (((2 * mu1_mu2 + SSIM_C1) * (2 * sigma12 + SSIM_C2)) / ((mu1_sq + mu2_sq + SSIM_C1) *
                                                                   (sigma1_sq + sigma2_sq + SSIM_C2)))


@METRIC_REGISTRY.register()
def calculate_ssim_d2c(img,
                       img2,
                       crop_border=0,
                       input_order='HWC',
                       test_y_channel=True,
                       luma='authors',
                       shave_border=False,
                       clip_sr=True,
                       **kwargs):
    """SSIM as the D2C-SR authors compute it (their ``ssim`` function, used by ``test.py``).

    Gaussian window 11x11, sigma 1.5, zero padding ('same' size), C1 = 0.01^2, C2 = 0.03^2 on
    images in [0, 1], mean over the whole map (and over channels if ``test_y_channel`` is False).

    Args:
        img (ndarray): SR image, range [0, 255] (uint8 from BasicSR's validation), BGR,
            (H, W, 3) or (3, H, W) with ``input_order='CHW'``.
        img2 (ndarray): HR image, same shape and range.
        crop_border (int): Accepted so that option files can give every metric the scale, but
            only applied with ``shave_border=True``: the authors' SSIM sees the whole image.
        input_order (str): 'HWC' or 'CHW'. Default: 'HWC'.
        test_y_channel (bool): True (default, what ``test.py`` does): SSIM of the luma (no +16
            offset, range [0, 0.859]); False: per colour channel, averaged (their unused
            ``SSIM`` class).
        luma (str): 'authors' (default) or 'bt601'; see :func:`calculate_psnr_d2c`.
        shave_border (bool): Shave ``crop_border`` pixels first (not the authors' protocol).
            Default: False.
        clip_sr (bool): Clip the SR image to [0, 255] first. The authors' ``test.py`` does not
            (their ``cal_psnr`` clips, their ``ssim`` does not); ``False`` follows them exactly.
            It only matters for float inputs outside [0, 255]: BasicSR's validation passes uint8
            images (``tensor2img`` clamps), where both give the same number. Default: True.

    Returns:
        float: SSIM, 1 for identical images.
    """
    img, img2 = _prepare(img, img2, input_order, 'calculate_ssim_d2c', clip_sr)
    if test_y_channel:
        img, img2 = _luma(img, luma, 'calculate_ssim_d2c'), _luma(img2, luma, 'calculate_ssim_d2c')
    if shave_border and crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border]
    return float(np.mean([ssim_map_d2c(img[..., c], img2[..., c]).mean() for c in range(img.shape[2])]))
