"""d2c-export and d2c-infer's ONNX Runtime / OpenVINO backends: round trips, image kinds, refusals."""
import os

import cv2
import numpy as np
import pytest
import torch
import yaml

from d2c_arch import D2CNet
from d2c_deploy import export_util, runtime_util
from d2c_deploy.export_util import check_export, export_onnx, psnr_db
from d2c_deploy.runtime_util import OnnxRuntimeModel, OpenVINOModel, read_onnx_metadata, select_backend
from d2c_tools import export, infer
from d2c_utils.errors import UserError

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

# two branch types: RCAN's groups with channel attention (the paper's), and SwinIR's windows, whose
# padding and attention mask depend on the input size (a graph that records the traced size fails)
RCAN = dict(num_feat=8, num_group=1, num_block=1, reduction=4, num_fusion_feat=8, upscale=4)
SWINIR = dict(
    num_feat=12,
    num_block=1,
    upscale=2,
    branch_type='SwinIRBranch',
    upsampler='pixelshuffledirect',
    tree_width=2,
    tree_depth=1,
    num_fusion_feat=8,
    branch_opt={
        'window_size': 4,
        'depth': 2,
        'num_heads': 2,
        'img_size': 16
    })


def build(opt, seed=0):
    torch.manual_seed(seed)
    return D2CNet(**opt).eval()


def smooth(h, w, channels=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, channels)).astype(np.float32), (5, 5), 1.2).reshape(h, w, channels)
    top = 65535 if dtype == np.uint16 else 255
    out = (img * top).round().astype(dtype)
    return out[..., 0] if channels == 1 else out


def save(root, opt, name, seed=0):
    """``<name>.pth`` ({'params'}) and ``<name>.yml`` (network_g) for D2CNet(**opt)."""
    net = build(opt, seed)
    pth, yml = os.path.join(root, f'{name}.pth'), os.path.join(root, f'{name}.yml')
    torch.save({'params': net.state_dict()}, pth)
    with open(yml, 'w') as f:
        yaml.safe_dump({'network_g': dict(opt, type='D2CNet')}, f)
    return pth, yml, net


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """One 'all'-outputs export per branch type: name -> (net, onnx path, export result)."""
    root = tmp_path_factory.mktemp('export')
    files = {}
    for name, opt in (('rcan', RCAN), ('swinir', SWINIR)):
        net = build(opt)
        path = str(root / f'{name}.onnx')
        files[name] = (net, path, export_onnx(net, path, outputs='all', net_opt=opt, source=name))
    return files


@pytest.mark.parametrize('name', ['rcan', 'swinir'])
def test_round_trip_on_two_sizes_fused_and_branches(exported, name):
    net, path, result = exported[name]
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    assert [o.name for o in session.get_outputs()] == ['sr', 'branches', 'weights']
    # neither is the traced 64x64; 21x30 is not a multiple of SwinIR's window (the graph pads)
    for shape in ((1, 3, 21, 30), (2, 3, 16, 24)):
        if shape[0] > 1 and not result['dynamic_batch']:
            shape = (1, ) + shape[1:]
        lq = torch.rand(*shape)
        with torch.no_grad():
            want = net(lq, return_branches=True)
        got = session.run(None, {'lq': lq.numpy()})
        for w, g in zip(want, got):
            assert g.shape == tuple(w.shape)
            assert np.abs(g - w.numpy()).max() < 1e-4, (name, shape)
    assert result['dynamic_batch'] == (name == 'rcan')  # SwinIR's window partition keeps a batch of 1


def test_metadata_carries_what_d2c_infer_needs(exported):
    net, path, _ = exported['swinir']
    meta = read_onnx_metadata(path)
    assert (meta['upscale'], meta['num_branch'], meta['tree_depth'], meta['tree_width']) == (2, 2, 1, 2)
    assert meta['branch_type'] == 'SwinIRBranch' and meta['size_multiple'] == 4 and meta['outputs'] == 'all'
    assert meta['network_g']['branch_opt']['window_size'] == 4


def test_self_check_passes_and_catches_a_different_graph(exported):
    net, path, _ = exported['rcan']
    agreement = check_export(net, path)
    assert set(agreement) == {'sr', 'branches', 'weights'} and min(agreement.values()) > 100
    other = build(RCAN, seed=1)  # what a graph computing something else looks like to the check
    with pytest.raises(UserError, match=r'disagrees with PyTorch.*needs >= 80 dB'):
        check_export(other, path)


def test_fp16_export_agrees_within_its_threshold(tmp_path):
    net = build(RCAN)
    path = str(tmp_path / 'half.onnx')
    export_onnx(net, path, outputs='fused', precision='fp16')
    agreement = check_export(net, path, precision='fp16')
    assert set(agreement) == {'sr'} and agreement['sr'] >= export_util.MIN_AGREEMENT_DB['fp16']
    onnx = pytest.importorskip('onnx')
    weights = [t for t in onnx.load_model(path).graph.initializer if len(t.dims) == 4]  # the convolution kernels
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)


