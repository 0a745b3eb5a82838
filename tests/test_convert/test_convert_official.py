"""d2c_tools.convert_official, d2c_convert.official_util: the authors' checkpoint -> a BasicSR checkpoint for D2CNet.

The real released file is not available here. These tests build checkpoints in the authors'
layout two independent ways: from D2CNet through ``export_official`` (round trip), and from the
authors' key names and shapes as their MegEngine code (github.com/megvii-research/D2C-SR) defines
them (``official_shapes`` below, not the converter's table; "the facts note" below means the
project's notes on that code, which are not part of this repository), checked against a functional
re-implementation of the authors' D_Net / C_Net (``reference_forward``).
"""
import io
import os
import pickle
import runpy
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from torch.nn import functional as F

from basicsr.utils.options import ordered_yaml
from d2c_arch import D2CNet
from d2c_convert import official_util as co
from d2c_tools import convert_official

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)
RGB_MEAN_OF_CONVERTED = [0.4040, 0.4371, 0.4488]  # the authors' (BGR) mean seen in RGB order
NODES = ('1', '2', '11', '12', '21', '22')
LEAVES = ('11', '12', '21', '22')
UPSAMPLER = {2: ((0, 4, 2), ), 3: ((0, 9, 3), ), 4: ((0, 4, 2), (2, 4, 2)), 8: ((0, 4, 2), (2, 4, 2), (4, 4, 2))}


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared; one thread is ~30x faster than two contended ones here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The authors' layout, written from the facts note (independent of the converter's table)
# ----------------------------------------------------------------------------------------------
def official_shapes(scale, nf=64, ng=2, nb=4, reduction=16):
    """{key: shape} of the authors' state_dict_D and state_dict_C (MegEngine: biases (1, C, 1, 1))."""
    sd_d, sd_c = {}, {}

    def conv(name, cin, cout, k=3):
        sd_d[f'{name}.weight'] = (cout, cin, k, k)
        sd_d[f'{name}.bias'] = (1, cout, 1, 1)

    conv('sub_mean', 3, 3, 1)
    conv('add_mean', 3, 3, 1)
    conv('head.0', 3, nf)
    for node in NODES:
        for g in range(ng):
            for b in range(nb):
                rcab = f'body{node}.{g}.body.{b}.body'
                conv(f'{rcab}.0', nf, nf)
                conv(f'{rcab}.2', nf, nf)
                conv(f'{rcab}.3.conv_du.0', nf, nf // reduction, 1)
                conv(f'{rcab}.3.conv_du.2', nf // reduction, nf, 1)
            conv(f'body{node}.{g}.body.{nb}', nf, nf)
        conv(f'body{node}.{ng}', nf, nf)
    for k in range(1, 9):
        conv(f'res_conv{k}', nf, nf)
    for leaf in LEAVES:
        for index, factor, _ in UPSAMPLER[scale]:
            conv(f'tail{leaf}.0.{index}', nf, factor * nf)
        conv(f'tail{leaf}.1', nf, 3)
    for i, (cin, cout) in enumerate(((12, 64), (64, 64), (64, 4))):
        sd_c[f'fusion_final.{i}.conv.weight'] = (cout, cin, 3, 3)
    return sd_d, sd_c


def random_official(scale, seed=0, **layout):
    """Random arrays under the authors' keys; the mean-shift layers hold the authors' constants."""
    rng = np.random.default_rng(seed)
    shapes_d, shapes_c = official_shapes(scale, **layout)
    sds = []
    for shapes in (shapes_d, shapes_c):
        sd = {}
        for key, shape in shapes.items():
            if key.endswith('weight'):
                fan_in = int(np.prod(shape[1:]))
                sd[key] = (rng.standard_normal(shape) * 0.5 / np.sqrt(fan_in)).astype(np.float32)
            else:
                sd[key] = (rng.standard_normal(shape) * 0.01).astype(np.float32)
        sds.append(sd)
    sd_d = sds[0]
    mean = np.array(DIV2K_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    eye = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    sd_d.update({
        'sub_mean.weight': eye.copy(),
        'sub_mean.bias': -mean,
        'add_mean.weight': eye.copy(),
        'add_mean.bias': mean.copy()
    })
    return sd_d, sds[1]


def _conv(x, sd, name):
    weight = torch.from_numpy(sd[f'{name}.weight'])
    bias = sd.get(f'{name}.bias')
    bias = None if bias is None else torch.from_numpy(bias.reshape(-1))
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)


def _node(x, sd, node, ng, nb):
    """The authors' basic branch module: G x ResidualGroup(B x RCAB, conv, skip), then a conv."""
    h = x
    for g in range(ng):
        r = h
        for b in range(nb):
            p = f'body{node}.{g}.body.{b}.body'
            y = _conv(F.relu(_conv(r, sd, f'{p}.0')), sd, f'{p}.2')
            att = torch.sigmoid(
                _conv(F.relu(_conv(y.mean((2, 3), keepdim=True), sd, f'{p}.3.conv_du.0')), sd, f'{p}.3.conv_du.2'))
            r = y * att + r
        h = _conv(r, sd, f'body{node}.{g}.body.{nb}') + h
    return _conv(h, sd, f'body{node}.{ng}')


def reference_forward(sd_d, sd_c, x, scale, ng=2, nb=4):
    """The authors' D_Net + C_Net (facts note), functional. x: (N, 3, H, W) in their channel order.

    Returns (branches (N, 4, 3, sH, sW) in the order 11, 12, 21, 22, fused (N, 3, sH, sW)).
    """
    head = _conv(_conv(x, sd_d, 'sub_mean'), sd_d, 'head.0')
    level1 = {'1': _node(head, sd_d, '1', ng, nb), '2': _node(head, sd_d, '2', ng, nb)}
    outs = []
    for i, leaf in enumerate(LEAVES):
        parent = level1[leaf[0]]
        h = _conv(_node(parent, sd_d, leaf, ng, nb), sd_d, f'res_conv{2 * i + 1}') + parent
        h = _conv(h, sd_d, f'res_conv{2 * i + 2}') + head
        for index, _, shuffle in UPSAMPLER[scale]:
            h = F.pixel_shuffle(_conv(h, sd_d, f'tail{leaf}.0.{index}'), shuffle)
        outs.append(_conv(_conv(h, sd_d, f'tail{leaf}.1'), sd_d, 'add_mean'))
    mask = torch.cat(outs, dim=1)
    for i in range(3):
        mask = F.relu(_conv(mask, sd_c, f'fusion_final.{i}.conv'))
    mask = F.softmax(mask, dim=1)
    fused = sum(mask[:, i:i + 1] * out for i, out in enumerate(outs))
    return torch.stack(outs, dim=1), fused


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def write_pickle(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def run_cli(capsys, *argv):
    rc = convert_official.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def load_converted(path):
    ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
    opt = dict(ckpt['converted_from']['network_g'])
    opt.pop('type')
    net = D2CNet(**opt).eval()
    net.load_state_dict(ckpt['params'], strict=True)
    return net, ckpt


def converted_net(sd_d, sd_c, channel_order='bgr', fold=False):
    state_dict, net_opt, _ = co.convert_state_dicts(sd_d, sd_c, channel_order, fold)
    net = D2CNet(**{k: v for k, v in net_opt.items() if k != 'type'}).eval()
    net.load_state_dict(state_dict, strict=True)
    return net


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('d2c-convert-official: error: '), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------------------------------------
# 1. Round trip through the CLI
# ----------------------------------------------------------------------------------------------
def test_export_matches_the_authors_layout_from_the_facts_note():
    """The inverse table gives exactly the keys and shapes the facts note describes (x4, paper layout)."""
    net = D2CNet(upscale=4, rgb_mean=RGB_MEAN_OF_CONVERTED)
    sd_d, sd_c = co.export_official(net.state_dict())
    want_d, want_c = official_shapes(4)
    assert {k: v.shape for k, v in sd_d.items()} == want_d
    assert {k: v.shape for k, v in sd_c.items()} == want_c
    assert all(v.dtype == np.float32 for v in list(sd_d.values()) + list(sd_c.values()))
    np.testing.assert_array_equal(sd_d['sub_mean.bias'].ravel(), -np.float32(DIV2K_MEAN))


@pytest.mark.parametrize(
    'scale, protocol, channel_order, small',
    [
        (4, pickle.DEFAULT_PROTOCOL, 'rgb', False),  # the paper's x4 network
        (2, 2, 'rgb', True),  # protocol 2 pickles bytes through _codecs.encode
        (3, 5, 'bgr', True),  # protocol 5 uses numpy's _frombuffer
        (8, 4, 'rgb', True),
    ],
    ids=['x4-paper', 'x2-proto2', 'x3-proto5-bgr', 'x8'])
def test_cli_round_trip_is_bit_identical(tmp_path, capsys, scale, protocol, channel_order, small):
    torch.manual_seed(scale)
    layout = dict(num_feat=16, num_group=1, num_block=2, reduction=4) if small else {}
    rgb_mean = RGB_MEAN_OF_CONVERTED if channel_order == 'rgb' else list(DIV2K_MEAN)
    net = D2CNet(upscale=scale, rgb_mean=rgb_mean, **layout).eval()
    sd_d, sd_c = co.export_official(net.state_dict(), channel_order=channel_order)
    src = write_pickle(tmp_path / 'checkpoint.pkl', {
        'state_dict_D': sd_d,
        'state_dict_C': sd_c,
        'epoch': 7,
        'optimizer_D': {
            'lr': 1e-4
        }
    }, protocol)
    argv = [
        src, tmp_path / 'out' / 'net.pth', '--opt-out', tmp_path / 'net.yml', '--channel-order', channel_order,
        '--scale', scale
    ]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "ignored top-level entries (not needed for inference): 'epoch', 'optimizer_D'" in out
    assert f'x{scale}' in out and 'rgb_mean:' in out

    converted, ckpt = load_converted(tmp_path / 'out' / 'net.pth')
    original = net.state_dict()
    assert list(ckpt['params']) == list(original)
    assert all(torch.equal(ckpt['params'][k], original[k]) for k in original)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        sr, branches, weights = net(x, return_branches=True)
        sr2, branches2, weights2 = converted(x, return_branches=True)
    assert torch.equal(sr, sr2) and torch.equal(branches, branches2) and torch.equal(weights, weights2)

    with open(tmp_path / 'net.yml') as f:
        snippet = yaml.load(f, Loader=ordered_yaml()[0])['network_g']
    assert snippet['upscale'] == scale and snippet['rgb_mean'] == pytest.approx(rgb_mean)
    assert dict(snippet) == ckpt['converted_from']['network_g']


# ----------------------------------------------------------------------------------------------
# 2. Against the authors' network, from the facts note
# ----------------------------------------------------------------------------------------------
def test_converted_network_computes_the_authors_function():
    """Paper layout, x4: BGR conversion equals the reference; RGB conversion equals it on flipped colours."""
    sd_d, sd_c = random_official(4, seed=1)
    x_bgr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        ref_branches, ref_fused = reference_forward(sd_d, sd_c, x_bgr, 4)
        fused, branches, _ = converted_net(sd_d, sd_c, 'bgr')(x_bgr, return_branches=True)
        torch.testing.assert_close(branches, ref_branches, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused, ref_fused, rtol=1e-4, atol=1e-5)

        x_rgb = x_bgr.flip(1)
        fused, branches, _ = converted_net(sd_d, sd_c, 'rgb')(x_rgb, return_branches=True)
        torch.testing.assert_close(branches, ref_branches.flip(2), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused, ref_fused.flip(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('scale', [2, 3, 8])
def test_scale_is_read_from_the_tails(scale):
    sd_d, sd_c = random_official(scale, nf=8, ng=1, nb=1, reduction=4)
    _, net_opt, notes = co.convert_state_dicts(sd_d, sd_c)
    assert net_opt['upscale'] == scale
    assert notes['layout'] == dict(num_feat=8, num_group=1, num_block=1, reduction=4, upscale=scale, num_fusion_feat=64)
    x = torch.rand(1, 3, 4, 5)
    with torch.no_grad():
        ref_branches, ref_fused = reference_forward(sd_d, sd_c, x, scale, ng=1, nb=1)
        fused, branches, _ = converted_net(sd_d, sd_c, 'bgr')(x, return_branches=True)
    torch.testing.assert_close(fused, ref_fused, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(branches, ref_branches, rtol=1e-4, atol=1e-5)


class _Branches:
    """Branch outputs of the converted network for variants of one authors'-layout checkpoint."""

    def __init__(self, sd_d, sd_c):
        self.sd_d, self.sd_c = sd_d, sd_c
        self.x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.net = converted_net(sd_d, sd_c, 'rgb')

    def run(self, sd_d=None, sd_c=None):
        state_dict, _, _ = co.convert_state_dicts(sd_d or self.sd_d, sd_c or self.sd_c, 'rgb')
        self.net.load_state_dict(state_dict, strict=True)
        with torch.no_grad():
            sr, branches, _ = self.net(self.x, return_branches=True)
        return branches[0], sr  # (4, 3, 32, 32), (1, 3, 32, 32)

    @staticmethod
    def changed(a, b):
        """Indices of the branches whose output differs."""
        return [i for i in range(4) if not torch.equal(a[i], b[i])]


def _edit(sd, prefix, how, seed=0):
    """A copy of sd with every array under ``prefix`` zeroed ('zero') or perturbed ('perturb')."""
    rng = np.random.default_rng(seed)
    out = dict(sd)
    hits = [k for k in sd if k.startswith(prefix)]
    assert hits, prefix
    for key in hits:
        if how == 'zero':
            out[key] = np.zeros_like(sd[key])
        else:
            noise = 0.2 * rng.standard_normal(sd[key].shape) / np.sqrt(sd[key][0].size)
            out[key] = sd[key] + noise.astype(np.float32)
    return out


def test_each_leaf_uses_its_residual_convs_and_parent():
    """Facts note: leaf 11 res_conv1 (+ body1) then res_conv2 (+ head); 12: 3/4 (body1); 21: 5/6, 22: 7/8 (body2)."""
    # G=2, B=4 as in the paper; F=16 only to keep the ~40 forward passes fast (routing does not depend on F)
    sd_d, sd_c = random_official(4, seed=2, nf=16, reduction=4)
    probe = _Branches(sd_d, sd_c)
    base, base_sr = probe.run()

    # perturbing res_conv<k> changes exactly the branch of its leaf
    for k in range(1, 9):
        branches, _ = probe.run(_edit(sd_d, f'res_conv{k}.', 'perturb', seed=k))
        assert probe.changed(base, branches) == [(k - 1) // 2], f'res_conv{k}'
    # tree nodes: body1 feeds leaves 11, 12; body2 leaves 21, 22; a leaf node only its branch
    expected = {
        'body1.': [0, 1],
        'body2.': [2, 3],
        'body11.': [0],
        'body12.': [1],
        'body21.': [2],
        'body22.': [3],
        'head.': [0, 1, 2, 3],
        'tail11.': [0],
        'tail12.': [1],
        'tail21.': [2],
        'tail22.': [3]
    }
    for prefix, branches_hit in expected.items():
        branches, _ = probe.run(_edit(sd_d, prefix, 'perturb'))
        assert probe.changed(base, branches) == branches_hit, prefix

    for i, (leaf, parent) in enumerate((('11', '1'), ('12', '1'), ('21', '2'), ('22', '2'))):
        # res_conv(2i+1) zeroed: the branch is parent + ..., so its leaf node no longer matters but the parent does
        first_off = _edit(sd_d, f'res_conv{2 * i + 1}.', 'zero')
        base_i, _ = probe.run(first_off)
        assert i not in probe.changed(base_i, probe.run(_edit(first_off, f'body{leaf}.', 'perturb'))[0])
        assert i in probe.changed(base_i, probe.run(_edit(first_off, f'body{parent}.', 'perturb'))[0])
        # res_conv(2i+2) zeroed: only the head's features remain, so neither node matters
        second_off = _edit(sd_d, f'res_conv{2 * i + 2}.', 'zero')
        base_i, _ = probe.run(second_off)
        for node in (leaf, parent):
            assert i not in probe.changed(base_i, probe.run(_edit(second_off, f'body{node}.', 'perturb'))[0])
        assert i in probe.changed(base_i, probe.run(_edit(second_off, 'head.', 'perturb'))[0])

    # the convergence net changes the fused image only
    branches, sr = probe.run(sd_c=_edit(sd_c, 'fusion_final.0.', 'perturb'))
    assert probe.changed(base, branches) == [] and not torch.equal(sr, base_sr)


# ----------------------------------------------------------------------------------------------
# 3. Mean shift
# ----------------------------------------------------------------------------------------------
def _trained_mean_shift(sd_d, seed):
    """As in every real checkpoint of the release: sub_mean/add_mean trained along with the network
    (their MeanShift's ``.data = ...`` never set them in MegEngine): near identity, other biases."""
    rng = np.random.default_rng(seed)
    for name in ('sub_mean', 'add_mean'):
        sd_d[f'{name}.weight'] = (np.eye(3) + 0.05 * rng.standard_normal((3, 3))).astype(np.float32).reshape(3, 3, 1, 1)
        sd_d[f'{name}.bias'] = (0.3 * rng.standard_normal((1, 3, 1, 1))).astype(np.float32)
    return sd_d


def _assert_matches_reference(net, sd_d, sd_c, x, rgb):
    """The converted net against reference_forward, which applies the 1x1 mean-shift convs explicitly."""
    with torch.no_grad():
        ref_branches, ref_fused = reference_forward(sd_d, sd_c, x, 4, ng=1, nb=1)
        fused, branches, _ = net(x.flip(1) if rgb else x, return_branches=True)
    if rgb:  # the converted net takes and gives RGB; the authors' works on BGR
        ref_branches, ref_fused = ref_branches.flip(2), ref_fused.flip(1)
    torch.testing.assert_close(branches, ref_branches, rtol=1e-4, atol=1e-5)  # borders included
    torch.testing.assert_close(fused, ref_fused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('channel_order', ['rgb', 'bgr'])
def test_trained_mean_shift_is_folded_by_default(tmp_path, capsys, channel_order):
    sd_d, sd_c = random_official(4, seed=3, nf=16, ng=1, nb=1, reduction=4)
    sd_d = _trained_mean_shift(sd_d, seed=3)
    src = write_pickle(tmp_path / 'trained_mean.pkl', {'state_dict_D': sd_d, 'state_dict_C': sd_c})
    args = [] if channel_order == 'rgb' else ['--channel-order', 'bgr']
    rc, out, err = run_cli(capsys, src, tmp_path / 'a.pth', *args)  # no mean-shift flag
    assert rc == 0, err
    assert [line for line in out.splitlines() if line.startswith('mean shift:')] == [
        'mean shift: sub_mean/add_mean are trained 1x1 convs (as in every checkpoint of the release), not the fixed '
        'DIV2K shift; folded exactly into the head and output convs'
    ]
    net, ckpt = load_converted(tmp_path / 'a.pth')
    assert ckpt['converted_from']['mean_shift'] == 'folded'
    _assert_matches_reference(net, sd_d, sd_c, torch.rand(1, 3, 6, 7), rgb=channel_order == 'rgb')


def test_random_mean_shift_as_initialised_by_megengine_is_folded(tmp_path, capsys):
    """Mean-shift convs that are plain random 1x1 convs (MegEngine's initialisation, nothing like the DIV2K shift)."""
    sd_d, sd_c = random_official(4, seed=5, nf=16, ng=1, nb=1, reduction=4)
    rng = np.random.default_rng(5)
    for name in ('sub_mean', 'add_mean'):
        sd_d[f'{name}.weight'] = rng.uniform(-1, 1, (3, 3, 1, 1)).astype(np.float32)
        sd_d[f'{name}.bias'] = np.zeros((1, 3, 1, 1), np.float32)
    src = write_pickle(tmp_path / 'random_mean.pkl', {'state_dict_D': sd_d, 'state_dict_C': sd_c})
    rc, out, err = run_cli(capsys, src, tmp_path / 'r.pth')
    assert rc == 0, err
    assert 'folded exactly' in out
    net, _ = load_converted(tmp_path / 'r.pth')
    _assert_matches_reference(net, sd_d, sd_c, torch.rand(2, 3, 5, 8), rgb=True)


def test_strict_mean_shift_refuses_what_is_not_the_fixed_shift(tmp_path, capsys):
    sd_d, sd_c = random_official(4, seed=3, nf=16, ng=1, nb=1, reduction=4)
    src = write_pickle(tmp_path / 'trained_mean.pkl', {
        'state_dict_D': _trained_mean_shift(sd_d, seed=3),
        'state_dict_C': sd_c
    })
    rc, _, err = run_cli(capsys, src, tmp_path / 'a.pth', '--strict-mean-shift')
    assert_one_line_error(rc, err, 'sub_mean.weight', "not the authors' fixed mean shift", '--strict-mean-shift')
    assert not (tmp_path / 'a.pth').exists()
    # the old spelling of the default still works
    rc, out, err = run_cli(capsys, src, tmp_path / 'a.pth', '--fold-mean-shift', '--channel-order', 'bgr')
    assert rc == 0, err
    assert 'folded' in out


def test_other_constant_mean_is_folded_or_refused_when_strict(tmp_path, capsys):
    net = D2CNet(num_feat=8, num_group=1, num_block=1, reduction=4, rgb_mean=(0.5, 0.5, 0.5))
    sd_d, sd_c = co.export_official(net.state_dict(), rgb_mean=(0.5, 0.5, 0.5))
    src = write_pickle(tmp_path / 'c.pkl', {'state_dict_D': sd_d, 'state_dict_C': sd_c})
    rc, _, err = run_cli(capsys, src, tmp_path / 'c.pth', '--strict-mean-shift')
    assert_one_line_error(rc, err, 'sub_mean.bias', '0.4488')
    rc, out, err = run_cli(capsys, src, tmp_path / 'c.pth')
    assert rc == 0, err
    converted, ckpt = load_converted(tmp_path / 'c.pth')
    assert ckpt['converted_from']['network_g']['rgb_mean'] == pytest.approx([0.5, 0.5, 0.5])
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), net.eval()(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. Bad input: one clear line, exit status 2, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_official():
    return random_official(4, seed=4, nf=8, ng=1, nb=1, reduction=4)


def _variant(sd_d, sd_c, change):
    sd_d, sd_c = dict(sd_d), dict(sd_c)
    change(sd_d, sd_c)
    return {'state_dict_D': sd_d, 'state_dict_C': sd_c}


@pytest.mark.parametrize(
    'change, needles', [
        (lambda d, c: d.update({'body3.0.weight': np.zeros((8, 8, 3, 3), np.float32)}),
         ['1 checkpoint key(s) match no D2CNet parameter', 'state_dict_D[body3.0.weight]']),
        (lambda d, c: d.pop('res_conv5.bias'),
         ['1 D2CNet parameter(s) not in the checkpoint', 'state_dict_D[res_conv5.bias] (for res_convs.2.0.bias)']),
        (lambda d, c: c.pop('fusion_final.2.conv.weight'),
         ['state_dict_C[fusion_final.2.conv.weight] (for convergence.4.weight)']),
        (lambda d, c: d.update({'tail12.1.weight': np.zeros((3, 8, 5, 5), np.float32)}),
         ['state_dict_D[tail12.1.weight] (3, 8, 5, 5) vs D2CNet tails.1.1.weight (3, 8, 3, 3)']),
        (lambda d, c: d.update({'tail11.0.2.weight': np.zeros(
            (16, 8, 3, 3), np.float32)}), ['cannot tell the scale from the upsampler of tail11']),
        (lambda d, c: d.update({'head.0.bias': np.zeros(
            (1, 8, 1, 1), np.int64)}), ["state_dict_D['head.0.bias'] is an array of int64"]),
        (lambda d, c: d.pop('sub_mean.bias'), ["state_dict_D has no 'sub_mean.bias'"]),
        (lambda d, c: d.update({'body21.1.bias': np.full(
            (1, 8, 1, 1), np.nan, np.float32)}), ['1 array(s) hold NaN or inf values: body21.1.bias']),
    ],
    ids=['leftover', 'missing', 'missing-C', 'shape', 'scale', 'dtype', 'mean-missing', 'nan'])
def test_bad_state_dicts(tmp_path, capsys, small_official, change, needles):
    src = write_pickle(tmp_path / 'bad.pkl', _variant(*small_official, change))
    rc, _, err = run_cli(capsys, src, tmp_path / 'bad.pth')
    assert_one_line_error(rc, err, 'bad.pkl', *needles)
    assert not (tmp_path / 'bad.pth').exists()


@pytest.mark.parametrize(
    'obj, needles', [
        ([1, 2], ['the top level is a list']),
        ({
            'state_dict_D': {}
        }, ["missing 'state_dict_C'"]),
        ({
            'params': {}
        }, ['BasicSR checkpoint']),
        ({
            'head.0.weight': np.zeros(1, np.float32)
        }, ['bare D_Net state dict']),
        ({
            'state_dict_D': [1],
            'state_dict_C': {}
        }, ['state_dict_D is a list']),
    ],
    ids=['list', 'no-C', 'basicsr', 'bare', 'not-dict'])
def test_bad_top_level(tmp_path, capsys, obj, needles):
    rc, _, err = run_cli(capsys, write_pickle(tmp_path / 'x.pkl', obj), tmp_path / 'x.pth')
    assert_one_line_error(rc, err, *needles)


def test_usage_errors(tmp_path, capsys, small_official):
    src = write_pickle(tmp_path / 'ok.pkl', _variant(*small_official, lambda d, c: None))
    assert_one_line_error(*run_cli(capsys, tmp_path / 'nope.pkl', tmp_path / 'o.pth')[::2], 'no such file')
    assert_one_line_error(*run_cli(capsys, src, tmp_path / 'o.pth', '--scale', 2)[::2], 'x4', 'not x2')
    assert_one_line_error(*run_cli(capsys, src, src, '--force')[::2], 'overwrite the input')
    (tmp_path / 'exists.pth').write_bytes(b'')
    assert_one_line_error(*run_cli(capsys, src, tmp_path / 'exists.pth')[::2], 'exists', '--force')
    assert_one_line_error(*run_cli(capsys, src, tmp_path / 'o.pth', '--template', 'x.yml')[::2], '--opt-out')
    template = os.path.join(REPO_ROOT, 'options', 'test_D2C_RealSR_x2.yml')
    assert_one_line_error(
        *run_cli(capsys, src, tmp_path / 'o.pth', '--opt-out', tmp_path / 'o.yml', '--template', template)[::2],
        'scale 2', 'x4')
    assert not (tmp_path / 'o.pth').exists()


def test_template_gives_a_complete_test_option_file(tmp_path, capsys, small_official):
    src = write_pickle(tmp_path / 'ok.pkl', _variant(*small_official, lambda d, c: None))
    template = os.path.join(REPO_ROOT, 'options', 'test_D2C_RealSR_x4.yml')
    rc, out, err = run_cli(capsys, src, tmp_path / 'o.pth', '--opt-out', tmp_path / 'o.yml', '--template', template)
    assert rc == 0, err
    with open(tmp_path / 'o.yml') as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    with open(template) as f:
        original = yaml.load(f, Loader=ordered_yaml()[0])
    assert opt['name'] == original['name'] + '_official'
    assert opt['path']['pretrain_network_g'] == str(tmp_path / 'o.pth')
    assert opt['network_g']['rgb_mean'] == pytest.approx(RGB_MEAN_OF_CONVERTED)
    assert opt['network_g']['num_feat'] == 8
    assert opt['val']['metrics'] == original['val']['metrics'] and opt['datasets'] == original['datasets']


# ----------------------------------------------------------------------------------------------
# 5. No code from the file runs
# ----------------------------------------------------------------------------------------------
class _RunsCommand:

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg, )


@pytest.mark.parametrize('func', [os.system, eval], ids=['os.system', 'builtins.eval'])
def test_malicious_pickle_is_refused_before_anything_runs(tmp_path, capsys, func, small_official):
    marker = tmp_path / 'pwned'
    command = f'touch {marker}' if func is os.system else f'open({str(marker)!r}, "w").close()'
    payload = _variant(*small_official, lambda d, c: d.update({'head.0.weight': _RunsCommand(func, command)}))
    src = write_pickle(tmp_path / 'evil.pkl', payload)
    rc, out, err = run_cli(capsys, src, tmp_path / 'evil.pth')
    assert_one_line_error(rc, err, f"refused global '{func.__module__}.{func.__name__}'", 'evil.pkl')
    assert not marker.exists() and not (tmp_path / 'evil.pth').exists()


def test_torch_pickles_are_refused(tmp_path, capsys):
    plain = write_pickle(tmp_path / 'torch_plain.pkl', {
        'state_dict_D': {
            'head.0.weight': torch.zeros(2)
        },
        'state_dict_C': {}
    })
    rc, _, err = run_cli(capsys, plain, tmp_path / 'o.pth')
    assert_one_line_error(rc, err, "refused global 'torch.", 'PyTorch pickle')

    torch.save({'params': {'w': torch.zeros(2)}}, tmp_path / 'zip.pth')
    rc, _, err = run_cli(capsys, tmp_path / 'zip.pth', tmp_path / 'o.pth')
    assert_one_line_error(rc, err, 'zip archive', 'needs no conversion')

    torch.save({'params': {'w': torch.zeros(2)}}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
    rc, _, err = run_cli(capsys, tmp_path / 'legacy.pth', tmp_path / 'o.pth')
    assert_one_line_error(rc, err, 'legacy torch.save')

    (tmp_path / 'junk.pkl').write_bytes(b'\x00not a pickle at all')
    rc, _, err = run_cli(capsys, tmp_path / 'junk.pkl', tmp_path / 'o.pth')
    assert_one_line_error(rc, err, 'not a readable pickle')


def test_safe_unpickler_reads_numpy_written_by_numpy_1_names():
    """Files from the MegEngine era name numpy.core.multiarray; numpy 2 keeps it in numpy._core."""
    data = pickle.dumps({'a': np.arange(3, dtype=np.float32)}, protocol=2)
    data = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    loaded = co.SafeUnpickler(io.BytesIO(data)).load()
    np.testing.assert_array_equal(loaded['a'], np.arange(3, dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# 6. The command line
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('module', ['d2c_tools.convert_official', 'd2c_model.convert_official'])
def test_module_entry_point(tmp_path, capsys, monkeypatch, module):
    """``python -m <module>`` (the tool and its old spelling) runs main() and exits with its status."""
    with pytest.raises(SystemExit) as exc:
        convert_official.main(['--help'])
    assert exc.value.code == 0 and '--opt-out' in capsys.readouterr().out
    monkeypatch.setattr(sys, 'argv', [module, str(tmp_path / 'missing.pkl'), str(tmp_path / 'o.pth')])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(module, run_name='__main__', alter_sys=True)
    assert exc.value.code == 2
    assert_one_line_error(exc.value.code, capsys.readouterr().err, 'missing.pkl: no such file')
