"""d2c-infer: tiling, image kinds, branch/weight pictures, metrics, safe loading, errors."""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from d2c_arch import D2CNet
from d2c_inference.tile_util import run_network, super_resolve, tile_boxes
from d2c_tools import infer
from d2c_utils.eval_util import oracle_fusion

TINY = {
    'type': 'D2CNet',
    'num_feat': 8,
    'num_group': 1,
    'num_block': 1,
    'reduction': 4,
    'upscale': 4,
    'num_fusion_feat': 8
}


def make_net(seed=0, **overrides):
    opt = dict(TINY, **overrides)
    torch.manual_seed(seed)
    return D2CNet(**{k: v for k, v in opt.items() if k != 'type'}).eval(), opt


def save_model(root, name='tiny', seed=0, ckpt_extra=None, **overrides):
    """Write ``<name>.pth`` ({'params': ...}) and ``<name>.yml`` (network_g); returns (pth, yml, net)."""
    net, opt = make_net(seed, **overrides)
    ckpt = {'params': net.state_dict()}
    ckpt.update(ckpt_extra or {})
    pth, yml = os.path.join(root, f'{name}.pth'), os.path.join(root, f'{name}.yml')
    torch.save(ckpt, pth)
    with open(yml, 'w') as f:
        yaml.safe_dump({'name': name, 'network_g': opt}, f)
    return pth, yml, net


def smooth_image(h, w, channels=3, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((h, w, channels)).astype(np.float32), (5, 5), 1.2)
    img = img.reshape(h, w, channels)
    max_value = 65535 if dtype == np.uint16 else 255
    out = (img * max_value).round().astype(dtype)
    return out[..., 0] if channels == 1 else out


def write(path, img):
    ok, buf = cv2.imencode(os.path.splitext(str(path))[1], img)
    assert ok
    buf.tofile(str(path))


def read(path):
    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)


def to_tensor(img_bgr_float):
    return torch.from_numpy(np.ascontiguousarray(img_bgr_float[..., ::-1].transpose(2, 0, 1))).unsqueeze(0)


@pytest.fixture(autouse=True)
def exact_fp32(monkeypatch):
    """These tests compare d2c-infer's files with fp32 forwards computed here, so they pin PyTorch fp32 NCHW;
    the reduced-precision default (bf16 on CPUs that have it) is tested in test_precision.py."""
    main = infer.main
    monkeypatch.setattr(
        infer,
        'main',
        lambda argv=None: main(list(argv) + ['--backend', 'torch', '--precision', 'fp32', '--no-channels-last']))


@pytest.fixture(scope='module')
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp('model')
    pth, yml, net = save_model(str(root))
    return pth, yml, net


# ----------------------------------------------------------------------------------- tiling


def test_tile_boxes_cover_the_image_without_overlap():
    boxes = tile_boxes(30, 17, tile=8, tile_pad=3)
    cover = np.zeros((30, 17), int)
    for (y0, y1, x0, x1), (wy0, wy1, wx0, wx1) in boxes:
        cover[y0:y1, x0:x1] += 1
        assert wy0 == max(y0 - 3, 0) and wy1 == min(y1 + 3, 30) and wx0 == max(x0 - 3, 0) and wx1 == min(x1 + 3, 17)
        assert y1 - y0 <= 8 and x1 - x0 <= 8
    assert (cover == 1).all()
    assert len(boxes) == 4 * 3  # 30 -> 4 even parts of 7-8, 17 -> 3 parts of 5-6


def test_one_tile_covering_the_image_is_identical_to_untiled():
    net, _ = make_net()
    x = torch.rand(1, 3, 13, 11)
    ref = run_network(net, x, return_branches=True)
    for tile in (0, 13, 64):
        out = super_resolve(net, x, 4, tile=tile, tile_pad=5, return_branches=True)
        assert all(torch.equal(r, o) for r, o in zip(ref, out)), f'tile={tile}'


