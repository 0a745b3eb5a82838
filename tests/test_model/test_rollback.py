"""train.nonfinite: rollback: the last good state comes back after K non-finite steps, at most M times."""
import logging
import os

import pytest
import torch
from conftest import read_log, run_two_ranks, write_yaml
from test_model import in_process_opt
from test_robustness import deterministic_opt

from basicsr.models import build_model
from d2c_model.rollback import rollback_options
from d2c_utils.errors import UserError

ROLLBACK = {'after': 2, 'max': 2, 'lr_factor': 0.5, 'every': 1}


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(2, 3, 4, 4, generator=gen), 'gt': torch.rand(2, 3, 16, 16, generator=gen)}


def step(model, it):
    model.update_learning_rate(it)
    model.feed_data(batch(it))
    model.optimize_parameters(it)


def state(model):
    net = model.get_bare_model(model.net_g)
    optimizer = model.current_phase.optimizers[0]
    adam = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(optimizer.state.values())}
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, adam


def corrupt(model, name='head.weight'):
    with torch.no_grad():
        dict(model.get_bare_model(model.net_g).named_parameters())[name].view(-1)[0] = float('inf')


def rollback_model(tmp_path, tiny_data, phases=(('joint', 20), ), **rollback):
    # no milestone in reach: the learning rate changes only by roll-backs
    scheduler = {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5}
    opt = in_process_opt(
        tmp_path, tiny_data, phases, nonfinite='rollback', rollback=dict(ROLLBACK, **rollback), scheduler=scheduler)
    return build_model(opt)


def test_k_nonfinite_steps_restore_the_last_good_state_and_lower_the_lr(tmp_path, tiny_data, caplog):
    model = rollback_model(tmp_path, tiny_data)
    step(model, 1)
    step(model, 2)
    good_weights, good_adam = state(model)
    lr = model.get_current_learning_rate()[0]
    corrupt(model)  # from here on every loss is NaN
    logging.getLogger('basicsr').addHandler(caplog.handler)  # BasicSR's logger does not propagate to caplog
    try:
        step(model, 3)  # skipped, 1 in a row: no roll-back yet
        assert model.rollback.count == 0 and not torch.isfinite(state(model)[0]['head.weight']).all()
        step(model, 4)  # skipped, 2 in a row: roll back to the state after iter 2
    finally:
        logging.getLogger('basicsr').removeHandler(caplog.handler)
    assert model.rollback.count == 1 and model.nonfinite_skips == 2
    weights, adam = state(model)
    assert all(torch.equal(weights[k], v) for k, v in good_weights.items())
    assert adam.keys() == good_adam.keys()
    assert all(torch.equal(adam[i][k], v) for i in adam for k, v in good_adam[i].items())
    assert model.get_current_learning_rate()[0] == pytest.approx(lr * 0.5)
    assert model.get_current_log()['rollbacks'] == 1
    message = [r.getMessage() for r in caplog.records if 'Rolling back' in r.getMessage()]
    assert len(message) == 1 and 'Rolling back at iter 4: 2 consecutive non-finite steps' in message[0]
    assert 'Restored the state after iter 2' in message[0] and 'roll-back 1 of at most 2' in message[0]
    # training goes on from the good state
    step(model, 5)
    assert torch.isfinite(state(model)[0]['head.weight']).all()
    assert not torch.equal(state(model)[0]['head.weight'], good_weights['head.weight'])
    # a second roll-back is allowed, a third is refused with a clear error
    corrupt(model)
    step(model, 6)
    step(model, 7)
    assert model.rollback.count == 2
    assert model.get_current_learning_rate()[0] == pytest.approx(lr * 0.25)
    corrupt(model)
    step(model, 8)
    with pytest.raises(FloatingPointError, match=r'iter 9: 2 consecutive .* train.rollback.max=2 roll-backs are used'):
        step(model, 9)


def test_nonfinite_weight_that_the_loss_does_not_see_triggers_a_rollback(tmp_path, tiny_data):
    # the divergence phase never runs the convergence network: its weights can go bad unnoticed by the loss
    model = rollback_model(tmp_path, tiny_data, phases=(('divergence', 10), ))
    step(model, 1)
    good = state(model)[0]
    corrupt(model, 'convergence.0.weight')
    step(model, 2)  # finite loss; the check at the snapshot (every step here) finds the inf weight
    assert model.rollback.count == 1
    assert torch.equal(state(model)[0]['convergence.0.weight'], good['convergence.0.weight'])


def test_save_rolls_back_instead_of_refusing(tmp_path, tiny_data):
    model = rollback_model(tmp_path, tiny_data, every=100)
    os.makedirs(model.opt['path']['models'])
    os.makedirs(model.opt['path']['training_states'])
    step(model, 1)  # snapshot of the starting state (every=100: no later one)
    corrupt(model)
    model.save(epoch=0, current_iter=1)
    assert model.rollback.count == 1
    saved = torch.load(os.path.join(model.opt['path']['models'], 'net_g_1.pth'), weights_only=True)['params']
    assert torch.isfinite(saved['head.weight']).all()
    resumed = torch.load(os.path.join(model.opt['path']['training_states'], '1.state'), weights_only=False)
    assert resumed['d2c']['nonfinite'] == {'skips': 0, 'rollbacks': 1}


@pytest.mark.parametrize('rollback,match', [
    ({
        'after': 0
    }, r'train.rollback.after=0; use an integer >= 1'),
    ({
        'lr_factor': 2
    }, r'train.rollback.lr_factor=2; use a number in \(0, 1\]'),
    ({
        'afterr': 1
    }, r"unknown keys \['afterr'\]"),
    ([1], r'train.rollback=\[1\]; use a mapping'),
])
def test_rollback_option_errors(rollback, match):
    with pytest.raises(UserError, match=match):
        rollback_options({'rollback': rollback})


def test_rollback_options_need_the_policy(tmp_path, tiny_data):
    opt = in_process_opt(tmp_path, tiny_data, (('joint', 2), ), nonfinite='skip', rollback={'after': 2})
    with pytest.raises(UserError, match='train.rollback is set but train.nonfinite is'):
        build_model(opt)


@pytest.mark.slow
def test_two_process_rollback_keeps_the_ranks_together(tmp_path, tiny_data):
    # rank 1 alone gets an inf weight before iteration 2: its losses turn NaN, rank 0's stay finite;
    # the ranks agree on skipping, roll back together after 2 steps and end with identical weights
    opt = deterministic_opt(tiny_data, 'rollback', batch=1)
    opt['train'].update(nonfinite='rollback', rollback={'after': 2, 'max': 1, 'lr_factor': 0.5, 'every': 1})
    yml = write_yaml(tmp_path / 'rollback.yml', opt)
    rank0, rank1 = run_two_ranks(tmp_path, yml, D2C_TEST_CORRUPT='1:2')
    assert all(torch.isfinite(v).all() for v in rank1.values())
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    log = read_log(tmp_path / 'experiments' / 'rollback')
    assert 'Skipping the step at iter 2, phase divergence: non-finite (another rank)' in log
    assert 'Rolling back at iter 3: 2 consecutive non-finite steps' in log
    assert 'Restored the state after iter 1' in log
    print('\n'.join(line for line in log.splitlines() if 'Skipping' in line or 'Rolling' in line))
