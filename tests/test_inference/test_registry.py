"""The method registry: one entry per method, asked by the loader, the tools and spandrel."""
import os
import re

import pytest
import torch
import yaml
from conftest import REPO_ROOT, assert_checkpoint_loads_and_runs
from test_dan import tiny_dan
from test_infer import TINY as TINY_D2C
from test_infer import make_net, save_model
from test_sdflow import TINY as TINY_SDFLOW

from d2c_arch import SDFlow
from d2c_inference import registry
from d2c_inference.checkpoint_util import load_model
from d2c_tools import infer as infer_tool
from d2c_tools import summary as summary_tool
from d2c_utils.errors import UserError


def tiny_sdflow(seed=0):
    torch.manual_seed(seed)
    net = SDFlow(**TINY_SDFLOW).eval()
    for param in net.parameters():  # no zero-initialised layer: every part of the flow does something
        param.data.add_(torch.randn_like(param) * 0.01)
    return net


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """(path, net, option file or None) of a weights-only checkpoint per method (D2CNet with its option file)."""
    root = str(tmp_path_factory.mktemp('methods'))
    pth, yml, d2c = save_model(root, 'd2c')
    dan, sdflow = tiny_dan(), tiny_sdflow()
    torch.save({'params': dan.state_dict()}, os.path.join(root, 'dan.pth'))
    torch.save({'params_ema': sdflow.state_dict()}, os.path.join(root, 'sdflow.pth'))
    return {
        'D2CNet': (pth, d2c, yml),
        'DAN': (os.path.join(root, 'dan.pth'), dan, None),
        'SDFlow': (os.path.join(root, 'sdflow.pth'), sdflow, None),
    }


@pytest.mark.parametrize('method', ['D2CNet', 'DAN', 'SDFlow'])
def test_every_method_loads_and_runs_through_the_one_loader_and_spandrel(checkpoints, method):
    path, net, opt = checkpoints[method]
    info = assert_checkpoint_loads_and_runs(path, net, method, opt)
    if opt is None:  # read from the weights: what they cannot tell is named
        assert info['warnings'] and all(key in info['warnings'][0] for key in registry.method_named(method).assumed)


@pytest.mark.parametrize('method', ['D2CNet', 'DAN', 'SDFlow'])
def test_each_state_dict_is_recognised_by_its_entry_only(checkpoints, method):
    state = checkpoints[method][1].state_dict()
    assert [m.name for m in registry.METHODS if m.detect(state)] == [method]
    assert registry.detect_method(state).name == method


def test_foreign_and_damaged_state_dicts_are_nobodys():
    from basicsr.archs.rcan_arch import RCAN
    rcan = RCAN(3, 3, num_feat=8, num_group=1, num_block=1, squeeze_factor=4, upscale=2).state_dict()
    for state in (rcan, {}, {1: 2}, {'head.weight': 1}, None, 'text'):
        assert registry.detect_method(state if state is not None else {}) is None


def test_options_from_the_weights_name_what_is_assumed(checkpoints):
    dan = registry.method_named('DAN')
    options = dan.options_from_weights(checkpoints['DAN'][1].state_dict())
    assert options['type'] == 'DAN' and options['loop'] == 4 and options['group_skip'] == 'double'
    assert options['kernel_size'] == checkpoints['DAN'][1].kernel_size
    assert 'loop=4 and group_skip=double assumed' in dan.assumed_note()


def test_unknown_type_names_the_file_and_the_known_methods(tmp_path, checkpoints):
    yml = tmp_path / 'rcan.yml'
    yml.write_text(yaml.safe_dump({'network_g': {'type': 'RCAN', 'num_feat': 8}}))
    with pytest.raises(UserError, match=r"rcan\.yml: network_g type is 'RCAN'; d2c-sr runs D2CNet, DAN, SDFlow"):
        load_model(checkpoints['D2CNet'][0], str(yml))


def test_one_precedence_rule_option_file_then_carried_then_weights(tmp_path, checkpoints):
    path, net, yml = checkpoints['D2CNet']
    with pytest.raises(UserError, match='--opt is required'):  # D2CNet's mean and range are never guessed to run
        load_model(path)
    assert 'shape inferred' in load_model(path, infer_missing=True)[1]['opt_source']
    carried = str(tmp_path / 'carried.pth')
    wrong = dict(TINY_D2C, num_feat=16)  # the option file wins over what the checkpoint carries
    torch.save({'params': net.state_dict(), 'network_g': TINY_D2C}, carried)
    assert load_model(carried)[1]['opt_source'].endswith('(carried options)')
    bad = tmp_path / 'bad.yml'
    bad.write_text(yaml.safe_dump({'network_g': wrong}))
    with pytest.raises(
            UserError, match=r'does not fit network_g of .*bad\.yml[\s\S]*num_feat: options 16, checkpoint 8'):
        load_model(carried, str(bad))


