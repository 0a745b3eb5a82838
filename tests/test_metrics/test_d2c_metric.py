"""d2c_metrics.d2c_metric: the authors' Y-PSNR and Gaussian SSIM as BasicSR metrics."""
import glob
import math
import os

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT
from numpy.lib.stride_tricks import sliding_window_view

from basicsr.metrics import calculate_metric
from basicsr.metrics.psnr_ssim import calculate_psnr
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import METRIC_REGISTRY
from d2c_metrics import calculate_psnr_d2c, calculate_ssim_d2c

WEIGHTS = np.array([65.738, 129.057, 25.064]) / 256  # the authors' gray_coeffs / 256
RNG = np.random.default_rng(0)


def rand_img(h=12, w=13):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# PSNR by hand
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('luma', ['authors', 'bt601'])
def test_psnr_of_a_constant_difference(luma):
    """Every channel off by d: the luma difference is d/255 * sum(weights) everywhere."""
    img = np.full((10, 10, 3), 100, np.uint8)
    d = 10
    expected = -20 * math.log10(d / 255 * WEIGHTS.sum())
    assert calculate_psnr_d2c(img + d, img, crop_border=2, luma=luma) == pytest.approx(expected, abs=1e-10)
    assert calculate_psnr_d2c(img, img + d, crop_border=0, luma=luma) == pytest.approx(expected, abs=1e-10)


def test_psnr_luma_channel_order():
    """One pixel of channel 0 (B in BasicSR's BGR arrays) off by 255 on an 8x8 image.

    The authors apply 65.738 to channel 0 of their cv2 (BGR) arrays; BT.601 puts 25.064 on B.
    """
    img = np.zeros((8, 8, 3), np.uint8)
    img2 = img.copy()
    img2[3, 4, 0] = 255
    authors = -10 * math.log10(WEIGHTS[0]**2 / 64)
    bt601 = -10 * math.log10(WEIGHTS[2]**2 / 64)
    assert calculate_psnr_d2c(img, img2, crop_border=0) == pytest.approx(authors, abs=1e-10)
    assert calculate_psnr_d2c(img, img2, crop_border=0, luma='bt601') == pytest.approx(bt601, abs=1e-10)
    # shaving 1 pixel leaves 6x6 pixels, the difference still inside
    assert calculate_psnr_d2c(img, img2, crop_border=1) == pytest.approx(-10 * math.log10(WEIGHTS[0]**2 / 36))


def test_psnr_border_shave_and_identity():
    img = rand_img()
    img2 = img.copy()
    img2[:2] = 255 - img2[:2]  # differs only in the top two rows
    assert calculate_psnr_d2c(img, img2, crop_border=2) == float('inf')
    assert math.isfinite(calculate_psnr_d2c(img, img2, crop_border=1))
    assert calculate_psnr_d2c(img, img, crop_border=0) == float('inf')
    chw = calculate_psnr_d2c(img.transpose(2, 0, 1), img2.transpose(2, 0, 1), crop_border=1, input_order='CHW')
    assert chw == calculate_psnr_d2c(img, img2, crop_border=1)


def test_psnr_bt601_matches_basicsr_y_psnr():
    """With the channels in BT.601 order, the authors' weights are BasicSR's (65.481/255 = 65.738/256 to 6 digits)."""
    img, img2 = rand_img(32, 32), rand_img(32, 32)
    ours = calculate_psnr_d2c(img, img2, crop_border=4, luma='bt601')
    assert ours == pytest.approx(calculate_psnr(img, img2, crop_border=4, test_y_channel=True), abs=1e-3)


def test_bad_input():
    with pytest.raises(ValueError, match='shapes differ'):
        calculate_psnr_d2c(rand_img(4, 4), rand_img(4, 5), crop_border=0)
    with pytest.raises(ValueError, match='luma must be one of'):
        calculate_psnr_d2c(rand_img(), rand_img(), crop_border=0, luma='rgb')
    with pytest.raises(ValueError, match='3-channel'):
        calculate_ssim_d2c(rand_img()[..., 0], rand_img()[..., 0])


