"""d2c_tools.convert_dan, d2c_convert.dan_convert_util: an official DANv2 checkpoint -> a BasicSR checkpoint for DAN.

No released checkpoint is available here. The tests build random state dicts under the official
key names and shapes (``official_shapes``, written from the official DANv2 ``dan_arch.py``, not
from the converter's table) and check the converted DAN against ``reference_forward``: a
functional re-implementation of the official forward on those key names, which keeps the official
semantics, including the blocks' in-place list update (danv2-facts pitfall 2).
"""
import os
import runpy
import sys

import pytest
import torch
import yaml
from torch.nn import functional as F

from d2c_arch import D2CNet
from d2c_arch.dan_arch import DAN
from d2c_convert import dan_convert_util as dc
from d2c_tools import convert_dan

KSIZE, CODE = 21, 10
TINY = dict(nf=8, ng=2, nb=2, est_nf=8)  # est_nf: the official Estimator's nf // 2 (64 // 2 = 32 in the release)


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared; one thread avoids contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# The official layout and forward (independent of the converter)
# ----------------------------------------------------------------------------------------------
def official_shapes(scale, nf, ng, nb, est_nf, est_nb=5, ksize=KSIZE, code=CODE, in_nc=3):
    """{official key: shape} of the official DANv2 ``DAN`` (weights; buffers added by ``random_official``)."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f'{name}.weight'] = (cout, cin, k, k)
        shapes[f'{name}.bias'] = (cout, )

    def dpcg(prefix, width, blocks, k1, k2):
        for b in range(blocks):
            for path, k in (('body1', k1), ('body2', k2)):
                conv(f'{prefix}.body.{b}.{path}.0', width, width, k)
                conv(f'{prefix}.body.{b}.{path}.2', width, width, k)

    conv('Restorer.head1', in_nc, nf, 3)
    conv('Restorer.head2', code, nf, 1)
    for g in range(ng):
        dpcg(f'Restorer.body.{g}', nf, nb, 3, 1)
    conv('Restorer.fusion', nf, nf, 3)
    if scale == 4:
        conv('Restorer.upscale.0', nf, nf * 4, 3)
        conv('Restorer.upscale.2', nf, nf * 4, 3)
        conv('Restorer.upscale.4', nf, in_nc, 3)
    else:
        conv('Restorer.upscale.0', nf, nf * scale**2, 3)
        conv('Restorer.upscale.2', nf, in_nc, 3)
    conv('Estimator.head_LR.0', in_nc, est_nf, 5)
    conv('Estimator.head_HR.0', in_nc, est_nf, 4 * scale + 1)
    dpcg('Estimator.body', est_nf, est_nb, 3, 3)
    conv('Estimator.tail.0', est_nf, 2 * est_nf, 3)
    conv('Estimator.tail.2', 2 * est_nf, ksize**2, 1)
    return shapes


def orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q.contiguous()


def random_official(scale, seed=0, buffers=True, ksize=KSIZE, code=CODE, est_nb=5, **layout):
    """Random tensors under the official keys; buffers as the official ``DAN.__init__`` makes them."""
    layout = {**TINY, **layout}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes(scale, est_nb=est_nb, ksize=ksize, code=code, **layout).items():
        if key.endswith('weight'):
            fan_in = shape[1] * shape[2] * shape[3]
            # outputs of order 1 (so 1e-5 is a tight bound); logits of a few units (a peaked, not flat, kernel)
            gain = 8.0 if key.startswith('Estimator.tail.2') else 0.85
            state[key] = torch.randn(shape, generator=gen) * gain / fan_in**0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    if buffers:
        encoder = orthonormal(ksize**2, code, seed)[None]  # (1, l*l, t)
        kernel = torch.zeros(1, ksize, ksize)
        kernel[:, ksize // 2, ksize // 2] = 1
        state['encoder'] = encoder
        state['init_kernel'] = kernel
        state['init_ker_map'] = kernel.view(1, 1, ksize**2).matmul(encoder)[:, 0]
    return state


def _conv(x, sd, name, stride=1, padding=None):
    weight = sd[f'{name}.weight']
    padding = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, sd[f'{name}.bias'], stride, padding)


def _dpcb(feats, sd, prefix):
    """One official DPCB: updates the list [image, condition] in place and returns it."""
    f1 = _conv(F.leaky_relu(_conv(feats[0], sd, f'{prefix}.body1.0'), 0.2), sd, f'{prefix}.body1.2')
    f2 = _conv(F.leaky_relu(_conv(feats[1], sd, f'{prefix}.body2.0'), 0.2), sd, f'{prefix}.body2.2')
    feats[0] = feats[0] + f1 * f2
    feats[1] = feats[1] + f2
    return feats


def _dpcg(feats, sd, prefix, blocks):
    """One official DPCG, aliasing kept: the chain returns the list it got, so the "skip" adds the output to itself."""
    y = feats
    for b in range(blocks):
        y = _dpcb(y, sd, f'{prefix}.body.{b}')
    x = feats  # the same list object as y
    y[0] = x[0] + y[0]
    y[1] = x[1] + y[1]
    return y


def _restorer(sd, lr, code, scale, ng, nb):
    feats = [_conv(lr, sd, 'Restorer.head1'), _conv(code[:, :, None, None], sd, 'Restorer.head2')]
    for g in range(ng):
        feats = _dpcg(feats, sd, f'Restorer.body.{g}', nb)
    f = _conv(feats[0], sd, 'Restorer.fusion')
    if scale == 4:
        f = F.pixel_shuffle(_conv(f, sd, 'Restorer.upscale.0'), 2)
        f = F.pixel_shuffle(_conv(f, sd, 'Restorer.upscale.2'), 2)
        return _conv(f, sd, 'Restorer.upscale.4')
    f = F.pixel_shuffle(_conv(f, sd, 'Restorer.upscale.0'), scale)
    return _conv(f, sd, 'Restorer.upscale.2')


def _estimator(sd, sr, lr, scale, est_nb):
    lrf = _conv(lr, sd, 'Estimator.head_LR.0')
    hrf = _conv(sr, sd, 'Estimator.head_HR.0', stride=scale, padding=2 * scale)
    f = _dpcg([lrf, hrf], sd, 'Estimator.body', est_nb)[0]
    f = _conv(f, sd, 'Estimator.tail.0').mean((2, 3), keepdim=True)
    logits = _conv(f, sd, 'Estimator.tail.2')
    return F.softmax(logits, dim=1).flatten(1)  # (B, l*l)


def reference_forward(sd, lr, scale, ng, nb, est_nb=5, loop=4, encoder=None):
    """The official DANv2 forward (eval: the stop-gradients change nothing).

    Returns (srs, kernels): ``loop`` SR images (B, C, sH, sW) and kernels (B, l*l).
    """
    encoder = sd['encoder'] if encoder is None else encoder  # (1, l*l, t): codes are k^T P, no mean removed
    batch = lr.shape[0]
    if 'init_ker_map' in sd:
        code = sd['init_ker_map'].repeat(batch, 1)
    else:  # what the official __init__ computes: the delta kernel's code
        ksize = int(round(encoder.shape[1]**0.5))
        delta = torch.zeros(1, 1, ksize**2)
        delta[..., ksize**2 // 2] = 1
        code = delta.matmul(encoder)[:, 0].repeat(batch, 1)
    srs, kernels = [], []
    for _ in range(loop):
        sr = _restorer(sd, lr, code, scale, ng, nb)
        kernel = _estimator(sd, sr, lr, scale, est_nb)
        code = kernel.view(batch, 1, -1).matmul(encoder)[:, 0]
        srs.append(sr)
        kernels.append(kernel)
    return srs, kernels


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    rc = convert_dan.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('d2c-convert-dan: error: '), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def load_converted(path):
    ckpt = torch.load(str(path), map_location='cpu', weights_only=True)
    opt = {k: v for k, v in ckpt['network_g'].items() if k != 'type'}
    net = DAN(**opt).eval()
    net.load_state_dict(ckpt['params'], strict=True)
    return net, ckpt


def assert_matches_reference(net, sd, scale, ng, nb, est_nb, sizes, encoder=None):
    for i, (batch, h, w) in enumerate(sizes):
        lr = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(100 + i))
        with torch.no_grad():
            ref_srs, ref_kernels = reference_forward(sd, lr, scale, ng, nb, est_nb, encoder=encoder)
            srs, kernels = net(lr, return_all=True)
        assert len(srs) == len(ref_srs) == 4
        # the loop is not trivial: the estimated kernel moves the code, and so the next SR image
        assert (ref_srs[1] - ref_srs[0]).abs().max() > 1e-3
        assert ref_kernels[-1].max() > 3 / KSIZE**2  # not the flat 1 / l^2 of a weak estimator
        for step, (sr, ref) in enumerate(zip(srs, ref_srs)):
            assert sr.shape == (batch, 3, h * scale, w * scale)
            assert (sr - ref).abs().max() < 1e-5, (step, (sr - ref).abs().max())
        for step, (kernel, ref) in enumerate(zip(kernels, ref_kernels)):
            assert kernel.shape == (batch, KSIZE, KSIZE)
            assert (kernel.flatten(1) - ref).abs().max() < 1e-5, (step, (kernel.flatten(1) - ref).abs().max())


# ----------------------------------------------------------------------------------------------
# 1. The converted network computes the official function
# ----------------------------------------------------------------------------------------------
def test_reference_group_skip_doubles_the_chain():
    """Pitfall 2 in the reference itself: the official DPCG returns twice the chain, not input + chain."""
    sd = random_official(4, seed=3)
    a, b = torch.rand(1, 8, 4, 4), torch.rand(1, 8, 1, 1)
    chain = [a, b]
    for blk in range(2):
        chain = _dpcb(chain, sd, f'Restorer.body.0.body.{blk}')
    chain = [t.clone() for t in chain]
    out = _dpcg([a, b], sd, 'Restorer.body.0', 2)
    torch.testing.assert_close(out[0], 2 * chain[0])
    torch.testing.assert_close(out[1], 2 * chain[1])


@pytest.mark.parametrize(
    'scale, est_nb, wrap', [(4, 5, None), (2, 3, 'state_dict'), (3, 2, 'params')],
    ids=['x4-bare', 'x2-state_dict-module', 'x3-params'])
def test_cli_conversion_equals_the_official_forward(tmp_path, capsys, scale, est_nb, wrap):
    sd = random_official(scale, seed=scale, est_nb=est_nb)
    saved = sd
    if wrap == 'state_dict':  # DataParallel prefix too
        saved = {'state_dict': {f'module.{k}': v for k, v in sd.items()}}
    elif wrap == 'params':
        saved = {'params': sd}
    torch.save(saved, tmp_path / 'official.pth')
    out_pth, out_yml = tmp_path / 'out' / 'dan.pth', tmp_path / 'dan_test.yml'
    rc, out, err = run_cli(capsys, tmp_path / 'official.pth', out_pth, '--opt-out', out_yml)
    assert rc == 0, err
    assert f'x{scale}' in out and 'encoder' in out and 'type: DAN' in out and 'warning' not in out

    net, ckpt = load_converted(out_pth)  # weights_only, strict
    want = dict(
        type='DAN',
        num_in_ch=3,
        num_feat=8,
        num_group=2,
        num_block=2,
        upscale=scale,
        code_length=CODE,
        kernel_size=KSIZE,
        estimator_feat=8,
        estimator_blocks=est_nb,
        loop=4,
        group_skip='double')
    assert ckpt['network_g'] == want and ckpt['converted_from']['network_g'] == want
    assert ckpt['converted_from']['file'] == 'official.pth' and ckpt['converted_from']['pca'] == 'encoder'
    torch.testing.assert_close(ckpt['params']['pca_matrix'], sd['encoder'][0], rtol=0, atol=0)
    assert_matches_reference(net, sd, scale, 2, 2, est_nb, sizes=[(1, 12, 12), (2, 9, 14)])

    with open(out_yml) as f:
        opt = yaml.safe_load(f)
    assert opt['model_type'] == 'DANModel' and opt['scale'] == scale
    assert opt['network_g'] == want
    assert opt['path']['pretrain_network_g'] == str(out_pth)
    assert opt['datasets']['test_1']['dataroot_lq'] == f'datasets/Set5_gaussian8_x{scale}/LR'


def test_every_official_key_maps_to_its_own_dan_key():
    """The mapping is one-to-one and covers DAN exactly (x4, the release's widths but fewer blocks)."""
    sd = random_official(4, seed=5, nf=64, ng=2, nb=2, est_nf=32)
    state, net_opt, notes = dc.convert_state_dict(sd)
    expected = DAN(**{k: v for k, v in net_opt.items() if k != 'type'}).state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == expected[k].shape for k in expected)
    table = dc.upscale_table(sd)
    targets = [dc.dan_key(k, table) for k in sd if k not in dc.BUFFERS]
    assert len(targets) == len(set(targets)) == len(expected) - 1  # all but the pca_matrix buffer
    assert dc.dan_key('Restorer.upscale.4.weight', table) == 'restorer.conv_last.weight'
    assert dc.dan_key('Restorer.body.1.body.0.body2.2.bias', table) == 'restorer.groups.1.blocks.0.cond_body.2.bias'
    assert dc.dan_key('Estimator.body.body.4.body1.0.weight', table) == 'estimator.group.blocks.4.image_body.0.weight'
    assert notes == {'pca': 'encoder', 'warnings': [], 'missing_buffers': []}


