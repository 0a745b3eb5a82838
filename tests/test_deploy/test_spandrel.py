"""D2C-SR checkpoints load through spandrel (chaiNNer, ComfyUI): detection, options, outputs, autoload, errors."""
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.archs.srresnet_arch import MSRResNet
from d2c_arch import D2CNet
from d2c_deploy import spandrel_util
from d2c_inference.checkpoint_util import load_model
from d2c_utils.errors import UserError

spandrel = pytest.importorskip('spandrel')

TINY = dict(num_feat=8, num_block=1, num_group=1, reduction=4, tree_width=2)
SWIN = {'depth': 1, 'num_heads': 2, 'window_size': 4, 'img_size': 16}
# (D2CNet options, the tags that tell its size multiple)
NETWORKS = {
    'rcan_x4_L2': (dict(TINY, tree_depth=2, upscale=4), []),
    'edsr_x3_L1': (dict(TINY, tree_depth=1, upscale=3, branch_type='EDSRBranch'), []),
    'swinir_x2_L1': (dict(TINY, tree_depth=1, upscale=2, branch_type='SwinIRBranch', branch_opt=SWIN), ['window 4']),
}


def stock_registry():
    """spandrel's own architectures only (the test process may have D2C-SR autoloaded into MAIN_REGISTRY)."""
    registry = spandrel.ArchRegistry()
    registry.add(*[support for support in spandrel.MAIN_REGISTRY if support.architecture.id != spandrel_util.ARCH_ID])
    return registry


def d2c_registry():
    return spandrel_util.install(stock_registry())


def save_d2c(path, seed=0, ema_seed=None, **options):
    """A D2CNet with random weights saved as BasicSR does (``params``, and ``params_ema`` if ``ema_seed``)."""
    torch.manual_seed(seed)
    ckpt = {'params': D2CNet(**options).state_dict()}
    if ema_seed is not None:
        torch.manual_seed(ema_seed)
        ckpt['params_ema'] = D2CNet(**options).state_dict()
    torch.save(ckpt, path)
    return str(path)


def load_with(registry, path):
    return spandrel.ModelLoader(registry=registry).load_from_file(path)


@pytest.mark.parametrize('name', NETWORKS)
def test_spandrel_loads_d2c_and_matches_load_model(tmp_path, name):
    options, window_tags = NETWORKS[name]
    path = save_d2c(tmp_path / f'{name}.pth', **options)
    if options.get('branch_type', 'RCANBranch') == 'RCANBranch':
        descriptor = load_with(d2c_registry(), path)
    else:  # D2CNet's defaults are the paper's (RCANBranch) settings: other branch types are told so
        with pytest.warns(RuntimeWarning, match='d2c-infer --opt'):
            descriptor = load_with(d2c_registry(), path)
    assert descriptor.architecture.id == 'D2C-SR' and descriptor.purpose == 'SR'
    assert (descriptor.scale, descriptor.input_channels, descriptor.output_channels) == (options['upscale'], 3, 3)
    # none declared (D2CNet pads itself; spandrel's padding would change the border of the fusion)
    assert descriptor.size_requirements.none and [t for t in descriptor.tags if t.startswith('window')] == window_tags
    assert f"tree {options['tree_depth']}x2" in descriptor.tags and 'assumed: rgb_mean=DIV2K' in descriptor.tags
    assert options.get('branch_type', 'RCANBranch') in descriptor.tags and not descriptor.supports_half

    net, info = load_model(path, infer_missing=True)
    assert info['param_key'] == 'params'
    x = torch.rand(1, 3, 10, 9)  # not a multiple of the SwinIR window
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(descriptor.model(x), expected)
    assert torch.equal(descriptor(x), expected.clamp(0, 1))
    assert descriptor(x).shape == (1, 3, 10 * options['upscale'], 9 * options['upscale'])


def test_params_ema_is_preferred_like_our_tools(tmp_path):
    options = NETWORKS['rcan_x4_L2'][0]
    path = save_d2c(tmp_path / 'ema.pth', seed=0, ema_seed=1, **options)
    descriptor = load_with(d2c_registry(), path)
    net, info = load_model(path, infer_missing=True)
    assert info['param_key'] == 'params_ema'
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(descriptor.model(x), net(x))
        torch.manual_seed(0)
        assert not torch.equal(descriptor.model(x), D2CNet(**options).eval()(x))  # not 'params'


