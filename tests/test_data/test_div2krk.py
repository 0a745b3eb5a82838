"""DIV2KRK as KernelGAN publishes it, through scripts/prepare_data.py --preset div2krk and the DAN test file.

The fixture is a tiny DIV2KRK_public made here: ``gt/img_<n>_gt.png`` (RGB), ``lr_x2/``,
``lr_x4/im_<n>.png`` (RGBA, alpha 255 everywhere) and ``gt_k_x2/`` (11x11), ``gt_k_x4/kernel_<n>.mat``
(31x31) written with ``scipy.io.savemat`` (MATLAB 5, variable ``Kernel``), the LR images made
from the HR ones with those kernels (blur + decimation, KernelGAN's model).
"""
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, write_yaml
from scipy.io import savemat

from basicsr.metrics import calculate_psnr
from d2c_arch import DAN
from d2c_data import degradations

sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import prepare_data  # noqa: E402

KEYS = ('1', '2')
HR_SIZE = (48, 40)  # (height, width): multiples of 4
KERNEL_SIDE = {2: 11, 4: 31}
TINY_DAN = dict(num_feat=8, num_group=1, num_block=2, code_length=6, loop=2, estimator_feat=8, estimator_blocks=1)


def _div2krk_kernel(rng, side):
    kernel, _ = degradations.sample_kernels(1, 2, side, (0.6, 5.0), rng=rng)
    return kernel[0].astype(np.float64)


