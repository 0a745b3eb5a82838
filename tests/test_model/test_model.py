"""D2CModel: phases, frozen parts, schedules, validation, checkpoints and resume."""
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import read_log, tiny_train_opt, write_yaml

from basicsr.models import build_model
from d2c_arch import is_convergence_key
from d2c_model import AlphaSchedule, D2CModel


def in_process_opt(tmp_path, data_root, phases, **train_overrides):
    opt = tiny_train_opt(data_root, phases=phases)
    opt['train'].update(train_overrides)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, auto_resume=False, root_path=str(tmp_path))
    exp = tmp_path / 'experiments' / opt['name']
    opt['path'].update(
        experiments_root=str(exp),
        models=str(exp / 'models'),
        training_states=str(exp / 'training_states'),
        log=str(exp),
        visualization=str(exp / 'visualization'))
    return opt


def snapshot(model, convergence):
    net = model.get_bare_model(model.net_g)
    return {k: v.detach().clone() for k, v in net.named_parameters() if is_convergence_key(k) == convergence}


def run_iters(model, start, stop, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for it in range(start, stop + 1):
        model.update_learning_rate(it)
        model.feed_data({'lq': torch.rand(2, 3, 4, 4, generator=gen), 'gt': torch.rand(2, 3, 16, 16, generator=gen)})
        model.optimize_parameters(it)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_parts_stay_bit_identical_and_own_no_optimizer_state(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 3), ('convergence', 3))))
    assert isinstance(model, D2CModel)
    conv_before = snapshot(model, convergence=True)
    div_before = snapshot(model, convergence=False)
    run_iters(model, 1, 3)
    assert same(conv_before, snapshot(model, convergence=True)), 'convergence net moved in the divergence phase'
    div_after_phase1 = snapshot(model, convergence=False)
    assert not same(div_before, div_after_phase1)

    run_iters(model, 4, 6, seed=1)
    assert same(div_after_phase1, snapshot(model, convergence=False)), 'divergence net moved while frozen'
    assert not same(conv_before, snapshot(model, convergence=True))

    net = model.get_bare_model(model.net_g)
    div_opt, conv_opt = model.optimizers
    conv_ids = {id(p) for k, p in net.named_parameters() if is_convergence_key(k)}
    div_params = [p for group in div_opt.param_groups for p in group['params']]
    conv_params = [p for group in conv_opt.param_groups for p in group['params']]
    assert {id(p) for p in conv_params} == conv_ids
    assert not conv_ids & {id(p) for p in div_params}
    assert all(id(p) in conv_ids for p in conv_opt.state)  # Adam state only for trained parameters
    assert all(id(p) not in conv_ids for p in div_opt.state)
    # frozen parameters do not even get gradients
    assert all(not p.requires_grad and p.grad is None for k, p in net.named_parameters() if not is_convergence_key(k))


def test_joint_phase_trains_both_with_two_optimizers(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('joint', 2), )))
    conv_before, div_before = snapshot(model, True), snapshot(model, False)
    run_iters(model, 1, 2)
    assert not same(conv_before, snapshot(model, True)) and not same(div_before, snapshot(model, False))
    assert len(model.optimizers) == 2 and len(model.schedulers) == 2
    assert {'l_div', 'l_conv', 'alpha'} <= set(model.get_current_log())


def test_each_phase_steps_only_its_own_scheduler(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 4), ('convergence', 4))))
    lrs = []
    for it in range(1, 9):
        model.update_learning_rate(it)
        lrs.append((model.current_phase.name, model.get_current_learning_rate()[0]))
    # milestones [2] are counted from each phase's start: halved at its 3rd iteration
    assert lrs == [('divergence', 1e-3), ('divergence', 1e-3), ('divergence', 5e-4), ('divergence', 5e-4),
                   ('convergence', 1e-3), ('convergence', 1e-3), ('convergence', 5e-4), ('convergence', 5e-4)]