def test_tiling_is_exact_for_convolutions_with_padding_beyond_the_receptive_field():
    # EDSR branches have no global operation: with tile_pad >= receptive field (~14 LR px here)
    # tiled and untiled outputs agree up to float rounding, which checks the stitching geometry.
    net, _ = make_net(branch_type='EDSRBranch')
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 40, 37), 3, 1, 1)
    ref = run_network(net, x, return_branches=True)
    out = super_resolve(net, x, 4, tile=12, tile_pad=16, return_branches=True)
    for r, o in zip(ref, out):
        assert r.shape == o.shape
        assert torch.allclose(r, o, atol=1e-5), float((r - o).abs().max())


def test_tiling_with_channel_attention_is_close_with_generous_padding():
    net, _ = make_net()
    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 40, 36), 3, 1, 1)
    ref = run_network(net, x)
    loose = super_resolve(net, x, 4, tile=10, tile_pad=2)[0]
    tight = super_resolve(net, x, 4, tile=10, tile_pad=12)[0]
    err_loose, err_tight = (ref - loose).abs().max(), (ref - tight).abs().max()
    assert err_tight < 1e-3 and err_tight < err_loose


def test_pre_pad_keeps_the_output_size():
    net, _ = make_net()
    x = torch.rand(1, 3, 9, 12)
    sr, branches, weights = super_resolve(net, x, 4, tile=5, tile_pad=2, pre_pad=3, return_branches=True)
    assert sr.shape == (1, 3, 36, 48) and branches.shape == (1, 4, 3, 36, 48) and weights.shape == (1, 4, 36, 48)


# ------------------------------------------------------------------------------ image kinds


def test_image_kinds_round_trip(tmp_path, model):
    pth, yml, net = model
    src, out = tmp_path / 'in', tmp_path / 'out'
    src.mkdir()
    images = {
        'gray.png': smooth_image(10, 12, 1, seed=1),
        'rgb.png': smooth_image(10, 12, 3, seed=2),
        'rgba.png': smooth_image(10, 12, 4, seed=3),
        'deep.png': smooth_image(10, 12, 3, seed=4, dtype=np.uint16),
        'deepgray.png': smooth_image(10, 12, 1, seed=5, dtype=np.uint16),
        'photo.jpg': smooth_image(10, 12, 3, seed=6),
    }
    for name, img in images.items():
        write(src / name, img)
    assert infer.main(['-i', str(src), '-o', str(out), '--model', pth, '--opt', yml, '-q']) == 0

    for name, img in images.items():
        stem, ext = os.path.splitext(name)
        res = read(out / f'{stem}_out{ext}')
        assert res.dtype == img.dtype, name
        assert res.shape[:2] == (40, 48), name
        assert res.ndim == img.ndim and (res.ndim == 2 or res.shape[2] == img.shape[2]), name

    # 16-bit: the network sees full precision (value / 65535), not an 8-bit copy
    deep = read(src / 'deep.png').astype(np.float32) / 65535
    sr = run_network(net, to_tensor(deep))[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1]
    assert np.array_equal(read(out / 'deep_out.png'), (sr * 65535).round().astype(np.uint16))
    # gray: run as three equal channels, converted back with OpenCV's BGR->gray
    gray = cv2.cvtColor(read(src / 'gray.png').astype(np.float32) / 255, cv2.COLOR_GRAY2BGR)
    sr = run_network(net, to_tensor(gray))[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1]
    expected = (np.clip(cv2.cvtColor(np.ascontiguousarray(sr), cv2.COLOR_BGR2GRAY), 0, 1) * 255).round()
    assert np.array_equal(read(out / 'gray_out.png'), expected.astype(np.uint8))
    # RGBA: alpha upscaled on its own with INTER_LINEAR
    alpha = images['rgba.png'][..., 3].astype(np.float32) / 255
    up = (np.clip(cv2.resize(alpha, (48, 40), interpolation=cv2.INTER_LINEAR), 0, 1) * 255).round()
    assert np.array_equal(read(out / 'rgba_out.png')[..., 3], up.astype(np.uint8))


