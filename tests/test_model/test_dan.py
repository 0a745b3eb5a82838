"""DANv2: blocks, the loop's stop-gradients, kernels and PCA, DANModel training and resuming, bad inputs."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_pairs, run_train, write_yaml
from torch.nn import functional as F

from basicsr.utils.img_process_util import filter2D
from basicsr.utils.matlab_functions import imresize
from d2c_arch import DAN, infer_dan_options
from d2c_arch.dan_arch import DPCB, DPCG, Estimator, Restorer, load_pca_matrix
from d2c_data import degradations
from d2c_utils.errors import UserError

TINY = dict(
    num_feat=8,
    num_group=2,
    num_block=2,
    upscale=4,
    code_length=6,
    kernel_size=11,
    loop=3,
    estimator_feat=8,
    estimator_blocks=2)


def orthonormal(rows, cols, seed=0):
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))[0]


def tiny_dan(seed=0, **overrides):
    torch.manual_seed(seed)
    opt = dict(TINY, **overrides)
    net = DAN(**opt)
    net.pca_matrix.copy_(orthonormal(opt['kernel_size']**2, opt['code_length']))
    return net


# ------------------------------------------------------------------------------ blocks


def test_dpcb_by_hand():
    torch.manual_seed(0)
    block = DPCB(4, 3, 1)
    feat, cond = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 1, 1)
    image = block.image_body[2](F.leaky_relu(block.image_body[0](feat), 0.2))
    gate = block.cond_body[2](F.leaky_relu(block.cond_body[0](cond), 0.2))
    out_feat, out_cond = block(feat, cond)
    assert torch.allclose(out_feat, feat + image * gate, atol=1e-6)  # the 1x1 gate broadcasts over the image
    assert torch.allclose(out_cond, cond + gate, atol=1e-6) and out_cond.shape == (2, 4, 1, 1)


@pytest.mark.parametrize('skip', ['double', 'residual'])
def test_dpcg_group_skip(skip):
    torch.manual_seed(0)
    group = DPCG(4, 2, 3, 3, skip)
    feat, cond = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    chain_feat, chain_cond = group.blocks[1](*group.blocks[0](feat, cond))
    out_feat, out_cond = group(feat, cond)
    if skip == 'double':  # the official code: its blocks update the list they get, so "input + output" is 2 x output
        want = (2 * chain_feat, 2 * chain_cond)
    else:
        want = (feat + chain_feat, cond + chain_cond)
    assert torch.allclose(out_feat, want[0], atol=1e-6) and torch.allclose(out_cond, want[1], atol=1e-6)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_restorer_and_estimator_shapes_and_gradients(scale):
    restorer = Restorer(3, 8, 2, 2, scale, 6)
    estimator = Estimator(3, 8, 2, scale, 11)
    lq = torch.rand(2, 3, 9, 7, requires_grad=True)
    sr = restorer(lq, torch.randn(2, 6))
    assert sr.shape == (2, 3, 9 * scale, 7 * scale)
    kernel = estimator(sr, lq)
    assert kernel.shape == (2, 11, 11) and (kernel >= 0).all()
    assert torch.allclose(kernel.sum((1, 2)), torch.ones(2), atol=1e-5)
    kernel.sum().backward()
    assert all(p.grad is not None for p in estimator.parameters())


def test_parameter_counts_match_the_facts_note():
    counts = {}
    for scale in (2, 3, 4):
        net = DAN(upscale=scale)
        counts[scale] = (sum(p.numel()
                             for p in net.restorer.parameters()), sum(p.numel() for p in net.estimator.parameters()))
    # facts note, section 8 (analytic from the official code): x4 4.71 M (R 4.45 M + E 0.26 M), x3 4.73 M, x2 4.54 M
    assert round(sum(counts[4]) / 1e6, 2) == 4.71 and round(counts[4][0] / 1e6, 2) == 4.45
    assert round(counts[4][1] / 1e6, 2) == 0.26
    assert round(sum(counts[3]) / 1e6, 2) == 4.73 and round(sum(counts[2]) / 1e6, 2) == 4.54
    assert round(sum(p.numel() for p in DAN(code_length=15, kernel_size=31).parameters()) / 1e6, 2) == 4.74


# ------------------------------------------------------------------------------ the loop


def test_loop_codes_and_stop_gradients():
    net = tiny_dan()
    lq = torch.rand(2, 3, 6, 5)
    code0 = net.initial_code(2)
    delta = torch.zeros(11, 11)
    delta[5, 5] = 1
    assert torch.allclose(code0[0], delta.flatten() @ net.pca_matrix)  # c_0 = vec(delta) P
    srs, kernels = net(lq, return_all=True)
    assert len(srs) == len(kernels) == 3
    assert torch.allclose(net.encode(kernels[0]), kernels[0].flatten(1) @ net.pca_matrix)
    assert torch.equal(net(lq), srs[-1])

    def grads(loss):
        net.zero_grad()
        loss.backward()
        return ({n
                 for n, p in net.restorer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0},
                {n
                 for n, p in net.estimator.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})

    srs, kernels = net(lq, return_all=True)
    restorer, estimator = grads(srs[-1].abs().mean())
    assert restorer and not estimator  # the SR loss does not reach the Estimator
    srs, kernels = net(lq, return_all=True)
    target = torch.softmax(torch.randn(2, 121), 1).view(2, 11, 11)  # |k| alone sums to 1: no gradient
    restorer, estimator = grads((kernels[-1] - target).abs().mean())
    assert estimator and not restorer  # the kernel loss does not reach the Restorer


def test_estimate_code_is_the_code_of_the_last_restoration():
    net = tiny_dan().eval()
    lq = torch.rand(1, 3, 6, 6)
    code, kernel = net.estimate_code(lq)
    with torch.no_grad():
        sr, last_kernel = net(lq, return_kernel=True)
        assert torch.allclose(net.restorer(lq, code), sr, atol=1e-6)
    assert torch.allclose(kernel, last_kernel, atol=1e-6)


def test_weights_tell_the_options():
    net = tiny_dan(upscale=3)
    inferred = infer_dan_options(net.state_dict())
    assert inferred == {k: v for k, v in dict(TINY, upscale=3, num_in_ch=3).items() if k != 'loop'}
    assert 'pca_matrix' in net.state_dict()  # the checkpoint carries the PCA matrix


# ------------------------------------------------------------------------ kernels and PCA


def test_setting1_kernels_sum_to_one_with_the_drawn_width():
    kernels, params = degradations.sample_kernels(200, 1, 21, (0.2, 4.0), rng=np.random.default_rng(0))
    assert kernels.shape == (200, 21, 21) and np.allclose(kernels.sum((1, 2)), 1, atol=1e-5)
    assert params[:, 0].min() >= 0.2 and params[:, 0].max() <= 4.0 and params[:, 0].std() > 0.9
    grid = np.arange(21) - 10
    for kernel, sigma in zip(kernels[:50], params[:50, 0]):
        if 0.8 < sigma < 3.0:  # wide enough to be sampled, narrow enough not to be cut by the 21x21 window
            variance = (kernel.sum(0) * grid**2).sum()
            assert abs(np.sqrt(variance) - sigma) < 0.05 * sigma


def test_setting2_kernels_are_anisotropic_and_noisy():
    kernels, params = degradations.sample_kernels(100, 2, 31, (0.6, 5.0), 0.25, rng=np.random.default_rng(1))
    assert (kernels >= 0).all() and np.allclose(kernels.sum((1, 2)), 1, atol=1e-5)
    assert (params[:, :2] >= 0.6).all() and (params[:, :2] <= 5).all() and np.abs(params[:, 2]).max() <= np.pi
    assert not np.allclose(kernels[0], kernels[0].T)  # anisotropic, rotated


def test_degradation_is_blur_then_downscale_then_8_bits():
    hr = torch.rand(2, 3, 24, 20)
    kernels = torch.from_numpy(degradations.sample_kernels(2, 1, 11, rng=np.random.default_rng(2))[0])
    blurred = filter2D(hr, kernels)
    lr = degradations.degrade(hr, kernels, 4, 'decimate')
    assert torch.allclose(lr, (blurred[..., ::4, ::4].clamp(0, 1) * 255).round() / 255)
    lr = degradations.degrade(hr, kernels, 4, 'bicubic', quantize=False)
    assert torch.allclose(lr, imresize(blurred[1], 0.25).clamp(0, 1)[None].expand(2, -1, -1, -1)[1:], atol=1e-6) \
        or torch.allclose(lr[1], imresize(blurred[1], 0.25).clamp(0, 1), atol=1e-6)
    with pytest.raises(UserError, match='not a multiple of the scale 4'):
        degradations.degrade(torch.rand(1, 3, 22, 20), kernels[:1], 4)


def test_pca_round_trip():
    kernels, _ = degradations.sample_kernels(3000, 1, 21, (0.2, 4.0), rng=np.random.default_rng(3))
    matrix, explained = degradations.pca_matrix(kernels, 10)
    assert matrix.shape == (441, 10) and torch.allclose(matrix.T @ matrix, torch.eye(10), atol=1e-5)
    assert (explained[:-1] >= explained[1:]).all() and explained.sum() > 0.99
    held_out = torch.from_numpy(degradations.sample_kernels(100, 1, 21, (0.2, 4.0), rng=np.random.default_rng(4))[0])
    flat = held_out.flatten(1)
    mean = torch.from_numpy(kernels.reshape(3000, -1).mean(0))
    rebuilt = (flat - mean) @ matrix @ matrix.T + mean
    assert (rebuilt - flat).abs().max() < 0.01 * flat.max()


# ------------------------------------------------------------------------------ bad inputs


def test_pca_of_the_wrong_shape_names_both_shapes(tmp_path):
    path = str(tmp_path / 'pca.pth')
    torch.save(orthonormal(441, 10), path)
    with pytest.raises(UserError, match=r'has shape \(441, 10\), the network needs .* = \(121, 6\)'):
        DAN(**dict(TINY, pca_matrix=path))
    torch.save({'pca_matrix': orthonormal(121, 6)}, path)
    assert torch.allclose(DAN(**dict(TINY, pca_matrix=path)).pca_matrix, orthonormal(121, 6))
    torch.save(orthonormal(121, 6)[None], path)  # the official files: (1, l*l, t)
    assert load_pca_matrix(path, 11, 6).shape == (121, 6)
    with pytest.raises(UserError, match='file not found'):
        DAN(**dict(TINY, pca_matrix=str(tmp_path / 'missing.pth')))
    with pytest.raises(UserError, match='no PCA matrix'):
        DAN(**TINY)(torch.rand(1, 3, 4, 4))
    with pytest.raises(UserError, match="unknown option 'nb'|'nb'"):
        DAN(nb=10)


# ------------------------------------------------------------------------ training end to end


def dan_train_opt(root, pca, name='tiny_dan', total_iter=4, **train_overrides):
    train = {
        'ema_decay': 0,
        'total_iter': total_iter,
        'warmup_iter': -1,
        'degradation': {
            'setting': 1,
            'sigma_range': [0.2, 2.0]
        },
        'optim_g': {
            'type': 'Adam',
            'lr': 1e-3,
            'betas': [0.9, 0.99]
        },
        'optim_e': {
            'lr': 5e-4
        },
        'scheduler': {
            'type': 'MultiStepLR',
            'milestones': [2],
            'gamma': 0.5
        },
        'pixel_opt': {
            'type': 'L1Loss'
        },
        'kernel_opt': {
            'type': 'L1Loss'
        },
    }
    train.update(train_overrides)
    return {
        'name': name,
        'model_type': 'DANModel',
        'scale': 4,
        'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {
            'train': {
                'name': 'hr',
                'type': 'HRImageDataset',
                'dataroot_gt': os.path.join(root, 'train', 'HR'),
                'io_backend': {
                    'type': 'disk'
                },
                'gt_size': 24,
                'use_hflip': True,
                'use_rot': True,
                'num_worker_per_gpu': 0,
                'batch_size_per_gpu': 2,
                'dataset_enlarge_ratio': 1,
            },
            'val': {
                'name': 'val',
                'type': 'PairedImageDataset',
                'dataroot_gt': os.path.join(root, 'val', 'HR'),
                'dataroot_lq': os.path.join(root, 'val', 'LR'),
                'dataroot_kernel': os.path.join(root, 'val', 'kernels'),
                'io_backend': {
                    'type': 'disk'
                },
            },
        },
        'network_g': dict(TINY, type='DAN', pca_matrix=pca, loop=2),
        'path': {
            'pretrain_network_g': None,
            'strict_load_g': True,
            'resume_state': None
        },
        'train': train,
        'val': {
            'val_freq': 2,
            'save_img': False,
            'metrics': {
                'psnr': {
                    'type': 'calculate_psnr',
                    'crop_border': 4,
                    'test_y_channel': True
                }
            }
        },
        'logger': {
            'print_freq': 1,
            'save_checkpoint_freq': 2,
            'use_tb_logger': False
        },
    }


@pytest.fixture
def dan_data(tmp_path):
    return make_dan_data(str(tmp_path))


def make_dan_data(folder):
    """HR/LR pairs, the validation kernels and a PCA file under ``folder`` (also used by benchmarks/gpu_check.py)."""
    root = os.path.join(folder, 'data')
    make_pairs(os.path.join(root, 'train'), num=4, hr_size=32, seed=0)
    make_pairs(os.path.join(root, 'val'), num=2, hr_size=32, seed=1)
    os.makedirs(os.path.join(root, 'val', 'kernels'))
    for name in os.listdir(os.path.join(root, 'val', 'LR')):
        np.save(
            os.path.join(root, 'val', 'kernels', name.replace('.png', '.npy')), degradations.isotropic_kernel(1.2, 11))
    kernels, _ = degradations.sample_kernels(500, 1, 11, (0.2, 2.0), rng=np.random.default_rng(0))
    pca = os.path.join(folder, 'pca.pth')
    torch.save({'pca_matrix': degradations.pca_matrix(kernels, 6)[0]}, pca)
    return root, pca


def test_dan_model_trains_validates_and_resumes(tmp_path, dan_data):
    root, pca = dan_data
    yml = write_yaml(tmp_path / 'dan.yml', dan_train_opt(root, pca))
    run_train(tmp_path, yml)
    exp = tmp_path / 'experiments' / 'tiny_dan'
    log = open(next(str(exp / f) for f in os.listdir(exp) if f.endswith('.log'))).read()
    assert 'lr Restorer 0.001, Estimator 0.0005' in log
    assert re.search(r'l_pix: [\d.e+-]+ l_kernel: [\d.e+-]+ kernel_err_1: [\d.e+-]+ kernel_err_2', log)
    assert re.search(r'kernel_err \(mean \|k - k_gt\|, 2 images\) of val: [\d.e+-]+', log)
    ckpt = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)
    assert torch.allclose(ckpt['params']['pca_matrix'], torch.load(pca, weights_only=True)['pca_matrix'])
    state = torch.load(exp / 'training_states' / '4.state', weights_only=False)
    assert [g['lr'] for g in state['optimizers'][0]['param_groups']] == [5e-4, 2.5e-4]  # halved at 2, per group
    assert state['plugin']['kernel_rng']['bit_generator'] == 'PCG64'

    # stop after iteration 2 and resume: same learning rates and kernel sampler state at the end
    resumed = dan_train_opt(root, pca, name='resumed')
    res_exp = tmp_path / 'experiments' / 'resumed'
    import shutil
    shutil.copytree(exp, res_exp)
    for f in os.listdir(res_exp / 'training_states'):
        if f != '2.state':
            os.remove(res_exp / 'training_states' / f)
    for f in os.listdir(res_exp / 'models'):
        if f != 'net_g_2.pth':
            os.remove(res_exp / 'models' / f)
    for f in os.listdir(res_exp):
        if f.endswith('.log'):
            os.remove(res_exp / f)
    run_train(tmp_path, write_yaml(tmp_path / 'resumed.yml', resumed), '--auto_resume')
    log = open(next(str(res_exp / f) for f in os.listdir(res_exp) if f.endswith('.log'))).read()
    assert 'Resuming training from epoch' in log
    again = torch.load(res_exp / 'training_states' / '4.state', weights_only=False)
    assert again['plugin']['kernel_rng'] == state['plugin']['kernel_rng']
    assert [g['lr'] for g in again['optimizers'][0]['param_groups']] == [5e-4, 2.5e-4]


def test_missing_estimator_learning_rate_is_a_clear_error(tmp_path, dan_data):
    root, pca = dan_data
    opt = dan_train_opt(root, pca)
    del opt['train']['optim_e']
    result = run_train(tmp_path, write_yaml(tmp_path / 'no_e.yml', opt), expect=2)
    assert 'train.optim_e.lr is missing' in result.stderr + result.stdout
    opt = dan_train_opt(root, pca)
    del opt['train']['kernel_opt']
    result = run_train(tmp_path, write_yaml(tmp_path / 'no_k.yml', opt), expect=2)
    assert 'train.kernel_opt is missing' in result.stderr + result.stdout


# ---------------------------------------------------------------------------------- d2c-infer


def test_d2c_infer_runs_dan_with_one_kernel_for_all_tiles(tmp_path, capsys):
    import cv2

    from d2c_tools import infer
    net = tiny_dan(loop=2).eval()
    pth = str(tmp_path / 'dan.pth')
    torch.save({'params': net.state_dict()}, pth)
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur((rng.random((20, 24, 3)) * 255).astype(np.uint8), (5, 5), 1.2)
    src = tmp_path / 'in'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), img)
    common = ['-i', str(src), '--model', pth, '--precision', 'fp32', '--no-channels-last', '-q', '--save-kernel']
    assert infer.main(common + ['-o', str(tmp_path / 'guess')]) == 0  # no --opt: loop and group skip assumed
    assert 'loop=4 and group_skip=double assumed' in capsys.readouterr().err
    opt = str(tmp_path / 'dan.yml')
    write_yaml(opt, {'network_g': dict(TINY, type='DAN', loop=2)})
    common += ['--opt', opt]
    assert infer.main(common + ['-o', str(tmp_path / 'whole')]) == 0
    assert infer.main(common + ['-o', str(tmp_path / 'tiled'), '--tile', '8', '--tile-pad', '8']) == 0
    lq = torch.from_numpy(img[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255).unsqueeze(0).contiguous()
    with torch.no_grad():
        sr, kernel = net(lq, return_kernel=True)
    want = (sr[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8)
    whole = cv2.imread(str(tmp_path / 'whole' / 'a_out.png'))
    assert np.abs(whole.astype(int) - want.astype(int)).max() <= 1  # untiled: exactly net(lq)
    assert np.allclose(np.load(tmp_path / 'whole' / 'a_kernel.npy'), kernel[0].numpy(), atol=1e-6)
    assert np.array_equal(np.load(tmp_path / 'tiled' / 'a_kernel.npy'), np.load(tmp_path / 'whole' / 'a_kernel.npy'))
    tiled = cv2.imread(str(tmp_path / 'tiled' / 'a_out.png'))
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1  # every tile restored with the same kernel
    assert cv2.imread(str(tmp_path / 'whole' / 'a_kernel.png')).shape[:2] == (88, 88)
    assert infer.main(common + ['-o', str(tmp_path / 'x'), '--save-branches']) == 2


@pytest.mark.slow
def test_dan_model_trains_distributed_on_cpu(tmp_path, dan_data):
    """Two gloo processes; only rank 0 validates, so validation must not go through DDP's forward."""
    root, pca = dan_data
    opt = dan_train_opt(root, pca, name='dist_dan')
    opt['dist_params'] = {'backend': 'gloo', 'port': 29000 + os.getpid() % 1000}
    yml = write_yaml(tmp_path / 'dist.yml', opt)
    result = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port',
        str(opt['dist_params']['port']), '-m', 'd2c_tools.train', '-opt', yml, '--launcher', 'pytorch'
    ],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'dist_dan'
    log = open(next(str(exp / f) for f in os.listdir(exp) if f.endswith('.log'))).read()
    assert 'world_size: 2' in log and 'End of training' in log
    assert re.search(r'kernel_err \(mean \|k - k_gt\|, 2 images\) of val', log)
