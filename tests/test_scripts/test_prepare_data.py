"""Tests for scripts/prepare_data.py (issue #4: real-world data preparation).

Every data set here is generated in tmp_path with numpy + cv2: a tiny RealSR V3 tree
(2 cameras, train/test, 64x64 HR / 16x16 LR at x4, one 64x80 scene) plus small
DRealSR / D2CRealSR / generic layouts. Most runs call ``prepare_data.main(argv)`` in
process (fast); a few run the script as a subprocess to check real exit codes and
signal handling.
"""
import hashlib
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT

SCRIPT = osp.join(REPO_ROOT, 'scripts', 'prepare_data.py')
sys.path.insert(0, osp.join(REPO_ROOT, 'scripts'))
import prepare_data  # noqa: E402

SCALE = 4


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def _noise(rng, h, w, channels=3, dtype=np.uint8):
    high = 65536 if dtype == np.uint16 else 256
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, high, shape, dtype=dtype)


def _write(path, img):
    os.makedirs(osp.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img), path


def make_realsr(root, n_train=3, n_test=2, seed=0):
    """Fake RealSR(V3): <root>/<Cam>/<Split>/4/<Cam>_<NNN>_HR.png and _LR4.png.

    Scene 001 is 64x80 (HxW), the others 64x64; LR is HR / 4 (area downscale).
    Returns {(split, key): (hr_array, lr_array)}.
    """
    rng = np.random.default_rng(seed)
    images = {}
    for cam in ('Canon', 'Nikon'):
        for split, n in (('Train', n_train), ('Test', n_test)):
            folder = osp.join(root, cam, split, str(SCALE))
            for i in range(1, n + 1):
                hr = _noise(rng, 64, 80 if i == 1 else 64)
                lr = cv2.resize(hr, (hr.shape[1] // SCALE, hr.shape[0] // SCALE), interpolation=cv2.INTER_AREA)
                key = f'{cam}_{i:03d}'
                _write(osp.join(folder, f'{key}_HR.png'), hr)
                _write(osp.join(folder, f'{key}_LR{SCALE}.png'), lr)
                images[(split.lower(), key)] = (hr, lr)
    return images


def realsr_file(root, key, role, split='Train'):
    cam = key.split('_')[0]
    name = f'{key}_HR.png' if role == 'HR' else f'{key}_LR{SCALE}.png'
    return osp.join(root, cam, split, str(SCALE), name)


def tree_digest(path):
    """Hash of every file name and content under ``path`` (to prove it was left untouched)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = osp.join(folder, name)
            digest.update(osp.relpath(full, path).encode())
            with open(full, 'rb') as fin:
                digest.update(fin.read())
    return digest.hexdigest()


def leftovers(output):
    parent, base = osp.split(output)
    return [n for n in os.listdir(parent) if n.startswith((base + '.tmp-', base + '.old-'))]


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)],
                          capture_output=True,
                          text=True,
                          timeout=timeout,
                          cwd=REPO_ROOT)


def realsr_args(src, out, *extra):
    return ['--preset', 'realsr', '--input', str(src), '--output', str(out), '--scale', str(SCALE), *map(str, extra)]


def read_meta(lmdb_dir):
    with open(osp.join(lmdb_dir, 'meta_info.txt')) as fin:
        return [line.split() for line in fin]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """One realsr run with sub-images and LMDBs, shared by the read-only tests."""
    base = tmp_path_factory.mktemp('realsr')
    src, out = base / 'RealSR(V3)', base / 'out'
    images = make_realsr(src)
    assert prepare_data.main(realsr_args(src, out, '--crop-size', 32, '--step', 16, '--lmdb')) == 0
    return src, out, images


# ----------------------------------------------------------------------------
# happy paths
# ----------------------------------------------------------------------------
def test_help_and_spec_call_as_subprocess(tmp_path):
    """The documented call works as a real process: folders + LMDBs, exit 0, summary printed."""
    res = run_script('--help')
    assert res.returncode == 0 and '--preset' in res.stdout and 'realsr' in res.stdout

    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=2, n_test=1)
    res = run_script(*realsr_args(src, out, '--lmdb'))
    assert res.returncode == 0, res.stderr
    assert 'train: 4 pairs written, 0 skipped' in res.stdout
    assert 'test : 2 pairs written, 0 skipped' in res.stdout
    for split, n in (('train', 4), ('test', 2)):
        for role in ('HR', 'LR'):
            assert len(os.listdir(out / split / role)) == n
            assert sorted(os.listdir(out / split / f'{role}.lmdb')) == ['data.mdb', 'lock.mdb', 'meta_info.txt']
    assert not (out / 'train' / 'HR_sub').exists()
    assert leftovers(str(out)) == []


def test_layout_names_sizes_and_content(prepared):
    src, out, images = prepared
    assert sorted(os.listdir(out)) == ['test', 'train']
    assert sorted(os.listdir(out / 'train')) == ['HR', 'HR.lmdb', 'HR_sub', 'LR', 'LR.lmdb', 'LR_sub']
    assert sorted(os.listdir(out / 'test')) == ['HR', 'HR.lmdb', 'LR', 'LR.lmdb']
    for split, keys in (('train', ['Canon_001', 'Canon_002', 'Canon_003', 'Nikon_001', 'Nikon_002',
                                   'Nikon_003']), ('test', ['Canon_001', 'Canon_002', 'Nikon_001', 'Nikon_002'])):
        expected = [f'{k}.png' for k in keys]
        assert sorted(os.listdir(out / split / 'HR')) == expected
        assert sorted(os.listdir(out / split / 'LR')) == expected
        for key in keys:
            hr = cv2.imread(str(out / split / 'HR' / f'{key}.png'), cv2.IMREAD_UNCHANGED)
            lr = cv2.imread(str(out / split / 'LR' / f'{key}.png'), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(hr, images[(split, key)][0])
            np.testing.assert_array_equal(lr, images[(split, key)][1])
            assert hr.shape[:2] == (lr.shape[0] * SCALE, lr.shape[1] * SCALE)


def test_sub_images_match_between_hr_and_lr(prepared):
    """crop 32 / step 16: 3x3 sub-images for 64x64, 3x4 for 64x80; LR crop = HR crop / 4 at position / 4."""
    _, out, images = prepared
    hr_subs = sorted(os.listdir(out / 'train' / 'HR_sub'))
    assert hr_subs == sorted(os.listdir(out / 'train' / 'LR_sub'))
    assert len([n for n in hr_subs if n.startswith('Canon_001_s')]) == 12
    assert len([n for n in hr_subs if n.startswith('Canon_002_s')]) == 9
    assert len(hr_subs) == 2 * (12 + 9 + 9)
    hr, lr = images[('train', 'Canon_001')]
    positions = [(y, x) for y in (0, 16, 32) for x in (0, 16, 32, 48)]  # row-major, as BasicSR
    for index, (y, x) in enumerate(positions, 1):
        name = f'Canon_001_s{index:03d}.png'
        hr_sub = cv2.imread(str(out / 'train' / 'HR_sub' / name), cv2.IMREAD_UNCHANGED)
        lr_sub = cv2.imread(str(out / 'train' / 'LR_sub' / name), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(hr_sub, hr[y:y + 32, x:x + 32])
        np.testing.assert_array_equal(lr_sub, lr[y // 4:y // 4 + 8, x // 4:x // 4 + 8])


def test_lmdb_meta_info_keys_identical(prepared):
    _, out, _ = prepared
    for split, shape_hr, shape_lr in (('train', '(32,32,3)', '(8,8,3)'), ('test', None, None)):
        hr_meta, lr_meta = read_meta(out / split / 'HR.lmdb'), read_meta(out / split / 'LR.lmdb')
        assert [m[0] for m in hr_meta] == [m[0] for m in lr_meta]
        folder = 'HR_sub' if split == 'train' else 'HR'
        assert [m[0] for m in hr_meta] == sorted(os.listdir(out / split / folder))
        assert all(m[2] == '1' for m in hr_meta + lr_meta)
        if shape_hr:
            assert {m[1] for m in hr_meta} == {shape_hr} and {m[1] for m in lr_meta} == {shape_lr}
        else:  # full-size test images: HR shape = LR shape x 4
            for h_m, l_m in zip(hr_meta, lr_meta):
                hh, hw, _ = map(int, h_m[1].strip('()').split(','))
                lh, lw, _ = map(int, l_m[1].strip('()').split(','))
                assert (hh, hw) == (lh * SCALE, lw * SCALE)


def _batches(gt, lq, backend, gt_size, seed=7):
    """All training batches of BasicSR's PairedImageDataset, in key order, under a fixed seed."""
    import d2c_compat
    d2c_compat.apply()
    import torch
    from torch.utils.data import DataLoader, Subset

    from basicsr.data.paired_image_dataset import PairedImageDataset

    opt = dict(
        dataroot_gt=str(gt),
        dataroot_lq=str(lq),
        io_backend={'type': backend},
        gt_size=gt_size,
        use_hflip=True,
        use_rot=True,
        scale=SCALE,
        phase='train')
    dataset = PairedImageDataset(opt)
    keys = [osp.splitext(osp.basename(p['gt_path']))[0] for p in dataset.paths]
    # folders come in os.scandir order and LMDBs in sorted key order: line them up by key
    order = sorted(range(len(dataset)), key=keys.__getitem__)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(Subset(dataset, order), batch_size=4, shuffle=False, num_workers=0)
    return [keys[i] for i in order], [(b['gt'], b['lq']) for b in loader]


@pytest.mark.parametrize('split,folder,gt_size', [('train', '_sub', 16), ('test', '', 32)])
def test_folder_and_lmdb_give_identical_batches(prepared, split, folder, gt_size):
    """Sub-image (train) and full-size (test) data read from folders and from LMDB are the same batches."""
    import torch
    _, out, _ = prepared
    d = out / split
    keys_f, from_folder = _batches(d / f'HR{folder}', d / f'LR{folder}', 'disk', gt_size)
    keys_l, from_lmdb = _batches(d / 'HR.lmdb', d / 'LR.lmdb', 'lmdb', gt_size)
    assert keys_f == keys_l and len(keys_f) > 0
    assert len(from_folder) == len(from_lmdb)
    for (gt_f, lq_f), (gt_l, lq_l) in zip(from_folder, from_lmdb):
        assert gt_f.shape[-2:] == (gt_size, gt_size) and lq_f.shape[-2:] == (gt_size // SCALE, gt_size // SCALE)
        assert torch.equal(gt_f, gt_l) and torch.equal(lq_f, lq_l)
    # the seed matters, i.e. the comparison above really exercised random crops/flips
    _, other_seed = _batches(d / 'HR.lmdb', d / 'LR.lmdb', 'lmdb', gt_size, seed=8)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(from_lmdb, other_seed))


def test_other_presets_and_generic_mode(tmp_path):
    rng = np.random.default_rng(1)
    # DRealSR: <root>/x4/Train_x4/train_HR/<name>_x1.png + train_LR/<name>_x4.png
    for split in ('train', 'test'):
        base = tmp_path / 'DRealSR' / 'x4' / f'{split.capitalize()}_x4'
        hr = _noise(rng, 32, 32)
        _write(base / f'{split}_HR' / f'DSC_{split}_x1.png', hr)
        _write(base / f'{split}_LR' / f'DSC_{split}_x4.png', hr[::4, ::4])
    out = tmp_path / 'd_out'
    assert prepare_data.main(
        ['--preset', 'drealsr', '--input',
         str(tmp_path / 'DRealSR'), '--output',
         str(out), '--scale', '4']) == 0
    assert os.listdir(out / 'train' / 'HR') == ['DSC_train.png'] == os.listdir(out / 'train' / 'LR')
    assert os.listdir(out / 'test' / 'LR') == ['DSC_test.png']

    # D2CRealSR (x8 by default): <root>/{train,test}/{HR,LR}/<same name>
    for split in ('train', 'test'):
        hr = _noise(rng, 64, 64)
        _write(tmp_path / 'D2C' / split / 'HR' / 'a.png', hr)
        _write(tmp_path / 'D2C' / split / 'LR' / 'a.png', hr[::8, ::8])
    out = tmp_path / 'c_out'
    assert prepare_data.main(['--preset', 'd2crealsr', '--input', str(tmp_path / 'D2C'), '--output', str(out)]) == 0
    assert cv2.imread(str(out / 'test' / 'LR' / 'a.png')).shape == (8, 8, 3)

    # generic: one split per call into the same output; LR name from a template, then a regex
    hr = _noise(rng, 32, 32)
    _write(tmp_path / 'g' / 'HR' / 'img1.png', hr)
    _write(tmp_path / 'g' / 'LR' / 'img1_LR4.png', hr[::4, ::4])
    out = tmp_path / 'g_out'
    common = [
        '--hr-dir',
        str(tmp_path / 'g' / 'HR'), '--lr-dir',
        str(tmp_path / 'g' / 'LR'), '--output',
        str(out), '--scale', '4'
    ]
    assert prepare_data.main([*common, '--split', 'train', '--lr-pattern', '{stem}_LR{scale}.png']) == 0
    assert prepare_data.main(
        [*common, '--split', 'test', '--hr-regex', r'(?P<key>img\d+)\.png', '--lr-regex',
         r'(?P<key>img\d+)_LR4\.png']) == 0
    assert os.listdir(out / 'train' / 'LR') == ['img1.png'] == os.listdir(out / 'test' / 'LR')


def test_allow_crop(tmp_path, capsys):
    """LR x scale 4 px taller than HR, and HR 2 px taller than LR x scale: both cropped top-left."""
    src = tmp_path / 'RealSR(V3)'
    make_realsr(src, n_train=2, n_test=1)
    rng = np.random.default_rng(3)
    lr_big = _noise(rng, 17, 16)  # 17*4 = 68 > 64
    _write(realsr_file(src, 'Canon_002', 'LR'), lr_big)
    hr_big = _noise(rng, 66, 64)  # 66 > 16*4
    _write(realsr_file(src, 'Nikon_002', 'HR'), hr_big)

    assert prepare_data.main(realsr_args(src, tmp_path / 'no', '--allow-crop', 3)) == 1
    err = capsys.readouterr().out
    assert 'Canon_002_LR4.png' in err and 'size mismatch' in err and '--allow-crop 4 crops it' in err
    assert 'Nikon_002' not in err  # off by 2 <= 3: accepted

    out = tmp_path / 'out'
    assert prepare_data.main(realsr_args(src, out, '--allow-crop', 4)) == 0
    np.testing.assert_array_equal(cv2.imread(str(out / 'train' / 'LR' / 'Canon_002.png')), lr_big[:16])
    assert cv2.imread(str(out / 'train' / 'HR' / 'Canon_002.png')).shape == (64, 64, 3)
    np.testing.assert_array_equal(cv2.imread(str(out / 'train' / 'HR' / 'Nikon_002.png')), hr_big[:64])


# ----------------------------------------------------------------------------
# bad data
# ----------------------------------------------------------------------------
def _truncate(path):
    with open(path, 'rb') as fin:
        data = fin.read()
    with open(path, 'wb') as fout:
        fout.write(data[:len(data) // 2])


def _garbage(path):
    with open(path, 'wb') as fout:
        fout.write(b'this is not an image')


def _reformat(path, convert):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    os.remove(path)
    _write(path, convert(img))


def _to16(img):
    return img.astype(np.uint16) * 257


def _gray(img):
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def _rgba(img):
    return cv2.cvtColor(img, cv2.COLOR_BGR2BGRA)


BAD_CASES = {
    # case: (mutation(src), file that must be named, reason that must be given, key that is skipped)
    'lr_size': (lambda s: _write(realsr_file(s, 'Canon_002', 'LR'), np.zeros((15, 16, 3), np.uint8)),
                'Canon_002_LR4.png', 'size mismatch: LR 16x15 x4 = 64x60 does not match HR 64x64', 'Canon_002'),
    'no_lr': (lambda s: os.remove(realsr_file(s, 'Nikon_001', 'LR')), 'Nikon_001_HR.png', 'no LR partner', 'Nikon_001'),
    'no_hr':
    (lambda s: os.remove(realsr_file(s, 'Nikon_002', 'HR')), 'Nikon_002_LR4.png', 'no HR partner', 'Nikon_002'),
    'truncated': (lambda s: _truncate(realsr_file(s, 'Canon_001', 'HR')), 'Canon_001_HR.png', 'truncated', 'Canon_001'),
    'unreadable':
    (lambda s: _garbage(realsr_file(s, 'Canon_001', 'LR')), 'Canon_001_LR4.png', 'unreadable', 'Canon_001'),
    '16bit_in_pair': (lambda s: _reformat(realsr_file(s, 'Canon_002', 'HR'), _to16), 'Canon_002_HR.png',
                      'format mismatch in pair: HR is 16-bit RGB but LR is 8-bit RGB', 'Canon_002'),
    'gray_in_pair': (lambda s: _reformat(realsr_file(s, 'Nikon_002', 'LR'), _gray), 'Nikon_002_LR4.png',
                     'HR is 8-bit RGB but LR is 8-bit gray', 'Nikon_002'),
    'rgba_in_set': (lambda s: [_reformat(realsr_file(s, 'Nikon_001', r), _rgba) for r in ('HR', 'LR')],
                    'Nikon_001_HR.png', 'format differs from set: pair is 8-bit RGBA while', 'Nikon_001'),
    '16bit_in_set': (lambda s: [_reformat(realsr_file(s, 'Canon_001', r), _to16) for r in ('HR', 'LR')],
                     'Canon_001_LR4.png', 'format differs from set: pair is 16-bit RGB', 'Canon_001'),
}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_bad_data_reported_and_refused(tmp_path, capsys, case):
    mutate, filename, reason, key = BAD_CASES[case]
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=2, n_test=1)
    mutate(str(src))

    assert prepare_data.main(realsr_args(src, out)) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if filename in line]
    assert len(lines) == 1 and reason in lines[0], captured.out
    assert '--skip-bad' in captured.err
    assert not out.exists() and leftovers(str(out)) == []

    assert prepare_data.main(realsr_args(src, out, '--skip-bad')) == 0
    written = os.listdir(out / 'train' / 'HR')
    assert f'{key}.png' not in written and len(written) == 3
    assert sorted(written) == sorted(os.listdir(out / 'train' / 'LR'))
    assert reason in capsys.readouterr().out


def test_bad_data_exit_code_of_the_process(tmp_path):
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=2, n_test=1)
    _truncate(realsr_file(src, 'Nikon_002', 'LR'))
    res = run_script(*realsr_args(src, out))
    assert res.returncode == 1
    assert 'Nikon/Train/4/Nikon_002_LR4.png' in res.stdout and 'PNG is truncated' in res.stdout
    assert not out.exists()


# ----------------------------------------------------------------------------
# usage errors, refusal, interruption, overwrite
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('argv,message', [
    (['--preset', 'realsr', '--input', '{src}', '--output', '{out}'], '--scale is required for preset realsr'),
    (['--preset', 'realsr', '--input', '{src}/missing', '--output', '{out}', '--scale', '4'
      ], 'missing is not a folder'),
    (['--preset', 'realsr', '--input', '{src}', '--output', '{out}', '--scale', '8'], '--scale 8 is not available'),
    (['--preset', 'realsr', '--input', '{src}', '--output', '{out}', '--scale', '3'], 'scale folders there: 4'),
    (['--preset', 'realsr', '--input', '{src}', '--output', '{out}', '--scale', '4', '--crop-size', '30'
      ], '--crop-size 30 must be a positive multiple of --scale 4'),
    (['--preset', 'realsr', '--input', '{src}', '--output', '{out}', '--scale', '4', '--step', '8'
      ], '--step/--thresh-size need --crop-size'),
    (['--hr-dir', '{src}', '--output', '{out}', '--scale', '4'], 'needs both --hr-dir and --lr-dir'),
    (['--hr-dir', '{src}', '--lr-dir', '{src}', '--output', '{out}', '--scale', '4', '--lr-pattern', '{{name}}.png'
      ], 'unknown placeholder {name}'),
])
def test_usage_errors_exit_2(tmp_path, capsys, argv, message):
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=1, n_test=1)
    with pytest.raises(SystemExit) as exc:
        prepare_data.main([a.format(src=src, out=out) for a in argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_existing_output_without_overwrite(tmp_path):
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=1, n_test=1)
    assert prepare_data.main(realsr_args(src, out)) == 0
    before = tree_digest(out)
    res = run_script(*realsr_args(src, out, '--lmdb'))
    assert res.returncode == 2
    assert f'{out}/train already exists; pass --overwrite' in res.stderr
    assert tree_digest(out) == before and leftovers(str(out)) == []


def _fail_on_call(monkeypatch, n, exc):
    real, calls = prepare_data.write_pair, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_data, 'write_pair', flaky)


