"""d2c-swap: BasicSR training files -> D2C counterparts that keep every other byte and train."""
import os
import subprocess
import sys

import pytest
import yaml
from conftest import make_pairs

from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from d2c_convert.swap_util import count_parameters, full_options, parse_budget, swap_options
from d2c_tools import swap as swap_cli
from d2c_utils.errors import UserError

# shaped like BasicSR's options/train/*.yml: section comments, commented-out LMDB lines, !!float, ~
BASICSR_FILE = """\
# general settings
name: {name}
model_type: {model_type}
scale: {scale}
num_gpu: 0  # set num_gpu: 0 for cpu mode
manual_seed: 10

# dataset and data loader settings
datasets:
  train:
    name: DIV2K
    type: PairedImageDataset
    dataroot_gt: {gt}
    dataroot_lq: {lq}
    # (for lmdb)
    # dataroot_gt: datasets/DIV2K/DIV2K_train_HR_sub.lmdb
    filename_tmpl: '{{}}'
    io_backend:
      type: {backend}
{meta_info}
    gt_size: {gt_size}
    use_hflip: true
    use_rot: true

    # data loader
    num_worker_per_gpu: 0
    batch_size_per_gpu: 2
    dataset_enlarge_ratio: 1
    prefetch_mode: ~

  val:
    name: Set5
    type: PairedImageDataset
    dataroot_gt: {val_gt}
    dataroot_lq: {val_lq}
    io_backend:
      type: disk

# network structures
network_g:
{network}

# path
path:
  pretrain_network_g: {pretrain}
  strict_load_g: true
  resume_state: ~

# training settings
train:
  ema_decay: 0.999
  optim_g:
    type: Adam
    lr: !!float 2e-4
    weight_decay: 0
    betas: [0.9, 0.99]

  scheduler:
    type: MultiStepLR
    milestones: [250000, 400000]
    gamma: 0.5

  total_iter: {total_iter}
  warmup_iter: -1  # no warm up

  # losses
  pixel_opt:
    type: L1Loss
    loss_weight: 1.0
    reduction: mean

# validation settings
val:
  val_freq: !!float 5e3
  save_img: false

  metrics:
    psnr: # metric name, can be arbitrary
      type: calculate_psnr
      crop_border: {scale}
      test_y_channel: false

# logging settings
logger:
  print_freq: 1
  save_checkpoint_freq: !!float 5e3
  use_tb_logger: false
  wandb:
    project: ~
    resume_id: ~

# dist training settings
dist_params:
  backend: nccl
  port: 29500
"""

# the networks of BasicSR's own files, made tiny so that a few iterations run on CPU in seconds
NETWORKS = {
    'EDSR': ('  type: EDSR\n  num_in_ch: 3\n  num_out_ch: 3\n  num_feat: 16\n  num_block: 4\n  upscale: {scale}\n'
             '  res_scale: 1\n  img_range: 255.\n  rgb_mean: [0.4488, 0.4371, 0.4040]'),
    'MSRResNet': ('  type: MSRResNet\n  num_in_ch: 3\n  num_out_ch: 3\n  num_feat: 16\n  num_block: 4\n'
                  '  upscale: {scale}'),
    'RRDBNet': ('  type: RRDBNet\n  num_in_ch: 3\n  num_out_ch: 3\n  scale: {scale}\n  num_feat: 16\n  num_block: 8\n'
                '  num_grow_ch: 8'),
    'RCAN': ('  type: RCAN\n  num_in_ch: 3\n  num_out_ch: 3\n  num_feat: 32\n  num_group: 4\n  num_block: 2\n'
             '  squeeze_factor: 4\n  upscale: {scale}\n  res_scale: 1\n  img_range: 255.\n'
             '  rgb_mean: [0.4488, 0.4371, 0.4040]'),
    'SwinIR': ("  type: SwinIR\n  upscale: {scale}\n  in_chans: 3\n  img_size: 8\n  window_size: 4\n  img_range: 1.\n"
               "  depths: [2, 2]\n  embed_dim: 24\n  num_heads: [2, 2]\n  mlp_ratio: 2\n  upsampler: 'pixelshuffle'\n"
               "  resi_connection: '1conv'"),
}
MODELS = {'SwinIR': 'SwinIRModel'}


