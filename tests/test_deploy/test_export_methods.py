"""DAN and SDFlow through d2c-export and d2c-infer's ONNX Runtime / OpenVINO backends, against PyTorch."""
import json
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from test_sdflow import TINY as TINY_SDFLOW

from d2c_arch import DAN, SDFlow
from d2c_arch import flow_util as fu
from d2c_deploy import export_util, runtime_util
from d2c_deploy.export_util import psnr_db
from d2c_deploy.runtime_util import DANRuntimeModel, SDFlowRuntimeModel, load_method_runtime_model, read_onnx_metadata
from d2c_inference.export_graphs import dan_graphs
from d2c_tools import export, infer
from d2c_utils.errors import UserError

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
BACKENDS = [b for b in ('onnxruntime', 'openvino') if runtime_util.installed(b)]
CPU = torch.device('cpu')

DAN_OPT = dict(
    num_feat=8,
    num_group=2,
    num_block=1,
    upscale=4,
    code_length=6,
    kernel_size=11,
    loop=2,
    estimator_feat=8,
    estimator_blocks=1)
SDFLOW_OPT = TINY_SDFLOW  # the SDFlow tests' tiny network


def tiny_dan():
    torch.manual_seed(0)
    net = DAN(**DAN_OPT).eval()
    size = DAN_OPT['kernel_size']**2
    net.pca_matrix.copy_(torch.linalg.qr(torch.randn(size, DAN_OPT['code_length']))[0])
    return net


def tiny_sdflow():
    """Random values in the zero-initialised and identity layers, so every layer computes something."""
    torch.manual_seed(0)
    net = SDFlow(**SDFLOW_OPT).eval()
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, fu.ZeroConv2d):
            for p in (m.weight, m.bias, m.log_gain):
                p.data = torch.randn(p.shape, generator=gen) * 0.05
        if isinstance(m, fu.ActNorm):
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.3
            m.log_scale.data = torch.randn(m.log_scale.shape, generator=gen) * 0.3
            m.initialized.fill_(1)
        if isinstance(m, fu.InvConv1x1):
            m.log_s.data += torch.randn(m.log_s.shape, generator=gen) * 0.2
    return net


def smooth(h, w, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, channels)).astype(np.float32), (5, 5), 1.2).reshape(h, w, channels)
    out = (img * 255).round().astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def lq_tensor(h, w, seed=0):
    return torch.from_numpy(smooth(h, w, seed=seed).astype(np.float32).transpose(2, 0, 1) / 255).unsqueeze(0)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """name -> (net, .pth, .yml, .onnx written by d2c-export) for a tiny DAN and a tiny SDFlow."""
    root = tmp_path_factory.mktemp('methods')
    made = {}
    for name, net, opt in (('dan', tiny_dan(), dict(DAN_OPT, type='DAN')), ('sdflow', tiny_sdflow(),
                                                                            dict(SDFLOW_OPT, type='SDFlow'))):
        pth, yml, onnx_path = (str(root / f'{name}.{ext}') for ext in ('pth', 'yml', 'onnx'))
        torch.save({'params': net.state_dict()}, pth)
        with open(yml, 'w') as f:
            yaml.safe_dump({'network_g': opt}, f)
        assert export.main([pth, '-o', onnx_path, '--opt', yml]) == 0
        made[name] = (net, pth, yml, onnx_path)
    return made


def test_export_writes_one_file_per_graph_named_in_the_metadata(models, capsys):
    for name, graphs in (('dan', ['dan', 'restore']), ('sdflow', ['sr', 'downscale'])):
        _, pth, yml, onnx_path = models[name]
        meta = read_onnx_metadata(onnx_path)
        assert meta['graphs'] == graphs and meta['upscale'] == 4 and meta['precision'] == 'fp32'
        stem = onnx_path[:-len('.onnx')]
        assert meta['paths'] == {graphs[0]: onnx_path, graphs[1]: f'{stem}.{graphs[1]}.onnx'}
        assert json.loads(json.dumps(meta['files'])) == {g: os.path.basename(p) for g, p in meta['paths'].items()}
    assert read_onnx_metadata(models['dan'][3])['method'] == 'DAN'
    assert read_onnx_metadata(models['sdflow'][3])['hf_channels'] == 45