def test_loop_option_and_init_ker_map_warning(tmp_path, capsys):
    sd = random_official(2, seed=7)
    sd['init_ker_map'] = sd['init_ker_map'] + 0.01  # not vec(delta) P any more
    torch.save(sd, tmp_path / 'o.pth')
    rc, out, err = run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'c.pth', '--loop', 2)
    assert rc == 0, err
    assert 'warning: init_ker_map differs' in out
    ckpt = torch.load(tmp_path / 'c.pth', weights_only=True)
    assert ckpt['network_g']['loop'] == 2 and len(ckpt['converted_from']['warnings']) == 1
    assert_one_line_error(*run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'd.pth', '--loop', 0)[::2], '--loop 0')


# ----------------------------------------------------------------------------------------------
# 2. The PCA matrix
# ----------------------------------------------------------------------------------------------
def test_old_checkpoint_needs_pca(tmp_path, capsys):
    full = random_official(4, seed=11)
    old = {k: v for k, v in full.items() if k not in dc.BUFFERS}
    torch.save(old, tmp_path / 'old.pth')
    rc, _, err = run_cli(capsys, tmp_path / 'old.pth', tmp_path / 'c.pth')
    assert_one_line_error(rc, err, 'no PCA matrix', 'encoder', '--pca', '(441, 10)', 'pca_matrix/DANv2/pca_matrix.pth')
    assert not (tmp_path / 'c.pth').exists()

    torch.save(full['encoder'][0].clone(), tmp_path / 'pca.pth')  # the official files: a bare (l*l, t) tensor
    rc, out, err = run_cli(capsys, tmp_path / 'old.pth', tmp_path / 'c.pth', '--pca', tmp_path / 'pca.pth')
    assert rc == 0, err
    assert 'missing: encoder, init_kernel, init_ker_map' in out
    net, ckpt = load_converted(tmp_path / 'c.pth')
    assert ckpt['converted_from']['pca'] == 'pca.pth'
    assert_matches_reference(net, old, 4, 2, 2, 5, sizes=[(1, 10, 11)], encoder=full['encoder'])