@pytest.fixture(scope='module')
def div2krk(tmp_path_factory):
    """A two-image DIV2KRK_public; returns (root, {(scale, key): kernel})."""
    root = tmp_path_factory.mktemp('DIV2KRK_public')
    rng = np.random.default_rng(0)
    kernels = {}
    for folder in ('gt', 'lr_x2', 'lr_x4', 'gt_k_x2', 'gt_k_x4'):
        (root / folder).mkdir()
    for i, key in enumerate(KEYS):
        hr = cv2.GaussianBlur((rng.random(HR_SIZE + (3, )) * 255).astype(np.uint8), (5, 5), 1.0)
        assert cv2.imwrite(str(root / 'gt' / f'img_{key}_gt.png'), hr)
        for scale in (2, 4):
            kernel = _div2krk_kernel(rng, KERNEL_SIDE[scale])
            kernels[(scale, key)] = kernel
            savemat(str(root / f'gt_k_x{scale}' / f'kernel_{key}.mat'), {'Kernel': kernel})  # MATLAB 5
            lr = degradations.degrade(
                torch.from_numpy(hr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255,
                torch.from_numpy(kernel).float()[None], scale, 'decimate')
            lr = np.rint(lr[0].permute(1, 2, 0).numpy()[..., ::-1] * 255).astype(np.uint8)
            rgba = np.concatenate([lr, np.full(lr.shape[:2] + (1, ), 255, np.uint8)], axis=2)
            assert cv2.imwrite(str(root / f'lr_x{scale}' / f'im_{key}.png'), rgba)
    return root, kernels


def _prepare(root, out, scale, *extra):
    return prepare_data.main([
        '--preset', 'div2krk', '--input',
        str(root), '--scale',
        str(scale), '--output',
        str(out), '--workers', '1', *extra
    ])


@pytest.mark.parametrize('scale', [2, 4])
def test_prepare_div2krk_layout(div2krk, tmp_path, scale, capsys):
    root, kernels = div2krk
    out = tmp_path / f'DIV2KRK_x{scale}'
    assert _prepare(root, out, scale) == 0
    assert 'test/kernels' in capsys.readouterr().out
    test = out / 'test'
    assert sorted(os.listdir(test)) == ['HR', 'LR', 'kernels']
    for key in KEYS:
        hr = cv2.imread(str(test / 'HR' / f'{key}.png'), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(hr, cv2.imread(str(root / 'gt' / f'img_{key}_gt.png'), cv2.IMREAD_UNCHANGED))
        lr = cv2.imread(str(test / 'LR' / f'{key}.png'), cv2.IMREAD_UNCHANGED)
        rgba = cv2.imread(str(root / f'lr_x{scale}' / f'im_{key}.png'), cv2.IMREAD_UNCHANGED)
        assert rgba.shape[2] == 4 and lr.shape == rgba.shape[:2] + (3, )  # the opaque alpha is gone
        assert np.array_equal(lr, rgba[..., :3])
        kernel = np.load(test / 'kernels' / f'{key}.npy')
        assert kernel.dtype == np.float32 and kernel.shape == (KERNEL_SIDE[scale], ) * 2
        np.testing.assert_allclose(kernel, kernels[(scale, key)] / kernels[(scale, key)].sum(), rtol=1e-6)


@pytest.mark.parametrize(
    'damage, reason',
    [
        ('missing', 'no kernel'),
        ('no_variable', "bad kernel: kernel: no variable 'Kernel' (it holds K)"),
        ('not_square', 'bad kernel'),
        ('not_mat', 'kernel: not a MATLAB file'),
        ('transparent', 'transparent alpha'),
    ],
)
def test_prepare_div2krk_reports_bad_files(div2krk, tmp_path, capsys, damage, reason):
    src, _ = div2krk
    root = tmp_path / 'DIV2KRK_public'
    shutil.copytree(src, root)
    mat = root / 'gt_k_x4' / 'kernel_2.mat'
    if damage == 'missing':
        mat.unlink()
    elif damage == 'no_variable':
        savemat(str(mat), {'K': np.ones((31, 31))})
    elif damage == 'not_square':
        savemat(str(mat), {'Kernel': np.ones((31, 30))})
    elif damage == 'not_mat':
        mat.write_bytes(b'not a mat file')
    else:
        lr = root / 'lr_x4' / 'im_2.png'
        img = cv2.imread(str(lr), cv2.IMREAD_UNCHANGED)
        img[0, 0, 3] = 0
        cv2.imwrite(str(lr), img)
    out = tmp_path / 'out'
    assert _prepare(root, out, 4) == 1
    captured = capsys.readouterr()
    assert reason in captured.out and 'Nothing was written' in captured.out and not out.exists()
    assert _prepare(root, out, 4, '--skip-bad') == 0  # the good pair is written, with its kernel
    assert sorted(os.listdir(out / 'test' / 'kernels')) == ['1.npy']


def test_prepare_div2krk_usage_errors(div2krk, tmp_path, capsys):
    root, _ = div2krk
    for args, message in ((['--split', 'train'], 'DIV2KRK is a test set'), ([], '--scale 3 is not available')):
        scale = 3 if not args else 4
        with pytest.raises(SystemExit) as info:
            _prepare(root, tmp_path / 'out', scale, *args)
        assert info.value.code == 2 and message in capsys.readouterr().err


def _tiny_dan_checkpoint(path, scale):
    torch.manual_seed(3)
    opt = dict(TINY_DAN, upscale=scale, kernel_size=KERNEL_SIDE[scale])
    net = DAN(**opt).eval()
    net.pca_matrix.copy_(torch.linalg.qr(torch.randn(KERNEL_SIDE[scale]**2, opt['code_length']))[0])
    torch.save({'params': net.state_dict()}, path)
    return net, opt


@pytest.mark.slow
@pytest.mark.parametrize('scale', [2, 4])
def test_dan_test_option_file_on_div2krk(div2krk, tmp_path, scale):
    """options/dan/test_DANv2_setting2_x<scale>.yml on the prepared fixture: d2c-test logs PSNR/SSIM and the
    kernel error against the .mat kernels, equal to what is computed here from the same network."""
    root, kernels = div2krk
    prepared = tmp_path / 'datasets' / f'DIV2KRK_x{scale}'
    assert _prepare(root, prepared, scale) == 0
    net, net_opt = _tiny_dan_checkpoint(tmp_path / 'dan.pth', scale)
    with open(os.path.join(REPO_ROOT, 'options', 'dan', f'test_DANv2_setting2_x{scale}.yml')) as f:
        opt = yaml.safe_load(f)
    data = opt['datasets']['test_1']
    # the file's own relative paths, run from tmp_path: the documented preparation's output is what it reads
    assert data['dataroot_kernel'] == f'datasets/DIV2KRK_x{scale}/test/kernels'
    opt['num_gpu'] = 0
    opt['network_g'].update(net_opt)
    opt['path']['pretrain_network_g'] = str(tmp_path / 'dan.pth')
    opt['val']['pbar'] = False
    yml = write_yaml(tmp_path / 'test.yml', opt)
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.test', '-opt', yml],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = next((tmp_path / 'results' / opt['name']).glob('*.log')).read_text()
    print('\n'.join(line for line in log.splitlines() if '#' in line))  # shown with -s: the fixture run's output
    pattern = rf'kernel_err \(mean \|k - k_gt\|, 2 images\) of DIV2KRK_x{scale}: ([\d.e+-]+)'
    logged_err = float(re.search(pattern, log).group(1))
    logged_psnr = float(re.search(r'# psnr: ([\d.]+)', log).group(1))
    assert re.search(r'# ssim: [\d.]+', log)

    errors, psnrs = [], []
    folder = tmp_path / 'results' / opt['name'] / 'visualization' / data['name']
    for key in KEYS:
        lr = cv2.imread(str(prepared / 'test' / 'LR' / f'{key}.png'))[..., ::-1].astype(np.float32) / 255
        with torch.no_grad():
            _, estimate = net(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None], return_kernel=True)
        truth = kernels[(scale, key)] / kernels[(scale, key)].sum()
        errors.append(float(np.abs(estimate[0].numpy() - truth).mean()))
        sr = cv2.imread(str(folder / f'{key}_{opt["name"]}.png'))
        hr = cv2.imread(str(prepared / 'test' / 'HR' / f'{key}.png'))
        psnrs.append(calculate_psnr(sr, hr, crop_border=scale, test_y_channel=True))
    assert logged_err == pytest.approx(np.mean(errors), rel=1e-3)
    assert logged_psnr == pytest.approx(np.mean(psnrs), abs=1e-3)