def test_d2c_infer_refuses_what_a_method_cannot_do(tmp_path, checkpoints, capsys):
    img = tmp_path / 'in.png'
    import cv2
    import numpy as np
    cv2.imwrite(str(img), np.full((8, 8, 3), 128, np.uint8))
    cases = [('DAN', ['--save-branches'], 'holds a DAN: DAN has no branches'),
             ('SDFlow', ['--reference', str(tmp_path)], 'holds a SDFlow: SDFlow writes samples'),
             ('D2CNet', ['--samples', '2'], 'holds a D2CNet: --downscale, --samples and --temperature are for SDFlow'),
             ('DAN', ['--compile'], '--compile compiles D2CNet models')]
    for method, flags, message in cases:
        path, _, opt = checkpoints[method]
        argv = ['-i', str(img), '-o', str(tmp_path / 'out'), '--model', path] + (['--opt', opt] if opt else [])
        assert infer_tool.main(argv + flags) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'out')  # refused before any output


@pytest.mark.parametrize('method', ['DAN', 'SDFlow'])
def test_d2c_summary_reports_every_method(checkpoints, method, capsys):
    path, net, _ = checkpoints[method]
    assert summary_tool.main(['--model', path, '--count-size', '8']) == 0
    out = capsys.readouterr().out
    assert out.startswith(f'{method} from {path}')
    total = int(re.search(r'^total\s+([\d,]+)', out, re.M).group(1).replace(',', ''))
    assert total == sum(p.numel() for p in net.parameters())


def test_no_method_names_are_branched_on_outside_the_registry():
    """Tools, deployment and inference ask the registry: no ``kind ==`` strings or isinstance checks on methods."""
    pattern = re.compile(r"""(==|!=|\bin)\s*\(?['"](D2CNet|DAN|SDFlow)['"]|isinstance\([^)]*\b(D2CNet|DAN|SDFlow)\b""")
    found = []
    for package in ('d2c_tools', 'd2c_deploy', 'd2c_inference'):
        for name in sorted(os.listdir(os.path.join(REPO_ROOT, package))):
            if name.endswith('.py') and name != 'registry.py':
                with open(os.path.join(REPO_ROOT, package, name), encoding='utf-8') as f:
                    found += [f'{package}/{name}:{i}' for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not found, found


def test_d2cnet_of_any_depth_is_recognised():
    net, _ = make_net(tree_depth=1, tree_width=3)
    assert registry.detect_method(net.state_dict()).name == 'D2CNet'


@pytest.mark.parametrize('arch, options',
                         [('RDN', dict(num_feat=8, num_block=1, num_layer=2, num_grow_ch=4, upscale=2)),
                          ('IMDN', dict(num_feat=8, num_block=1, upscale=3)),
                          ('VDSR', dict(num_feat=8, num_block=2, upscale=2))])
def test_table3_originals_run_in_d2c_infer_with_their_option_file(tmp_path, arch, options, capsys):
    import cv2
    import numpy as np

    from basicsr.utils.registry import ARCH_REGISTRY
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get(arch)(**options).eval()
    pth, yml = tmp_path / 'net.pth', tmp_path / 'net.yml'
    torch.save({'params': net.state_dict()}, pth)
    yml.write_text(yaml.safe_dump({'network_g': dict(options, type=arch)}))
    with pytest.raises(UserError, match='--opt is required'):  # the weights do not tell the scale
        load_model(str(pth))
    (tmp_path / 'lr').mkdir()
    (tmp_path / 'hr').mkdir()
    lr = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'lr' / 'a.png'), lr)
    scale = options['upscale']
    cv2.imwrite(str(tmp_path / 'hr' / 'a.png'), cv2.resize(lr, (12 * scale, 10 * scale)))
    argv = ['-i', str(tmp_path / 'lr'), '-o', str(tmp_path / 'out'), '--model', str(pth), '--opt', str(yml)]
    assert infer_tool.main(argv + ['--backend', 'torch', '--precision', 'fp32', '--reference',
                                   str(tmp_path / 'hr')]) == 0
    out = cv2.imread(str(tmp_path / 'out' / 'a_out.png'))
    with torch.no_grad():
        expected = net(torch.from_numpy(lr[..., ::-1].transpose(2, 0, 1) / 255.).float()[None])
    expected = (expected[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1] * 255.).round()
    assert out.shape == (10 * scale, 12 * scale, 3) and np.abs(out - expected).max() <= 1
    assert f'{arch} x{scale}' in capsys.readouterr().out
    assert infer_tool.main(argv + ['-o', str(tmp_path / 'x'), '--save-branches']) == 2
    assert summary_tool.main(['--opt', str(yml), '--count-size', '8']) == 0
    assert capsys.readouterr().out.startswith(f'{arch} from {yml}')