def test_pca_of_the_wrong_shape_names_both_shapes(tmp_path, capsys):
    old = {k: v for k, v in random_official(4, seed=12).items() if k not in dc.BUFFERS}
    torch.save(old, tmp_path / 'old.pth')
    torch.save(orthonormal(121, 10, 0), tmp_path / 'aniso_x2.pth')
    rc, _, err = run_cli(capsys, tmp_path / 'old.pth', tmp_path / 'c.pth', '--pca', tmp_path / 'aniso_x2.pth')
    assert_one_line_error(rc, err, '(121, 10)', '(441, 10)', 'aniso_x2.pth')
    assert not (tmp_path / 'c.pth').exists()


def test_given_pca_must_agree_with_the_encoder(tmp_path, capsys):
    sd = random_official(4, seed=13)
    torch.save(sd, tmp_path / 'o.pth')
    torch.save({'pca_matrix': orthonormal(441, 10, 99)}, tmp_path / 'other.pth')  # make_dan_pca.py's dict form
    rc, _, err = run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'c.pth', '--pca', tmp_path / 'other.pth')
    assert_one_line_error(rc, err, 'its own PCA matrix', 'drop --pca')
    torch.save(sd['encoder'], tmp_path / 'same.pth')  # (1, l*l, t) is accepted too
    rc, _, err = run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'c.pth', '--pca', tmp_path / 'same.pth')
    assert rc == 0, err


