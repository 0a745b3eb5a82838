"""Issue 27: what hostile or unlucky users do to every entry point, and the one clear line they get.

Full disks are simulated by injecting ENOSPC where the bytes reach the disk (``os.write`` /
``os.fsync`` / the file object), as a tmpfs would need root here.
"""
import errno
import os
import struct
import zlib

import cv2
import pytest
import torch
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

    monkeypatch.setattr(infer, 'process_image', interrupted)
    assert run_infer('-i', src, '-o', tmp_path / 'out', *model) == 130
    err = capsys.readouterr().err
    assert 'd2c-infer: interrupted (Ctrl-C)' in err and 'Traceback' not in err