@pytest.mark.parametrize('backend', BACKENDS)
def test_dan_runtime_equals_pytorch_kernel_and_image(models, backend):
    net, _, _, onnx_path = models['dan']
    model = load_method_runtime_model(onnx_path, backend, CPU)
    assert isinstance(model, DANRuntimeModel) and model.loop == 2 and model.kernel_size == 11
    lq = lq_tensor(19, 23)
    with torch.no_grad():
        want_code, want_kernel = net.estimate_code(lq)
        want_sr = net(lq)
        code, kernel = model.estimate_code(lq)
        sr = model.restore(lq, code)
    assert psnr_db(kernel, want_kernel) >= 80 and psnr_db(code, want_code) >= 80
    assert psnr_db(sr, want_sr) >= 80 and psnr_db(model.run(lq), want_sr) >= 80


@pytest.mark.parametrize('backend', BACKENDS)
def test_sdflow_runtime_draws_pytorchs_samples(models, backend):
    net, _, _, onnx_path = models['sdflow']
    model = load_method_runtime_model(onnx_path, backend, CPU)
    assert isinstance(model, SDFlowRuntimeModel) and model.temperature == net.temperature
    lq = lq_tensor(13, 17)
    hr = lq_tensor(36, 44, seed=1)  # multiples of 4, not of 8: the reflect-padded path
    for temperature in (0.8, 0.):
        with torch.no_grad():
            want = net.super_resolve(lq, temperature, torch.Generator().manual_seed(3))
            got = model.super_resolve(lq, temperature, torch.Generator().manual_seed(3))
            other = model.super_resolve(lq, temperature, torch.Generator().manual_seed(4))
            want_lr = net.downscale(hr, temperature, torch.Generator().manual_seed(5))
            got_lr = model.downscale(hr, temperature, torch.Generator().manual_seed(5))
        assert got.shape == (1, 3, 52, 68) and got_lr.shape == (1, 3, 9, 11)
        assert psnr_db(got, want) >= 80 and psnr_db(got_lr, want_lr) >= 80
        assert (psnr_db(other, want) < 60) == (temperature > 0)  # another seed, another sample


def run_infer(args):
    assert infer.main(args + ['-q', '--precision', 'fp32', '--cache-dir', '']) == 0


