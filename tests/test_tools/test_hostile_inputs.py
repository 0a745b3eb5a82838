"""Issue 27: what hostile or unlucky users do to every entry point, and the one clear line they get.

Full disks are simulated by injecting ENOSPC where the bytes reach the disk (``os.write`` /
``os.fsync`` / the file object), as a tmpfs would need root here.
"""
import errno
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import cv2
import pytest
import torch
import yaml
from conftest import read_log, tiny_train_opt, write_yaml
from test_infer import save_model, smooth_image, write

from d2c_tools import infer
from d2c_utils.errors import UserError
from d2c_utils.img_util import read_image
from d2c_utils.output_util import DiskFullError, atomic_write, atomic_write_bytes, check_distinct

TORCH_FP32 = ['--backend', 'torch', '--precision', 'fp32', '--no-channels-last', '-q']


def run_infer(*argv):
    return infer.main([str(a) for a in argv] + TORCH_FP32)


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')


# ---------------------------------------------------------------- the one writer


def test_atomic_write_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / 'out.png'
    target.write_bytes(b'good old output')
    monkeypatch.setattr(os, 'fsync', enospc)
    with pytest.raises(DiskFullError, match=r'^disk full: cannot write .*out\.png .*MiB free'):
        atomic_write_bytes(str(target), b'new bytes')
    assert target.read_bytes() == b'good old output'
    assert sorted(os.listdir(tmp_path)) == ['out.png']


def test_atomic_write_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, 'fsync', lambda fd: (events.append('fsync'), fsync(fd))[1])
    monkeypatch.setattr(os, 'replace', lambda a, b: (events.append('rename'), replace(a, b))[1])
    atomic_write_bytes(str(tmp_path / 'x.bin'), b'1234')
    assert events[:2] == ['fsync', 'rename'] and (tmp_path / 'x.bin').read_bytes() == b'1234'


def test_writer_that_loses_the_errno_is_still_reported_as_disk_full(tmp_path):

    def numpy_style(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise OSError('280335 requested and 0 written')

    with pytest.raises(DiskFullError):
        atomic_write(str(tmp_path / 'a.png'), numpy_style)
    assert os.listdir(tmp_path) == []


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    dead = tmp_path / '.x.onnx.d2c-999999999-abcd.tmp'  # no such pid
    alive = tmp_path / f'.y.onnx.d2c-{os.getppid()}-abcd.tmp'
    other = tmp_path / 'keep.tmp'
    for path in (dead, alive, other):
        path.write_bytes(b'partial')
    atomic_write_bytes(str(tmp_path / 'z.bin'), b'z')
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, 'z.bin'])


def test_check_distinct_refuses_inputs_and_colliding_outputs(tmp_path):
    a = str(tmp_path / 'a.pth')
    with pytest.raises(UserError, match=r'--opt-out .*a\.pth is the input MODEL'):
        check_distinct({'OUT': str(tmp_path / 'b.pth'), '--opt-out': a}, {'MODEL': a})
    with pytest.raises(UserError, match=r'OUT and --opt-out are the same file'):
        check_distinct({'OUT': str(tmp_path / 'b.pth'), '--opt-out': str(tmp_path / '.' / 'b.pth')}, {'MODEL': a})
    check_distinct({'OUT': str(tmp_path / 'b.pth'), '--opt-out': None}, {'MODEL': a})


# ---------------------------------------------------------------- d2c-infer outputs


@pytest.fixture
def model(tmp_path):
    pth, yml, _ = save_model(str(tmp_path))
    return ['--model', pth, '--opt', yml]


def photos(folder, names, size=12):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        write(folder / name, smooth_image(size, size, seed=i))
    return folder


def test_infer_full_disk_leaves_no_partial_or_empty_file(tmp_path, model, monkeypatch, capsys):
    src = photos(tmp_path / 'in', [f'p{i}.png' for i in range(3)])
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'p0_out.png').write_bytes(b'previous good output')
    monkeypatch.setattr(os, 'fsync', enospc)
    assert run_infer('-i', src, '-o', out, *model) == 2
    err = capsys.readouterr().err
    assert 'd2c-infer: error: disk full: cannot write' in err and 'Traceback' not in err
    assert os.listdir(out) == ['p0_out.png'] and (out / 'p0_out.png').read_bytes() == b'previous good output'


