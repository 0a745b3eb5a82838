"""Distributed CPU training across the phase switch, crash recovery, non-finite losses, bad configs."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_two_ranks, tiny_train_opt, write_yaml
from test_model import in_process_opt, iter_table, read_log, run_iters, snapshot, state_summary, train

from basicsr.models import build_model
from d2c_arch import D2CNet
from d2c_inference.checkpoint_util import atomic_torch_save

LOSS_LINE = re.compile(r'iter:\s*([\d,]+),.*?phase: \w+ (.*)$', re.M)


def loss_table(log_text):
    table = {}
    for m in LOSS_LINE.finditer(log_text):
        values = dict(re.findall(r'(l_\w+|alpha): ([-\d.e+]+)', m.group(2)))
        table[int(m.group(1).replace(',', ''))] = {k: float(v) for k, v in values.items()}
    return table


def deterministic_opt(data_root, name, batch):
    """Full-image crops and no flips, so that data depend only on the sampler's order."""
    opt = tiny_train_opt(data_root, name=name, phases=(('divergence', 3), ('convergence', 3)))
    train_set = opt['datasets']['train']
    train_set.update(gt_size=32, use_hflip=False, use_rot=False, batch_size_per_gpu=batch)
    del opt['datasets']['val']
    del opt['val']
    opt['logger']['save_checkpoint_freq'] = 100
    return opt


@pytest.mark.slow
def test_two_process_cpu_training_matches_single_process(tmp_path, tiny_data):
    dist_yml = write_yaml(tmp_path / 'dist.yml', deterministic_opt(tiny_data, 'dist', batch=1))
    rank0, rank1 = run_two_ranks(tmp_path, dist_yml)
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    single_yml = write_yaml(tmp_path / 'single.yml', deterministic_opt(tiny_data, 'single', batch=2))
    train(tmp_path, single_yml)
    dist_losses = loss_table(read_log(tmp_path / 'experiments' / 'dist'))
    single_losses = loss_table(read_log(tmp_path / 'experiments' / 'single'))
    assert sorted(dist_losses) == sorted(single_losses) == list(range(1, 7))
    for it in single_losses:
        assert dist_losses[it].keys() == single_losses[it].keys()
        for key, value in single_losses[it].items():
            assert dist_losses[it][key] == pytest.approx(value, rel=1e-3, abs=1e-7), (it, key)
    log = read_log(tmp_path / 'experiments' / 'dist')
    assert 'Phase 2/2 at iter 4: convergence' in log
    single = torch.load(tmp_path / 'experiments' / 'single' / 'models' / 'net_g_latest.pth', weights_only=True)
    assert all(torch.allclose(single['params'][k], rank0[k], atol=1e-4) for k in rank0)


@pytest.mark.slow
def test_sigkill_anywhere_then_auto_resume(tmp_path, tiny_data):
    opt = tiny_train_opt(tiny_data, name='killed', phases=(('divergence', 24), ('convergence', 16)))
    opt['logger']['save_checkpoint_freq'] = 2
    opt['val']['val_freq'] = 1000
    yml = write_yaml(tmp_path / 'killed.yml', opt)
    states = tmp_path / 'experiments' / 'killed' / 'training_states'
    proc = subprocess.Popen([sys.executable, '-m', 'd2c_tools.train', '-opt', yml],
                            cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if states.is_dir() and any(int(f.split('.')[0]) >= 8 for f in os.listdir(states) if f.endswith('.state')):
            break
        time.sleep(0.05)
    assert proc.poll() is None, 'training ended before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(f[:-6]) for f in os.listdir(states) if re.fullmatch(r'\d+\.state', f))
    assert saved and saved[-1] < 40
    # what a crash in the middle of writing can leave behind: temp files and a truncated state
    (states / f'{saved[-1] + 2}.state.tmp4242').write_bytes(b'partial')
    (states / '38.state').write_bytes(b'\x80\x02truncated')
    (states.parent / 'models' / 'net_g_38.pth').write_bytes(b'\x80\x02truncated')

    result = train(tmp_path, yml, '--auto_resume')
    assert 'skipping unreadable' in result.stderr
    log = read_log(tmp_path / 'experiments' / 'killed')
    assert f'iter: {saved[-1]}.' in log  # resumed from the last complete state
    assert sorted(iter_table(log)) == list(range(saved[-1] + 1, 41))

    reference = tiny_train_opt(tiny_data, name='reference', phases=(('divergence', 24), ('convergence', 16)))
    reference['logger']['save_checkpoint_freq'] = 40
    reference['val']['val_freq'] = 1000
    train(tmp_path, write_yaml(tmp_path / 'reference.yml', reference))
    assert state_summary(states / '40.state') == \
        state_summary(tmp_path / 'experiments' / 'reference' / 'training_states' / '40.state')


def test_atomic_save_never_leaves_a_half_written_file(tmp_path, monkeypatch):
    target = tmp_path / '10.state'
    atomic_torch_save({'iter': 8}, str(target))

    def broken_save(obj, path):
        with open(path, 'wb') as f:
            f.write(b'half')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({'iter': 10}, str(target))
    assert torch.load(target, weights_only=True) == {'iter': 8}
    assert os.listdir(tmp_path) == ['10.state']


def _nan_batch():
    gt = torch.rand(2, 3, 16, 16)
    gt[0, 0, 0, 0] = float('nan')
    return {'lq': torch.rand(2, 3, 4, 4), 'gt': gt}


def test_nonfinite_loss_stops_with_iteration_phase_and_part(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 2), ('convergence', 2))))
    run_iters(model, 1, 1)
    model.update_learning_rate(2)
    model.feed_data(_nan_batch())
    with pytest.raises(FloatingPointError, match=r'iter 2, phase divergence: non-finite l_div, l_div_l2'):
        model.optimize_parameters(2)


