"""Shared fixtures: tiny paired data sets and option dictionaries made on the fly.

The tests mirror the packages (``tests/test_arch`` for ``d2c_arch``, ...), as BasicSR's mirror
``basicsr/``. Test modules reuse each other's tiny-network builders (``from test_dan import
tiny_dan``), so every test folder is put on ``sys.path`` here; module names are unique across folders.
"""
import os
import sys

import cv2
import numpy as np
import pytest
import yaml

import d2c_model  # noqa: F401  (registers everything, applies the compat shim)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
for _folder in sorted(os.listdir(TESTS_DIR)):
    if _folder.startswith('test_') and os.path.isdir(os.path.join(TESTS_DIR, _folder)):
        sys.path.insert(0, os.path.join(TESTS_DIR, _folder))


def make_pairs(root, num=4, hr_size=32, scale=4, seed=0):
    """Write ``num`` smooth random HR/LR PNG pairs under ``root/{HR,LR}``; returns (hr_dir, lr_dir)."""
    rng = np.random.default_rng(seed)
    hr_dir, lr_dir = os.path.join(root, 'HR'), os.path.join(root, 'LR')
    os.makedirs(hr_dir, exist_ok=True)
    os.makedirs(lr_dir, exist_ok=True)
    for i in range(num):
        hr = cv2.GaussianBlur((rng.random((hr_size, hr_size, 3)) * 255).astype(np.uint8), (5, 5), 1.5)
        lr = cv2.resize(hr, (hr_size // scale, hr_size // scale), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(hr_dir, f'img{i}.png'), hr)
        cv2.imwrite(os.path.join(lr_dir, f'img{i}.png'), lr)
    return hr_dir, lr_dir


def tiny_train_opt(data_root, name='tiny_d2c', phases=(('divergence', 4), ('convergence', 2)), **overrides):
    """A complete training option dict for a very small D2CNet on the data under ``data_root``."""
    opt = {
        'name': name,
        'model_type': 'D2CModel',
        'scale': 4,
        'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {
            'train': {
                'name': 'tiny',
                'type': 'PairedImageDataset',
                'dataroot_gt': os.path.join(data_root, 'train', 'HR'),
                'dataroot_lq': os.path.join(data_root, 'train', 'LR'),
                'io_backend': {
                    'type': 'disk'
                },
                'gt_size': 16,
                'use_hflip': True,
                'use_rot': True,
                'num_worker_per_gpu': 0,
                'batch_size_per_gpu': 2,
                'dataset_enlarge_ratio': 1,
            },
            'val': {
                'name': 'tinyval',
                'type': 'PairedImageDataset',
                'dataroot_gt': os.path.join(data_root, 'val', 'HR'),
                'dataroot_lq': os.path.join(data_root, 'val', 'LR'),
                'io_backend': {
                    'type': 'disk'
                },
            },
        },
        'network_g': {
            'type': 'D2CNet',
            'num_feat': 8,
            'num_group': 1,
            'num_block': 1,
            'reduction': 4,
            'upscale': 4
        },
        'path': {
            'pretrain_network_g': None,
            'strict_load_g': True,
            'resume_state': None
        },
        'train': {
            'ema_decay': 0,
            'total_iter': sum(iters for _, iters in phases),
            'warmup_iter': -1,
            'optim_g': {
                'type': 'Adam',
                'lr': 1e-3,
                'betas': [0.9, 0.999]
            },
            'scheduler': {
                'type': 'MultiStepLR',
                'milestones': [2],
                'gamma': 0.5
            },
            'phases': [{
                'name': n,
                'iters': i
            } for n, i in phases],
            'divergence_opt': {
                'type': 'DivergenceLoss',
                'alpha': 0.1
            },
            'alpha_schedule': {
                'start_iter': 2
            },
            'pixel_opt': {
                'type': 'ConvergenceLoss'
            },
        },
        'val': {
            'val_freq': 3,
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
            'save_checkpoint_freq': 3,
            'use_tb_logger': False
        },
    }
    for key, value in overrides.items():
        opt[key] = value
    return opt


def write_yaml(path, opt):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def run_train(cwd, yml, *extra, expect=0):
    """``python -m d2c_tools.train -opt yml`` in ``cwd``; asserts the exit status, returns the result."""
    import subprocess
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.train', '-opt', yml, *extra],
                            cwd=str(cwd),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def run_two_ranks(cwd, yml, **env):
    """Train ``yml`` in two gloo processes through tests/dist_worker.py; returns (rank 0, rank 1) weights.

    Runs ``torch.distributed.run`` through this interpreter: a venv's torchrun script may name another python.
    """
    import subprocess

    import torch
    dump = os.path.join(str(cwd), 'dump')
    os.makedirs(dump)
    result = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        os.path.join(TESTS_DIR, 'dist_worker.py'), dump, '-opt', yml, '--launcher', 'pytorch'
    ],
                            cwd=str(cwd),
                            env=dict(os.environ, OMP_NUM_THREADS='1', **env),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return tuple(torch.load(os.path.join(dump, f'rank{r}.pth'), weights_only=True) for r in (0, 1))