def test_infer_never_overwrites_its_input(tmp_path, model, capsys):
    src = photos(tmp_path / 'in', ['photo.png'])
    before = (src / 'photo.png').read_bytes()
    assert run_infer('-i', src, '-o', src, '--suffix', '', *model) == 2
    assert 'every output would replace its input' in capsys.readouterr().err
    assert run_infer('-i', src / 'photo.png', '-o', src, '--suffix', '', *model) == 2
    assert (src / 'photo.png').read_bytes() == before and os.listdir(src) == ['photo.png']


def test_infer_rerun_does_not_process_its_own_outputs(tmp_path, model, capsys):
    src = photos(tmp_path / 'in', ['photo.png', 'photo_2.png'])
    assert run_infer('-i', src, '-o', src, *model) == 0
    assert run_infer('-i', src, '-o', src, *model) == 0
    assert 'outputs of an earlier run' in capsys.readouterr().err
    assert sorted(os.listdir(src)) == ['photo.png', 'photo_2.png', 'photo_2_out.png', 'photo_out.png']


def test_infer_colliding_outputs_are_refused_not_overwritten(tmp_path, model, capsys):
    src = photos(tmp_path / 'in', ['x.png', 'x.jpg'])
    assert run_infer('-i', src, '-o', tmp_path / 'out', '--ext', 'png', *model) == 1
    captured = capsys.readouterr()
    assert '1 of 2 image(s) written' in captured.out
    assert 'already written for' in captured.err and 'x.png' in captured.err
    assert os.listdir(tmp_path / 'out') == ['x_out.png']