def test_alpha_schedule_mirrors_the_release():
    schedule = AlphaSchedule(2e-5, start_iter=200, period=1000, active_iters=200, decay_every=2000, decay_factor=0.5)
    assert schedule(199) == 0 and schedule(200) == 2e-5 and schedule(399) == 2e-5 and schedule(400) == 0
    assert schedule(1199) == 0 and schedule(1200) == 2e-5 and schedule(2200) == 1e-5 and schedule(4300) == 5e-6
    assert AlphaSchedule(0.3)(1) == 0.3
    with pytest.raises(ValueError, match='unknown keys'):
        AlphaSchedule.from_opt(1., {'start': 3})


def test_alpha_is_applied_and_logged(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 3), ), alpha_schedule={'start_iter': 3}))
    run_iters(model, 1, 2)
    assert model.get_current_log()['alpha'] == 0
    run_iters(model, 3, 3)
    log = model.get_current_log()
    assert log['alpha'] == pytest.approx(0.1) and f'{log["phase"]:.4e}' == 'divergence'
    assert log['l_div'] == pytest.approx(log['l_div_l2'] + 0.1 * log['l_div_triplet'], rel=1e-5)


@pytest.mark.parametrize('phases,match', [
    ((('divergense', 2), ), 'unknown'),
    ((('divergence', 0), ), 'positive integer'),
])
def test_bad_phase_options(tmp_path, tiny_data, phases, match):
    with pytest.raises(ValueError, match=match):
        build_model(in_process_opt(tmp_path, tiny_data, phases))


def test_phase_lengths_must_add_up(tmp_path, tiny_data):
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ('convergence', 2)))
    opt['train']['total_iter'] = 5
    with pytest.raises(ValueError, match=r'2 \+ 2 = 4, but train.total_iter is 5'):
        build_model(opt)


# ------------------------------------------------------------------ end to end (subprocesses)
LOG_LINE = re.compile(r'iter:\s*([\d,]+), lr:\(([\d.e+-]+),\)\].*phase: (\w+)')


