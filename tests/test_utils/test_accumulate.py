"""train.accumulate: N micro-batches per optimiser step equal one batch N times larger."""
import os

import pytest
import torch
from conftest import read_log, run_train, tiny_train_opt, write_yaml
from test_model import in_process_opt

from basicsr.models import build_model
from d2c_utils.accumulate_util import GroupedLoader, MicroBatches, accumulate_steps
from d2c_utils.errors import UserError


def batches(steps, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{
        'lq': torch.rand(size, 3, 4, 4, generator=gen),
        'gt': torch.rand(size, 3, 16, 16, generator=gen)
    } for _ in range(steps)]


def split(batch, n):
    """A batch as n micro-batches (MicroBatches), in order."""
    parts = [{key: value.chunk(n)[i] for key, value in batch.items()} for i in range(n)]
    return MicroBatches(parts[0], parts[1:])


def train(model, data, phases_start=1):
    for it, batch in enumerate(data, phases_start):
        model.update_learning_rate(it)
        model.feed_data(batch)
        model.optimize_parameters(it)


def weights(model, attr='net_g'):
    return {k: v.detach().clone() for k, v in model.get_bare_model(getattr(model, attr)).state_dict().items()}


@pytest.mark.parametrize('phase', ['divergence', 'convergence', 'joint'])
def test_micro_batches_equal_one_large_batch(tmp_path, tiny_data, phase):
    # D2CNet has no batch statistics: the mean loss over 4 samples has the gradient of the mean of
    # two 2-sample means, so 2 accumulated micro-batches must give the weights of one 4-sample batch
    data = batches(3, 4)
    results = {}
    for n in (1, 2, 4):
        torch.manual_seed(0)
        model = build_model(in_process_opt(tmp_path, tiny_data, ((phase, 3), ), accumulate=n, ema_decay=0.5))
        train(model, [split(b, n) for b in data])
        optimizer = model.current_phase.optimizers[0]
        assert all(state['step'] == 3 for state in optimizer.state.values())  # steps, not micro-batches
        results[n] = (weights(model), weights(model, 'net_g_ema'), model.get_current_log())
    for n in (2, 4):
        for k, ref in results[1][0].items():
            assert torch.allclose(results[n][0][k], ref, rtol=1e-4, atol=1e-6), (n, k)
        for k, ref in results[1][1].items():
            assert torch.allclose(results[n][1][k], ref, rtol=1e-4, atol=1e-6), (n, k)
        # the logged losses are the means over the micro-batches: the large batch's loss
        for key, value in results[1][2].items():
            if type(value) is float:
                assert results[n][2][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (n, key)


def test_accumulation_differs_from_single_micro_batches(tmp_path, tiny_data):
    # the parity above is not trivial: stepping after every micro-batch gives other weights
    data = batches(2, 4)
    torch.manual_seed(0)
    accumulated = build_model(in_process_opt(tmp_path, tiny_data, (('convergence', 4), ), accumulate=2))
    train(accumulated, [split(b, 2) for b in data])
    torch.manual_seed(0)
    stepped = build_model(in_process_opt(tmp_path, tiny_data, (('convergence', 4), )))
    train(stepped, [{k: v.chunk(2)[i] for k, v in b.items()} for b in data for i in range(2)])
    a, b = weights(accumulated), weights(stepped)
    assert any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_nonfinite_micro_batch_skips_the_whole_step(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('convergence', 4), ), accumulate=2, nonfinite='skip'))
    train(model, [split(b, 2) for b in batches(1, 4)])
    before = weights(model)
    bad = batches(1, 4, seed=1)[0]
    bad['gt'][3, 0, 0, 0] = float('nan')  # in the second micro-batch
    model.update_learning_rate(2)
    model.feed_data(split(bad, 2))
    model.optimize_parameters(2)
    assert model.get_current_log()['nonfinite_skips'] == 1
    assert all(torch.equal(before[k], v) for k, v in weights(model).items())
    assert all(p.grad is None for p in model.get_bare_model(model.net_g).parameters())


def test_grouped_loader_and_option_errors():
    groups = list(GroupedLoader([{'i': i} for i in range(5)], 2))
    assert [(g['i'], [r['i'] for r in g.rest]) for g in groups] == [(0, [1]), (2, [3]), (4, [])]
    assert len(GroupedLoader(list(range(5)), 2)) == 3
    assert accumulate_steps({'train': {}}) == 1
    for bad in (0, -1, 1.5, True, '2'):
        with pytest.raises(UserError, match=r'train.accumulate='):
            accumulate_steps({'train': {'accumulate': bad}})


def test_plain_batch_with_accumulation_is_refused(tmp_path, tiny_data):
    model = build_model(in_process_opt(tmp_path, tiny_data, (('convergence', 2), ), accumulate=2))
    model.update_learning_rate(1)
    model.feed_data(batches(1, 2)[0])
    with pytest.raises(UserError, match="needs d2c-train's loop"):
        model.optimize_parameters(1)


@pytest.mark.slow
def test_d2c_train_counts_iterations_as_optimiser_steps_and_resumes(tmp_path, tiny_data):
    # 4 training pairs, batches of 1, accumulate 2: 2 optimiser steps per epoch; 6 iterations need 3 epochs
    opt = tiny_train_opt(tiny_data, name='acc', phases=(('divergence', 4), ('convergence', 2)))
    opt['datasets']['train']['batch_size_per_gpu'] = 1
    opt['train']['accumulate'] = 2
    opt['logger']['save_checkpoint_freq'] = 4
    yml = write_yaml(tmp_path / 'acc.yml', opt)
    run_train(tmp_path, yml)
    exp = tmp_path / 'experiments' / 'acc'
    log = read_log(exp)
    assert 'Gradient accumulation: 2 micro-batches of 1 per optimiser step (effective batch 2)' in log
    assert '2 steps per epoch' in log
    assert 'iter:       6' in log and 'iter:       7' not in log
    assert sorted(os.listdir(exp / 'training_states')) == ['4.state']
    state = torch.load(exp / 'training_states' / '4.state', weights_only=False)
    assert state['iter'] == 4
    # resuming continues from step 4 to 6, in optimiser steps
    opt['path']['resume_state'] = str(exp / 'training_states' / '4.state')
    run_train(tmp_path, write_yaml(tmp_path / 'acc_resume.yml', opt))
    resumed = read_log(exp)
    assert 'Resuming training from epoch: 1, iter: 4.' in resumed and 'iter:       6' in resumed