def test_outscale_suffix_and_ext(tmp_path, model):
    pth, yml, _ = model
    write(tmp_path / 'a.png', smooth_image(8, 10, 3))
    write(tmp_path / 'b.png', smooth_image(8, 10, 4))
    out = tmp_path / 'out'
    code = infer.main([
        '-i',
        str(tmp_path / 'a.png'), '-o',
        str(out), '--model', pth, '--opt', yml, '-s', '2', '--suffix', 'x2', '--ext', 'jpg', '-q'
    ])
    assert code == 0
    assert read(out / 'a_x2.jpg').shape == (16, 20, 3)
    # JPEG has no alpha channel: RGBA outputs fall back to PNG
    assert infer.main([
        '-i',
        str(tmp_path / 'b.png'), '-o',
        str(out), '--model', pth, '--opt', yml, '--ext', 'jpg', '--suffix', '', '-q'
    ]) == 0
    assert read(out / 'b.png').shape == (32, 40, 4)


def test_branch_and_weight_pictures(tmp_path, model):
    pth, yml, _ = model
    write(tmp_path / 'cat.png', smooth_image(9, 11, 3))
    out = tmp_path / 'out'
    assert infer.main([
        '-i',
        str(tmp_path / 'cat.png'), '-o',
        str(out), '--model', pth, '--opt', yml, '--save-branches', '--save-weights', '-q'
    ]) == 0
    for i in range(1, 5):
        assert read(out / f'cat_branch{i}.png').shape == (36, 44, 3)
        heat = read(out / f'cat_weight{i}.png')
        assert heat.shape == (36, 44, 3) and heat.dtype == np.uint8
    assert not (out / 'cat_branch5.png').exists()
    grid = read(out / 'cat_grid.png')
    assert grid.ndim == 3 and grid.shape[1] > 6 * 44 and grid.shape[0] > 2 * 36