# ----------------------------------------------------------------------------------------------
# 3. What is refused
# ----------------------------------------------------------------------------------------------
def _danv1_keys():
    """A few keys of an official DANv1 state dict (CRB blocks on concatenated code, code-regressing Estimator)."""
    z = torch.zeros
    return {
        'Restorer.head.weight': z(8, 3, 3, 3),
        'Restorer.body.0.body.0.weight': z(18, 18, 3, 3),
        'Restorer.body.0.body.3.body.0.weight': z(1, 8, 1, 1),
        'Estimator.head_LR.weight': z(4, 3, 1, 1),
        'Estimator.out.weight': z(10, 4, 3, 3),
        'encoder': z(1, 441, 10),
    }


@pytest.mark.parametrize('kind', ['d2cnet', 'random', 'danv1', 'converted', 'leftover', 'nan', 'bad-encoder', 'x1'])
def test_refused_checkpoints(tmp_path, capsys, kind):
    if kind == 'd2cnet':
        obj = {'params': D2CNet(num_feat=8, num_group=1, num_block=1, reduction=4).state_dict()}
        needles = ['D2CNet checkpoint']
    elif kind == 'random':
        obj = {'conv1.weight': torch.zeros(4, 3, 3, 3), 'fc.bias': torch.zeros(2)}
        needles = ['not a DANv2 checkpoint', 'conv1.weight']
    elif kind == 'danv1':
        obj, needles = _danv1_keys(), ['DANv1 checkpoint', 'not supported yet']
    elif kind == 'converted':
        obj = {'params': DAN(num_feat=8, num_group=1, num_block=1, estimator_feat=8).state_dict()}
        needles = ['already in this project', 'needs no conversion']
    elif kind == 'leftover':
        obj = random_official(4, seed=1)
        obj['Restorer.extra.weight'] = torch.zeros(3)
        obj['Estimator.body.body.0.body3.0.weight'] = torch.zeros(3)
        needles = ['2 key(s) match no DANv2 module', 'Restorer.extra.weight', 'body3']
    elif kind == 'nan':
        obj = random_official(2, seed=1)
        obj['Restorer.fusion.weight'][0, 0, 0, 0] = float('nan')
        needles = ['NaN', 'Restorer.fusion.weight']
    elif kind == 'bad-encoder':  # a kernel-21 network with an 11x11 matrix
        obj = random_official(4, seed=1)
        obj['encoder'] = orthonormal(121, 10, 0)[None]
        needles = ['encoder has shape (1, 121, 10)', '(441, 10)']
    else:
        obj = {
            'Restorer.head1.weight': torch.zeros(8, 3, 3, 3),
            'Estimator.head_LR.0.weight': torch.zeros(8, 3, 5, 5),
            'Restorer.upscale.weight': torch.zeros(3, 8, 3, 3)
        }
        needles = ['x1']
    torch.save(obj, tmp_path / 'in.pth')
    rc, _, err = run_cli(capsys, tmp_path / 'in.pth', tmp_path / 'out.pth', '--opt-out', tmp_path / 'out.yml')
    assert_one_line_error(rc, err, 'in.pth', *needles)
    assert not (tmp_path / 'out.pth').exists() and not (tmp_path / 'out.yml').exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]


