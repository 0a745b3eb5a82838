"""LPIPS and DISTS as BasicSR metrics (d2c_metrics/perceptual_metric.py), without any download.

The real backbones (ImageNet AlexNet / VGG16 / SqueezeNet) cannot be fetched here, so every test
builds the libraries' networks with weights made in the test: either put straight into the
metric's network cache, or written as a torchvision file into a temporary torch hub folder. The
``offline`` fixture points the torch hub at an empty folder and makes any download or socket
connection fail the test, so nothing here ever reaches the network.
"""
import csv
import os
import re
import shutil
import socket
import subprocess
import sys

import cv2
import lpips
import numpy as np
import piq
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from conftest import REPO_ROOT, write_yaml
from test_options import load_like_basicsr

from basicsr.metrics import calculate_metric
from basicsr.models import build_model
from basicsr.utils.registry import METRIC_REGISTRY
from d2c_metrics import perceptual_metric as pm
from d2c_tools import infer
from d2c_tools.pipeline_util import normalise_argv

sys.path.insert(0, os.path.join(REPO_ROOT, 'scripts'))
import make_table2_options  # noqa: E402

TINY_D2C = {'num_feat': 8, 'num_group': 1, 'num_block': 1, 'reduction': 4, 'num_fusion_feat': 8}
ALEX_FILE = 'alexnet-owt-7be5be79.pth'
SQUEEZE_FILE = 'squeezenet1_1-b8a52dc0.pth'


