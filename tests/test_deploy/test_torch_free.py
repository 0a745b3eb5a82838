"""d2c-infer on an exported model without torch: the same outputs as the PyTorch-driven runtime path.

The runs without torch are subprocesses in which ``import torch``, ``torchvision`` and ``basicsr``
raise ImportError; the reference is the same command in this process with the torch-free path
switched off (the path every run took before it existed).
"""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from d2c_arch import D2CNet
from d2c_deploy import exported_infer_util, runtime_util
from d2c_deploy.export_util import export_onnx
from d2c_inference.array_infer_util import GuardedRun, output_problem, super_resolve_array
from d2c_inference.tile_util import output_problem as tensor_output_problem
from d2c_inference.tile_util import super_resolve
from d2c_tools import infer

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NET = dict(num_feat=8, num_group=1, num_block=1, reduction=4, num_fusion_feat=8, upscale=4)
BLOCKED = ('torch', 'torchvision', 'basicsr')
# a finder first in sys.meta_path that refuses the heavy packages, then d2c-infer's entry point
WITHOUT_TORCH = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked by the test: ' + name)
sys.meta_path.insert(0, Refuse())
from d2c_tools.infer import main
status = main(sys.argv[1:])
assert not set({BLOCKED!r}) & set(sys.modules), sorted(set({BLOCKED!r}) & set(sys.modules))
sys.exit(status)
"""
BACKENDS = [b for b in ('onnxruntime', 'openvino') if runtime_util.installed(b)]


def smooth(h, w, channels, dtype, seed):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, channels)).astype(np.float32), (5, 5), 1.2).reshape(h, w, channels)
    top = 65535 if dtype == np.uint16 else 255
    out = (img * top).round().astype(dtype)
    return out[..., 0] if channels == 1 else out


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    """A tiny D2CNet: its checkpoint and option file, an 'all'-outputs ONNX file, and three kinds of images."""
    root = tmp_path_factory.mktemp('torch_free')
    torch.manual_seed(0)
    net = D2CNet(**NET).eval()
    pth, yml, onnx = str(root / 'net.pth'), str(root / 'net.yml'), str(root / 'net.onnx')
    torch.save({'params': net.state_dict()}, pth)
    with open(yml, 'w') as f:
        yaml.safe_dump({'network_g': dict(NET, type='D2CNet')}, f)
    export_onnx(net, onnx, outputs='all', net_opt=NET, source='net')
    images = root / 'in'
    images.mkdir()
    cv2.imwrite(str(images / 'rgba.png'), smooth(20, 26, 4, np.uint8, 1))
    cv2.imwrite(str(images / 'deep.png'), smooth(18, 23, 3, np.uint16, 2))
    cv2.imwrite(str(images / 'gray.png'), smooth(17, 21, 1, np.uint8, 3))
    return {'pth': pth, 'yml': yml, 'onnx': onnx, 'images': str(images), 'root': root}


def run_without_torch(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-c', WITHOUT_TORCH, *args],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)


def run_with_torch(args, monkeypatch):
    """The same command on the PyTorch-driven runtime path (the torch-free one switched off)."""
    with monkeypatch.context() as patch:
        patch.setattr(exported_infer_util, 'run_exported', lambda *unused: None)
        return infer.main(args)


def assert_same_outputs(got_dir, want_dir):
    names = sorted(os.listdir(want_dir))
    assert names and names == sorted(os.listdir(got_dir))
    for name in names:
        got = cv2.imread(os.path.join(got_dir, name), cv2.IMREAD_UNCHANGED)
        want = cv2.imread(os.path.join(want_dir, name), cv2.IMREAD_UNCHANGED)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        top = 65535. if want.dtype == np.uint16 else 255.
        mse = np.mean((got.astype(np.float64) / top - want.astype(np.float64) / top)**2)
        assert mse == 0 or 10 * np.log10(1 / mse) >= 50, f'{name}: {10 * np.log10(1 / mse):.1f} dB'


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('tile', ['0', '8'])
def test_onnx_file_runs_without_torch_like_the_torch_driven_path(model, backend, tile, tmp_path, monkeypatch):
    common = [
        '-i', model['images'], '--model', model['onnx'], '--backend', backend, '--tile', tile, '--tile-pad', '4',
        '--pre-pad', '2', '--save-branches', '--save-weights', '--grid-size', '40', '--cache-dir',
        str(tmp_path / 'cache'), '-q'
    ]
    done = run_without_torch(common + ['-o', str(tmp_path / 'free')], tmp_path)
    assert done.returncode == 0, done.stderr
    assert '3 of 3 image(s) written' in done.stdout
    assert run_with_torch(common + ['-o', str(tmp_path / 'torch')], monkeypatch) == 0
    assert_same_outputs(str(tmp_path / 'free'), str(tmp_path / 'torch'))
    # alpha and 16 bits kept: the RGBA input gives RGBA, the 16-bit one 16 bits
    assert cv2.imread(str(tmp_path / 'free' / 'rgba_out.png'), cv2.IMREAD_UNCHANGED).shape == (80, 104, 4)
    assert cv2.imread(str(tmp_path / 'free' / 'deep_out.png'), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    if backend == 'openvino':  # the second run loads the compiled model from OpenVINO's cache
        again = run_without_torch(common + ['-o', str(tmp_path / 'again')], tmp_path)
        assert again.returncode == 0 and 'loaded from the compiled-model cache' in again.stdout, again.stdout


@pytest.mark.parametrize('backend', BACKENDS)
def test_cached_export_of_a_checkpoint_runs_without_torch(model, backend, tmp_path, monkeypatch):
    cache = str(tmp_path / 'cache')
    common = [
        '-i', model['images'], '--model', model['pth'], '--opt', model['yml'], '--backend', backend, '--cache-dir',
        cache, '--outscale', '3', '-q'
    ]
    assert run_with_torch(common + ['-o', str(tmp_path / 'torch')], monkeypatch) == 0  # exports into the cache
    done = run_without_torch(common + ['-o', str(tmp_path / 'free')], tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'exported model from the cache' in done.stderr and 'weights ' + model['pth'] + ' [params]' in done.stdout
    assert_same_outputs(str(tmp_path / 'free'), str(tmp_path / 'torch'))
    # no cached export (another cache folder): the run needs torch to export, and says nothing else
    elsewhere = [a if a != cache else str(tmp_path / 'elsewhere') for a in common]
    assert exported_infer_util.exported_file(infer.parse_args(elsewhere), 'fused') is None


def test_errors_without_torch_keep_their_message_and_status(model, tmp_path):
    done = run_without_torch(['-i', model['images'], '--model', model['onnx'], '--samples', '2'], tmp_path)
    assert done.returncode == 2 and 'holds a D2CNet' in done.stderr
    done = run_without_torch(
        ['-i', model['images'], '--model', model['onnx'], '--backend', 'onnxruntime', '--precision', 'bf16'], tmp_path)
    assert done.returncode == 2 and 'ONNX Runtime runs the precision the file was exported in' in done.stderr
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    done = run_without_torch(['-i', str(broken), '--model', model['onnx'], '-o', str(tmp_path / 'o'), '-q'], tmp_path)
    assert done.returncode == 1 and 'skipped' in done.stderr and not os.listdir(tmp_path / 'o')


def test_modules_of_the_path_import_no_torch():
    code = ('import sys, d2c_tools.infer, d2c_deploy.exported_infer_util, d2c_inference.array_infer_util; '
            f'print(sorted(set({BLOCKED!r}) & set(sys.modules)))')
    done = subprocess.run([sys.executable, '-c', code],
                          capture_output=True,
                          text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0 and done.stdout.strip() == '[]', done.stdout + done.stderr


class FakeRuntime:
    """``run_array`` of a x2 nearest-neighbour 'network' whose bf16 output is broken as asked."""
    upscale = 2

    def __init__(self, broken=None):
        self.broken = broken
        self.calls = []

    def run_array(self, lq, return_branches=False, precision=None):
        self.calls.append(precision)
        out = lq.repeat(2, axis=2).repeat(2, axis=3)
        if precision and self.broken == 'nan':
            out = np.full_like(out, np.nan)
        elif self.broken == 'far':  # the model's own doing: fp32 too
            out = 1 - out
        return out


def test_numpy_guard_falls_back_once_and_keeps_one_call_per_tile():
    lq = np.random.default_rng(0).random((1, 3, 18, 24), dtype=np.float32)
    net, warnings = FakeRuntime(broken='nan'), []
    guard = GuardedRun(net, 'bf16', warnings.append)
    sr, _, _ = super_resolve_array(guard, lq, 2, tile=8, tile_pad=2)
    np.testing.assert_array_equal(sr, lq.repeat(2, axis=2).repeat(2, axis=3))
    assert net.calls[:2] == ['bf16', None] and set(
        net.calls[2:]) == {None} and len(net.calls) == 10  # 9 tiles and one probe
    assert len(warnings) == 1 and 'bf16 gave non-finite' in warnings[0] and guard.precision is None
    net = FakeRuntime(broken='far')  # fp32 as far: one probe, then one call per pass, no warning
    guard = GuardedRun(net, 'bf16', warnings.append)
    for _ in range(3):
        guard(lq)
    assert net.calls == ['bf16', None, 'bf16', 'bf16'] and len(warnings) == 1 and guard.precision == 'bf16'
    healthy = FakeRuntime()
    guard = GuardedRun(healthy, 'bf16')
    guard(lq)
    assert healthy.calls == ['bf16']


def test_numpy_tiling_and_checks_match_the_torch_ones():
    rng = np.random.default_rng(1)
    lq = rng.random((1, 3, 19, 23), dtype=np.float32)
    net = FakeRuntime()

    def torch_forward(unused, window, return_branches=False):
        return torch.from_numpy(net.run_array(window.numpy()))

    for tile, pad, pre in ((0, 0, 0), (8, 3, 2), (7, 0, 5)):
        want, _, _ = super_resolve(None, torch.from_numpy(lq), 2, tile, pad, pre, forward=torch_forward)
        got, _, _ = super_resolve_array(lambda w, b: net.run_array(w), lq, 2, tile, pad, pre)
        np.testing.assert_array_equal(got, want.numpy())
    for out in (lq.repeat(2, 2).repeat(2, 3), np.full((1, 3, 38, 46), 0.5,
                                                      np.float32), 1 - lq.repeat(2, 2).repeat(2, 3)):
        assert output_problem(lq, out) == tensor_output_problem(torch.from_numpy(lq), torch.from_numpy(out))