def test_precision_flags(tmp_path):
    rcan = load_with(d2c_registry(), save_d2c(tmp_path / 'rcan.pth', **NETWORKS['rcan_x4_L2'][0]))
    assert rcan.supports_bfloat16
    out = rcan.bfloat16()(torch.rand(1, 3, 6, 6, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 24, 24)
    with pytest.raises(spandrel.UnsupportedDtypeError):
        rcan.half()
    with pytest.warns(RuntimeWarning):
        swin = load_with(d2c_registry(), save_d2c(tmp_path / 'swin.pth', **NETWORKS['swinir_x2_L1'][0]))
    assert not swin.supports_bfloat16


def test_no_stock_architecture_claims_d2c_and_ours_goes_first(tmp_path):
    stock = stock_registry()
    for name, (options, _) in NETWORKS.items():
        state = D2CNet(**options).state_dict()
        assert not [s.architecture.id for s in stock.architectures('detection') if s.detect(state)], name
        with pytest.raises(spandrel.UnsupportedModelError):
            stock.load({'params': state})
    assert d2c_registry().architectures('detection')[0].architecture.id == 'D2C-SR'


@pytest.mark.parametrize('make, owner', [
    (lambda: MSRResNet(num_feat=8, num_block=1, upscale=4), None),
    (lambda: RRDBNet(3, 3, num_feat=8, num_block=1), 'ESRGAN'),
])
def test_other_checkpoints_are_not_claimed(tmp_path, make, owner):
    state = make().state_dict()
    assert not spandrel_util.is_d2c_state_dict(state)
    path = tmp_path / 'other.pth'
    torch.save({'params': state}, path)
    if owner is None:  # spandrel has no MSRResNet: it refuses, as without D2C-SR
        with pytest.raises(spandrel.UnsupportedModelError):
            load_with(d2c_registry(), str(path))
    else:
        assert load_with(d2c_registry(), str(path)).architecture.id == owner


def test_detect_never_raises_on_odd_state_dicts():
    head = {'head.weight': 1, 'res_convs.0.0.weight': 1, 'convergence.0.weight': 1, 'tree.0.0.0.weight': 1}
    for odd in ({}, {0: 1}, [], {**head, 'tails.0.1.weight': 1, 7: 1}, {**head, 'tails.0.1.weight': 1, 'x.w': 1}):
        assert not spandrel_util.is_d2c_state_dict(odd)
    assert spandrel_util.is_d2c_state_dict({**head, 'tails.0.1.weight': 1})


def test_corrupt_and_damaged_files_give_clear_errors(tmp_path):
    options = NETWORKS['rcan_x4_L2'][0]
    good = save_d2c(tmp_path / 'good.pth', **options)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(open(good, 'rb').read()[:1000])
    with pytest.raises(RuntimeError, match='zip archive'):  # torch's reading error, before any detection
        load_with(d2c_registry(), str(truncated))

    state = D2CNet(**options).state_dict()
    del state['tails.3.1.weight']
    with pytest.raises(spandrel.UnsupportedModelError, match=r'missing in the checkpoint \(1\): tails\.3\.1\.weight'):
        d2c_registry().load(state)
    state = D2CNet(**options).state_dict()
    state['head.bias'] = 'not a tensor'
    with pytest.raises(UserError, match='not tensors'):
        d2c_registry().load(state)
    vdsr = D2CNet(**dict(TINY, tree_depth=1, upscale=2, branch_type='VDSRBranch', upsampler='interpolate'))
    with pytest.raises(UserError, match="'interpolate' upsampler.*d2c-infer"):
        d2c_registry().load(vdsr.state_dict())


def test_install_is_idempotent_and_targets_main_registry_by_default():
    registry = stock_registry()
    assert spandrel_util.install(registry) is registry
    count = len(registry)
    assert spandrel_util.install(registry) is registry and len(registry) == count
    assert spandrel_util.install() is spandrel.MAIN_REGISTRY and 'D2C-SR' in spandrel.MAIN_REGISTRY


def test_missing_spandrel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(spandrel_util, '_CACHE', {})
    monkeypatch.setitem(sys.modules, 'spandrel', None)  # what an environment without spandrel gives
    with pytest.raises(UserError, match='pip install "d2c-sr\\[spandrel\\]"'):
        spandrel_util.install()


def run_python(code, cwd, env_extra=None):
    env = dict(os.environ)
    env.pop('D2C_SR_NO_AUTOLOAD', None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, '-c', code],
                          env=env,
                          cwd=str(cwd),
                          capture_output=True,
                          text=True,
                          timeout=120)


def test_import_spandrel_autoloads_d2c(tmp_path):
    if not os.path.isfile(os.path.join(sysconfig.get_paths()['purelib'], 'd2c_sr_autoload.pth')):
        pytest.skip('d2c-sr is not pip-installed into this Python (no d2c_sr_autoload.pth in site-packages)')
    path = save_d2c(tmp_path / 'auto.pth', **NETWORKS['rcan_x4_L2'][0])
    code = ('import sys, spandrel\n'
            'assert "basicsr" not in sys.modules and "d2c_arch" not in sys.modules, "imported at import spandrel"\n'
            'print("D2C-SR" in spandrel.MAIN_REGISTRY)\n'
            f'd = spandrel.ModelLoader().load_from_file({path!r})\n'
            'print(d.architecture.id, d.scale, type(d.model).__name__)')
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ['True', 'D2C-SR', '4', 'D2CNet']

    opted_out = run_python('import spandrel; print("D2C-SR" in spandrel.MAIN_REGISTRY)', tmp_path,
                           {'D2C_SR_NO_AUTOLOAD': '1'})
    assert opted_out.returncode == 0 and opted_out.stdout.strip() == 'False', opted_out.stderr[-3000:]


def test_broken_plugin_warns_and_spandrel_still_works(tmp_path):
    broken = tmp_path / 'd2c_utils'
    broken.mkdir()
    (broken / '__init__.py').write_text('raise RuntimeError("simulated breakage")\n')
    result = run_python(
        'import warnings; warnings.simplefilter("always")\nimport spandrel\n'
        'print("D2C-SR" in spandrel.MAIN_REGISTRY, len(spandrel.MAIN_REGISTRY) > 10)', tmp_path,
        {'PYTHONPATH': str(tmp_path)})
    if 'could not register' not in result.stderr and result.stdout.split() == ['True', 'True']:
        pytest.skip('the autoload hook is not active in this Python (d2c-sr not pip-installed)')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ['False', 'True']
    assert 'could not register D2C-SR with spandrel' in result.stderr and 'simulated breakage' in result.stderr