def test_nonfinite_loss_skipped_when_asked(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 2), ), nonfinite='skip'))
    run_iters(model, 1, 1)
    before = snapshot(model, convergence=False)
    model.update_learning_rate(2)
    model.feed_data(_nan_batch())
    model.optimize_parameters(2)
    assert model.get_current_log()['nonfinite_skips'] == 1
    after = snapshot(model, convergence=False)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_model_is_never_saved(tmp_path, tiny_data):
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ))
    os.makedirs(opt['path']['models'])
    os.makedirs(opt['path']['training_states'])
    model = build_model(opt)
    with torch.no_grad():
        model.get_bare_model(model.net_g).head.weight[0, 0, 0, 0] = float('inf')
    with pytest.raises(FloatingPointError, match='non-finite weights'):
        model.save(epoch=0, current_iter=-1)
    assert os.listdir(opt['path']['models']) == [] and os.listdir(opt['path']['training_states']) == []


@pytest.mark.parametrize('case,match', [
    ('unknown_phase', r"train.phases\[0\].name='warmup' is unknown"),
    ('phase_sum', r'add up to 2 \+ 2 = 4, but train.total_iter is 6'),
    ('scale', r'network_g.upscale=2 but scale=4'),
    ('gt_size', r'gt_size=18 is not divisible by scale=4'),
    ('one_branch', r'1 branch; the divergence loss needs at least 2'),
    ('loss_tree', r'train.divergence_opt.tree_depth=3 but network_g has tree_depth=2'),
    ('pretrained', r'does not fit network_g.*\n  not in the network \(122\): res_convs\.4\.0\.bias.*\n'
     r'  different shapes \(2\): convergence\.0\.weight: checkpoint \(64, 27, 3, 3\) vs network \(64, 12'),
])
def test_bad_configuration_is_named_before_training(tmp_path, tiny_data, case, match):
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ('convergence', 2)))
    if case == 'unknown_phase':
        opt['train']['phases'][0]['name'] = 'warmup'
    elif case == 'phase_sum':
        opt['train']['total_iter'] = 6
    elif case == 'scale':
        opt['network_g']['upscale'] = 2
    elif case == 'gt_size':
        opt['datasets']['train']['gt_size'] = 18
    elif case == 'one_branch':
        opt['network_g']['tree_width'] = 1
    elif case == 'loss_tree':
        opt['train']['divergence_opt']['tree_depth'] = 3
    elif case == 'pretrained':
        other = D2CNet(num_feat=8, num_group=1, num_block=1, reduction=4, tree_width=3)
        ckpt = tmp_path / 'other.pth'
        torch.save({'params': other.state_dict()}, ckpt)
        opt['path']['pretrain_network_g'] = str(ckpt)
    with pytest.raises(ValueError, match=match):
        build_model(opt)


def test_bad_configuration_exits_2_with_one_line_message(tmp_path, tiny_data):
    opt = tiny_train_opt(tiny_data, name='bad')
    opt['network_g']['upscale'] = 2
    yml = write_yaml(tmp_path / 'bad.yml', opt)
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.train', '-opt', yml],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 2
    assert 'd2c-train: error: D2CModel: network_g.upscale=2 but scale=4' in result.stderr
    assert 'Traceback' not in result.stderr


def test_local_rank_with_dash_is_accepted(monkeypatch, tmp_path):
    from d2c_tools.pipeline_util import normalise_argv
    monkeypatch.setattr(sys, 'argv', ['x'])
    yml = write_yaml(tmp_path / 'opt.yml', {'name': 'x'})  # normalise_argv loads the option file
    normalise_argv(['-opt', yml, '--local-rank=1', '--local-rank', '0'], 'd2c-train')
    assert sys.argv == ['d2c-train', '-opt', yml, '--local_rank=1', '--local_rank', '0']


def test_converted_checkpoint_with_other_constants_warns(tmp_path, tiny_data, caplog):
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ))
    net = D2CNet(num_feat=8, num_group=1, num_block=1, reduction=4)
    ckpt = tmp_path / 'converted.pth'
    torch.save({
        'params': net.state_dict(),
        'converted_from': {
            'network_g': {
                'rgb_mean': [0.404, 0.4371, 0.4488]
            }
        }
    }, ckpt)
    opt['path']['pretrain_network_g'] = str(ckpt)
    import logging
    logging.getLogger('basicsr').addHandler(caplog.handler)
    try:
        build_model(opt)
    finally:
        logging.getLogger('basicsr').removeHandler(caplog.handler)
    assert 'was converted for network_g.rgb_mean=[0.404, 0.4371, 0.4488]' in caplog.text
