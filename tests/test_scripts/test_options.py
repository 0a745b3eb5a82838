"""Every option file in options/ builds its network, model and losses, so none of them can rot."""
import glob
import os
from copy import deepcopy

import pytest
import torch
import yaml
from conftest import REPO_ROOT

from basicsr.models import build_model
from basicsr.utils.options import ordered_yaml
from d2c_arch import D2CNet

OPTION_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, 'options', '*.yml')))


def load_like_basicsr(path, tmp_path):
    """What BasicSR's parse_options does to an option file, minus the command line and data."""
    with open(path) as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    is_train = os.path.basename(path).startswith(('train_', 'demo_'))
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1, auto_resume=False)
    if opt['num_gpu'] == 'auto':
        opt['num_gpu'] = 0
    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        dataset['scale'] = opt['scale']
    root = str(tmp_path / 'experiments' / opt['name'])
    opt['path'].update(
        experiments_root=root, results_root=root, models=root, training_states=root, log=root, visualization=root)
    opt['path']['pretrain_network_g'] = None  # the checkpoints do not exist here
    return opt


def test_all_expected_option_files_exist():
    names = {os.path.basename(p) for p in OPTION_FILES}
    expected = {f'train_D2C_RealSR_x{s}.yml'
                for s in (2, 3, 4)} | {'train_D2C_RealSR_x4_lmdb.yml', 'train_D2C_D2CRealSR_x8.yml', 'demo_D2C_x4.yml'}
    expected |= {f'test_D2C_{ds}_x{s}.yml' for ds in ('RealSR', 'DRealSR') for s in (2, 3, 4)}
    assert expected <= names


@pytest.mark.parametrize('path', OPTION_FILES, ids=os.path.basename)
def test_option_file_builds(path, tmp_path):
    opt = load_like_basicsr(path, tmp_path)
    model = build_model(deepcopy(opt))
    net = model.get_bare_model(model.net_g)
    assert isinstance(net, D2CNet)
    assert net.upscale == opt['scale'], 'network_g.upscale must equal scale'
    for metric in opt['val'].get('metrics', {}).values():
        assert metric.get('crop_border') == opt['scale'], 'the paper shaves `scale` pixels'
    if opt['is_train']:
        assert sum(p['iters'] for p in opt['train']['phases']) == opt['train']['total_iter']
        assert model.cri_div is not None and model.cri_pix is not None
        train_set = opt['datasets']['train']
        assert train_set['gt_size'] % opt['scale'] == 0
        if os.path.basename(path).startswith('train_'):  # the paper's settings
            assert train_set['gt_size'] == 96 * opt['scale'] and train_set['batch_size_per_gpu'] == 4
            assert (net.tree_depth, net.tree_width, net.num_branch) == (2, 2, 4)
            assert opt['train']['optim_g']['lr'] == 1e-4
            assert model.cri_div.alpha == 2e-5 and model.alpha_schedule(1) == 0
            # training and its validation stay fp32 NCHW unless the user opts in
            assert model.train_amp_dtype is None and model.val_amp_dtype is None and not model.channels_last
    else:  # test files: exact fp32 numbers, in the faster channels_last layout
        assert model.val_amp_dtype is None and model.channels_last
        assert net.head.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_demo_smoke_run(demo_run):
    """scripts/demo.py end to end (every iteration count scaled down, see conftest.demo_run)."""
    root, stdout = demo_run['root'], demo_run['stdout']
    for label in ('bicubic', 'branch1', 'branch4', 'fused', 'oracle'):
        assert f'\n{label} ' in stdout
        assert (root / 'results' / 'demo' / f'chelsea_{label}.png').is_file()
    for name in ('chelsea_compare.png', 'chelsea_weight1.png', 'metrics.txt'):
        assert (root / 'results' / 'demo' / name).is_file()
    assert 'it/s' in stdout
    log = open(next((root / 'experiments' / 'demo_D2C_x4').glob('train_*.log'))).read()
    assert 'phase: convergence' in log
