"""SDFlow: flow layers, the architecture, the unpaired data set and SDFlowModel training."""
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TESTS_DIR, make_pairs, read_log, run_train, write_yaml

from d2c_arch import SDFlow, infer_sdflow_options
from d2c_arch import flow_util as fu
from d2c_arch.sdflow_arch import MixturePrior
from d2c_utils.errors import UserError

TINY = dict(
    num_feat=8,
    hidden_channels=8,
    flow_steps=2,
    hf_steps=2,
    hf_blocks=1,
    deg_steps=2,
    deg_blocks=1,
    encoder_blocks=1,
    encoder_mod_convs=1,
    mixture_components=4)


def randomise(module, seed=0):
    """Random values for the zero-initialised convolutions and the ActNorms, so no layer is the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, fu.ZeroConv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype) * 0.05
            m.bias.data = torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.05
            m.log_gain.data = torch.randn(m.log_gain.shape, generator=gen, dtype=m.log_gain.dtype) * 0.1
        if isinstance(m, fu.ActNorm):
            m.bias.data = torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype) * 0.3
            m.log_scale.data = torch.randn(m.log_scale.shape, generator=gen, dtype=m.log_scale.dtype) * 0.3
            m.initialized.fill_(1)
        if isinstance(m, fu.InvConv1x1):  # away from a rotation, whose log-determinant is 0
            m.log_s.data += torch.randn(m.log_s.shape, generator=gen, dtype=m.log_s.dtype) * 0.2
    return module


def tiny_net(**kw):
    torch.manual_seed(0)
    return randomise(SDFlow(**dict(TINY, **kw)).double()).eval()


def autograd_logdet(fn, z):
    """log|det J| of fn at z (one image), by the full Jacobian."""
    jac = torch.autograd.functional.jacobian(lambda flat: fn(flat.view_as(z)).flatten(), z.flatten())
    return torch.linalg.slogdet(jac)[1]


# ---------------------------------------------------------------------------------- flow layers

LAYERS = {
    'actnorm': lambda: fu.ActNorm(4),
    'invconv': lambda: fu.InvConv1x1(4),
    'coupling': lambda: fu.AffineCoupling(4, 0, 8),
    'coupling_cond': lambda: fu.AffineCoupling(4, 3, 8),
    'injector': lambda: fu.AffineInjector(4, 3, 8),
    'step_cond': lambda: fu.FlowStep(4, 3, 8),
    'transition': lambda: fu.transition(4),
    'squeeze': lambda: fu.CheckerboardSqueeze(),
}
CONDITIONAL = {'coupling_cond', 'injector', 'step_cond'}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_each_layer_inverts_exactly_and_its_logdet_is_the_jacobians(name):
    torch.manual_seed(1)
    layer = randomise(LAYERS[name]().double()).eval()
    z = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    cond = torch.randn(1, 3, 4, 4, dtype=torch.float64) if name in CONDITIONAL else None
    out, logdet = layer(z, torch.zeros(1, dtype=torch.float64), cond)
    back, logdet_back = layer(out, logdet, cond, reverse=True)
    assert torch.allclose(back, z, atol=1e-12)
    assert abs(float(logdet_back.detach())) < 1e-10  # the reverse subtracts what the forward added
    want = autograd_logdet(lambda x: layer(x, None, cond)[0], z)
    assert float(logdet.detach()) == pytest.approx(float(want), abs=1e-9)
    if name != 'squeeze':
        assert abs(float(logdet.detach())) > 1e-3  # a layer that is not the identity


def test_squeeze_is_the_checkerboard_layout_and_rejects_odd_sides():
    z = torch.arange(2 * 4 * 6, dtype=torch.float64).view(1, 2, 4, 6)
    out, _ = fu.CheckerboardSqueeze()(z)
    # channel 4c + 2dy + dx holds pixel (2i + dy, 2j + dx) of channel c
    for c in range(2):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(out[0, 4 * c + 2 * dy + dx], z[0, c, dy::2, dx::2])
    with pytest.raises(ValueError, match='even height and width, got 5x4'):
        fu.CheckerboardSqueeze()(torch.zeros(1, 1, 4, 5))


def test_coupling_scale_is_bounded_and_the_last_conditional_step_has_no_coupling():
    raw = torch.linspace(-1e4, 1e4, 101)
    assert fu.bounded_scale(raw).abs().max() < 0.5
    assert not any(isinstance(m, fu.AffineCoupling) for m in fu.FlowStep(4, 3, 8, coupling=False))
    net = SDFlow(**TINY)
    assert not any(isinstance(m, fu.AffineCoupling) for m in net.hr_flow.hf_flow.steps[-1])
    assert any(isinstance(m, fu.AffineCoupling) for m in net.hr_flow.hf_flow.steps[0])


def test_actnorm_initialises_from_the_first_training_batch_only():
    torch.manual_seed(0)
    z = torch.randn(8, 3, 5, 5) * torch.tensor([2.0, 0.5, 1.0]).view(1, 3, 1, 1) + 3
    layer = fu.ActNorm(3).eval()
    out, _ = layer(z)
    assert torch.equal(out, z) and not layer.initialized  # eval mode never initialises
    layer.train()
    out, _ = layer(z)
    assert layer.initialized
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    before = layer.bias.detach().clone()
    layer(z * 5)
    assert torch.equal(layer.bias, before)  # only once


ACTNORM_WORKER = r'''
import sys, torch, torch.distributed as dist
from d2c_arch.flow_util import ActNorm
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
batch = torch.randn(6, 4, 5, 5) * torch.arange(1, 5).view(1, 4, 1, 1) + torch.arange(4).view(1, 4, 1, 1)
layer = ActNorm(4).train()
layer(batch[rank * 3:(rank + 1) * 3])
torch.save({'bias': layer.bias.detach(), 'log_scale': layer.log_scale.detach()}, sys.argv[1] + f'/rank{rank}.pth')
dist.destroy_process_group()
'''


def test_actnorm_initialisation_agrees_between_one_process_and_two_gloo_ranks(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(ACTNORM_WORKER)
    port = str(29500 + os.getpid() % 1000)
    result = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port', port,
        str(script),
        str(tmp_path)
    ],
                            capture_output=True,
                            text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    batch = torch.randn(6, 4, 5, 5) * torch.arange(1, 5).view(1, 4, 1, 1) + torch.arange(4).view(1, 4, 1, 1)
    single = fu.ActNorm(4).train()
    single(batch)
    for rank in range(2):
        got = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        assert torch.allclose(got['bias'], single.bias.detach(), atol=1e-6)
        assert torch.allclose(got['log_scale'], single.log_scale.detach(), atol=1e-6)


def test_mixture_prior_log_density_by_hand():
    prior = MixturePrior(2)
    prior.means.data = torch.tensor([-1.0, 2.0])
    prior.log_stds.data = torch.tensor([0.0, math.log(0.5)])
    u = torch.tensor([[0.3, -1.5], [2.2, 0.0]]).view(1, 1, 2, 2)

    def normal(x, mu, sigma):
        return math.exp(-0.5 * ((x - mu) / sigma)**2) / (sigma * math.sqrt(2 * math.pi))

    want = sum(math.log(0.5 * normal(x, -1.0, 1.0) + 0.5 * normal(x, 2.0, 0.5)) for x in (0.3, -1.5, 2.2, 0.0))
    assert float(prior.log_prob(u).detach()) == pytest.approx(want, abs=1e-5)
    # per element: the sample's components differ between elements; per image one component for all
    gen = torch.Generator().manual_seed(0)
    image = prior.sample((3, 1, 4, 4), 0.0, gen, mode='image')
    assert all(len(torch.unique(image[i])) == 1 for i in range(3))
    element = prior.sample((3, 1, 4, 4), 0.0, gen, mode='element')
    assert set(torch.unique(element).tolist()) == {-1.0, 2.0}


# ---------------------------------------------------------------------------------- architecture


def test_parameter_counts_match_the_official_modules():
    net = SDFlow()

    def count(module):
        return sum(p.numel() for p in module.parameters())

    sr_path = count(net.hr_flow) + count(net.lr_encoder)
    ds_path = count(net.hr_flow) + count(net.lr_flow) + count(net.deg_flow)
    assert round(sr_path / 1e6, 2) == 10.05
    assert round(ds_path / 1e6, 2) == 12.32
    assert round(count(net) / 1e6, 2) == 14.10
    assert sum(p.numel() for p in SDFlow(downscaler=False).parameters()) == sr_path
    assert infer_sdflow_options(net.state_dict()) == {
        'num_feat': 64,
        'hidden_channels': 64,
        'flow_steps': 16,
        'hf_steps': 8,
        'hf_blocks': 8,
        'encoder_blocks': 16,
        'encoder_mod_convs': 8,
        'downscaler': True,
        'deg_steps': 8,
        'deg_blocks': 4,
        'mixture_components': 16
    }


def test_whole_flows_invert_and_the_hr_logdet_is_the_jacobians():
    net = tiny_net()
    torch.manual_seed(2)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1
    z, logdet = net.hr_flow.levels(x, torch.zeros(1, dtype=torch.float64))
    assert z.shape == (1, 48, 2, 2)
    back, _ = net.hr_flow.levels(z, None, reverse=True)
    assert torch.allclose(back, x, atol=1e-10)
    assert float(logdet.detach()) == pytest.approx(
        float(autograd_logdet(lambda v: net.hr_flow.levels(v)[0], x)), abs=1e-7)
    # the HF flow given the content, and the whole HR flow through decode with the encoded latent
    content, z_h = z[:, :3], z[:, 3:]
    u_h, _ = net.hr_flow.hf_flow(z_h, None, content)
    z_h_back, _ = net.hr_flow.hf_flow(u_h, None, content, reverse=True)
    assert torch.allclose(z_h_back, z_h, atol=1e-10)
    # LR flow (keeps the shape) and degradation flow (latent squeezed once)
    y = torch.rand(2, 3, 4, 6, dtype=torch.float64) * 2 - 1
    z_y, _ = net.lr_flow(y)
    assert z_y.shape == y.shape
    assert torch.allclose(net.lr_flow(z_y, None, reverse=True)[0], y, atol=1e-10)
    u_d, _ = net.deg_flow.flow(y, None, z_y)
    assert u_d.shape == (2, 12, 2, 3)
    assert torch.allclose(net.deg_flow.flow(u_d, None, z_y, reverse=True)[0], y, atol=1e-10)


def test_log_prob_is_the_change_of_variables_density():
    net = tiny_net()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    content, log_p = net.hr_log_prob(x)
    z, logdet = net.hr_flow.levels(x, torch.zeros(2, dtype=torch.float64))
    u_h, logdet = net.hr_flow.hf_flow(z[:, 3:], logdet, z[:, :3])
    normal = -0.5 * (u_h**2 + math.log(2 * math.pi))
    assert torch.allclose(log_p, logdet + normal.flatten(1).sum(1), atol=1e-9)
    assert torch.equal(content, z[:, :3])
    y = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    c = net.lr_encoder(y)
    z_y, ld_lr = net.lr_flow(y, torch.zeros(2, dtype=torch.float64))
    u_d, ld_deg = net.deg_flow.flow(z_y - c, torch.zeros(2, dtype=torch.float64), c)
    want = net.deg_flow.prior.log_prob(u_d) + ld_deg + ld_lr
    assert torch.allclose(net.lr_log_prob(y, c), want, atol=1e-9)


def test_sampling_temperature_zero_is_deterministic_and_positive_temperatures_vary():
    net = tiny_net()
    lq = torch.rand(1, 3, 6, 5, dtype=torch.float64)
    sr0 = net(lq, temperature=0)
    assert sr0.shape == (1, 3, 24, 20) and 0 <= sr0.min() and sr0.max() <= 1
    state = torch.get_rng_state()
    assert torch.equal(net(lq, temperature=0.0), sr0)
    assert torch.equal(torch.get_rng_state(), state)  # temperature 0 draws nothing
    a = net.super_resolve(lq, 0.8, torch.Generator().manual_seed(1))
    b = net.super_resolve(lq, 0.8, torch.Generator().manual_seed(1))
    c = net.super_resolve(lq, 0.8, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    hr = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    d1 = net.downscale(hr, 0.5, torch.Generator().manual_seed(3))
    d2 = net.downscale(hr, 0.5, torch.Generator().manual_seed(3))
    assert d1.shape == (2, 3, 4, 6) and torch.equal(d1, d2)
    # sides that are multiples of 4 but not of 8: padded inside, cropped back
    assert net.downscale(torch.rand(1, 3, 20, 12, dtype=torch.float64), 0.5).shape == (1, 3, 5, 3)


def test_bad_inputs_get_clear_messages():
    net = tiny_net()
    with pytest.raises(UserError, match=r'HR image is 18x16; SDFlow needs both sides to be multiples of 4'):
        net.downscale(torch.rand(1, 3, 16, 18, dtype=torch.float64))
    with pytest.raises(UserError, match='x4 only'):
        SDFlow(upscale=2)
    with pytest.raises(UserError, match="SDFlow has no option 'num_blocks'"):
        SDFlow(num_blocks=3)
    with pytest.raises(UserError, match='downscaler: false'):
        SDFlow(downscaler=False, **TINY).downscale(torch.rand(1, 3, 16, 16))
    with pytest.raises(UserError, match='mixture_sampling'):
        SDFlow(mixture_sampling='pixel')


def test_flows_run_in_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    net = randomise(SDFlow(**TINY)).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.autocast('cpu', torch.bfloat16):
        content, log_p = net.hr_log_prob(x)
    assert content.dtype == torch.float32 and log_p.dtype == torch.float32
    ref_content, ref_log_p = net.hr_log_prob(x)
    assert torch.allclose(content, ref_content, atol=0.05)
    # the exact parts (1x1 inverse, affine maps) stay exact: invert at fp32 what bf16 encoded
    z, _ = net.hr_flow.levels(x)
    with torch.autocast('cpu', torch.bfloat16):
        back, _ = net.hr_flow.levels(z, None, reverse=True)
    assert (back - x).abs().max() < 0.05


# ---------------------------------------------------------------------------------- data


def test_unpaired_dataset_draws_independent_crops_and_reads_lmdb_like_folders(tmp_path):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    from d2c_data import UnpairedImageDataset
    lr_dir = make_pairs(str(tmp_path / 'a'), num=3, hr_size=64, seed=0)[1]
    hr_dir = make_pairs(str(tmp_path / 'b'), num=5, hr_size=48, seed=1)[0]
    (tmp_path / 'b' / 'HR' / 'notes.txt').write_text('not an image')  # no image suffix: left out
    opt = {
        'name': 'u',
        'dataroot_lq': lr_dir,
        'dataroot_gt': hr_dir,
        'io_backend': {
            'type': 'disk'
        },
        'gt_size': 32,
        'scale': 4
    }
    ds = UnpairedImageDataset(opt)
    assert len(ds) == 5
    item = ds[0]
    assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 8, 8)
    assert 0 <= item['lq'].min() and item['gt'].max() <= 1

    lmdb = {}
    for key, folder in (('lq', lr_dir), ('gt', hr_dir)):
        names = sorted(f for f in os.listdir(folder) if f.endswith('.png'))
        lmdb[key] = str(tmp_path / f'{key}.lmdb')
        make_lmdb_from_imgs(folder, lmdb[key], names, [n[:-4] for n in names], map_size=1 << 24)
    lmdb_ds = UnpairedImageDataset(
        dict(opt, dataroot_lq=lmdb['lq'], dataroot_gt=lmdb['gt'], io_backend={'type': 'lmdb'}))
    for index in range(5):  # same random state -> the same crops from either source
        import random
        random.seed(index)
        a = ds[index]
        random.seed(index)
        b = lmdb_ds[index]
        assert torch.equal(a['gt'], b['gt']) and torch.equal(a['lq'], b['lq'])


def test_unpaired_dataset_bad_inputs(tmp_path):
    from d2c_data import UnpairedImageDataset
    hr_dir, lr_dir = make_pairs(str(tmp_path), num=2, hr_size=32)
    opt = {'name': 'u', 'dataroot_lq': lr_dir, 'dataroot_gt': hr_dir, 'io_backend': {'type': 'disk'}, 'gt_size': 36}
    with pytest.raises(UserError, match='gt_size=36 must be a multiple of 8'):
        UnpairedImageDataset(opt)
    with pytest.raises(UserError, match='dataroot_lq is missing'):
        UnpairedImageDataset(dict(opt, dataroot_lq=None))
    with pytest.raises(UserError, match='holds no images'):
        UnpairedImageDataset(dict(opt, dataroot_lq=str(_empty(tmp_path)), gt_size=16))
    with open(os.path.join(hr_dir, 'broken.png'), 'wb') as f:
        f.write(b'not a png')
    ds = UnpairedImageDataset(dict(opt, gt_size=16))
    with pytest.raises(UserError, match=r'broken.png(: not a PNG file| is not a readable image)'):
        for i in range(len(ds)):
            ds[i]
    os.remove(os.path.join(hr_dir, 'broken.png'))
    with pytest.raises(UserError, match='smaller than the 64x64 crop'):
        UnpairedImageDataset(dict(opt, gt_size=64, lq_size=4))[0]
    with pytest.raises(UserError, match='is 8x8, smaller than the 16x16 crop; lower lq_size'):
        UnpairedImageDataset(dict(opt, gt_size=64))[0]


def _empty(tmp_path):
    path = tmp_path / 'empty'
    path.mkdir(exist_ok=True)
    return path


# ---------------------------------------------------------------------------------- training


def sdflow_train_opt(root, name='tiny_sdflow', iters=30, **train):
    return {
        'name':
        name,
        'model_type':
        'SDFlowModel',
        'scale':
        4,
        'num_gpu':
        0,
        'manual_seed':
        0,
        'datasets': {
            'train': {
                'name': 'unpaired',
                'type': 'UnpairedImageDataset',
                'dataroot_lq': os.path.join(root, 'lr_src', 'LR'),
                'dataroot_gt': os.path.join(root, 'hr_src', 'HR'),
                'io_backend': {
                    'type': 'disk'
                },
                'gt_size': 32,
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
                'io_backend': {
                    'type': 'disk'
                },
            },
        },
        'network_g':
        dict(TINY, type='SDFlow'),
        'network_d': {
            'type': 'UNetDiscriminatorSN',
            'num_in_ch': 3,
            'num_feat': 8
        },
        'path': {
            'pretrain_network_g': None,
            'strict_load_g': True,
            'resume_state': None
        },
        'train':
        dict(
            {
                'optim_g': {
                    'type': 'Adam',
                    'lr': 1e-3
                },
                'optim_d': {
                    'type': 'Adam',
                    'lr': 1e-4
                },
                'scheduler': {
                    'type': 'MultiStepLR',
                    'milestones': [1000],
                    'gamma': 0.5
                },
                'total_iter': iters,
                'warmup_iter': -1,
                'nll_hr_weight': 1.0,
                'nll_lr_weight': 1.0,
                'content_opt': {
                    'type': 'L1Loss',
                    'loss_weight': 0.5
                },
                'fidelity_opt': {
                    'type': 'L1Loss',
                    'loss_weight': 1.0
                },
                'cycle_opt': {
                    'type': 'L1Loss',
                    'loss_weight': 1.0
                },
                'gan_opt': {
                    'type': 'GANLoss',
                    'gan_type': 'lsgan',
                    'loss_weight': 0.05
                },
                'grad_clip': 1.0,
            }, **train),
        'val': {
            'val_freq': iters,
            'save_img': False,
            'temperature': 0.0,
            'metrics': {
                'psnr': {
                    'type': 'calculate_psnr',
                    'crop_border': 4,
                    'test_y_channel': True
                }
            }
        },
        'logger': {
            'print_freq': 5,
            'save_checkpoint_freq': 10,
            'use_tb_logger': False
        },
    }


@pytest.fixture
def unpaired_data(tmp_path):
    root = str(tmp_path / 'data')
    make_pairs(os.path.join(root, 'lr_src'), num=4, hr_size=64, seed=0)
    make_pairs(os.path.join(root, 'hr_src'), num=4, hr_size=64, seed=1)
    make_pairs(os.path.join(root, 'val'), num=2, hr_size=32, seed=2)
    return root


def test_tiny_unpaired_training_lowers_the_nll_validates_and_resumes(tmp_path, unpaired_data):
    yml = write_yaml(tmp_path / 'sdflow.yml', sdflow_train_opt(unpaired_data))
    run_train(tmp_path, yml)
    exp = tmp_path / 'experiments' / 'tiny_sdflow'
    log = read_log(exp)
    assert 'objective nll_hr x1.0 + nll_lr x1.0 + content + fidelity + cycle + gan' in log
    bpd = [(float(a), float(b)) for a, b in re.findall(r'bpd_hr: ([\d.e+-]+) bpd_lr: ([\d.e+-]+)', log)]
    assert len(bpd) == 6
    assert bpd[-1][0] < bpd[0][0] - 0.3  # bits/dim of the HR likelihood fall
    assert all(0 < hr < 8.5 and 0 < lr < 8.5 for hr, lr in bpd)
    assert re.search(r'# psnr: [\d.]+', log)
    ckpt = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert all(int(v) == 1 for k, v in ckpt.items() if k.endswith('initialized'))
    assert os.path.isfile(exp / 'models' / 'net_d_latest.pth')
    final = torch.load(exp / 'models' / 'net_g_30.pth', weights_only=True)['params']

    # resume from iteration 20: the noise generator and the weights continue as if never stopped
    res_exp = tmp_path / 'experiments' / 'resumed'
    shutil.copytree(exp, res_exp)
    for sub, keep in (('training_states', {'20.state'}), ('models', {'net_g_20.pth', 'net_d_20.pth'})):
        for f in os.listdir(res_exp / sub):
            if f not in keep:
                os.remove(res_exp / sub / f)
    for f in os.listdir(res_exp):
        if f.endswith('.log'):
            os.remove(res_exp / f)
    run_train(tmp_path, write_yaml(tmp_path / 'resumed.yml', sdflow_train_opt(unpaired_data, name='resumed')),
              '--auto_resume')
    assert 'Resuming training from epoch' in read_log(res_exp)
    state = torch.load(exp / 'training_states' / '30.state', weights_only=False)
    again = torch.load(res_exp / 'training_states' / '30.state', weights_only=False)
    assert torch.equal(again['plugin']['noise_rng'], state['plugin']['noise_rng'])
    resumed = torch.load(res_exp / 'models' / 'net_g_30.pth', weights_only=True)['params']
    # the data loader's crops are drawn by Python's random, which BasicSR does not save: weights differ
    # slightly, but every ActNorm stays as loaded (no re-initialisation on resume)
    for k, v in resumed.items():
        if k.endswith('initialized'):
            assert int(v) == 1
    assert set(resumed) == set(final)


def test_training_option_errors_are_clear(tmp_path, unpaired_data):
    opt = sdflow_train_opt(unpaired_data, iters=2)
    opt['scale'] = 2
    result = run_train(tmp_path, write_yaml(tmp_path / 'a.yml', opt), expect=2)
    assert 'SDFlow is x4 only' in result.stdout + result.stderr
    opt = sdflow_train_opt(unpaired_data, iters=2)
    del opt['network_d']
    result = run_train(tmp_path, write_yaml(tmp_path / 'b.yml', opt), expect=2)
    assert 'network_d is missing' in result.stdout + result.stderr
    opt = sdflow_train_opt(unpaired_data, iters=2)
    opt['network_g']['downscaler'] = False
    result = run_train(tmp_path, write_yaml(tmp_path / 'c.yml', opt), expect=2)
    assert 'training needs the LR and degradation flows' in result.stdout + result.stderr


def test_bf16_training_runs_and_keeps_float32_finite_weights(tmp_path, unpaired_data):
    opt = sdflow_train_opt(unpaired_data, name='bf16', iters=4, precision='bf16', nonfinite='skip')
    opt['logger']['print_freq'] = 2
    run_train(tmp_path, write_yaml(tmp_path / 'bf16.yml', opt))
    exp = tmp_path / 'experiments' / 'bf16'
    log = read_log(exp)
    assert 'bpd_hr' in log and 'End of training' in log
    ckpt = torch.load(exp / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert all(v.dtype in (torch.float32, torch.uint8) for v in ckpt.values())
    assert all(torch.isfinite(v.float()).all() for v in ckpt.values())


@pytest.mark.slow
def test_sdflow_trains_distributed_on_cpu(tmp_path, unpaired_data):
    """Two gloo ranks: ActNorm initialised across ranks, one DDP forward per step, rank 0 validates."""
    opt = sdflow_train_opt(unpaired_data, name='dist_sdflow', iters=6)
    opt['dist_params'] = {'backend': 'gloo', 'port': 29000 + os.getpid() % 1000}
    yml = write_yaml(tmp_path / 'dist.yml', opt)
    dump = tmp_path / 'dump'
    dump.mkdir()
    result = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port',
        str(opt['dist_params']['port']),
        os.path.join(TESTS_DIR, 'dist_worker.py'),
        str(dump), '-opt', yml, '--launcher', 'pytorch'
    ],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = read_log(tmp_path / 'experiments' / 'dist_sdflow')
    assert 'world_size: 2' in log and 'End of training' in log
    rank0, rank1 = (torch.load(dump / f'rank{r}.pth', weights_only=True) for r in range(2))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # same init, same all-reduced gradients


def test_sdflow_runs_through_basicsr_test_code(tmp_path):
    """Stock BasicSR code calls net(lq): SDFlow super-resolves at its default temperature."""
    from basicsr.archs import build_network
    net = build_network(dict(TINY, type='SDFlow', temperature=0.0)).eval()
    lq = torch.from_numpy(cv2.GaussianBlur(np.random.default_rng(0).random((12, 10, 3)).astype(np.float32), (3, 3),
                                           1)).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert torch.equal(net(lq), net.super_resolve(lq, 0.0))


# ---------------------------------------------------------------------------------- inference and pairs


@pytest.fixture
def tiny_checkpoint(tmp_path):
    net = tiny_net().float()
    path = str(tmp_path / 'sdflow.pth')
    torch.save({'params': net.state_dict()}, path)
    return net, path


def test_d2c_infer_writes_samples_mean_and_spread_and_downscales(tmp_path, tiny_checkpoint, capsys):
    from d2c_tools import infer
    net, pth = tiny_checkpoint
    hr_dir, lr_dir = make_pairs(str(tmp_path / 'data'), num=2, hr_size=32)
    common = ['--model', pth, '--precision', 'fp32', '--no-channels-last', '-q']
    assert infer.main(['-i', lr_dir, '-o', str(tmp_path / 'sr')] + common + ['--samples', '3', '--seed', '5']) == 0
    out = sorted(os.listdir(tmp_path / 'sr'))
    assert out == sorted(f'img{i}_{k}.png' for i in range(2)
                         for k in ('sample1', 'sample2', 'sample3', 'mean', 'spread'))
    lq = torch.from_numpy(cv2.imread(os.path.join(lr_dir, 'img0.png'))[..., ::-1].astype(np.float32) / 255)
    lq = lq.permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():  # sample i is seed + i - 1 at the checkpoint's temperature, as net.super_resolve draws it
        want = [net.super_resolve(lq, 0.8, torch.Generator().manual_seed(5 + i)) for i in range(3)]
    for i, sr in enumerate(want):
        got = cv2.imread(str(tmp_path / 'sr' / f'img0_sample{i + 1}.png'))[..., ::-1].astype(int)
        assert np.abs(got - (sr[0].numpy().transpose(1, 2, 0) * 255).round().astype(int)).max() <= 1
    mean = cv2.imread(str(tmp_path / 'sr' / 'img0_mean.png'))[..., ::-1].astype(float)
    stack = torch.stack(want).mean(0)[0].numpy().transpose(1, 2, 0) * 255
    assert np.abs(mean - stack).max() <= 1
    assert 'spread (per-pixel std) mean' in capsys.readouterr().err
    # temperature 0: one deterministic image, equal to net(lq, temperature=0)
    assert infer.main(['-i', lr_dir, '-o', str(tmp_path / 't0')] + common + ['--temperature', '0']) == 0
    got = cv2.imread(str(tmp_path / 't0' / 'img0_out.png'))[..., ::-1].astype(int)
    with torch.no_grad():
        want0 = (net(lq, temperature=0)[0].numpy().transpose(1, 2, 0) * 255).round().astype(int)
    assert np.abs(got - want0).max() <= 1
    # downscaling: LR samples of the HR photos, x4 smaller
    assert infer.main(['-i', hr_dir, '-o', str(tmp_path / 'ds'), '--downscale', '--samples', '2'] + common) == 0
    assert cv2.imread(str(tmp_path / 'ds' / 'img1_lr2.png')).shape == (8, 8, 3)
    # an HR photo whose sides are not multiples of 4 is skipped with the reason, nothing written for it
    odd = tmp_path / 'odd'
    odd.mkdir()
    cv2.imwrite(str(odd / 'bad.png'), np.zeros((30, 33, 3), np.uint8))
    assert infer.main(['-i', str(odd), '-o', str(tmp_path / 'odd_out'), '--downscale'] + common) == 1
    assert 'bad.png is 33x30; downscaling x4 needs both sides to be multiples of 4' in capsys.readouterr().err
    assert not os.listdir(tmp_path / 'odd_out')
    # refusals
    assert infer.main(['-i', lr_dir, '-o', str(tmp_path / 'x'), '--save-branches'] + common) == 2
    # the exported SDFlow (ONNX Runtime) draws the same samples from the same seed
    if importlib.util.find_spec('onnxruntime') and importlib.util.find_spec('onnxscript'):
        args = ['-i', lr_dir, '-o', str(tmp_path / 'ort'), '--backend', 'onnxruntime', '--cache-dir', '']
        assert infer.main(args + common + ['--samples', '3', '--seed', '5']) == 0
        for name in out:
            if not name.endswith('_spread.png'):  # a heatmap scaled to its own maximum
                want_img = cv2.imread(str(tmp_path / 'sr' / name)).astype(int)
                assert np.abs(cv2.imread(str(tmp_path / 'ort' / name)).astype(int) - want_img).max() <= 1, name
    with pytest.raises(SystemExit):
        infer.main(['-i', lr_dir, '-o', str(tmp_path / 'x'), '--samples', '0'] + common)


def test_make_sdflow_pairs_writes_folders_and_lmdb_all_or_nothing(tmp_path, tiny_checkpoint):
    net, pth = tiny_checkpoint
    hr_dir, _ = make_pairs(str(tmp_path / 'data'), num=2, hr_size=36)  # 36: mod-cropped as is, padded inside
    script = os.path.join(REPO_ROOT, 'scripts', 'make_sdflow_pairs.py')
    out = tmp_path / 'pairs'

    def run(*args):
        return subprocess.run([sys.executable, script, '--model', pth, '-q', *args],
                              capture_output=True,
                              text=True,
                              timeout=120)

    result = run('-i', hr_dir, '-o', str(out), '--samples', '2', '--lmdb', '--temperature', '0.5')
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(out / 'LR')) == ['img0_s0.png', 'img0_s1.png', 'img1_s0.png', 'img1_s1.png']
    assert cv2.imread(str(out / 'LR' / 'img0_s1.png')).shape == (9, 9, 3)
    assert cv2.imread(str(out / 'HR' / 'img0_s1.png')).shape == (36, 36, 3)
    hr = torch.from_numpy(cv2.imread(str(out / 'HR' / 'img0_s0.png'))[..., ::-1].astype(np.float32) / 255)
    with torch.no_grad():
        want = net.downscale(hr.permute(2, 0, 1)[None].contiguous(), 0.5, torch.Generator().manual_seed(1))
    got = cv2.imread(str(out / 'LR' / 'img0_s1.png'))[..., ::-1].astype(int)
    assert np.abs(got - (want[0].numpy().transpose(1, 2, 0) * 255).round().astype(int)).max() <= 1
    from basicsr.data.data_util import paths_from_lmdb
    assert sorted(paths_from_lmdb(str(out / 'LR.lmdb'))) == ['img0_s0', 'img0_s1', 'img1_s0', 'img1_s1']
    # the D2C option files read the pairs as they are
    from basicsr.data.paired_image_dataset import PairedImageDataset
    ds = PairedImageDataset({
        'dataroot_gt': str(out / 'HR.lmdb'),
        'dataroot_lq': str(out / 'LR.lmdb'),
        'io_backend': {
            'type': 'lmdb'
        },
        'phase': 'val',
        'scale': 4,
        'filename_tmpl': '{}'
    })
    assert ds[0]['lq'].shape == (3, 9, 9)
    # an unreadable image stops the run and leaves nothing behind; --skip-bad skips it
    with open(os.path.join(hr_dir, 'zz.png'), 'wb') as f:
        f.write(b'junk')
    result = run('-i', hr_dir, '-o', str(tmp_path / 'bad'))
    assert result.returncode == 2 and 'zz.png is not a readable image' in result.stderr
    assert not any(p.name.startswith('bad') for p in tmp_path.iterdir())
    result = run('-i', hr_dir, '-o', str(tmp_path / 'skip'), '--skip-bad')
    assert result.returncode == 0 and len(os.listdir(tmp_path / 'skip' / 'LR')) == 2
    assert run('-i', hr_dir, '-o', str(out)).returncode == 2  # never overwrites
    assert run('--help').returncode == 0


def test_sdflow_option_files_build():
    import glob

    import yaml

    from basicsr.archs import build_network
    from basicsr.losses import build_loss
    from basicsr.utils.registry import MODEL_REGISTRY
    files = sorted(glob.glob(os.path.join(REPO_ROOT, 'options', 'sdflow', '*.yml')))
    assert len(files) == 2
    for path in files:
        with open(path) as f:
            opt = yaml.safe_load(f)
        assert MODEL_REGISTRY.get(opt['model_type']) is not None
        net = build_network(dict(opt['network_g']))
        assert isinstance(net, SDFlow)
        if 'network_d' in opt:
            build_network(dict(opt['network_d']))
        for key, value in (opt.get('train') or {}).items():
            if key.endswith('_opt'):
                build_loss(dict(value))
