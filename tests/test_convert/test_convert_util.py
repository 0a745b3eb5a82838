"""d2c_convert.convert_util: the pipeline the three official converters share.

The same damage (a NaN, a resized tensor, a missing tensor) in an official D2C-SR, DANv2 or SDFlow
file gives the same kind of one-line error naming the key and the file, and leaves nothing
behind; the shared check, reader and writer on their own, on tiny hand-made inputs.
"""
import re

import numpy as np
import pytest
import test_convert_dan as dan_tests
import test_convert_official as official_tests
import test_convert_sdflow as sdflow_tests
import torch

from d2c_convert import convert_util as cu
from d2c_tools import convert_dan, convert_official, convert_sdflow
from d2c_utils.errors import UserError


# ----------------------------------------------------------------------------------------------
# One damaged input per converter: (argv, the damaged file, the official key named, the network)
# ----------------------------------------------------------------------------------------------
def _official_case(tmp_path, damage):
    sd_d, sd_c = (dict(sd) for sd in official_tests.random_official(4, seed=4, nf=8, ng=1, nb=1, reduction=4))
    if damage == 'nan':
        key = 'body21.1.bias'
        sd_d[key] = np.full((1, 8, 1, 1), np.nan, np.float32)
    elif damage == 'resized':
        key = 'tail12.1.weight'
        sd_d[key] = np.zeros((3, 8, 5, 5), np.float32)
    else:
        key = 'res_conv5.bias'
        del sd_d[key]
    src = official_tests.write_pickle(tmp_path / 'damaged.pkl', {'state_dict_D': sd_d, 'state_dict_C': sd_c})
    return convert_official.main, [src], src, key, 'D2CNet'


def _dan_case(tmp_path, damage):
    state = dan_tests.random_official(4, seed=2)
    if damage == 'nan':
        key = 'Restorer.fusion.weight'
        state[key][0, 0, 0, 0] = float('inf')
    elif damage == 'resized':
        key = 'Restorer.fusion.weight'
        state[key] = torch.zeros(8, 8, 1, 1)
    else:
        key = 'Restorer.body.1.body.1.body1.2.bias'
        del state[key]
    src = str(tmp_path / 'damaged.pth')
    torch.save(state, src)
    return convert_dan.main, [src], src, key, 'DAN'


@pytest.fixture(scope='module')
def sdflow_parts():
    return {k: v.state_dict() for k, v in sdflow_tests.official_parts(sdflow_tests.SMALL, seed=0).items()}


def _sdflow_case(tmp_path, damage, parts):
    states = {k: dict(v) for k, v in parts.items()}
    if damage == 'nan':
        part, key = 'lrencoder', 'out_conv.3.bias'
        states[part][key] = states[part][key].clone()
        states[part][key][0] = float('nan')
    elif damage == 'resized':
        part, key = 'contentnet', 'blocks.0.expand_transition.transitions.0.actnorm.loc'
        states[part][key] = torch.zeros(1, 3, 1, 1)
    else:
        part, key = 'hrnet', 'blocks.1.steps.2.affine_coulping.net.conv3.logs'
        del states[part][key]
    argv = []
    for name, state in states.items():
        path = str(tmp_path / (f'damaged_{name}.pth' if name == part else f'{name}.pth'))
        torch.save(state, path)
        argv += [f'--{name}', path]
    return convert_sdflow.main, argv + ['-o'], str(tmp_path / f'damaged_{part}.pth'), key, 'SDFlow'