class DownloadAttempted(Exception):
    pass


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub folder; downloads and socket connections raise DownloadAttempted (recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise DownloadAttempted(f'download attempted: {args[:1]}')

    hub = tmp_path / 'hub'
    old_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', refuse)
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(pm, 'NETWORKS', {})
    yield hub, attempts
    torch.hub.set_dir(old_dir)


def _images(size=(64, 72), seed=0):
    """Two related uint8 BGR images: a smooth one and a noisy, shifted copy."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random(size + (3, )).astype(np.float32), (7, 7), 2.0)
    other = np.roll(img, 2, axis=1) + rng.normal(0, 0.05, img.shape).astype(np.float32)
    to8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    return to8(img), to8(other)


def _rgb_tensor(img_bgr):
    """Independent conversion: uint8 BGR (H, W, 3) -> (1, 3, H, W) float RGB in [0, 1]."""
    rgb = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def _random_lpips(net='alex', seed=0):
    torch.manual_seed(seed)
    return lpips.LPIPS(net=net, version='0.1', pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope='module')
def random_dists():
    """piq.DISTS with a random VGG16 and random alpha/beta (non-negative, summing to 1 as DISTS's do).

    Built once (a VGG16's random initialisation takes seconds), with piq's two downloads replaced.
    """
    torch.manual_seed(0)
    channels = sum([3, 64, 128, 256, 512, 512])
    weights = torch.rand(2, 1, channels, 1, 1)
    weights /= weights.sum()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(piq.perceptual, 'vgg16', lambda *a, **k: torchvision.models.vgg16(weights=None))
        patch.setattr(torch.hub, 'load_state_dict_from_url', lambda *a, **k: {'alpha': weights[0], 'beta': weights[1]})
        return piq.DISTS(reduction='none').eval()


# ----------------------------------------------------------------------------- registration, errors
def test_registered():
    assert METRIC_REGISTRY.get('calculate_lpips') is pm.calculate_lpips
    assert METRIC_REGISTRY.get('calculate_dists') is pm.calculate_dists


@pytest.mark.parametrize('metric, files', [('calculate_lpips', [ALEX_FILE]),
                                           ('calculate_dists', ['vgg16-397923af.pth', 'dists_weights.pt'])])
def test_missing_weights_is_one_line_naming_file_and_folder(offline, metric, files):
    hub, attempts = offline
    img, other = _images()
    with pytest.raises(pm.MissingWeightsError) as info:
        calculate_metric(dict(img=img, img2=other), {'type': metric, 'better': 'lower'})
    message = str(info.value)
    assert '\n' not in message and str(hub / 'checkpoints') in message
    assert all(name in message for name in files) and 'download failed' in message
    assert len(attempts) == len(files)  # the usual download was tried (and refused here) once per file
    assert not list((hub / 'checkpoints').iterdir())  # nothing half-written left behind


def test_download_false_never_touches_the_network(offline):
    hub, attempts = offline
    img, other = _images()
    with pytest.raises(pm.MissingWeightsError, match=f'{ALEX_FILE} in .*download: false'):
        pm.calculate_lpips(img, other, download=False)
    assert attempts == []


def test_missing_package_is_a_clear_error(offline, monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'lpips', None)  # import lpips -> ImportError
    with pytest.raises(pm.UserError, match=r'needs the lpips package: pip install "d2c-sr\[perceptual\]"'):
        pm.lpips_network()


def test_bad_options(offline):
    img, other = _images()
    with pytest.raises(ValueError, match="net 'resnet'"):
        pm.calculate_lpips(img, other, net='resnet')
    with pytest.raises(ValueError, match="version '0.2'"):
        pm.calculate_lpips(img, other, version='0.2')
    with pytest.raises(ValueError, match='shapes differ'):
        pm.NETWORKS[('lpips', 'alex', '0.1', 'cpu')] = _random_lpips()
        pm.calculate_lpips(img, other[:-1], device='cpu')


# ----------------------------------------------------------------------------- LPIPS
def test_lpips_equals_the_library_call(offline):
    model = _random_lpips()
    pm.NETWORKS[('lpips', 'alex', '0.1', 'cpu')] = model
    img, other = _images()
    ours = calculate_metric(dict(img=img, img2=other), {'type': 'calculate_lpips', 'crop_border': 0, 'device': 'cpu'})
    # the lpips package's own path: RGB uint8 -> im2tensor ([-1, 1]) -> LPIPS.forward
    rgb = [cv2.cvtColor(a, cv2.COLOR_BGR2RGB) for a in (img, other)]
    with torch.no_grad():
        theirs = float(model(lpips.im2tensor(rgb[0]), lpips.im2tensor(rgb[1])))
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    assert ours > 0 and pm.calculate_lpips(img, img, device='cpu') == pytest.approx(0, abs=1e-7)
    # crop_border shaves before scoring; CHW input and gray images are accepted
    shaved = pm.calculate_lpips(img, other, crop_border=4, device='cpu')
    with torch.no_grad():
        expected = float(model(_rgb_tensor(img[4:-4, 4:-4]), _rgb_tensor(other[4:-4, 4:-4]), normalize=True))
    assert shaved == pytest.approx(expected, rel=1e-5)
    assert pm.calculate_lpips(
        img.transpose(2, 0, 1), other.transpose(2, 0, 1), input_order='CHW', device='cpu') == pytest.approx(
            ours, rel=1e-6)
    gray = pm.calculate_lpips(img[..., 1], other[..., 1], device='cpu')
    with torch.no_grad():
        expected = float(
            model(
                _rgb_tensor(np.repeat(img[..., 1:2], 3, 2)),
                _rgb_tensor(np.repeat(other[..., 1:2], 3, 2)),
                normalize=True))
    assert gray == pytest.approx(expected, rel=1e-5)


def test_lpips_arithmetic_by_hand(offline):
    """LPIPS v0.1 written out: scale the input, AlexNet's five ReLU outputs, unit-normalise every
    feature vector over channels, squared difference, the 1x1 linear heads, spatial mean, sum."""
    model = _random_lpips(seed=3)
    with torch.no_grad():
        for lin in model.lins:  # the package's heads on random features give tiny numbers; make them count
            lin.model[-1].weight.uniform_(0, 1)
    pm.NETWORKS[('lpips', 'alex', '0.1', 'cpu')] = model
    img, other = _images((67, 70), seed=5)
    ours = pm.calculate_lpips(img, other, device='cpu')

    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)  # LPIPS's ScalingLayer constants
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    layers = [
        layer for block in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5)
        for layer in block
    ]
    convs = [layer for layer in layers if isinstance(layer, torch.nn.Conv2d)]
    assert len(convs) == 5

    def features(img_bgr):
        x = (_rgb_tensor(img_bgr) * 2 - 1 - shift) / scale
        out = []
        for i, conv in enumerate(convs):
            if i in (1, 2):  # AlexNet: max-pool 3x3 stride 2 before conv2 and conv3
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding))
            out.append(x)
        return out

    total = 0.
    with torch.no_grad():
        for k, (f0, f1) in enumerate(zip(features(img), features(other))):
            n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = model.lins[k].model[-1].weight.view(1, -1, 1, 1)
            total += float(((n0 - n1)**2 * w).sum(1).mean())
    assert ours == pytest.approx(total, rel=1e-5)


def test_lpips_reads_the_torchvision_backbone_from_the_hub_cache(offline):
    """The real loading path: a torchvision SqueezeNet file (weights made here) in the hub folder;
    the result equals the lpips package built the library's own way around the same backbone."""
    hub, attempts = offline
    torch.manual_seed(7)
    backbone = torchvision.models.squeezenet1_1(weights=None)
    (hub / 'checkpoints').mkdir(parents=True)
    torch.save(backbone.state_dict(), hub / 'checkpoints' / SQUEEZE_FILE)
    img, other = _images(seed=2)
    ours = pm.calculate_lpips(img, other, net='squeeze', device='cpu')
    assert attempts == []

    original = lpips.pretrained_networks.tv.squeezenet1_1
    lpips.pretrained_networks.tv.squeezenet1_1 = lambda *a, **k: backbone  # what torchvision would return
    try:
        reference = lpips.LPIPS(net='squeeze', version='0.1', verbose=False).eval()
    finally:
        lpips.pretrained_networks.tv.squeezenet1_1 = original
    with torch.no_grad():
        theirs = float(reference(_rgb_tensor(img), _rgb_tensor(other), normalize=True))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_lpips_refuses_a_file_that_is_not_the_backbone(offline):
    hub, _ = offline
    (hub / 'checkpoints').mkdir(parents=True)
    torch.save({'features.0.weight': torch.zeros(1)}, hub / 'checkpoints' / SQUEEZE_FILE)
    with pytest.raises(pm.MissingWeightsError, match='not the torchvision backbone lpips expects'):
        pm.lpips_network('squeeze', device='cpu')
    (hub / 'checkpoints' / SQUEEZE_FILE).write_bytes(b'truncated download')
    with pytest.raises(pm.MissingWeightsError, match=f'{SQUEEZE_FILE} cannot be read .*delete it') as info:
        pm.lpips_network('squeeze', device='cpu')
    assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------- DISTS
def test_dists_equals_the_library_call(offline, random_dists):
    model = random_dists
    pm.NETWORKS[('dists', 'cpu')] = model
    img, other = _images()
    ours = calculate_metric(dict(img=img, img2=other), {'type': 'calculate_dists', 'better': 'lower', 'device': 'cpu'})
    with torch.no_grad():
        theirs = float(model(_rgb_tensor(img), _rgb_tensor(other)))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert 0 < ours < 1 and pm.calculate_dists(img, img, device='cpu') == pytest.approx(0, abs=1e-5)


def test_dists_builds_from_cached_files_without_downloading(offline, monkeypatch):
    """With both files present in the hub folder, piq's constructor reads them (no download)."""
    hub, attempts = offline
    (hub / 'checkpoints').mkdir(parents=True)
    for name in ('vgg16-397923af.pth', 'dists_weights.pt'):
        (hub / 'checkpoints' / name).write_bytes(b'')  # present; their content is the library's business
    built = []

    class Built(torch.nn.Conv2d):
        _weights_url = piq.DISTS._weights_url

        def __init__(self, **kwargs):
            built.append(kwargs)
            super().__init__(1, 1, 1)

    monkeypatch.setattr(piq, 'DISTS', Built)
    pm.dists_network(device='cpu')
    assert built == [{'reduction': 'none'}] and attempts == []


# ----------------------------------------------------------------------------- d2c-infer --reference
def test_infer_reference_with_perceptual_metrics(offline, tmp_path, random_dists):
    from test_infer import save_model, smooth_image, write
    pth, yml, _ = save_model(str(tmp_path))
    lr_dir, hr_dir, out = tmp_path / 'LR', tmp_path / 'HR', tmp_path / 'out'
    lr_dir.mkdir()
    hr_dir.mkdir()
    hr = smooth_image(64, 68, 3, seed=1)
    write(hr_dir / 'im0.png', hr)
    write(lr_dir / 'im0.png', cv2.resize(hr, (17, 16), interpolation=cv2.INTER_AREA))
    pm.NETWORKS[('lpips', 'alex', '0.1', 'cpu')] = _random_lpips()
    pm.NETWORKS[('dists', 'cpu')] = random_dists
    args = [
        '-i',
        str(lr_dir), '-o',
        str(out), '--model', pth, '--opt', yml, '--reference',
        str(hr_dir), '-q', '--device', 'cpu', '--backend', 'torch', '--precision', 'fp32', '--save-branches'
    ]
    assert infer.main(args + ['--perceptual', 'lpips', 'dists']) == 0
    with open(out / 'metrics.csv', newline='') as f:
        rows = {row['image']: row for row in csv.DictReader(f)}
    assert 'fused_lpips' in rows['mean'] and 'bicubic_dists' in rows['mean'] and 'oracle_psnr_y' in rows['mean']
    fused = cv2.imread(str(out / 'im0_out.png'))
    assert float(rows['im0.png']['fused_lpips']) == pytest.approx(pm.calculate_lpips(fused, hr, device='cpu'), abs=1e-4)
    assert float(rows['im0.png']['fused_dists']) == pytest.approx(pm.calculate_dists(fused, hr, device='cpu'), abs=1e-4)


def test_infer_perceptual_missing_weights_stops_before_any_image(offline, tmp_path, capsys):
    from test_infer import save_model, smooth_image, write
    pth, yml, _ = save_model(str(tmp_path))
    (tmp_path / 'LR').mkdir()
    write(tmp_path / 'LR' / 'im0.png', smooth_image(16, 16))
    out = tmp_path / 'out'
    code = infer.main([
        '-i',
        str(tmp_path / 'LR'), '-o',
        str(out), '--model', pth, '--opt', yml, '--reference',
        str(tmp_path / 'LR'), '--perceptual', 'lpips', '-q', '--device', 'cpu', '--backend', 'torch'
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert f'd2c-infer: error: calculate_lpips (net alex) needs the weight file {ALEX_FILE}' in err
    assert 'Traceback' not in err and not os.path.exists(out / 'im0_out.png')


def test_infer_perceptual_needs_reference(capsys):
    with pytest.raises(SystemExit) as info:
        infer.parse_args(['-i', 'x', '--model', 'm.pth', '--perceptual', 'lpips'])
    assert info.value.code == 2 and '--perceptual needs --reference' in capsys.readouterr().err


# ----------------------------------------------------------------------------- Table 2 option files
TABLE2 = os.path.join(REPO_ROOT, 'options', 'table2')


def test_table2_option_files_are_current():
    assert make_table2_options.main(['--check']) == 0
    assert sorted(os.listdir(TABLE2)) == sorted(f'{kind}_D2C-VGG_RealSR_x{s}.yml' for s in (2, 3, 4)
                                                for kind in ('train', 'test'))


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_table2_training_adds_vgg_loss_and_lpips_validation(offline, monkeypatch, tmp_path, scale):
    """The Table 2 files build a D2CModel with BasicSR's PerceptualLoss (VGG19 made here) whose
    convergence step logs l_percep, and validate with LPIPS (lower is better)."""
    hub, attempts = offline
    monkeypatch.setattr(torchvision.models.vgg, 'vgg19', lambda *a, **k: torchvision.models.vgg19(weights=None))
    monkeypatch.chdir(tmp_path)  # BasicSR looks for experiments/pretrained_models/vgg19-*.pth here first
    opt = load_like_basicsr(os.path.join(TABLE2, f'train_D2C-VGG_RealSR_x{scale}.yml'), tmp_path)
    metrics = opt['val']['metrics']
    assert list(metrics) == ['psnr', 'ssim', 'lpips']
    assert metrics['lpips'] == {
        'type': 'calculate_lpips',
        'crop_border': 0,
        'net': 'alex',
        'version': '0.1',
        'better': 'lower'
    }
    percep = opt['train']['perceptual_opt']
    assert percep['type'] == 'PerceptualLoss' and percep['layer_weights'] == {'conv5_4': 1.0}
    if scale != 4:  # one full build is enough: the files differ only in the scale (checked above)
        return
    opt['network_g'].update(TINY_D2C)
    model = build_model(opt)
    assert model.cri_perceptual is not None and attempts == []
    convergence_start = opt['train']['phases'][0]['iters'] + 1
    torch.manual_seed(0)
    model.feed_data({'lq': torch.rand(2, 3, 8, 8), 'gt': torch.rand(2, 3, 32, 32)})
    model.optimize_parameters(convergence_start)
    assert model.log_dict['l_percep'] > 0 and 'l_conv' in model.log_dict


def _tiny_test_option(tmp_path, metrics):
    """options/table2/test_D2C-VGG_RealSR_x4.yml on a tiny D2CNet and two 32x32 pairs."""
    from conftest import make_pairs
    from test_infer import save_model
    pth, _, _ = save_model(str(tmp_path), seed=4)
    hr_dir, lr_dir = make_pairs(str(tmp_path / 'data'), num=2, hr_size=32)
    with open(os.path.join(TABLE2, 'test_D2C-VGG_RealSR_x4.yml')) as f:
        opt = yaml.safe_load(f)
    opt.update(num_gpu=0)
    opt['datasets']['test_1'].update(dataroot_gt=hr_dir, dataroot_lq=lr_dir)
    opt['network_g'].update(TINY_D2C)
    opt['path']['pretrain_network_g'] = pth
    opt['val'].update(pbar=False, metrics=metrics)
    return write_yaml(tmp_path / 'test.yml', opt), opt


def _d2c_test(tmp_path, yml, torch_home):
    env = dict(os.environ, TORCH_HOME=str(torch_home))
    return subprocess.run([sys.executable, '-m', 'd2c_tools.test', '-opt', yml],
                          cwd=str(tmp_path),
                          capture_output=True,
                          text=True,
                          timeout=300,
                          env=env)


@pytest.mark.slow
def test_d2c_test_reports_lpips_from_the_torch_cache(offline, tmp_path):
    """d2c-test with the Table 2 test file (LPIPS on SqueezeNet, whose file is made here) logs the
    LPIPS of the saved images; with the file missing it stops with one line, exit 2."""
    hub, _ = offline
    torch_home = tmp_path / 'torch_home'
    checkpoints = torch_home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    torch.manual_seed(11)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), checkpoints / SQUEEZE_FILE)
    metrics = {'lpips': {'type': 'calculate_lpips', 'net': 'squeeze', 'download': False, 'better': 'lower'}}
    yml, opt = _tiny_test_option(tmp_path, metrics)
    result = _d2c_test(tmp_path, yml, torch_home)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    log = next((tmp_path / 'results' / opt['name']).glob('*.log')).read_text()
    logged = float(re.search(r'# lpips: ([0-9.]+)', log).group(1))
    torch.hub.set_dir(str(torch_home / 'hub'))  # the same file, read in this process
    folder = tmp_path / 'results' / opt['name'] / 'visualization' / opt['datasets']['test_1']['name']
    scores = [
        pm.calculate_lpips(
            cv2.imread(str(folder / f'img{i}_{opt["name"]}.png')),
            cv2.imread(str(tmp_path / 'data' / 'HR' / f'img{i}.png')),
            net='squeeze',
            download=False,
            device='cpu') for i in range(2)
    ]
    assert logged == pytest.approx(np.mean(scores), abs=1e-4)

    (checkpoints / SQUEEZE_FILE).unlink()
    shutil.rmtree(tmp_path / 'results')
    result = _d2c_test(tmp_path, yml, torch_home)
    assert result.returncode == 2 and not (tmp_path / 'results').exists()  # stopped before BasicSR started
    assert (f'd2c-test: error: calculate_lpips (net squeeze) needs the weight file {SQUEEZE_FILE} in {checkpoints} '
            '(download: false)') in result.stderr
    assert 'Traceback' not in result.stderr


def test_training_stops_at_start_when_a_metric_lacks_its_weights(offline, tmp_path, capsys, monkeypatch):
    """d2c-train / d2c-test check the perceptual metrics' files before BasicSR starts (not at the first
    validation, hours later); other metrics and present files pass."""
    hub, attempts = offline
    monkeypatch.setattr(sys, 'argv', list(sys.argv))  # normalise_argv rewrites it
    opt = {'val': {'metrics': {'psnr': {'type': 'calculate_psnr'}, 'lpips': {'type': 'calculate_lpips'}}}}
    yml = write_yaml(tmp_path / 'train.yml', opt)
    with pytest.raises(SystemExit) as info:
        normalise_argv(['-opt', yml], 'd2c-train')
    assert info.value.code == 2 and len(attempts) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'd2c-train: error: calculate_lpips (net alex) needs the weight file {ALEX_FILE}')
    (hub / 'checkpoints' / ALEX_FILE).write_bytes(b'')
    normalise_argv(['-opt', yml], 'd2c-train')  # present: nothing is built or fetched here
    assert len(attempts) == 1 and pm.NETWORKS == {}
    pm.check_weight_files({'psnr': {'type': 'calculate_psnr'}})
    with pytest.raises(pm.UserError, match="val.metrics.lp: net 'vg'"):
        pm.check_weight_files({'lp': {'type': 'calculate_lpips', 'net': 'vg'}})