def test_runtime_models_equal_pytorch(exported):
    net, path, _ = exported['rcan']
    meta = read_onnx_metadata(path)
    lq = torch.rand(1, 3, 19, 23)
    with torch.no_grad():
        want = net(lq, return_branches=True)
    models = [OnnxRuntimeModel(path, meta, torch.device('cpu'))]
    if runtime_util.installed('openvino'):
        models.append(OpenVINOModel(path, meta))
    for model in models:
        got = model.run(lq, return_branches=True, dtype=None)
        for w, g in zip(want, got):
            assert psnr_db(g, w) > 100, model.backend
        assert torch.equal(model.run(lq), got[0])
    if len(models) > 1 and models[1].default_dtype is not None:  # OpenVINO's bf16 default on this CPU
        assert psnr_db(models[1].run(lq, dtype=models[1].default_dtype), want[0]) >= 50


# ------------------------------------------------------------------------- d2c-infer on ONNX


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp('model')
    pth, yml, net = save(str(root), RCAN, 'tiny')
    onnx_path = str(root / 'tiny.onnx')
    assert export.main([pth, '-o', onnx_path, '--opt', yml, '--outputs', 'all']) == 0
    return pth, yml, onnx_path


def kinds(src):
    images = {
        'gray.png': smooth(18, 22, 1, seed=1),
        'rgba.png': smooth(18, 22, 4, seed=3),
        'deep.png': smooth(18, 22, 3, seed=4, dtype=np.uint16),
    }
    os.makedirs(src, exist_ok=True)
    for name, img in images.items():
        cv2.imwrite(os.path.join(src, name), img)
    return images


@pytest.mark.parametrize('backend', ['onnxruntime', 'openvino'])
def test_d2c_infer_onnx_backends_equal_the_torch_backend(tmp_path, tiny_model, backend):
    if not runtime_util.installed(backend):
        pytest.skip(f'{backend} is not installed')
    pth, yml, onnx_path = tiny_model
    src = str(tmp_path / 'in')
    images = kinds(src)
    common = ['-i', src, '--precision', 'fp32', '-q', '--save-branches']
    for tile in ('0', '8'):
        ref, out = str(tmp_path / f'torch{tile}'), str(tmp_path / f'{backend}{tile}')
        assert infer.main(common + ['-o', ref, '--model', pth, '--opt', yml, '--backend', 'torch', '--tile', tile]) == 0
        assert infer.main(common + ['-o', out, '--model', onnx_path, '--backend', backend, '--tile', tile]) == 0
        for name, img in images.items():
            stem = os.path.splitext(name)[0]
            for suffix in ('out', 'branch1', 'branch4'):
                want = cv2.imread(os.path.join(ref, f'{stem}_{suffix}.png'), cv2.IMREAD_UNCHANGED)
                got = cv2.imread(os.path.join(out, f'{stem}_{suffix}.png'), cv2.IMREAD_UNCHANGED)
                assert got.dtype == img.dtype and got.shape == want.shape, (name, suffix)
                assert got.shape[:2] == (72, 88)
                # fp32 on both sides: equal up to a value rounding the other way (1e-6 apart before rounding)
                assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (name, suffix, tile)
        alpha = cv2.imread(os.path.join(out, 'rgba_out.png'), cv2.IMREAD_UNCHANGED)[..., 3]
        assert np.array_equal(alpha, cv2.imread(os.path.join(ref, 'rgba_out.png'), cv2.IMREAD_UNCHANGED)[..., 3])


def test_d2c_infer_auto_exports_a_checkpoint_once_and_reuses_it(tmp_path, tiny_model, capsys):
    pth, yml, _ = tiny_model
    src = str(tmp_path / 'in')
    kinds(src)
    backend, why = select_backend('auto', pth, torch.device('cpu'))
    cache = str(tmp_path / 'cache')
    args = ['-i', src, '--model', pth, '--opt', yml, '-q', '--cache-dir', cache]
    assert infer.main(args + ['-o', str(tmp_path / 'a')]) == 0
    captured = capsys.readouterr()
    assert f'backend {backend} ({why})' in captured.out
    if backend == 'torch':
        return  # neither runtime installed: auto keeps PyTorch, nothing is exported
    assert 'exported' in captured.err and os.listdir(os.path.join(cache, 'onnx'))
    assert infer.main(args + ['-o', str(tmp_path / 'b')]) == 0
    assert 'from the cache' in capsys.readouterr().err
    for name in os.listdir(tmp_path / 'a'):
        assert np.array_equal(cv2.imread(str(tmp_path / 'a' / name)), cv2.imread(str(tmp_path / 'b' / name)))