def test_interrupted_overwrite_keeps_earlier_output(tmp_path, monkeypatch):
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=2, n_test=1)
    assert prepare_data.main(realsr_args(src, out)) == 0
    before = tree_digest(out)

    _fail_on_call(monkeypatch, 3, OSError('disk full (simulated)'))
    with pytest.raises(OSError, match='simulated'):
        prepare_data.main(realsr_args(src, out, '--overwrite', '--crop-size', 32, '--workers', 1))
    assert tree_digest(out) == before and leftovers(str(out)) == []

    _fail_on_call(monkeypatch, 2, KeyboardInterrupt())
    assert prepare_data.main(realsr_args(src, tmp_path / 'fresh', '--workers', 2)) == 130
    assert not (tmp_path / 'fresh').exists() and leftovers(str(tmp_path / 'fresh')) == []


def test_overwrite_replaces_only_when_complete(tmp_path):
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=2, n_test=1)
    assert prepare_data.main(realsr_args(src, out, '--crop-size', 32)) == 0
    (out / 'notes.txt').write_text('kept')  # not ours: must survive the replacement of the splits
    assert prepare_data.main(realsr_args(src, out, '--overwrite')) == 0
    assert sorted(os.listdir(out)) == ['notes.txt', 'test', 'train']
    assert sorted(os.listdir(out / 'train')) == ['HR', 'LR']  # the old HR_sub/LR_sub are gone
    assert leftovers(str(out)) == []