@pytest.mark.parametrize('damage', ['nan', 'resized', 'missing'])
@pytest.mark.parametrize('converter', ['official', 'dan', 'sdflow'])
def test_damage_gives_one_message_format_naming_key_and_file(tmp_path, capsys, request, converter, damage):
    if converter == 'official':
        main, argv, src, key, network = _official_case(tmp_path, damage)
    elif converter == 'dan':
        main, argv, src, key, network = _dan_case(tmp_path, damage)
    else:
        main, argv, src, key, network = _sdflow_case(tmp_path, damage, request.getfixturevalue('sdflow_parts'))
    out, yml = tmp_path / 'out.pth', tmp_path / 'out.yml'
    rc = main(argv + [str(out), '--opt-out', str(yml)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and ': error: ' in lines[0], err
    line = lines[0]
    if damage == 'nan':
        assert re.search(rf'1 array\(s\) hold NaN or inf values: {re.escape(key)}\b', line), line
        assert src in line and 'damaged' in line
    elif damage == 'resized':
        # <file>: <key> <shape> vs <network> <our key> <shape> (<file>[<key>] for the authors' sections)
        assert re.search(rf'1 shape mismatch\(es\): .*{re.escape(key)}\]? \(\d+(, \d+)*\) vs {network} \S+ \(', line)
        assert src in line and 'layout read from the weights' in line
    else:
        assert re.search(rf'1 {network} (parameter|key)\(s\) ', line), line
        # the official converters of one file name it first; SDFlow's names the flag that should have given it
        assert line.split(': error: ', 1)[1].startswith(f'{src}: ') or '(--hrnet)' in line
        assert 'layout read from the weights' in line
    assert not out.exists() and not yml.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]


# ----------------------------------------------------------------------------------------------
# The check on its own
# ----------------------------------------------------------------------------------------------
def test_check_mapping_lists_every_kind_of_problem_in_one_line():
    targets = {'a.weight': (2, 3), 'b.weight': (4, ), 'c.weight': (1, )}
    converted = {'a.weight': torch.zeros(2, 2), 'b.weight': torch.zeros(4), 'extra.weight': torch.zeros(1)}
    origins = {'a.weight': ('x.pth', 'A.w'), 'b.weight': ('x.pth', 'B.w'), 'extra.weight': ('y.pth', 'E.w')}
    with pytest.raises(UserError) as exc:
        cu.check_mapping(converted, targets, origins, 'Net', 'tiny', leftover=[('y.pth', 'junk')])
    assert str(exc.value) == ('2 checkpoint key(s) match no Net parameter: y.pth: junk, y.pth: E.w (-> extra.weight); '
                              '1 Net parameter(s) not in the checkpoint: c.weight; '
                              '1 shape mismatch(es): x.pth: A.w (2, 2) vs Net a.weight (2, 3) '
                              '(layout read from the weights: tiny)')


def test_check_mapping_sections_path_and_non_finite():
    targets = {'a': (2, ), 'n': (1, ), 'i': (1, )}
    converted = {'a': np.array([1.0, np.inf], np.float32), 'n': torch.tensor([float('nan')]), 'i': torch.tensor([7])}
    origins = {'a': ('state_dict_D', 'A'), 'n': ('state_dict_C', 'N'), 'i': (None, 'I')}
    with pytest.raises(UserError) as exc:
        cu.check_mapping(converted, targets, origins, 'Net', 'tiny', path='f.pkl', sections=True)
    assert str(exc.value).startswith('f.pkl: 2 array(s) hold NaN or inf values: A (state_dict_D), N (state_dict_C);')
    del targets['a']
    with pytest.raises(
            UserError,
            match=r'^f\.pkl: 1 checkpoint key\(s\) match no Net parameter: '
            r'state_dict_D\[A\] \(-> a\) \(layout'):
        cu.check_mapping(converted, targets, origins, 'Net', 'tiny', path='f.pkl', sections=True)
    converted['n'] = torch.tensor([0.5])
    del converted['a']
    cu.check_mapping(converted, targets, origins, 'Net', 'tiny')  # integers are not checked for NaN


def test_short_list_says_how_many_more():
    assert cu.short_list(['a', 'b', 'c'], 2) == 'a, b, ... and 1 more'
    assert cu.short_list(str(i) for i in range(3)) == '0, 1, 2'


# ----------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------
def test_read_state_dict_unwraps_and_refuses_with_what_is_expected(tmp_path):
    path = str(tmp_path / 'w.pth')
    torch.save({'state_dict': {'module.conv.weight': torch.ones(1)}}, path)
    state, wrapper = cu.read_state_dict(path, '--in <w.pth>', 'expected the release')
    assert list(state) == ['conv.weight'] and wrapper == 'state_dict'
    for obj, needle in (([1], 'holds a list, not a state dict'), ({
            'params': {}
    }, 'the state dict [params] is empty'), ({
            'epoch': 3
    }, "not a state dict of tensors: 'epoch'")):
        torch.save(obj, path)
        with pytest.raises(UserError) as exc:
            cu.read_state_dict(path, '--in <w.pth>', 'expected the release')
        assert needle in str(exc.value) and path in str(exc.value) and 'expected the release' in str(exc.value)
    with pytest.raises(UserError, match=r'not found.*--in <w\.pth>.*expected the release'):
        cu.read_state_dict(str(tmp_path / 'nope.pth'), '--in <w.pth>', 'expected the release')


def test_write_converted_is_all_or_nothing(tmp_path, monkeypatch):
    net_opt = {'type': 'VDSR'}
    state = {'w': torch.zeros(2)}
    out, yml = tmp_path / 'c.pth', tmp_path / 'c.yml'
    lines = cu.write_converted(str(out), state, net_opt, {'file': 'x', 'tool': 't'}, 2, str(yml), 'a: 1\n')
    ckpt = torch.load(out, weights_only=True)
    assert ckpt['network_g'] == net_opt and ckpt['converted_from'] == {'file': 'x', 'tool': 't', 'network_g': net_opt}
    assert yml.read_text() == 'a: 1\n' and lines[0].startswith(f'wrote {out}: 1 tensors, 0.00M parameters, sha256 ')

    def fail(path, text):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(cu, 'atomic_write_text', fail)
    with pytest.raises(OSError):
        cu.write_converted(str(tmp_path / 'd.pth'), state, net_opt, {}, 2, str(tmp_path / 'd.yml'), 'a: 1\n')
    assert not (tmp_path / 'd.pth').exists() and not (tmp_path / 'd.yml').exists()
    cu.write_converted(str(tmp_path / 'e.pth'), state, net_opt, {}, 2, carry_options=False)
    assert 'network_g' not in torch.load(tmp_path / 'e.pth', weights_only=True)