def test_missing_keys_and_wrong_shapes_are_named():
    sd = random_official(4, seed=2)
    del sd['Restorer.body.1.body.1.body1.2.bias']
    with pytest.raises(dc.UserError, match=r'not in the checkpoint: restorer\.groups\.1\.blocks\.1\.image_body\.2'):
        dc.convert_state_dict(sd)
    sd = random_official(4, seed=2)
    sd['Restorer.fusion.weight'] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(dc.UserError, match=r'Restorer\.fusion\.weight \(8, 8, 1, 1\) vs DAN restorer\.fusion\.weight'):
        dc.convert_state_dict(sd)


class _RunsCommand:

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command, )


def test_corrupt_and_pickled_object_files_are_refused(tmp_path, capsys):
    (tmp_path / 'junk.pth').write_bytes(b'\x00not a checkpoint at all')
    rc, _, err = run_cli(capsys, tmp_path / 'junk.pth', tmp_path / 'out.pth')
    assert_one_line_error(rc, err, 'cannot read', 'junk.pth')

    marker = tmp_path / 'pwned'
    evil = random_official(2, seed=1)
    evil['Restorer.head1.weight'] = _RunsCommand(f'touch {marker}')
    torch.save(evil, tmp_path / 'evil.pth')
    rc, _, err = run_cli(capsys, tmp_path / 'evil.pth', tmp_path / 'out.pth')
    assert_one_line_error(rc, err, 'refusing to load', 'evil.pth', 'pickled Python object')
    assert not marker.exists() and not (tmp_path / 'out.pth').exists()