# ----------------------------------------------------------------------------------------------
# SSIM by hand
# ----------------------------------------------------------------------------------------------
def _window_mass_1d(n, size=11, sigma=1.5):
    """Share of the normalised 1-D Gaussian that falls inside [0, n) for each position (zero padding)."""
    g = np.exp(-(np.arange(size) - size // 2)**2 / (2 * sigma**2))
    g /= g.sum()
    return np.array([sum(g[t] for t in range(size) if 0 <= i + t - size // 2 < n) for i in range(n)])


def test_ssim_identical_is_one():
    img = rand_img()
    assert calculate_ssim_d2c(img, img) == pytest.approx(1., abs=1e-12)
    assert calculate_ssim_d2c(img, img, test_y_channel=False) == pytest.approx(1., abs=1e-12)


@pytest.mark.parametrize('test_y_channel', [False, True])
def test_ssim_of_a_flat_image_against_black(test_y_channel):
    """Flat value a vs 0. With zero padding and window mass s(x, y) inside the image:
    mu = a s, sigma^2 = a^2 s (1 - s), so SSIM = C1 / (a^2 s^2 + C1) * C2 / (a^2 s (1 - s) + C2)."""
    h, w, v = 9, 14, 200
    img = np.full((h, w, 3), v, np.uint8)
    a = v / 255 * (WEIGHTS.sum() if test_y_channel else 1.)
    s = np.outer(_window_mass_1d(h), _window_mass_1d(w))
    c1, c2 = 0.01**2, 0.03**2
    expected = np.mean(c1 / (a**2 * s**2 + c1) * c2 / (a**2 * s * (1 - s) + c2))
    got = calculate_ssim_d2c(img, np.zeros_like(img), test_y_channel=test_y_channel)
    assert got == pytest.approx(expected, rel=1e-9)


def _naive_ssim(x, y):
    """Straight from the definition: zero-padded 11x11 Gaussian windows, mean of the map."""
    g = np.exp(-(np.arange(11) - 5)**2 / (2 * 1.5**2))
    win = np.outer(g, g) / g.sum()**2

    def filt(z):
        return (sliding_window_view(np.pad(z, 5), (11, 11)) * win).sum(axis=(-2, -1))

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))


def test_ssim_matches_the_definition_on_random_images():
    img, img2 = rand_img(10, 17), rand_img(10, 17)
    x, y = img / 255., img2 / 255.
    rgb = np.mean([_naive_ssim(x[..., c], y[..., c]) for c in range(3)])
    assert calculate_ssim_d2c(img, img2, test_y_channel=False) == pytest.approx(rgb, abs=1e-12)
    assert calculate_ssim_d2c(img, img2) == pytest.approx(_naive_ssim(x @ WEIGHTS, y @ WEIGHTS), abs=1e-12)
    assert calculate_ssim_d2c(
        img, img2, luma='bt601') == pytest.approx(
            _naive_ssim(x @ WEIGHTS[::-1], y @ WEIGHTS[::-1]), abs=1e-12)


def test_ssim_clips_the_sr_image_unless_told_to_follow_the_authors():
    """The authors' test.py scores SSIM on the unclipped SR image; clip_sr=False does the same."""
    rng = np.random.default_rng(7)
    img2 = rand_img(12, 15).astype(np.float64)
    img = img2 + rng.normal(0, 40, img2.shape)  # a float SR image with values below 0 and above 255
    assert img.min() < 0 and img.max() > 255
    x, y = img / 255., img2 / 255.
    authors = calculate_ssim_d2c(img, img2, clip_sr=False)
    assert authors == pytest.approx(_naive_ssim(x @ WEIGHTS, y @ WEIGHTS), abs=1e-12)
    clipped = calculate_ssim_d2c(img, img2)
    assert clipped == pytest.approx(_naive_ssim(np.clip(x, 0, 1) @ WEIGHTS, y @ WEIGHTS), abs=1e-12)
    assert clipped != pytest.approx(authors, abs=1e-4)
    # on what BasicSR's validation passes (uint8, already in range) both are the same
    sr8 = np.clip(img, 0, 255).round().astype(np.uint8)
    assert calculate_ssim_d2c(sr8, img2, clip_sr=False) == calculate_ssim_d2c(sr8, img2)


def test_ssim_does_not_shave_unless_asked():
    img, img2 = rand_img(20, 20), rand_img(20, 20)
    whole = calculate_ssim_d2c(img, img2, crop_border=0)
    assert calculate_ssim_d2c(img, img2, crop_border=4) == whole  # the authors' protocol: whole image
    shaved = calculate_ssim_d2c(img, img2, crop_border=4, shave_border=True)
    assert shaved == pytest.approx(calculate_ssim_d2c(img[4:-4, 4:-4], img2[4:-4, 4:-4]), abs=1e-15)
    assert shaved != whole


# ----------------------------------------------------------------------------------------------
# Inside BasicSR
# ----------------------------------------------------------------------------------------------
TEST_OPTIONS = sorted(glob.glob(os.path.join(REPO_ROOT, 'options', 'test_D2C_*.yml')))


def test_registered():
    assert METRIC_REGISTRY.get('calculate_psnr_d2c') is calculate_psnr_d2c
    assert METRIC_REGISTRY.get('calculate_ssim_d2c') is calculate_ssim_d2c


@pytest.mark.parametrize('path', TEST_OPTIONS, ids=os.path.basename)
def test_option_files_metrics_run_in_calculate_metric(path):
    with open(path) as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    metrics = opt['val']['metrics']
    assert metrics['psnr_d2c'] == {'type': 'calculate_psnr_d2c', 'crop_border': opt['scale']}
    assert metrics['ssim_d2c'] == {'type': 'calculate_ssim_d2c', 'crop_border': opt['scale']}
    sr, hr = rand_img(24, 24), rand_img(24, 24)
    results = {name: calculate_metric({'img': sr, 'img2': hr}, metric_opt) for name, metric_opt in metrics.items()}
    assert all(math.isfinite(v) for v in results.values()), results
    assert results['psnr_d2c'] == calculate_psnr_d2c(sr, hr, crop_border=opt['scale'])
    assert results['ssim_d2c'] == calculate_ssim_d2c(sr, hr)
    assert calculate_metric({'img': sr, 'img2': sr}, metrics['ssim_d2c']) == pytest.approx(1.)