def read_log(exp_dir):
    """The text of the newest ``train_*.log`` of an experiment folder."""
    logs = sorted(f for f in os.listdir(exp_dir) if f.startswith('train_') and f.endswith('.log'))
    return open(os.path.join(exp_dir, logs[-1])).read()


@pytest.fixture
def tiny_data(tmp_path):
    """``tmp_path/data/{train,val}/{HR,LR}`` with 4 pairs each (HR 32x32, x4)."""
    root = tmp_path / 'data'
    make_pairs(str(root / 'train'), seed=0)
    make_pairs(str(root / 'val'), seed=1)
    return str(root)


@pytest.fixture
def python():
    return sys.executable


# the demo's iterations scaled down 10 times (100 divergence + 40 convergence): a model that has
# learned something about real photos, for the tests that need a trained model (~1 minute)
DEMO_TEST_ITERS_SCALE = 0.1


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
    """``scripts/demo.py`` run once per test session in a temporary folder.

    Returns:
        dict: ``root`` (the folder), ``stdout``, ``stderr``, ``model`` (net_g_latest.pth),
        ``opt`` (the demo option file), ``lr`` / ``hr`` (the held-out photo's PNG files).
    """
    import subprocess
    root = tmp_path_factory.mktemp('demo')
    opt = os.path.join(REPO_ROOT, 'options', 'demo_D2C_x4.yml')
    result = subprocess.run([
        sys.executable,
        os.path.join(REPO_ROOT, 'scripts', 'demo.py'), '--iters-scale',
        str(DEMO_TEST_ITERS_SCALE), '--opt', opt
    ],
                            cwd=str(root),
                            capture_output=True,
                            text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return {
        'root': root,
        'stdout': result.stdout,
        'stderr': result.stderr,
        'opt': opt,
        'model': str(root / 'experiments' / 'demo_D2C_x4' / 'models' / 'net_g_latest.pth'),
        'lr': str(root / 'datasets' / 'demo_x4' / 'val' / 'LR' / 'chelsea.png'),
        'hr': str(root / 'datasets' / 'demo_x4' / 'val' / 'HR' / 'chelsea.png')
    }


@pytest.fixture(autouse=True, scope='session')
def export_cache(tmp_path_factory):
    """d2c-infer keeps checkpoints it exports for ONNX Runtime / OpenVINO in a cache: a temporary one here."""
    previous = os.environ.get('D2C_SR_CACHE')
    os.environ['D2C_SR_CACHE'] = str(tmp_path_factory.mktemp('d2c_sr_cache'))
    yield os.environ['D2C_SR_CACHE']
    if previous is None:
        os.environ.pop('D2C_SR_CACHE', None)
    else:
        os.environ['D2C_SR_CACHE'] = previous


def assert_checkpoint_loads_and_runs(model_path, reference, method, opt_path=None, lr_size=12, spandrel_too=True):
    """The one check that a checkpoint of any method loads and runs correctly (shared by every method's tests).

    Through the one loader (``load_model``; the registry names ``method``), the weights are
    ``reference``'s exactly and a forward pass on a random (1, 3, lr_size, lr_size) input gives
    ``reference``'s output exactly; through spandrel's ``ModelLoader`` too (where the weights alone
    build the network), with the descriptor's scale. Returns ``load_model``'s info dict.
    """
    import torch

    from d2c_inference.checkpoint_util import load_model
    torch.manual_seed(0)
    lq = torch.rand(1, 3, lr_size, lr_size)
    net, info = load_model(model_path, opt_path)
    assert info['method'].name == method and type(net).__name__ == type(reference).__name__
    expected = reference.state_dict()
    assert set(net.state_dict()) == set(expected)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    reference = reference.eval()

    def run(module):
        torch.manual_seed(1)  # SDFlow samples: the same noise for both
        with torch.no_grad():
            return module(lq)

    assert torch.equal(run(net), run(reference))
    if spandrel_too:
        spandrel = pytest.importorskip('spandrel')
        descriptor = spandrel.ModelLoader().load_from_file(model_path)
        assert descriptor.architecture.id == ('D2C-SR' if method == 'D2CNet' else method)
        assert descriptor.scale == reference.upscale
        assert torch.equal(run(descriptor.model), run(reference))
    return info