def train(tmp_path, yml, *extra):
    result = subprocess.run([sys.executable, '-m', 'd2c_model.train', '-opt', yml, *extra],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def iter_table(log_text):
    return {int(m.group(1).replace(',', '')): (float(m.group(2)), m.group(3)) for m in LOG_LINE.finditer(log_text)}


def state_summary(path):
    state = torch.load(path, map_location='cpu', weights_only=False)
    steps = [sorted({float(s['step']) for s in o['state'].values()}) for o in state['optimizers']]
    lrs = [[g['lr'] for g in o['param_groups']] for o in state['optimizers']]
    return dict(
        iter=state['iter'],
        steps=steps,
        lrs=lrs,
        last_epochs=[s['last_epoch'] for s in state['schedulers']],
        phase=state['d2c']['phase_name'],
        alpha=state['d2c']['alpha'])


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """An uninterrupted 4 + 3 iteration run saving every iteration."""
    from conftest import make_pairs
    tmp_path = tmp_path_factory.mktemp('run')
    make_pairs(str(tmp_path / 'data' / 'train'), seed=0)
    make_pairs(str(tmp_path / 'data' / 'val'), seed=1)
    opt = tiny_train_opt(str(tmp_path / 'data'), name='full', phases=(('divergence', 4), ('convergence', 3)))
    opt['logger']['save_checkpoint_freq'] = 1
    opt['val']['val_freq'] = 3
    yml = write_yaml(tmp_path / 'full.yml', opt)
    train(tmp_path, yml)
    return tmp_path, opt


def test_end_to_end_training_writes_checkpoints_and_logs_validation(trained_run):
    tmp_path, _ = trained_run
    exp = tmp_path / 'experiments' / 'full'
    log = read_log(exp)
    assert 'Phase 1/2 at iter 1: divergence (iters 1-4)' in log
    assert 'Phase 2/2 at iter 5: convergence (iters 5-7)' in log
    assert 'is in the divergence phase: the convergence network is not trained yet' in log
    for name in ['psnr', 'psnr_branch1', 'psnr_branch2', 'psnr_branch3', 'psnr_branch4', 'psnr_oracle']:
        assert re.search(rf'# {name}: \d+\.\d+', log), name
    table = iter_table(log)
    assert [table[i][1] for i in range(1, 8)] == ['divergence'] * 4 + ['convergence'] * 3
    ckpt = torch.load(exp / 'models' / 'net_g_latest.pth', map_location='cpu', weights_only=True)
    assert any(k.startswith('convergence.') for k in ckpt['params'])
    state = state_summary(exp / 'training_states' / '7.state')
    assert state['phase'] == 'convergence' and state['steps'] == [[4.0], [3.0]]
    assert not [f for f in os.listdir(exp / 'training_states') if not f.endswith('.state')]  # no temp files left


@pytest.mark.parametrize(
    'stop_at,how', [(2, 'auto_resume'), (4, 'auto_resume'), (3, 'resume_state')],
    ids=['mid-phase', 'phase-boundary', 'path.resume_state'])
def test_resume_continues_like_the_uninterrupted_run(trained_run, stop_at, how):
    tmp_path, opt = trained_run
    full = tmp_path / 'experiments' / 'full'
    name = f'resumed_{stop_at}'
    exp = tmp_path / 'experiments' / name
    shutil.rmtree(exp, ignore_errors=True)
    shutil.copytree(full, exp)
    # simulate a run stopped right after saving at `stop_at`
    for sub, pattern in (('training_states', r'(\d+)\.state'), ('models', r'net_g_(\d+)\.pth')):
        for f in os.listdir(exp / sub):
            m = re.fullmatch(pattern, f)
            if m is None or int(m.group(1)) > stop_at:
                os.remove(exp / sub / f)
    for f in os.listdir(exp):
        if f.endswith('.log'):
            os.remove(exp / f)
    resumed_opt = dict(opt, name=name)
    if how == 'resume_state':
        resumed_opt['path'] = dict(opt['path'], resume_state=str(exp / 'training_states' / f'{stop_at}.state'))
        train(tmp_path, write_yaml(tmp_path / f'{name}.yml', resumed_opt))
    else:
        train(tmp_path, write_yaml(tmp_path / f'{name}.yml', resumed_opt), '--auto_resume')

    log = read_log(exp)
    assert 'Resuming training from epoch' in log and f'iter: {stop_at}.' in log
    uninterrupted = iter_table(read_log(full))
    resumed = iter_table(log)
    assert sorted(resumed) == list(range(stop_at + 1, 8))
    for it in resumed:  # same phase and learning rate at every iteration
        assert resumed[it] == uninterrupted[it], it
    assert state_summary(exp / 'training_states' / '7.state') == state_summary(full / 'training_states' / '7.state')


def test_stock_srmodel_scores_a_d2c_checkpoint_like_d2cmodel(trained_run):
    tmp_path, opt = trained_run
    ckpt = str(tmp_path / 'experiments' / 'full' / 'models' / 'net_g_latest.pth')
    psnr = {}
    for model_type in ('SRModel', 'D2CModel'):
        name = f'test_{model_type}'
        test_opt = {
            'name': name,
            'model_type': model_type,
            'scale': 4,
            'num_gpu': 0,
            'manual_seed': 0,
            'datasets': {
                'test_1': dict(opt['datasets']['val'], name='tinytest')
            },
            'network_g': opt['network_g'],
            'path': {
                'pretrain_network_g': ckpt,
                'strict_load_g': True,
                'param_key_g': 'params'
            },
            'val': {
                'save_img': True,
                'suffix': None,
                'metrics': opt['val']['metrics']
            },
        }
        yml = write_yaml(tmp_path / f'{name}.yml', test_opt)
        result = subprocess.run([sys.executable, '-m', 'd2c_model.test', '-opt', yml],
                                cwd=str(tmp_path),
                                capture_output=True,
                                text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        results = tmp_path / 'results' / name
        log = open(next(results / f for f in os.listdir(results) if f.endswith('.log'))).read()
        psnr[model_type] = float(re.search(r'# psnr: ([\d.]+)', log).group(1))
        assert (results / 'visualization' / 'tinytest' / f'img0_{name}.png').is_file()
    assert psnr['SRModel'] == psnr['D2CModel']


@pytest.mark.parametrize('precision,channels_last', [('bf16', True), ('bf16', False), ('fp32', True)])
def test_reduced_precision_and_channels_last_training(tmp_path, tiny_data, precision, channels_last):
    model = build_model(
        in_process_opt(
            tmp_path,
            tiny_data, (('divergence', 2), ('convergence', 2)),
            precision=precision,
            channels_last=channels_last))
    assert model.train_amp_dtype == (torch.bfloat16 if precision == 'bf16' else None)
    conv_before = snapshot(model, convergence=True)
    run_iters(model, 1, 2)
    assert same(conv_before, snapshot(model, convergence=True))  # still frozen in the divergence phase
    div_after = snapshot(model, convergence=False)
    run_iters(model, 3, 4)
    assert same(div_after, snapshot(model, convergence=False))
    net = model.get_bare_model(model.net_g)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert all(isinstance(v, float) and np.isfinite(v) for k, v in model.get_current_log().items() if k != 'phase')
    if channels_last:
        assert net.head.weight.is_contiguous(memory_format=torch.channels_last)


def test_precision_option_errors(tmp_path, tiny_data):
    with pytest.raises(ValueError, match='fp16 needs CUDA'):
        build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 2), ), precision='fp16'))
    with pytest.raises(ValueError, match="precision 'half' is unknown"):
        build_model(in_process_opt(tmp_path, tiny_data, (('divergence', 2), ), precision='half'))