def basicsr_file(tmp_path, network, scale=4, backend='disk', pretrain='~', total_iter=4, model_type=None):
    """A BasicSR-shaped training file on tiny data under tmp_path; returns (path, text)."""
    root = tmp_path / 'data'
    hr, lr = make_pairs(str(root), num=4, hr_size=8 * scale * 2, scale=scale)
    val_gt, val_lq = hr, lr  # BasicSR cannot open one LMDB twice in a process: validation reads the PNGs
    if backend == 'lmdb':
        names = sorted(os.listdir(hr))
        for folder in (hr, lr):
            make_lmdb_from_imgs(folder, folder + '.lmdb', names, [n[:-4] for n in names])
        hr, lr = hr + '.lmdb', lr + '.lmdb'
    text = BASICSR_FILE.format(
        name=f'swap_{network}',
        model_type=model_type or MODELS.get(network, 'SRModel'),
        scale=scale,
        gt=hr,
        lq=lr,
        val_gt=val_gt,
        val_lq=val_lq,
        backend=backend,
        meta_info='      # (for lmdb)\n      # type: lmdb' if backend == 'disk' else '',
        gt_size=8 * scale,
        network=NETWORKS[network].format(scale=scale),
        pretrain=pretrain,
        total_iter=total_iter)
    path = tmp_path / f'train_{network}.yml'
    path.write_text(text)
    return str(path), text


