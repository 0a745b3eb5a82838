"""Tests for the DANv2 data scripts: scripts/make_dan_pca.py, scripts/make_blur_testset.py, options/dan/test_*.yml.

Everything runs on tiny images made here (50x46 and 45x53 noise-free gradients with texture, so that
the mod-crop to x4 and x3 has work to do); the scripts run in process through ``main(argv)``,
once as a subprocess to check that they start from a checkout.
"""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT

from basicsr.data.degradations import mesh_grid
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.registry import ARCH_REGISTRY
from d2c_data.degradations import GAUSSIAN8_SIGMAS, degrade, isotropic_kernel

sys.path.insert(0, osp.join(REPO_ROOT, 'scripts'))
import make_blur_testset  # noqa: E402
import make_dan_pca  # noqa: E402

SIZES = {'a': (46, 50), 'b': (53, 45)}  # name: (height, width); neither a multiple of 4 nor of 3


def _image(height, width, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    base = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) % 256
    return np.clip(base + rng.integers(-20, 21, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def hr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hr')
    for i, (name, (height, width)) in enumerate(SIZES.items()):
        assert cv2.imwrite(str(folder / f'{name}.png'), _image(height, width, i))
    return folder


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _degrade(hr, kernel, scale, downsample):
    """kernel_util.degrade on a uint8 BGR image, back to uint8 (what the script must have written)."""
    lr = degrade(
        torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255,
        torch.from_numpy(kernel)[None], scale, downsample)
    return np.rint(lr[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _width(kernel):
    """Standard deviation of an isotropic kernel along x (pixels)."""
    _, xx, _ = mesh_grid(kernel.shape[0])
    return float(np.sqrt((kernel * xx**2).sum() - (kernel * xx).sum()**2))


def _centre(kernel):
    _, xx, yy = mesh_grid(kernel.shape[0])
    return float((kernel * xx).sum()), float((kernel * yy).sum())


def _tags(scale):
    return [f'{s:.2f}' for s in np.linspace(*GAUSSIAN8_SIGMAS[scale], 8)]


# ----------------------------------------------------------------------------
# make_dan_pca.py
# ----------------------------------------------------------------------------
def test_pca_matrix_file(tmp_path, capsys):
    out = tmp_path / 'pca.pth'
    assert make_dan_pca.main(['--num-kernels', '600', '--holdout', '100', '--seed', '1', '-o', str(out)]) == 0
    text = capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    matrix = saved['pca_matrix']
    assert matrix.shape == (441, 10) and matrix.dtype == torch.float32
    assert torch.allclose(matrix.T @ matrix, torch.eye(10), atol=1e-5)  # orthonormal columns
    assert saved['setting'] == 1 and saved['scale'] == 4 and saved['kernel_size'] == 21
    assert saved['sigma_range'] == [0.2, 4.0] and saved['num_kernels'] == 600
    assert saved['mean_kernel'].shape == (21, 21)
    # the table: one row per component, explained variance decreasing, cumulative increasing to ~1
    rows = [line.split() for line in text.splitlines() if re.match(r'\s+\d+\s+0\.\d+\s+[01]\.\d+\s', line)]
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    explained, cumulative = np.array([float(r[1]) for r in rows]), np.array([float(r[2]) for r in rows])
    assert np.all(np.diff(explained) <= 0) and explained[0] > 0.5
    assert np.all(np.diff(cumulative) >= 0) and cumulative[-1] > 0.999
    assert np.allclose(explained, saved['explained_variance'].numpy(), atol=1e-5)
    errors = saved['heldout_error'].numpy()
    assert np.all(np.diff(errors) <= 1e-9) and errors[-1] < 0.01 * errors[0]


def test_pca_setting2_defaults(tmp_path, capsys):
    """Setting 2 x4 takes the released model's sizes by default: 31x31 kernels, t = 15."""
    out = tmp_path / 'aniso.pth'
    assert make_dan_pca.main(
        ['--setting', '2', '--scale', '4', '--num-kernels', '100', '--holdout', '20', '-o',
         str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved['pca_matrix'].shape == (961, 15) and saved['noise'] == 0.25
    assert 'kernel_size: 31, code_length: 15' in capsys.readouterr().out


@pytest.mark.parametrize('flags, words', [
    (['--length', '442'], ['--length 442', '441 taps']),
    (['--kernel-size', '20'], ['--kernel-size 20', 'odd']),
    (['--sigma-min', '3', '--sigma-max', '1'], ['--sigma-min 3']),
    (['--noise', '0.1'], ['--noise', 'setting 2']),
    (['--num-kernels', '5'], ['--num-kernels 5']),
])
def test_pca_bad_flags(tmp_path, capsys, flags, words):
    out = tmp_path / 'pca.pth'
    assert make_dan_pca.main(flags + ['-o', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('make_dan_pca.py: error:')
    assert all(word in err for word in words), err
    assert not os.listdir(tmp_path)  # nothing written, no temporary file left


def test_pca_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / 'pca.pth'
    out.write_bytes(b'keep')
    assert make_dan_pca.main(['--num-kernels', '100', '-o', str(out)]) == 2
    assert '--force' in capsys.readouterr().err and out.read_bytes() == b'keep'


# ----------------------------------------------------------------------------
# make_blur_testset.py gaussian8
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def gaussian8_x4(hr_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('g8') / 'Set_gaussian8_x4'
    assert make_blur_testset.main(['gaussian8', '--input', str(hr_dir), '--output', str(out), '--scale', '4']) == 0
    return out


def test_gaussian8_layout_and_exact_lr(hr_dir, gaussian8_x4):
    out, tags = gaussian8_x4, _tags(4)
    sigmas = np.linspace(*GAUSSIAN8_SIGMAS[4], 8)
    manifest = json.loads((out / 'make_blur_testset.json').read_text())
    assert np.allclose(manifest['sigmas'], sigmas) and manifest['images'] == ['a.png', 'b.png']
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('LR_sigma')) == [f'LR_sigma{t}' for t in tags]
    for name, (height, width) in SIZES.items():
        hr = _read(out / 'HR' / f'{name}.png')
        assert hr.shape == (height // 4 * 4, width // 4 * 4, 3)  # mod-cropped
        assert np.array_equal(hr, _read(hr_dir / f'{name}.png')[:hr.shape[0], :hr.shape[1]])
        for sigma, tag in zip(sigmas, tags):
            kernel = np.load(out / f'kernels_sigma{tag}' / f'{name}.npy')
            assert kernel.dtype == np.float32 and kernel.shape == (21, 21)
            assert abs(float(kernel.sum()) - 1) < 1e-5 and abs(_width(kernel) - sigma) < 0.01 * sigma
            assert np.array_equal(kernel, isotropic_kernel(sigma, 21))
            lr = _read(out / f'LR_sigma{tag}' / f'{name}.png')
            assert lr.shape == (hr.shape[0] // 4, hr.shape[1] // 4, 3)
            assert np.array_equal(lr, _degrade(hr, kernel, 4, 'bicubic'))  # exact, 8-bit levels included
            # the "all" layout holds the same files
            assert np.array_equal(_read(out / 'LR' / f'{name}_s{tag}.png'), lr)
            assert np.array_equal(_read(out / 'HR_all' / f'{name}_s{tag}.png'), hr)
            assert np.array_equal(np.load(out / 'kernels' / f'{name}_s{tag}.npy'), kernel)
            assert _read(out / 'kernels' / f'{name}_s{tag}.png').shape == (168, 168)  # the picture, 8 px per tap


def test_gaussian8_reads_as_basicsr_paired_sets(gaussian8_x4):

    def paired(gt, lq):  # BasicSR pops io_backend.type: a fresh dict per data set
        return PairedImageDataset({
            'dataroot_gt': str(gaussian8_x4 / gt),
            'dataroot_lq': str(gaussian8_x4 / lq),
            'io_backend': {
                'type': 'disk'
            },
            'phase': 'test',
            'scale': 4
        })

    all_set, one = paired('HR_all', 'LR'), paired('HR', 'LR_sigma2.20')
    assert len(all_set) == 16 and len(one) == 2
    for item in (all_set[0], one[1]):
        assert item['gt'].shape[-2:] == tuple(4 * s for s in item['lq'].shape[-2:])


def test_gaussian8_widths_follow_the_scale(hr_dir, tmp_path):
    """The official script uses the x4 widths at every scale; here x3 gets 1.35-2.40."""
    out = tmp_path / 'x3'
    assert make_blur_testset.main(['gaussian8', '-i', str(hr_dir), '-o', str(out), '--scale', '3']) == 0
    tags = _tags(3)
    assert tags[0] == '1.35' and tags[-1] == '2.40'
    for tag, sigma in zip(tags, np.linspace(1.35, 2.40, 8)):
        lr = _read(out / f'LR_sigma{tag}' / 'b.png')
        assert lr.shape == (53 // 3, 45 // 3, 3)
        assert abs(_width(np.load(out / f'kernels_sigma{tag}' / 'b.npy')) - sigma) < 0.01 * sigma


# ----------------------------------------------------------------------------
# make_blur_testset.py div2krk
# ----------------------------------------------------------------------------
def test_div2krk_decimate_x4(hr_dir, tmp_path):
    out = tmp_path / 'rk4'
    assert make_blur_testset.main(['div2krk', '-i', str(hr_dir), '-o', str(out), '--scale', '4', '--seed', '3']) == 0
    manifest = json.loads((out / 'make_blur_testset.json').read_text())
    assert sorted(manifest['kernel_params']) == ['a', 'b'] and manifest['downsample'] == 'decimate'
    assert sorted(p.name for p in (out / 'kernels').glob('*.npy')) == ['a.npy', 'b.npy']  # one kernel per image
    kernels = []
    for name in SIZES:
        hr, lr = _read(out / 'HR' / f'{name}.png'), _read(out / 'LR' / f'{name}.png')
        kernel = np.load(out / 'kernels' / f'{name}.npy')
        assert kernel.shape == (31, 31) and kernel.min() >= 0 and abs(float(kernel.sum()) - 1) < 1e-5
        # centre of mass (4-1)/2 px right and down: LR pixels where bicubic puts them
        assert np.allclose(_centre(kernel), (1.5, 1.5), atol=1e-4)
        assert np.array_equal(lr, _degrade(hr, kernel, 4, 'decimate'))
        params = manifest['kernel_params'][name]
        assert 0.6 <= params['sigma_x'] <= 5 and 0.6 <= params['sigma_y'] <= 5
        kernels.append(kernel)
    assert not np.array_equal(*kernels)
    again = tmp_path / 'rk4_again'  # the same seed gives the same set
    assert make_blur_testset.main(['div2krk', '-i', str(hr_dir), '-o', str(again), '--scale', '4', '--seed', '3']) == 0
    assert np.array_equal(np.load(again / 'kernels' / 'a.npy'), kernels[0])


def test_div2krk_bicubic_x2(hr_dir, tmp_path):
    out = tmp_path / 'rk2'
    assert make_blur_testset.main(
        ['div2krk', '-i', str(hr_dir), '-o',
         str(out), '--scale', '2', '--downsample', 'bicubic']) == 0
    for name in SIZES:
        kernel = np.load(out / 'kernels' / f'{name}.npy')
        assert kernel.shape == (11, 11)  # DANv2's setting-2 x2 side
        hr = _read(out / 'HR' / f'{name}.png')
        assert np.array_equal(_read(out / 'LR' / f'{name}.png'), _degrade(hr, kernel, 2, 'bicubic'))


# ----------------------------------------------------------------------------
# make_blur_testset.py: bad input
# ----------------------------------------------------------------------------
def test_unreadable_and_small_images_are_skipped(hr_dir, tmp_path, capsys):
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'a.png').write_bytes((hr_dir / 'a.png').read_bytes())
    (src / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    assert cv2.imwrite(str(src / 'small.png'), _image(24, 19, 5))  # 16x24 after the x4 crop < 21
    out = tmp_path / 'out'
    assert make_blur_testset.main(['gaussian8', '-i', str(src), '-o', str(out), '--scale', '4']) == 1
    err = capsys.readouterr().err
    assert 'broken.png' in err and 'small.png' in err and 'smaller than the 21x21 kernel' in err
    assert sorted(p.name for p in (out / 'HR').iterdir()) == ['a.png']  # the good image is written
    assert [s[0] for s in json.loads((out / 'make_blur_testset.json').read_text())['skipped']
            ] == ['broken.png', 'small.png']


def test_output_in_the_way(hr_dir, gaussian8_x4, tmp_path, capsys):
    out = tmp_path / 'busy'
    out.mkdir()
    (out / 'mine.txt').write_text('keep')
    for force in ([], ['--force']):  # not made by the script: refused even with --force
        assert make_blur_testset.main(['gaussian8', '-i', str(hr_dir), '-o', str(out), '--scale', '4'] + force) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and '--output' in err
    assert os.listdir(out) == ['mine.txt'] and sorted(os.listdir(tmp_path)) == ['busy']  # nothing written
    # a set made by the script is replaced with --force only
    argv = ['div2krk', '-i', str(hr_dir), '-o', str(gaussian8_x4), '--scale', '4']
    before = sorted(os.listdir(gaussian8_x4))
    assert make_blur_testset.main(argv) == 2 and sorted(os.listdir(gaussian8_x4)) == before
    capsys.readouterr()


def test_bad_input_flags(tmp_path, capsys):
    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    cases = [
        (['gaussian8', '-i', str(tmp_path / 'missing'), '-o',
          str(tmp_path / 'o'), '--scale', '4'], '--input'),
        (['gaussian8', '-i', str(empty), '-o', str(tmp_path / 'o'), '--scale', '4'], 'holds no images'),
        (['div2krk', '-i', str(empty), '-o', str(tmp_path / 'o'), '--scale', '3'], '--downsample bicubic'),
    ]
    for argv, words in cases:
        assert make_blur_testset.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert not osp.exists(tmp_path / 'o')


def test_help_exits_0(capsys):
    for main, argv in ((make_dan_pca.main, ['--help']), (make_blur_testset.main, ['--help']),
                       (make_blur_testset.main, ['gaussian8',
                                                 '--help']), (make_blur_testset.main, ['div2krk', '--help'])):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert 'decimate' in capsys.readouterr().out
    # and from a checkout, as a file
    proc = subprocess.run(
        [sys.executable, osp.join(REPO_ROOT, 'scripts', 'make_blur_testset.py'), '--help'],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT)
    assert proc.returncode == 0 and 'gaussian8' in proc.stdout


# ----------------------------------------------------------------------------
# options/dan/test_*.yml
# ----------------------------------------------------------------------------
NET_KEYS = {
    'type', 'num_in_ch', 'num_feat', 'num_group', 'num_block', 'upscale', 'code_length', 'kernel_size', 'loop',
    'estimator_feat', 'estimator_blocks', 'pca_matrix', 'group_skip'
}
OPTION_FILES = {  # file: (setting, scale, kernel_size, code_length)
    'test_DANv2_setting1_x2.yml': (1, 2, 21, 10),
    'test_DANv2_setting1_x3.yml': (1, 3, 21, 10),
    'test_DANv2_setting1_x4.yml': (1, 4, 21, 10),
    'test_DANv2_setting2_x2.yml': (2, 2, 11, 10),
    'test_DANv2_setting2_x4.yml': (2, 4, 31, 15),
}


@pytest.mark.parametrize('name', sorted(OPTION_FILES))
def test_option_files(name):
    setting, scale, kernel_size, code_length = OPTION_FILES[name]
    with open(osp.join(REPO_ROOT, 'options', 'dan', name), encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    assert opt['model_type'] == 'DANModel' and opt['scale'] == scale
    net = opt['network_g']
    assert set(net) == NET_KEYS and net['type'] == 'DAN' and net['upscale'] == scale
    assert (net['kernel_size'], net['code_length'], net['group_skip']) == (kernel_size, code_length, 'double')
    assert opt['path']['pretrain_network_g']
    arch = ARCH_REGISTRY.get('DAN')(**{k: v for k, v in net.items() if k != 'type'})  # the arch takes these keys
    assert (arch.kernel_size, arch.code_length) == (kernel_size, code_length)
    for metric in ('psnr', 'ssim'):
        assert opt['val']['metrics'][metric]['crop_border'] == scale
        assert opt['val']['metrics'][metric]['test_y_channel'] is True
    sets = opt['datasets']
    assert sets and all(key.startswith('test') for key in sets)
    for data in sets.values():
        assert data['type'] == 'PairedImageDataset' and data['dataroot_gt'] and data['dataroot_lq']
    if setting == 1:  # the folders make_blur_testset.py gaussian8 writes for this scale
        root = f'datasets/Set5_gaussian8_x{scale}'
        lq = {data['dataroot_lq'] for data in sets.values()}
        assert lq == {f'{root}/LR'} | {f'{root}/LR_sigma{tag}' for tag in _tags(scale)}
        for data in sets.values():
            suffix = data['dataroot_lq'][len(root) + 3:]  # '' or '_sigma<s>'
            assert data['dataroot_gt'] == f'{root}/{"HR_all" if not suffix else "HR"}'
            assert data['dataroot_kernel'] == f'{root}/kernels{suffix}'