KILL_SNIPPET = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {scripts!r})
    import prepare_data
    real, calls = prepare_data.write_pair, []
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), {sig})
        return real(*args, **kwargs)
    prepare_data.write_pair = dying
    sys.exit(prepare_data.main(sys.argv[1:]))
''')


@pytest.mark.parametrize('sig', ['SIGKILL', 'SIGTERM'])
def test_killed_process_leaves_no_finished_output(tmp_path, sig):
    """A hard kill leaves only <out>.tmp-<pid> (never <out>/train); SIGTERM cleans even that up."""
    src, out = tmp_path / 'RealSR(V3)', tmp_path / 'out'
    make_realsr(src, n_train=2, n_test=1)
    out.mkdir()
    (out / 'test').mkdir()  # an earlier split that must survive
    (out / 'test' / 'old.txt').write_text('old')
    code = KILL_SNIPPET.format(scripts=osp.join(REPO_ROOT, 'scripts'), sig=f'signal.{sig}')
    res = subprocess.run([sys.executable, '-c', code, *realsr_args(src, out, '--split', 'train', '--workers', 1)],
                         capture_output=True,
                         text=True,
                         timeout=120)
    signum = getattr(signal, sig)
    assert sorted(os.listdir(out)) == ['test'] and (out / 'test' / 'old.txt').read_text() == 'old'
    if signum == signal.SIGKILL:
        assert res.returncode == -signal.SIGKILL
        assert [n.split('-')[0] for n in leftovers(str(out))] == ['out.tmp']
        # the next run points at the debris and still works
        assert prepare_data.main(realsr_args(src, out, '--split', 'train')) == 0
    else:
        assert res.returncode == 128 + signal.SIGTERM, res.stderr
        assert 'interrupted (SIGTERM)' in res.stderr and leftovers(str(out)) == []