def png_claiming(width, height):
    """A valid small PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\x00' * 1000)) +
            chunk(b'IEND', b''))


def jpeg_claiming(width, height):
    ok, buf = cv2.imencode('.jpg', smooth_image(8, 8))
    data = bytearray(buf.tobytes())
    sof = data.index(b'\xff\xc0')
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def test_decompression_bomb_is_skipped_and_the_run_goes_on(tmp_path, model, capsys):
    src = photos(tmp_path / 'in', ['a.png', 'z.png'])
    (src / 'bomb.png').write_bytes(png_claiming(100000, 100000))
    (src / 'bomb2.jpg').write_bytes(jpeg_claiming(60000, 60000))
    assert run_infer('-i', src, '-o', tmp_path / 'out', *model) == 1
    err = capsys.readouterr().err
    assert 'bomb.png: the header claims 100000x100000' in err and 'bomb2.jpg: the header claims 60000x60000' in err
    assert sorted(os.listdir(tmp_path / 'out')) == ['a_out.png', 'z_out.png']
    with pytest.raises(Exception, match='more than the limit of 100'):
        read_image(str(src / 'a.png'), max_pixels=100)
    assert read_image(str(src / 'a.png'), max_pixels=0).shape == (12, 12, 3)


def test_animated_gif_is_refused_and_a_still_gif_written_as_png(tmp_path, model, capsys):
    from PIL import Image
    src = tmp_path / 'in'
    src.mkdir()
    frames = [Image.fromarray(smooth_image(12, 12, seed=i)[..., ::-1].copy()) for i in range(3)]
    frames[0].save(src / 'anim.gif', save_all=True, append_images=frames[1:])
    frames[0].save(src / 'still.gif')
    assert run_infer('-i', src, '-o', tmp_path / 'out', *model) == 1
    err = capsys.readouterr().err
    assert 'animated GIF with 3 frames' in err and 'writing PNG' in err
    assert os.listdir(tmp_path / 'out') == ['still_out.png']


def test_infer_names_nonfinite_weights_at_load_time(tmp_path, capsys):
    pth, yml, net = save_model(str(tmp_path))
    state = net.state_dict()
    state['head.weight'][0, 0, 0, 0] = float('nan')
    torch.save({'params': state}, pth)
    src = photos(tmp_path / 'in', ['a.png'])
    assert run_infer('-i', src, '-o', tmp_path / 'out', '--model', pth, '--opt', yml) == 2
    assert 'weights hold NaN/inf values (head.weight)' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_ctrl_c_exits_130_with_one_line(tmp_path, model, monkeypatch, capsys):
    src = photos(tmp_path / 'in', ['a.png'])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr('d2c_inference.registry.Method.process_image', interrupted)
    assert run_infer('-i', src, '-o', tmp_path / 'out', *model) == 130
    err = capsys.readouterr().err
    assert 'd2c-infer: interrupted (Ctrl-C)' in err and 'Traceback' not in err


# ---------------------------------------------------------------- d2c-train / d2c-test


def run_tool(module, cwd, *argv, timeout=300):
    return subprocess.run([sys.executable, '-m', f'd2c_tools.{module}', *map(str, argv)],
                          cwd=str(cwd),
                          capture_output=True,
                          text=True,
                          timeout=timeout)


def assert_one_line_error(result, prog, *needles, status=2):
    assert result.returncode == status, result.stdout[-1000:] + result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert f'{prog}: error: ' in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr[-2000:]


BILLION_LAUGHS = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n' + ''.join(
    f'{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},'
    f'*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n' for i in range(8))


@pytest.mark.parametrize('case,needles', [
    ('missing', ['option file not found']),
    ('unparsable', ['cannot parse option file', 'line 2']),
    ('not_utf8', ['is not UTF-8 text']),
    ('billion_laughs', ['expand to more than 100,000 values']),
    ('python_tag', ['cannot parse option file']),
    ('total_iter', ["train.total_iter='4' is not valid; it must be an integer >= 1"]),
    ('lr', ["train.optim_g.lr='fast' is not valid"]),
    ('gt_size', ["datasets.train.gt_size='big' is not valid"]),
    ('crop_border', ["val.metrics.psnr.crop_border='four' is not valid"]),
    ('accumulate', ['train.accumulate=0 is not valid']),
    ('save_format', ["logger.save_format='npz' is not valid; it must be one of pth, safetensors"]),
])
def test_bad_option_files_exit_2_before_any_work(tmp_path, tiny_data, case, needles):
    opt = tiny_train_opt(tiny_data, name='hostile')
    yml = tmp_path / 'opt.yml'
    if case == 'total_iter':
        opt['train']['total_iter'] = '4'
    elif case == 'lr':
        opt['train']['optim_g']['lr'] = 'fast'
    elif case == 'gt_size':
        opt['datasets']['train']['gt_size'] = 'big'
    elif case == 'crop_border':
        opt['val']['metrics']['psnr']['crop_border'] = 'four'
    elif case == 'accumulate':
        opt['train']['accumulate'] = 0
    elif case == 'save_format':
        opt['logger']['save_format'] = 'npz'
    write_yaml(yml, opt)
    if case == 'missing':
        yml = tmp_path / 'nowhere.yml'
    elif case == 'unparsable':
        yml.write_text('name: x\n  bad: [unclosed\n')
    elif case == 'not_utf8':
        yml.write_bytes('name: caf\u00e9\n'.encode('latin-1'))
    elif case == 'billion_laughs':
        yml.write_text(BILLION_LAUGHS)
    elif case == 'python_tag':
        yml.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    result = run_tool('train', tmp_path, '-opt', yml, timeout=120)
    assert_one_line_error(result, 'd2c-train', *needles)
    assert not (tmp_path / 'experiments').exists() or os.listdir(tmp_path / 'experiments') == []
    assert not (tmp_path / 'pwned').exists()


def test_d2c_test_checks_network_options(tmp_path, tiny_data):
    opt = tiny_train_opt(tiny_data, name='hostile_test')
    test_opt = {k: opt[k] for k in ('name', 'model_type', 'scale', 'num_gpu', 'network_g', 'path', 'val')}
    test_opt['datasets'] = {'test_1': opt['datasets']['val']}
    test_opt['network_g']['num_block'] = 'one'
    result = run_tool('test', tmp_path, '-opt', write_yaml(tmp_path / 't.yml', test_opt), timeout=120)
    assert_one_line_error(result, 'd2c-test', "network_g.num_block='one' is not valid")
    assert not (tmp_path / 'results' / 'hostile_test').exists()


def test_failed_start_leaves_no_experiment_folder(tmp_path, tiny_data):
    opt = tiny_train_opt(tiny_data, name='fails')
    opt['network_g']['upscale'] = 2  # refused by the model, after BasicSR made the folders
    result = run_tool('train', tmp_path, '-opt', write_yaml(tmp_path / 'f.yml', opt))
    assert_one_line_error(result, 'd2c-train', 'network_g.upscale=2 but scale=4')
    assert not (tmp_path / 'experiments' / 'fails').exists()


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize('where', ['train', 'val'])
def test_truncated_png_in_the_data_is_named(tmp_path, tiny_data, where):
    opt = tiny_train_opt(tiny_data, name='damaged', phases=(('divergence', 2), ('convergence', 1)))
    bad = tmp_path / 'data' / where / 'LR' / 'img2.png'
    truncate(bad)
    result = run_tool('train', tmp_path, '-opt', write_yaml(tmp_path / 'd.yml', opt))
    assert_one_line_error(result, 'd2c-train', f'{bad}: PNG is truncated')


def make_lmdb(folder, images):
    import lmdb
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, img in images.items():
            txn.put(key.encode('ascii'), cv2.imencode('.png', img)[1].tobytes())
    env.close()
    (folder / 'meta_info.txt').write_text(''.join(f'{key}.png ({img.shape[0]},{img.shape[1]},3) 1\n'
                                                  for key, img in images.items()))


def lmdb_opt(tmp_path, tiny_data):
    """Train and val read the same two LMDBs (one for HR, one for LR)."""
    for role in ('HR', 'LR'):
        folder = tmp_path / f'{role}.lmdb'
        images = {f'img{i}': cv2.imread(os.path.join(tiny_data, 'train', role, f'img{i}.png')) for i in range(4)}
        images.update({f'img{i}': smooth_image(1024, 1024, seed=i) for i in range(4, 6)})  # several pages
        make_lmdb(folder, images)
    opt = tiny_train_opt(tiny_data, name='lmdb', phases=(('divergence', 2), ('convergence', 1)))
    for phase in ('train', 'val'):
        opt['datasets'][phase].update(
            dataroot_gt=str(tmp_path / 'HR.lmdb'), dataroot_lq=str(tmp_path / 'LR.lmdb'), io_backend={'type': 'lmdb'})
    opt['val']['val_freq'] = 1
    for folder in ('HR.lmdb', 'LR.lmdb'):  # only the small images: training crops need 32x32 HR / 8x8 LR
        meta = tmp_path / folder / 'meta_info.txt'
        meta.write_text(''.join(meta.read_text().splitlines(True)[:4]))
    return opt


def test_train_and_val_share_one_lmdb_and_best_is_the_last_iteration(tmp_path, tiny_data):
    result = run_tool('train', tmp_path, '-opt', write_yaml(tmp_path / 'l.yml', lmdb_opt(tmp_path, tiny_data)))
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path / 'experiments' / 'lmdb')
    best = re.findall(r'Best: [\d.]+ @ (\d+) iter', log)
    assert best and max(map(int, best)) <= 3


def test_truncated_lmdb_is_a_clear_error_not_a_bus_error(tmp_path, tiny_data):
    opt = lmdb_opt(tmp_path, tiny_data)
    truncate(tmp_path / 'LR.lmdb' / 'data.mdb', keep=0.3)
    result = run_tool('train', tmp_path, '-opt', write_yaml(tmp_path / 'l.yml', opt))
    assert_one_line_error(result, 'd2c-train', f'LMDB {tmp_path / "LR.lmdb"}: data.mdb is truncated')


def test_ctrl_c_during_training_exits_130_with_whole_files_only(tmp_path, tiny_data):
    opt = tiny_train_opt(tiny_data, name='interrupted', phases=(('divergence', 400), ('convergence', 100)))
    opt['logger']['save_checkpoint_freq'] = 1
    opt['val']['val_freq'] = 10000
    proc = subprocess.Popen([sys.executable, '-m', 'd2c_tools.train', '-opt',
                             write_yaml(tmp_path / 'i.yml', opt)],
                            cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            text=True)
    states = tmp_path / 'experiments' / 'interrupted' / 'training_states'
    deadline = time.time() + 200
    while time.time() < deadline and not (states.is_dir() and len(os.listdir(states)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert 'd2c-train: interrupted (Ctrl-C)' in err and 'Traceback' not in err
    for folder in (states, states.parent / 'models'):
        names = os.listdir(folder)
        assert not [n for n in names if n.endswith('.tmp')]
        for name in names:
            torch.load(folder / name, weights_only=False)  # every file whole


def test_swap_refuses_bad_values_and_huge_networks_quickly(tmp_path):
    base = {
        'name': 'edsr',
        'model_type': 'SRModel',
        'scale': 4,
        'network_g': {
            'type': 'EDSR',
            'num_in_ch': 3,
            'num_out_ch': 3,
            'num_feat': 64,
            'num_block': 16,
            'upscale': 4
        },
        'train': {
            'total_iter': 1000,
            'optim_g': {
                'type': 'Adam',
                'lr': 1.0e-4
            }
        },
    }
    cases = [('num_block', -3, 'network_g.num_block=-3 is not valid'),
             ('total_iter', 'lots', "train.total_iter='lots' is not valid"),
             ('num_feat', 100000000, 'network_g.num_feat=100000000 is not valid')]
    for key, value, needle in cases:
        opt = yaml.safe_load(yaml.safe_dump(base))
        (opt['train'] if key == 'total_iter' else opt['network_g'])[key] = value
        yml = write_yaml(tmp_path / f'{key}.yml', opt)
        start = time.time()
        result = run_tool('swap', tmp_path, yml, '-o', tmp_path / f'{key}_d2c.yml', timeout=120)
        assert_one_line_error(result, 'd2c-swap', needle)
        assert time.time() - start < 60
    (tmp_path / 'latin1.yml').write_bytes('name: caf\u00e9\n'.encode('latin-1'))
    assert_one_line_error(run_tool('swap', tmp_path, tmp_path / 'latin1.yml', '--check'), 'd2c-swap', 'not UTF-8')


# ---------------------------------------------------------------- d2c-export and the export cache


@pytest.fixture(scope='module')
def exported_model(tmp_path_factory):
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript')
    from d2c_tools import export
    root = tmp_path_factory.mktemp('export')
    pth, yml, net = save_model(str(root))
    onnx_path = root / 'good.onnx'
    assert export.main([pth, '-o', str(onnx_path), '--opt', yml]) == 0
    return pth, yml, net, onnx_path


def test_export_of_nan_weights_fails_and_force_keeps_the_good_file(tmp_path, exported_model, capsys):
    from d2c_tools import export
    pth, yml, net, good = exported_model
    target = tmp_path / 'model.onnx'
    target.write_bytes(good.read_bytes())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state['head.weight'][0, 0, 0, 0] = float('nan')
    nan_pth = tmp_path / 'nan.pth'
    torch.save({'params': state}, nan_pth)
    assert export.main([str(nan_pth), '-o', str(target), '--opt', yml, '-f']) == 2
    err = capsys.readouterr().err
    assert 'd2c-export: error: the exported model gives NaN/inf (sr)' in err
    assert target.read_bytes() == good.read_bytes() and sorted(os.listdir(tmp_path)) == ['model.onnx', 'nan.pth']


def test_export_full_disk_is_one_line(tmp_path, exported_model, monkeypatch, capsys):
    from d2c_tools import export
    pth, yml, _, _ = exported_model
    monkeypatch.setattr(os, 'fsync', enospc)
    assert export.main([pth, '-o', str(tmp_path / 'x.onnx'), '--opt', yml]) == 2
    assert 'd2c-export: error: disk full: cannot write' in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def edited_metadata(source, target, **changes):
    import onnx
    proto = onnx.load_model(str(source))
    for entry in list(proto.metadata_props):
        key = entry.key[len('d2c_sr.'):]
        if key in changes:
            if changes[key] is None:
                proto.metadata_props.remove(entry)
            else:
                entry.value = changes[key]
    onnx.save_model(proto, str(target))
    return target


@pytest.mark.parametrize('changes,needle', [
    ({
        'upscale': 'four'
    }, "d2c_sr.upscale='four' is not a positive integer"),
    ({
        'upscale': None
    }, 'd2c_sr.upscale=None is not a positive integer'),
    ({
        'upscale': '0'
    }, "d2c_sr.upscale='0' is not a positive integer"),
    ({
        'network_g': '{broken'
    }, 'd2c_sr.network_g is not valid JSON'),
])
def test_onnx_with_bad_metadata_is_one_line(tmp_path, exported_model, changes, needle, capsys):
    bad = edited_metadata(exported_model[3], tmp_path / 'bad.onnx', **changes)
    src = photos(tmp_path / 'in', ['a.png'])
    assert infer.main(
        ['-i', str(src), '-o',
         str(tmp_path / 'out'), '--model',
         str(bad), '--backend', 'onnxruntime', '-q']) == 2
    err = capsys.readouterr().err
    assert needle in err and 'Traceback' not in err


def test_onnx_with_external_data_outside_its_folder_is_one_line(tmp_path, exported_model, capsys):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data
    proto = onnx.load_model(str(exported_model[3]))
    convert_model_to_external_data(proto, location='../outside.bin', size_threshold=0)
    folder = tmp_path / 'model'
    folder.mkdir()
    (tmp_path / 'outside.bin').write_bytes(b'\0' * 4096)
    (folder / 'm.onnx').write_bytes(proto.SerializeToString())  # onnx.save_model refuses such a location
    src = photos(tmp_path / 'in', ['a.png'])
    assert infer.main([
        '-i',
        str(src), '-o',
        str(tmp_path / 'out'), '--model',
        str(folder / 'm.onnx'), '--backend', 'onnxruntime', '-q'
    ]) == 2
    err = capsys.readouterr().err
    assert 'ONNX Runtime cannot open' in err and 'Traceback' not in err


def test_corrupt_cache_entry_is_exported_again_and_stale_temps_removed(tmp_path, exported_model, capsys):
    pth, yml, _, _ = exported_model
    src = photos(tmp_path / 'in', ['a.png'])
    cache = tmp_path / 'cache'
    args = [
        '-i',
        str(src), '--model', pth, '--opt', yml, '--backend', 'onnxruntime', '--precision', 'fp32', '-q', '--cache-dir',
        str(cache)
    ]
    assert infer.main(args + ['-o', str(tmp_path / 'a')]) == 0
    entries = sorted(os.listdir(cache / 'onnx'))  # the export and what the loader said beside it (<key>.json)
    assert len(entries) == 2 and entries[1].endswith('.onnx')
    (cache / 'onnx' / entries[1]).write_bytes(b'\x08garbage')
    stale = cache / 'onnx' / f'.{entries[1]}.d2c-999999999-abcd.tmp'
    stale.write_bytes(b'partial export')
    capsys.readouterr()
    assert infer.main(args + ['-o', str(tmp_path / 'b')]) == 0
    err = capsys.readouterr().err
    assert 'notice: the cached export' in err and 'exporting' in err
    assert sorted(os.listdir(cache / 'onnx')) == entries
    assert infer.main(args + ['-o', str(tmp_path / 'c')]) == 0
    assert 'from the cache' in capsys.readouterr().err


def test_no_cache_leaves_nothing_in_the_temp_folder(tmp_path, exported_model, monkeypatch):
    import tempfile
    pth, yml, _, _ = exported_model
    temp = tmp_path / 'tmp'
    temp.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(temp))
    src = photos(tmp_path / 'in', ['a.png'])
    assert infer.main([
        '-i',
        str(src), '-o',
        str(tmp_path / 'out'), '--model', pth, '--opt', yml, '--backend', 'onnxruntime', '--precision', 'fp32', '-q',
        '--cache-dir', ''
    ]) == 0
    assert os.listdir(temp) == []


# ---------------------------------------------------------------- converters


def test_official_converter_refuses_opt_out_on_its_output_or_input(tmp_path, capsys):
    from test_convert_official import _variant, random_official, write_pickle

    from d2c_tools import convert_official
    src = write_pickle(tmp_path / 'off.pkl',
                       _variant(*random_official(4, seed=4, nf=8, ng=1, nb=1, reduction=4), lambda d, c: None))
    before = open(src, 'rb').read()
    out = tmp_path / 'out.pth'
    assert convert_official.main([str(src), str(out), '--opt-out', str(out)]) == 2
    assert 'OUTPUT and --opt-out are the same file' in capsys.readouterr().err
    assert convert_official.main([str(src), str(out), '--opt-out', str(src), '--force']) == 2
    assert 'is the input CHECKPOINT' in capsys.readouterr().err
    assert open(src, 'rb').read() == before and not out.exists()


def test_dan_converter_refuses_to_overwrite_its_pca_input(tmp_path, capsys):
    from d2c_tools import convert_dan
    pca = tmp_path / 'pca.pth'
    torch.save(torch.rand(441, 10), pca)
    before = pca.read_bytes()
    (tmp_path / 'in.pth').write_bytes(b'')
    assert convert_dan.main([str(tmp_path / 'in.pth'), str(pca), '--pca', str(pca), '--force']) == 2
    assert 'is the input --pca' in capsys.readouterr().err
    assert pca.read_bytes() == before


def test_dan_checkpoint_with_zero_pca_is_refused_at_load(tmp_path, capsys):
    from d2c_arch import DAN
    net = DAN(num_feat=8, num_group=1, num_block=1, code_length=4, kernel_size=5, estimator_feat=8, estimator_blocks=1)
    pth = tmp_path / 'dan.pth'
    torch.save({'params': net.state_dict()}, pth)  # pca_matrix: all zeros
    src = photos(tmp_path / 'in', ['a.png'])
    assert run_infer('-i', src, '-o', tmp_path / 'out', '--model', pth) == 2
    err = capsys.readouterr().err
    assert 'its PCA matrix (the buffer pca_matrix) is all zeros' in err and 'Traceback' not in err


def test_training_save_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_data, monkeypatch,
                                                                                capsys):
    from test_model import in_process_opt

    from basicsr.models import build_model
    from d2c_tools.pipeline_util import run_pipeline
    opt = in_process_opt(tmp_path, tiny_data, (('divergence', 2), ))
    os.makedirs(opt['path']['models'])
    os.makedirs(opt['path']['training_states'])
    model = build_model(opt)
    model.save(epoch=0, current_iter=1)
    models = opt['path']['models']
    before = {name: os.path.getsize(os.path.join(models, name)) for name in os.listdir(models)}
    monkeypatch.setattr(os, 'fsync', enospc)

    def pipeline(root_path):
        model.save(epoch=0, current_iter=2)

    with pytest.raises(SystemExit) as exc:
        run_pipeline(pipeline, 'd2c-train')
    assert exc.value.code == 2
    assert 'd2c-train: error: disk full: cannot write' in capsys.readouterr().err
    assert {name: os.path.getsize(os.path.join(models, name)) for name in os.listdir(models)} == before
    assert not [
        n for folder in (opt['path']['models'], opt['path']['training_states'])
        for n in os.listdir(folder) if n.endswith('.tmp')
    ]


def test_swap_sizing_search_is_bounded(monkeypatch):
    from d2c_convert import swap_util
    calls = []
    count = swap_util.count_d2c_parameters
    monkeypatch.setattr(swap_util, 'count_d2c_parameters', lambda opt: (calls.append(1), count(opt))[1])
    base = dict(branch_type='EDSRBranch', num_feat=4096, tree_depth=2, tree_width=2, upscale=4)
    opt, params = swap_util.size_counterpart(base, 64, 'num_block', budget=2_000_000)
    assert params <= 2_000_000 and len(calls) < 60
    # the result is the deepest path, then the widest width, that fits (what a scan would find)
    assert count(dict(opt, num_feat=opt['num_feat'] + 8)) > 2_000_000 or opt['num_feat'] == 4096


def test_converter_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from test_convert_official import _variant, random_official, write_pickle

    from d2c_tools import convert_official
    src = write_pickle(tmp_path / 'off.pkl',
                       _variant(*random_official(4, seed=4, nf=8, ng=1, nb=1, reduction=4), lambda d, c: None))
    monkeypatch.setattr(os, 'fsync', enospc)
    assert convert_official.main([str(src), str(tmp_path / 'out.pth'), '--opt-out', str(tmp_path / 'o.yml')]) == 2
    err = capsys.readouterr().err
    assert 'd2c-convert-official: error: disk full: cannot write' in err and 'Traceback' not in err
    assert os.listdir(tmp_path) == ['off.pkl']
