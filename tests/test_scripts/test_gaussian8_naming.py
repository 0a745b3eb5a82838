"""Gaussian8 in both namings: sets made by scripts/make_blur_testset.py gaussian8 and sets in DAN's official
naming (``HR/x4/sig<sigma>_<name>.png``, ``LRblur/x4/sig<sigma>_<name>.png``, whose kernels
``make_blur_testset.py kernels`` writes) give the same scores and kernel errors through the DAN test file.

The official-named set is made here from our set by renaming (the official generator does not run
as published), with the widths spelt as Python prints np.linspace's values (``sig2.4000000000000004``).
"""
import os
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_options import load_like_basicsr

from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model

sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import make_blur_testset  # noqa: E402

NAMES = ('a', 'b')
SIGMAS = np.linspace(1.8, 3.2, 8)  # what DAN's generate_mod_blur_LR_bic.py loops over (x4)
TINY_DAN = dict(num_feat=8, num_group=1, num_block=2, code_length=6, loop=2, estimator_feat=8, estimator_blocks=1)


def official(sigma, name):
    return 'sig{}_{}.png'.format(sigma, name)  # the official script's spelling of the file name


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp('g8')
    rng = np.random.default_rng(0)
    (root / 'hr').mkdir()
    for name in NAMES:
        img = cv2.GaussianBlur((rng.random((44, 52, 3)) * 255).astype(np.uint8), (5, 5), 1.0)
        assert cv2.imwrite(str(root / 'hr' / f'{name}.png'), img)
    ours = root / 'ours'
    assert make_blur_testset.main(['gaussian8', '--input',
                                   str(root / 'hr'), '--scale', '4', '--output',
                                   str(ours)]) == 0
    theirs = root / 'Set5'
    for folder in ('HR/x4', 'LRblur/x4'):
        (theirs / folder).mkdir(parents=True)
    for sigma in SIGMAS:
        for name in NAMES:
            shutil.copyfile(ours / 'HR' / f'{name}.png', theirs / 'HR' / 'x4' / official(sigma, name))
            shutil.copyfile(ours / f'LR_sigma{sigma:.2f}' / f'{name}.png',
                            theirs / 'LRblur' / 'x4' / official(sigma, name))
    return ours, theirs


def test_kernels_of_an_official_set(sets, tmp_path, capsys):
    ours, theirs = sets
    out = theirs / 'kernels_x4'
    if not out.exists():
        assert make_blur_testset.main(['kernels', '--input', str(theirs / 'LRblur' / 'x4'), '--output', str(out)]) == 0
    assert official(SIGMAS[3], 'a') == 'sig2.4000000000000004_a.png'
    for sigma in SIGMAS:
        for name in NAMES:
            stem = official(sigma, name)[:-4]
            assert np.array_equal(
                np.load(out / f'{stem}.npy'), np.load(ours / f'kernels_sigma{sigma:.2f}' / f'{name}.npy'))
            assert (out / f'{stem}.png').is_file()
        names = (out / f'meta_info_sigma{sigma:.2f}.txt').read_text().split()
        assert names == [official(sigma, name) for name in NAMES]
    # names without sig<sigma>_: refused, nothing written
    (tmp_path / 'lr').mkdir()
    shutil.copyfile(ours / 'LR' / f'a_s{SIGMAS[0]:.2f}.png', tmp_path / 'lr' / 'a_s1.80.png')
    assert make_blur_testset.main(['kernels', '--input', str(tmp_path / 'lr'), '--output', str(tmp_path / 'k')]) == 2
    assert 'not named sig<sigma>_<name>' in capsys.readouterr().err and not (tmp_path / 'k').exists()


def _validate(model, opt, data):
    data = dict(data, name='g8', type='PairedImageDataset', io_backend={'type': 'disk'}, phase='test', scale=4)
    loader = build_dataloader(build_dataset(data), data, num_gpu=0, dist=False, sampler=None, seed=0)
    model.validation(loader, 0, None, False)
    return dict(model.metric_results), model.last_kernel_error, len(loader)


def test_dan_test_file_scores_both_namings_alike(sets, tmp_path):
    ours, theirs = sets
    kernels = theirs / 'kernels_x4'
    if not kernels.exists():
        assert make_blur_testset.main(['kernels', '--input',
                                       str(theirs / 'LRblur' / 'x4'), '--output',
                                       str(kernels)]) == 0
    opt = load_like_basicsr(os.path.join(REPO_ROOT, 'options', 'dan', 'test_DANv2_setting1_x4.yml'), tmp_path)
    opt['network_g'].update(TINY_DAN)
    opt['val']['pbar'] = False
    torch.manual_seed(0)
    model = build_model(opt)
    net = model.get_bare_model(model.net_g)
    net.pca_matrix.copy_(torch.linalg.qr(torch.randn(21 * 21, 6))[0])
    # all 8 widths at once: our LR + HR_all + kernels, and the official folders + the kernels mode's output
    mine = _validate(model, opt, {
        'dataroot_gt': ours / 'HR_all',
        'dataroot_lq': ours / 'LR',
        'dataroot_kernel': ours / 'kernels'
    })
    official_set = _validate(model, opt, {
        'dataroot_gt': theirs / 'HR' / 'x4',
        'dataroot_lq': theirs / 'LRblur' / 'x4',
        'dataroot_kernel': kernels
    })
    assert mine[2] == official_set[2] == 16
    for key in ('psnr', 'ssim'):
        assert official_set[0][key] == pytest.approx(mine[0][key], abs=1e-9)
    assert official_set[1] == pytest.approx(mine[1], rel=1e-9) and mine[1] > 0
    # one width: our per-width folders, and the official folders filtered by the meta_info file
    tag = f'{SIGMAS[3]:.2f}'
    mine = _validate(model, opt, {
        'dataroot_gt': ours / 'HR',
        'dataroot_lq': ours / f'LR_sigma{tag}',
        'dataroot_kernel': ours / f'kernels_sigma{tag}'
    })
    official_set = _validate(
        model, opt, {
            'dataroot_gt': theirs / 'HR' / 'x4',
            'dataroot_lq': theirs / 'LRblur' / 'x4',
            'dataroot_kernel': kernels,
            'meta_info_file': kernels / f'meta_info_sigma{tag}.txt'
        })
    assert mine[2] == official_set[2] == 2
    assert official_set[0]['psnr'] == pytest.approx(mine[0]['psnr'], abs=1e-9)
    assert official_set[1] == pytest.approx(mine[1], rel=1e-9)