def test_ema_network_is_kept_saved_and_used_for_validation(tmp_path, tiny_data):
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ('convergence', 2)), ema_decay=0.5)
    os.makedirs(opt['path']['models'])
    os.makedirs(opt['path']['training_states'])
    model = build_model(opt)
    run_iters(model, 1, 4)
    ema = model.net_g_ema.state_dict()
    live = model.get_bare_model(model.net_g).state_dict()
    assert any(not torch.equal(ema[k], live[k]) for k in ema)
    model.save(epoch=0, current_iter=4)
    ckpt = torch.load(os.path.join(opt['path']['models'], 'net_g_4.pth'), weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    model.feed_data({'lq': torch.rand(1, 3, 4, 4), 'gt': torch.rand(1, 3, 16, 16)})
    model.test()
    with torch.no_grad():
        expected = model.net_g_ema(model.lq)
    assert torch.equal(model.output, expected)


def test_validation_precision_runs_reduced_and_falls_back_to_fp32_on_broken_output(tmp_path, tiny_data):
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ))
    opt['val'].update(precision='bf16', channels_last=True)
    model = build_model(opt)
    assert model.val_amp_dtype == torch.bfloat16
    net = model.get_bare_model(model.net_g)
    lq = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    model.feed_data({'lq': lq})
    # the first pass of an untrained net is probed in fp32 too (its output is far from its input in either
    # precision: not a precision fault), and that paid-for fp32 output is used; the next pass runs bf16 alone
    model.test()
    model.test()
    with torch.no_grad():
        reference = net(lq)
    assert model.output.dtype == torch.float32 and model.output.shape == (1, 3, 24, 24)
    mse = float(((model.output - reference)**2).mean())
    assert 0 < mse < 1e-4  # bf16 ran (not bit-identical), and agrees with fp32 to > 40 dB

    healthy_forward = net.forward

    def overflowing_forward(x, **kwargs):  # what some GPUs do in fp16: inf/NaN images
        out = healthy_forward(x, **kwargs)
        if torch.is_autocast_enabled('cpu'):
            return tuple(t * float('nan') for t in out) if isinstance(out, tuple) else out * float('nan')
        return out

    net.forward = overflowing_forward
    model.feed_data({'lq': lq})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('basicsr')  # BasicSR's root logger does not propagate to pytest's caplog
    logger.addHandler(handler)
    try:
        model.test()
    finally:
        logger.removeHandler(handler)
    assert torch.isfinite(model.output).all() and torch.isfinite(model.branches).all()
    torch.testing.assert_close(model.output, reference, rtol=1e-4, atol=1e-5)
    logged = '\n'.join(record.getMessage() for record in records)
    assert 'bf16 gave non-finite values' in logged and 'set val.precision: fp32' in logged