def changed_keys(old, new, prefix=''):
    """Dotted keys whose values differ between two loaded option trees."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f'{prefix}{key}.')
        elif a != b:
            keys.append(f'{prefix}{key}')
    return keys


@pytest.mark.parametrize('network,scale,backend', [('EDSR', 4, 'disk'), ('MSRResNet', 4, 'lmdb'),
                                                   ('RRDBNet', 4, 'disk'), ('RCAN', 2, 'lmdb'), ('SwinIR', 4, 'disk')])
def test_swap_keeps_every_other_line_and_shrinks(tmp_path, network, scale, backend):
    path, text = basicsr_file(tmp_path, network, scale, backend, pretrain='experiments/old/net_g_300000.pth')
    result = swap_options(text, path)
    old, new = yaml.safe_load(text), yaml.safe_load(result.text)

    # what d2c-swap changes, and nothing else (loaded the way BasicSR loads option files)
    assert set(changed_keys(old, new)) - {'network_g'} <= {
        'name', 'model_type', 'path.pretrain_network_g', 'train.phases', 'train.divergence_opt'
    } | {k
         for k in changed_keys(old, new) if k.startswith('network_g.')}
    assert new['name'] == f'D2C_swap_{network}'
    assert new['model_type'] == 'D2CModel'
    assert new['path']['pretrain_network_g'] is None and 'path.pretrain_network_g cleared' in result.notices[0]
    assert new['train']['pixel_opt'] == old['train']['pixel_opt']  # the original loss, now on the fused image
    assert new['train']['optim_g']['lr'] == 2e-4 and isinstance(new['train']['optim_g']['lr'], float)
    assert [p['iters'] for p in new['train']['phases']] == [3, 1]  # 90% / 10% of total_iter 4 (rounded)
    assert new['train']['divergence_opt']['type'] == 'DivergenceLoss'

    # every line outside the replaced network_g block and the edited values survives byte for byte
    net_lines = set(NETWORKS[network].format(scale=scale).splitlines())
    edited = ('name:', 'model_type:', '  pretrain_network_g:')
    kept = [line for line in text.splitlines() if line not in net_lines and not line.startswith(edited)]
    out = result.text.splitlines()
    position = 0
    for line in kept:  # in the same order
        position = out.index(line, position) + 1

    # the network: the original's basic module, at most the original's parameters
    net = new['network_g']
    assert net['type'] == 'D2CNet' and net['upscale'] == scale
    assert net['branch_type'] == {
        'MSRResNet': 'SRResNetBranch',
        'RRDBNet': 'RRDBBranch'
    }.get(network, f'{network}Branch')
    original = count_parameters(network, full_options(network, old['network_g']))
    assert result.original_params == original
    assert result.params == count_parameters('D2CNet', {k: v for k, v in net.items() if k != 'type'}) <= original


def test_hyper_parameters_are_carried_over(tmp_path):
    _, text = basicsr_file(tmp_path, 'EDSR')
    net = yaml.safe_load(swap_options(text, 'x.yml', budget='same').text)['network_g']
    assert (net['num_feat'], net['num_block'], net['img_range'], net['branch_opt']) == (16, 2, 255., {'res_scale': 1})
    assert net['rgb_mean'] == [0.4488, 0.4371, 0.4040]
    _, text = basicsr_file(tmp_path, 'SwinIR')
    net = yaml.safe_load(swap_options(text, 'x.yml', budget='same').text)['network_g']
    assert net['branch_opt'] == {
        'depth': 2,
        'num_heads': 2,
        'window_size': 4,
        'mlp_ratio': 2,
        'img_size': 8,
        'resi_connection': '1conv',
        'drop_path_rate': 0.1
    }
    assert (net['num_feat'], net['num_block'], net['upsampler']) == (24, 1, 'pixelshuffle')
    _, text = basicsr_file(tmp_path, 'RRDBNet')
    net = yaml.safe_load(swap_options(text, 'x.yml', budget='same').text)['network_g']
    assert (net['upsampler'], net['branch_opt'], net['rgb_mean']) == ('nearest+conv', {'num_grow_ch': 8}, [0., 0., 0.])


def test_budget_and_tree_options(tmp_path):
    _, text = basicsr_file(tmp_path, 'EDSR')
    small = swap_options(text, 'x.yml', budget=150_000)
    assert small.params <= 150_000
    wide = swap_options(text, 'x.yml', tree_depth=1, tree_width=3, convergence_iters=2)
    new = yaml.safe_load(wide.text)
    assert (new['network_g']['tree_depth'], new['network_g']['tree_width']) == (1, 3)
    assert [p['iters'] for p in new['train']['phases']] == [2, 2]
    assert new['train']['divergence_opt']['margin'] == [5e-5]
    assert parse_budget('1.37M') == 1_370_000 and parse_budget('500k') == 500_000 and parse_budget(None) is None
    with pytest.raises(UserError, match='no D2C counterpart fits 1,000'):
        swap_options(text, 'x.yml', budget=1000)
    with pytest.raises(UserError, match='--budget'):
        parse_budget('lots')


@pytest.mark.parametrize('model_type,match', [('ESRGANModel', 'GAN model'), ('RealESRGANModel', 'GAN model'),
                                              ('EDVRModel', 'video model'), ('D2CModel', 'already D2C'),
                                              ('HATModel', 'not one d2c-swap knows')])
def test_refusals_exit_2_and_write_nothing(tmp_path, capsys, model_type, match):
    path, _ = basicsr_file(tmp_path, 'EDSR', model_type=model_type)
    out = tmp_path / 'new.yml'
    assert swap_cli.main([path, '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('d2c-swap: error: ') and match in err and model_type in err and err.count('\n') == 1
    assert not out.exists()


def test_unknown_network_and_cli_errors(tmp_path, capsys):
    path, text = basicsr_file(tmp_path, 'EDSR')
    hat = tmp_path / 'hat.yml'
    hat.write_text(text.replace('type: EDSR', 'type: HAT'))
    assert swap_cli.main([str(hat), '-o', str(tmp_path / 'n.yml')]) == 2
    assert "network_g.type 'HAT' has no D2C branch type" in capsys.readouterr().err
    assert swap_cli.main([path]) == 2  # no -o and no --check
    existing = tmp_path / 'exists.yml'
    existing.write_text('keep me')
    assert swap_cli.main([path, '-o', str(existing)]) == 2 and existing.read_text() == 'keep me'
    assert swap_cli.main([path, '-o', path]) == 2
    assert swap_cli.main([str(tmp_path / 'missing.yml'), '--check']) == 2
    capsys.readouterr()
    assert swap_cli.main([path, '--check']) == 0
    out = capsys.readouterr().out
    assert 'EDSR: ' in out and 'D2CNet (EDSRBranch' in out and '+model_type: D2CModel' in out
    assert 'nothing written' in out


def _train(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize('network,scale,backend', [('EDSR', 4, 'lmdb'), ('MSRResNet', 4, 'disk'),
                                                   ('RRDBNet', 4, 'lmdb'), ('RCAN', 2, 'disk'), ('SwinIR', 4, 'lmdb')])
def test_swapped_file_trains(tmp_path, network, scale, backend):
    """The swapped file trains unchanged through both phases with our entry point."""
    path, _ = basicsr_file(tmp_path, network, scale, backend)
    new = str(tmp_path / 'd2c.yml')
    assert swap_cli.main([path, '-o', new]) == 0
    _train([sys.executable, '-m', 'd2c_tools.train', '-opt', new], str(tmp_path))
    models = tmp_path / 'experiments' / f'D2C_swap_{network}' / 'models'
    assert (models / 'net_g_latest.pth').is_file()


@pytest.mark.slow
def test_swapped_file_trains_with_stock_basicsr(tmp_path):
    """``python -m basicsr.train -opt NEW.yml`` (BasicSR's own entry point, plugin autoloaded)."""
    import shutil

    import basicsr
    path, _ = basicsr_file(tmp_path, 'MSRResNet', 4, 'lmdb')
    new = str(tmp_path / 'd2c.yml')
    assert swap_cli.main([path, '-o', new]) == 0
    root = os.path.abspath(os.path.join(os.path.dirname(basicsr.__file__), os.pardir))
    exp_dir = os.path.join(root, 'experiments', 'D2C_swap_MSRResNet')
    try:
        _train([sys.executable, '-m', 'basicsr.train', '-opt', new], str(tmp_path))
        assert os.path.isfile(os.path.join(exp_dir, 'models', 'net_g_latest.pth'))
    finally:
        shutil.rmtree(exp_dir, ignore_errors=True)
        if os.path.isdir(os.path.join(root, 'experiments')) and not os.listdir(os.path.join(root, 'experiments')):
            os.rmdir(os.path.join(root, 'experiments'))


REALESRNET_FILE = """\
# general settings
name: train_RealESRNetx4plus_tiny
model_type: RealESRNetModel
scale: 4
num_gpu: 0
manual_seed: 0

# ----------------- options for synthesizing training data in RealESRNetModel ----------------- #
gt_usm: True  # USM the ground-truth
resize_prob: [0.2, 0.7, 0.1]  # up, down, keep
resize_range: [0.15, 1.5]
gaussian_noise_prob: 0.5
noise_range: [1, 30]
poisson_scale_range: [0.05, 3]
gray_noise_prob: 0.4
jpeg_range: [30, 95]
second_blur_prob: 0.8
resize_prob2: [0.3, 0.4, 0.3]  # up, down, keep
resize_range2: [0.3, 1.2]
gaussian_noise_prob2: 0.5
noise_range2: [1, 25]
poisson_scale_range2: [0.05, 2.5]
gray_noise_prob2: 0.4
jpeg_range2: [30, 95]

gt_size: 32
queue_size: 4

datasets:
  train:
    name: DF2K+OST
    type: RealESRGANDataset
    dataroot_gt: {hr}
    meta_info: {meta}
    io_backend:
      type: disk

    blur_kernel_size: 21
    kernel_list: ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    sinc_prob: 0.1
    blur_sigma: [0.2, 3]
    betag_range: [0.5, 4]
    betap_range: [1, 2]

    blur_kernel_size2: 21
    kernel_list2: ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    kernel_prob2: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    sinc_prob2: 0.1
    blur_sigma2: [0.2, 1.5]
    betag_range2: [0.5, 4]
    betap_range2: [1, 2]

    final_sinc_prob: 0.8

    gt_size: 32
    use_hflip: True
    use_rot: False

    # data loader
    num_worker_per_gpu: 0
    batch_size_per_gpu: 2
    dataset_enlarge_ratio: 1
    prefetch_mode: ~

# network structures
network_g:
  type: RRDBNet
  num_in_ch: 3
  num_out_ch: 3
  num_feat: 16
  num_block: 8
  num_grow_ch: 8

# path
path:
  pretrain_network_g: ~
  param_key_g: params_ema
  strict_load_g: true
  resume_state: ~

# training settings
train:
  ema_decay: 0.999
  optim_g:
    type: Adam
    lr: !!float 2e-4
    weight_decay: 0
    betas: [0.9, 0.99]

  scheduler:
    type: MultiStepLR
    milestones: [1000000]
    gamma: 0.5

  total_iter: 6
  warmup_iter: -1  # no warm up

  # losses
  pixel_opt:
    type: L1Loss
    loss_weight: 1.0
    reduction: mean

logger:
  print_freq: 1
  save_checkpoint_freq: !!float 5e3
  use_tb_logger: false
  wandb:
    project: ~
    resume_id: ~

dist_params:
  backend: nccl
  port: 29500
"""


@pytest.mark.slow
def test_realesrnet_file_trains_d2c_from_hr_photos_on_cpu(tmp_path):
    """Real-ESRNet's recipe: HR photos only, degraded on the fly; D2CRealESRNetModel runs on CPU."""
    hr, _ = make_pairs(str(tmp_path / 'data'), num=4, hr_size=48)
    meta = tmp_path / 'meta_info.txt'
    meta.write_text(''.join(f'{name}\n' for name in sorted(os.listdir(hr))))
    old = tmp_path / 'train_realesrnet.yml'
    old.write_text(REALESRNET_FILE.format(hr=hr, meta=meta))
    new = str(tmp_path / 'd2c.yml')
    assert swap_cli.main([str(old), '-o', new]) == 0
    assert yaml.safe_load(open(new))['model_type'] == 'D2CRealESRNetModel'
    result = _train([sys.executable, '-m', 'd2c_tools.train', '-opt', new], str(tmp_path))
    log = result.stdout + result.stderr
    assert 'divergence' in log and 'convergence' in log
    assert (tmp_path / 'experiments' / 'D2C_train_RealESRNetx4plus_tiny' / 'models' / 'net_g_latest.pth').is_file()