def images(folder):
    return {name: cv2.imread(os.path.join(folder, name), cv2.IMREAD_UNCHANGED) for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize('backend', BACKENDS)
def test_d2c_infer_runs_dan_on_the_runtimes_like_pytorch_one_kernel_per_image(tmp_path, models, backend):
    _, pth, yml, onnx_path = models['dan']
    src = tmp_path / 'in'
    src.mkdir()
    cv2.imwrite(str(src / 'rgb.png'), smooth(20, 24))
    cv2.imwrite(str(src / 'gray.png'), smooth(17, 21, 1, seed=2))
    common = ['-i', str(src), '--save-kernel', '--kernel-crop', '12']
    run_infer(common + ['-o', str(tmp_path / 'torch'), '--model', pth, '--opt', yml, '--backend', 'torch'])
    run_infer(common + ['-o', str(tmp_path / 'whole'), '--model', onnx_path, '--backend', backend])
    run_infer(common + [
        '-o',
        str(tmp_path / 'tiled'), '--model', pth, '--opt', yml, '--backend', backend, '--tile', '8', '--tile-pad', '4'
    ])
    want, whole, tiled = images(tmp_path / 'torch'), images(tmp_path / 'whole'), images(tmp_path / 'tiled')
    assert sorted(want) == sorted(whole) == sorted(tiled) == [
        'gray_kernel.npy', 'gray_kernel.png', 'gray_out.png', 'rgb_kernel.npy', 'rgb_kernel.png', 'rgb_out.png'
    ]
    assert whole['gray_out.png'].shape == (68, 84) and whole['rgb_out.png'].shape == (80, 96, 3)
    for name in ('gray_out.png', 'rgb_out.png'):
        assert np.abs(whole[name].astype(int) - want[name].astype(int)).max() <= 1, name
        assert np.abs(tiled[name].astype(int) - whole[name].astype(int)).max() <= 1, name
    for stem in ('gray', 'rgb'):
        kernels = [np.load(tmp_path / run / f'{stem}_kernel.npy') for run in ('torch', 'whole', 'tiled')]
        assert psnr_db(kernels[1], kernels[0]) >= 80
        assert np.array_equal(kernels[2], kernels[1])  # tiled: the one kernel of the image, not one per tile


@pytest.mark.parametrize('backend', BACKENDS)
def test_d2c_infer_runs_sdflow_samples_and_downscaling_on_the_runtimes_like_pytorch(tmp_path, models, backend):
    _, pth, yml, onnx_path = models['sdflow']
    src, hr = tmp_path / 'in', tmp_path / 'hr'
    src.mkdir()
    hr.mkdir()
    cv2.imwrite(str(src / 'a.png'), smooth(14, 18))
    cv2.imwrite(str(hr / 'h.png'), smooth(36, 44, seed=1))
    for flags in (['-i', str(src), '--samples', '2', '--seed', '3', '--tile',
                   '8'], ['-i', str(hr), '--downscale', '--samples', '2', '--temperature', '0.5']):
        ref, out = str(tmp_path / 'torch'), str(tmp_path / backend)
        run_infer(flags + ['-o', ref, '--model', pth, '--opt', yml, '--backend', 'torch'])
        run_infer(flags + ['-o', out, '--model', onnx_path, '--backend', backend])
        want, got = images(ref), images(out)
        assert sorted(want) == sorted(got)
        for name in want:
            if name.endswith('_spread.png'):
                continue  # a heatmap scaled to its maximum: compared through the samples
            assert want[name].shape == got[name].shape
            assert np.abs(want[name].astype(int) - got[name].astype(int)).max() <= 1, name
    assert sorted(images(tmp_path / backend)) == [
        'a_mean.png', 'a_sample1.png', 'a_sample2.png', 'a_spread.png', 'h_lr1.png', 'h_lr2.png', 'h_mean.png',
        'h_spread.png'
    ]
    assert images(tmp_path / backend)['h_lr1.png'].shape == (9, 11, 3)


def test_refusals_name_the_fix(tmp_path, models, capsys):
    net, pth, yml, onnx_path = models['sdflow']
    out = str(tmp_path / 'half.onnx')
    assert export.main([pth, '-o', out, '--opt', yml, '--precision', 'fp16']) == 2
    assert 'fp32 only' in capsys.readouterr().err and not os.listdir(tmp_path)
    lone = tmp_path / 'lone.onnx'
    lone.write_bytes(open(models['dan'][3], 'rb').read())  # the main file without its restore graph
    with pytest.raises(UserError, match=r'needs .*dan\.restore\.onnx beside it'):
        read_onnx_metadata(str(lone))
    existing = tmp_path / 'x.restore.onnx'
    existing.write_bytes(b'')
    assert export.main([models['dan'][1], '-o', str(tmp_path / 'x.onnx'), '--opt', models['dan'][2]]) == 2
    assert 'x.restore.onnx exists; pass --force' in capsys.readouterr().err


def test_auto_follows_the_measured_order_per_method(monkeypatch):
    monkeypatch.setattr(runtime_util, 'installed', lambda name: True)
    for method, order in runtime_util.AUTO_ORDER.items():
        assert runtime_util.select_method_backend('auto', 'm.pth', CPU, method)[0] == order[0]
    assert runtime_util.select_method_backend('torch', 'm.pth', CPU, 'DAN')[0] == 'torch'  # --backend overrides
    assert runtime_util.select_method_backend('auto', 'm.pth', torch.device('cuda'), 'DAN')[0] == 'torch'


def test_check_graphs_catches_a_graph_that_computes_something_else(models):
    net, *_ = models['dan']
    graphs = dan_graphs(net)
    files = read_onnx_metadata(models['dan'][3])['paths']
    assert min(export_util.check_graphs(graphs, files).values()) >= 80
    with torch.no_grad():
        graphs[1].module.restorer.conv_last.bias += 0.01
    with pytest.raises(UserError, match=r'restore\.sr .* dB'):
        export_util.check_graphs(graphs, files)