def test_auto_prefers_the_measured_fastest(monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    monkeypatch.setattr(runtime_util, 'installed', lambda name: True)
    assert select_backend('auto', 'm.pth', cpu)[0] == runtime_util.AUTO_ORDER_CPU[0]
    assert select_backend('auto', 'm.onnx', cpu)[0] == 'openvino'
    assert select_backend('auto', 'm.pth', cuda)[0] == 'torch'
    assert select_backend('auto', 'm.onnx', cuda)[0] == 'onnxruntime'
    monkeypatch.setattr(runtime_util, 'installed', lambda name: name == 'torch')
    assert select_backend('auto', 'm.pth', cpu)[0] == 'torch'
    with pytest.raises(UserError, match=r'd2c-sr\[openvino\].*d2c-sr\[onnx\]'):
        select_backend('auto', 'm.onnx', cpu)
    with pytest.raises(UserError, match=r'pip install "d2c-sr\[onnx\]"'):
        select_backend('onnxruntime', 'm.onnx', cpu)


# ----------------------------------------------------------------------------------- refusals


def test_missing_extra_names_it(monkeypatch):
    real = export_util.importlib.import_module

    def no_onnx(name):
        if name == 'onnx':
            raise ImportError("No module named 'onnx'")
        return real(name)

    monkeypatch.setattr(export_util.importlib, 'import_module', no_onnx)
    with pytest.raises(UserError, match=r'pip install "d2c-sr\[onnx\]"'):
        export_onnx(build(RCAN), 'never.onnx')
    assert not os.path.exists('never.onnx')


def test_d2c_export_refuses_bad_inputs(tmp_path, tiny_model, capsys):
    pth, yml, onnx_path = tiny_model
    out = str(tmp_path / 'x.onnx')
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'PK\x03\x04 not really a zip')
    assert export.main([str(corrupt), '-o', out]) == 2
    assert 'corrupt or not a PyTorch checkpoint' in capsys.readouterr().err
    foreign = tmp_path / 'msrresnet.pth'
    torch.save({'params': {'conv_first.weight': torch.zeros(64, 3, 3, 3)}}, foreign)
    assert export.main([str(foreign), '-o', out, '--opt', yml]) == 2
    assert 'does not fit network_g' in capsys.readouterr().err
    assert export.main([onnx_path, '-o', out]) == 2
    assert 'already an ONNX file' in capsys.readouterr().err
    assert export.main([pth, '-o', onnx_path, '--opt', yml]) == 2  # exists, no --force
    assert '--force' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main([pth, '-o', str(tmp_path / 'x.bin'), '--opt', yml])
    assert not os.path.exists(out)


def test_d2c_export_removes_a_file_that_fails_its_check(tmp_path, tiny_model, monkeypatch, capsys):
    pth, yml, _ = tiny_model

    def failing(*args, **kwargs):
        raise UserError('the exported graph disagrees with PyTorch (simulated)')

    monkeypatch.setattr(export_util, 'check_graphs', failing)
    out = str(tmp_path / 'bad.onnx')
    assert export.main([pth, '-o', out, '--opt', yml]) == 2
    assert 'disagrees' in capsys.readouterr().err and not os.path.exists(out)
    assert os.listdir(tmp_path) == []  # no temporary file left either


def test_d2c_infer_refuses_bad_onnx_files(tmp_path, tiny_model, capsys):
    pth, yml, onnx_path = tiny_model
    src = str(tmp_path / 'in')
    kinds(src)
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(b'\x08\x07garbage')
    onnx = pytest.importorskip('onnx')
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])])
    foreign = str(tmp_path / 'foreign.onnx')
    onnx.save_model(helper.make_model(graph), foreign)
    out = str(tmp_path / 'out')
    for model, backend, message in ((str(corrupt), 'onnxruntime',
                                     'cannot read'), (foreign, 'onnxruntime', 'not an ONNX file written by d2c-export'),
                                    (onnx_path, 'torch', '--backend torch runs .pth checkpoints'),
                                    (str(tmp_path / 'missing.onnx'), 'onnxruntime', 'model file not found')):
        assert infer.main(['-i', src, '-o', out, '--model', model, '--backend', backend, '-q']) == 2
        assert message in capsys.readouterr().err, model
    assert infer.main(['-i', src, '-o', out, '--model', onnx_path, '--backend', 'onnxruntime', '--precision',
                       'bf16']) == 2
    assert 'ONNX Runtime runs the precision the file was exported in' in capsys.readouterr().err
    fused = str(tmp_path / 'fused.onnx')
    assert export.main([pth, '-o', fused, '--opt', yml, '--no-check']) == 0
    assert infer.main(['-i', src, '-o', out, '--model', fused, '--backend', 'onnxruntime', '--save-branches']) == 2
    assert 'd2c-export --outputs all' in capsys.readouterr().err
    assert not os.path.exists(out)


def test_help_of_the_new_tool():
    with pytest.raises(SystemExit) as exc:
        export.main(['--help'])
    assert exc.value.code == 0