def test_tiled_cli_matches_untiled_cli(tmp_path, model):
    pth, yml, _ = model
    write(tmp_path / 'p.png', smooth_image(20, 18, 3))
    outs = []
    for name, extra in (('whole', []), ('tiled', ['--tile', '8', '--tile-pad', '12'])):
        assert infer.main(
            ['-i', str(tmp_path / 'p.png'), '-o',
             str(tmp_path / name), '--model', pth, '--opt', yml, '-q'] + extra) == 0
        outs.append(read(tmp_path / name / 'p_out.png').astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1


# ---------------------------------------------------------------------------------- metrics


def test_reference_metrics_match_basicsr(tmp_path, model):
    pth, yml, net = model
    lr_dir, hr_dir, out = tmp_path / 'LR', tmp_path / 'HR', tmp_path / 'out'
    lr_dir.mkdir()
    hr_dir.mkdir()
    for i in range(2):
        hr = smooth_image(48, 40, 3, seed=10 + i)
        write(hr_dir / f'im{i}.png', hr)
        write(lr_dir / f'im{i}.png', cv2.resize(hr, (10, 12), interpolation=cv2.INTER_AREA))
    assert infer.main([
        '-i',
        str(lr_dir), '-o',
        str(out), '--model', pth, '--opt', yml, '--reference',
        str(hr_dir), '--save-branches', '-q'
    ]) == 0
    with open(out / 'metrics.csv', newline='') as f:
        rows = {row['image']: row for row in csv.DictReader(f)}
    assert set(rows) == {'im0.png', 'im1.png', 'mean'}
    methods = ['bicubic', 'branch1', 'branch2', 'branch3', 'branch4', 'fused', 'oracle']
    assert list(rows['mean'])[1:] == [f'{m}_{k}' for m in methods for k in ('psnr_y', 'ssim_y')]
    for i in range(2):
        hr = read(hr_dir / f'im{i}.png')
        row = rows[f'im{i}.png']
        for method, name in (('fused', 'out'), ('branch1', 'branch1'), ('branch4', 'branch4')):
            img = read(out / f'im{i}_{name}.png')
            assert float(row[f'{method}_psnr_y']) == pytest.approx(
                calculate_psnr(img, hr, crop_border=4, test_y_channel=True), abs=1e-4)
            assert float(row[f'{method}_ssim_y']) == pytest.approx(
                calculate_ssim(img, hr, crop_border=4, test_y_channel=True), abs=1e-4)
        lr = read(lr_dir / f'im{i}.png').astype(np.float32) / 255
        bicubic = (np.clip(cv2.resize(lr, (40, 48), interpolation=cv2.INTER_CUBIC), 0, 1) * 255).round()
        assert float(row['bicubic_psnr_y']) == pytest.approx(
            calculate_psnr(bicubic.astype(np.uint8), hr, crop_border=4, test_y_channel=True), abs=1e-4)
        # the oracle: per pixel, the (clamped) branch closest to HR
        _, branches, _ = run_network(net, to_tensor(lr), return_branches=True)
        oracle = tensor2img(oracle_fusion(branches.clamp(0, 1), to_tensor(hr.astype(np.float32) / 255)))
        assert float(row['oracle_psnr_y']) == pytest.approx(
            calculate_psnr(oracle, hr, crop_border=4, test_y_channel=True), abs=1e-4)
    for key in ('fused_psnr_y', 'oracle_ssim_y'):
        mean = np.mean([float(rows[f'im{i}.png'][key]) for i in range(2)])
        assert float(rows['mean'][key]) == pytest.approx(mean, abs=1e-4)


# ------------------------------------------------------------------------- model loading


def run_cli(capsys, args):
    code = infer.main(args + ['-q'])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_crafted_pickle_is_refused(tmp_path, capsys, model):
    _, yml, _ = model
    marker = tmp_path / 'pwned'
    evil = _Evil()
    evil.marker = str(marker)
    bad = tmp_path / 'evil.pth'
    torch.save({'params': evil}, str(bad))
    write(tmp_path / 'a.png', smooth_image(6, 6, 3))
    code, text = run_cli(
        capsys, ['-i', str(tmp_path / 'a.png'), '-o',
                 str(tmp_path / 'o'), '--model',
                 str(bad), '--opt', yml])
    assert code == 2
    assert not marker.exists()
    assert str(bad) in text and 'weights_only' in text and 'refusing' in text
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('content', [None, b'', b'not a checkpoint at all' * 20, 'truncated'])
def test_missing_or_corrupt_model_is_one_clear_line(tmp_path, capsys, model, content):
    pth, yml, _ = model
    bad = tmp_path / 'bad.pth'
    if content == 'truncated':
        data = open(pth, 'rb').read()
        bad.write_bytes(data[:len(data) // 2])
    elif content is not None:
        bad.write_bytes(content)
    write(tmp_path / 'a.png', smooth_image(6, 6, 3))
    code, text = run_cli(capsys, ['-i', str(tmp_path / 'a.png'), '--model', str(bad), '--opt', yml])
    assert code == 2
    error = [line for line in text.splitlines() if 'error' in line]
    assert len(error) == 1 and str(bad) in error[0]
    assert ('not found' if content is None else 'corrupt') in error[0]


def test_options_and_checkpoint_mismatch_lists_keys(tmp_path, capsys, model):
    pth, _, _ = model
    _, other_yml, _ = save_model(str(tmp_path), name='other', upscale=2, num_feat=16)
    write(tmp_path / 'a.png', smooth_image(6, 6, 3))
    code, text = run_cli(capsys, ['-i', str(tmp_path / 'a.png'), '--model', pth, '--opt', other_yml])
    assert code == 2
    assert 'upscale: options 2, checkpoint 4' in text and 'num_feat: options 16, checkpoint 8' in text
    assert 'head.weight: checkpoint (8, 3, 3, 3) vs network (16, 3, 3, 3)' in text
    assert 'tails.0.0.2.weight' in text  # the second x2 stage only exists at x4
    assert other_yml in text

    _, wide_yml, _ = save_model(str(tmp_path), name='wide', tree_width=3, tree_depth=1)
    code, text = run_cli(capsys, ['-i', str(tmp_path / 'a.png'), '--model', pth, '--opt', wide_yml])
    assert code == 2
    assert 'tree_width: options 3, checkpoint 2' in text and 'tree_depth: options 1, checkpoint 2' in text
    assert 'not in the network' in text and 'tree.1.0' in text
    assert 'missing in the checkpoint' in text and 'tree.0.2' in text


def test_options_come_from_checkpoint_or_opt(tmp_path, capsys, model):
    pth, _, _ = model
    write(tmp_path / 'a.png', smooth_image(6, 6, 3))
    code, text = run_cli(capsys, ['-i', str(tmp_path / 'a.png'), '--model', pth])
    assert code == 2 and '--opt is required' in text and pth in text

    carried, _, _ = save_model(str(tmp_path), name='carried', ckpt_extra={'network_g': dict(TINY)})
    code, text = run_cli(capsys, ['-i', str(tmp_path / 'a.png'), '-o', str(tmp_path / 'o'), '--model', carried])
    assert code == 0 and (tmp_path / 'o' / 'a_out.png').exists()


def test_param_key_default_prefers_ema(tmp_path, model):
    _, yml, net = model
    ema, _ = make_net(seed=1)
    both = tmp_path / 'both.pth'
    torch.save({'params': net.state_dict(), 'params_ema': ema.state_dict()}, str(both))
    img = smooth_image(6, 7, 3)
    write(tmp_path / 'a.png', img)
    x = to_tensor(img.astype(np.float32) / 255)
    for key, reference in ((None, ema), ('params', net)):
        out = tmp_path / f'o_{key}'
        args = ['-i', str(tmp_path / 'a.png'), '-o', str(out), '--model', str(both), '--opt', yml, '-q']
        assert infer.main(args + (['--param-key', key] if key else [])) == 0
        sr = run_network(reference, x)[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1]
        assert np.array_equal(read(out / 'a_out.png'), (sr * 255).round().astype(np.uint8))
    code = infer.main(['-i', str(tmp_path / 'a.png'), '--model', str(both), '--opt', yml, '--param-key', 'nope'])
    assert code == 2


# ---------------------------------------------------------------------- files and folders


def test_unreadable_files_are_skipped_with_exit_1(tmp_path, capsys, model):
    pth, yml, _ = model
    src = tmp_path / 'in'
    src.mkdir()
    write(src / 'good.png', smooth_image(6, 6, 3))
    (src / 'notes.txt').write_text('hello')
    (src / 'empty.png').write_bytes(b'')
    code, text = run_cli(capsys, ['-i', str(src), '-o', str(tmp_path / 'o'), '--model', pth, '--opt', yml])
    assert code == 1
    assert (tmp_path / 'o' / 'good_out.png').exists()
    assert 'skipped' in text and 'notes.txt' in text and 'empty.png' in text
    assert '1 of 3 image(s) written' in text


def test_non_ascii_paths(tmp_path, model):
    pth, yml, _ = model
    src, out = tmp_path / 'фото 写真', tmp_path / 'résultats'
    src.mkdir()
    write(src / 'кот.png', smooth_image(6, 8, 3))
    assert infer.main(['-i', str(src), '-o', str(out), '--model', pth, '--opt', yml, '-q', '--save-weights']) == 0
    assert read(out / 'кот_out.png').shape == (24, 32, 3)
    assert (out / 'кот_grid.png').exists()


def test_fp16_on_cpu_is_ignored_with_a_warning(tmp_path, capsys, model):
    pth, yml, _ = model
    write(tmp_path / 'a.png', smooth_image(6, 6, 3))
    code, text = run_cli(capsys, [
        '-i',
        str(tmp_path / 'a.png'), '-o',
        str(tmp_path / 'o'), '--model', pth, '--opt', yml, '--fp16', '--device', 'cpu'
    ])
    assert code == 0 and '--fp16 needs CUDA' in text


def test_help(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'd2c_tools.infer', '--help'],
                         capture_output=True,
                         text=True,
                         cwd=str(tmp_path),
                         timeout=120)
    assert res.returncode == 0
    for flag in ('--input', '--output', '--outscale', '--suffix', '--ext', '--tile', '--tile-pad', '--pre-pad',
                 '--fp16', '--save-branches', '--save-weights', '--reference', '--param-key', '--opt'):
        assert flag in res.stdout