def test_usage_errors(tmp_path, capsys):
    torch.save(random_official(2, seed=1), tmp_path / 'o.pth')
    assert_one_line_error(*run_cli(capsys, tmp_path / 'nope.pth', tmp_path / 'c.pth')[::2], 'not found', 'nope.pth')
    assert_one_line_error(*run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'o.pth', '--force')[::2],
                          'overwrite the input')
    (tmp_path / 'exists.pth').write_bytes(b'')
    assert_one_line_error(*run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'exists.pth')[::2], 'exists', '--force')
    rc, _, err = run_cli(capsys, tmp_path / 'o.pth', tmp_path / 'exists.pth', '--force')
    assert rc == 0, err
    old = {k: v for k, v in torch.load(tmp_path / 'o.pth').items() if k not in dc.BUFFERS}
    torch.save(old, tmp_path / 'old.pth')
    assert_one_line_error(*run_cli(capsys, tmp_path / 'old.pth', tmp_path / 'c.pth', '--pca', tmp_path / 'no.pth')[::2],
                          'no.pth', '--pca')


def test_module_entry_point(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        convert_dan.main(['--help'])
    assert exc.value.code == 0 and '--pca' in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, 'd2c_tools.convert_dan')  # runpy warns when running an imported module
    monkeypatch.setattr(sys, 'argv', ['d2c_tools.convert_dan', str(tmp_path / 'missing.pth'), str(tmp_path / 'o.pth')])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module('d2c_tools.convert_dan', run_name='__main__', alter_sys=True)
    assert_one_line_error(exc.value.code, capsys.readouterr().err, 'missing.pth')
