"""train.compile and d2c-infer --compile: results equal eager, one warning and eager where compiling fails."""
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from test_model import in_process_opt

from basicsr.models import build_model
from d2c_arch import D2CNet
from d2c_tools import infer as infer_tool
from d2c_utils.compile_util import CompiledCall, compile_options
from d2c_utils.errors import UserError

TINY = {'num_feat': 8, 'num_group': 1, 'num_block': 1, 'reduction': 4, 'upscale': 4}
FAILING = 'd2c_test_failing'


@torch._dynamo.register_backend(name=FAILING)
def _failing_backend(graph_module, example_inputs):
    raise RuntimeError('this backend cannot compile anything')


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_options():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {'dynamic': False}
    assert compile_options('max-autotune') == {'mode': 'max-autotune', 'dynamic': False}
    assert compile_options({'backend': 'aot_eager', 'dynamic': True}) == {'backend': 'aot_eager', 'dynamic': True}
    for bad, match in (({
            'mode': 'fast'
    }, r"train.compile.mode='fast'"), ({
            'modes': 1
    }, r"unknown keys \['modes'\]"), (3, r'train.compile=3; use true, false'), ({
            'fullgraph': 'yes'
    }, 'fullgraph')):
        with pytest.raises(UserError, match=match):
            compile_options(bad)


def test_failing_backend_falls_back_to_eager_with_one_warning():
    torch.manual_seed(0)
    net = D2CNet(**TINY).eval()
    warnings = []
    call = CompiledCall(net, {'backend': FAILING}, warnings.append, name='D2CNet')
    lq = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(call(lq), net(lq)) and torch.equal(call(lq), net(lq))
    assert call.compiled is None and len(warnings) == 1
    assert 'torch.compile cannot compile D2CNet here' in warnings[0] and 'running it eagerly' in warnings[0]


def test_other_errors_are_not_taken_for_compile_failures():
    call = CompiledCall(D2CNet(**TINY), {'backend': 'eager'}, lambda message: None)
    with pytest.raises(RuntimeError):
        call(torch.rand(1, 5, 6, 6))  # 5 channels: the network's own error, not a compile failure
    assert call.compiled is not None


def train_steps(tmp_path, tiny_data, compile_opt, phases=(('divergence', 2), ('convergence', 2)), **net):
    torch.manual_seed(0)
    opt = in_process_opt(tmp_path, tiny_data, phases, compile=compile_opt)
    opt['network_g'].update(net)
    model = build_model(opt)
    gen = torch.Generator().manual_seed(0)
    for it in range(1, sum(n for _, n in phases) + 1):
        model.update_learning_rate(it)
        model.feed_data({'lq': torch.rand(2, 3, 4, 4, generator=gen), 'gt': torch.rand(2, 3, 16, 16, generator=gen)})
        model.optimize_parameters(it)
    return model, {k: v.detach().clone() for k, v in model.get_bare_model(model.net_g).state_dict().items()}


def assert_close(a, b):
    for k, v in a.items():
        assert torch.allclose(b[k], v, rtol=1e-4, atol=1e-5), k


@pytest.mark.slow
def test_compiled_training_equals_eager_across_the_phase_switch(tmp_path, tiny_data):
    # aot_eager traces forward and backward as torch.compile does, without inductor's C++ build (seconds, not
    # minutes); the phase switch changes what is trained, so the compiled forward is rebuilt there
    _, eager = train_steps(tmp_path, tiny_data, False)
    model, compiled = train_steps(tmp_path, tiny_data, {'backend': 'aot_eager'})
    assert_close(eager, compiled)
    (net, call), = model._compiled.values()
    assert net is model.net_g and call.compiled is not None


@pytest.mark.slow
def test_compile_failure_in_training_warns_once_and_trains_eagerly(tmp_path, tiny_data):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('basicsr').addHandler(handler)  # BasicSR's logger does not propagate to caplog
    try:
        _, eager = train_steps(tmp_path, tiny_data, False, phases=(('joint', 3), ))
        _, failed = train_steps(tmp_path, tiny_data, {'backend': FAILING}, phases=(('joint', 3), ))
    finally:
        logging.getLogger('basicsr').removeHandler(handler)
    assert all(torch.equal(eager[k], v) for k, v in failed.items())
    warnings = [r.getMessage() for r in records if 'torch.compile cannot compile' in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.slow
def test_inductor_training_step_equals_eager(tmp_path, tiny_data):
    # the real default backend (C++ build on a CPU: about a minute) on one tiny network and one phase
    _, eager = train_steps(tmp_path, tiny_data, False, phases=(('divergence', 2), ))
    model, compiled = train_steps(tmp_path, tiny_data, True, phases=(('divergence', 2), ))
    assert all(call.compiled is not None for _, call in model._compiled.values()), 'inductor fell back'
    assert_close(eager, compiled)


def test_d2c_infer_compile(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    torch.save({'params': D2CNet(**TINY).state_dict(), 'network_g': dict(TINY, type='D2CNet')}, tmp_path / 'm.pth')
    cv2.imwrite(str(tmp_path / 'lr.png'), (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8))
    common = ['-i', str(tmp_path / 'lr.png'), '--model', str(tmp_path / 'm.pth'), '-q', '--precision', 'fp32']
    assert infer_tool.main(common + ['-o', str(tmp_path / 'eager'), '--backend', 'torch']) == 0
    # aot_eager instead of inductor: the same dynamo path in seconds
    monkeypatch.setattr('d2c_utils.compile_util.compile_options', lambda value, key: {
        'backend': 'aot_eager',
        'dynamic': False
    })
    assert infer_tool.main(common + ['-o', str(tmp_path / 'compiled'), '--compile']) == 0
    out = capsys.readouterr().out
    assert 'backend torch (auto: --compile runs PyTorch)' in out and 'torch.compile' in out
    eager, compiled = (cv2.imread(str(tmp_path / d / 'lr_out.png')) for d in ('eager', 'compiled'))
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1
    rc = infer_tool.main(common + ['-o', str(tmp_path / 'x'), '--compile', '--backend', 'onnxruntime'])
    assert rc == 2 and '--compile runs PyTorch' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'x')
