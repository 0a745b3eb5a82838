#!/usr/bin/env python
"""CPU inference speed and memory of D2C-SR, untiled and tiled (what ``d2c-infer`` runs).

Tiling costs and accuracy; by default in fp32 NCHW (``--precision``, ``--channels-last`` for
others). ``benchmarks/bench_infer.py`` compares the precisions and layouts.

Speed: the paper's D2CNet (L=2, C=2, G=2, B=4, F=64, x4; random weights, which cost the same as
trained ones) on a ``--size`` input (default 256x256 -> 1024x1024), whole and tiled
(``--tile``/``--tile-pad``). Each configuration is warmed up once on its own tile shapes, then
timed ``--repeats`` times (median); prints seconds per image, images/s and output megapixels/s.

Memory: the real ``d2c-infer`` command in a fresh process on a ``--memory-size`` image (default
960x540 -> 3840x2160, a 4K output) with tiling; its peak resident memory is the kernel's
high-water mark ``VmHWM`` that the process reads from ``/proc/self/status`` at its end. The same
command on a 16x16 image gives the baseline (interpreter, torch, the model).

Accuracy (``--accuracy``, not in the default run): how far tiled outputs are from untiled ones,
because RCAN's channel attention pools over the whole input it sees (each tile sees its own
statistics). Runs real photos (DRealSR x4 LR crops, 128x128, and their HR resized to 256x256)
through each model of ``--models`` (``random`` = the paper setting with random weights, or
``ckpt.pth:options.yml``) for every ``--configs`` tile/pad pair and prints the largest absolute
difference in 8-bit levels and the PSNR of tiled against untiled (float, RGB, peak 1).

Examples::

    python benchmarks/bench_infer_cpu.py                     # speed + memory, ~4 min on 2 cores
    python benchmarks/bench_infer_cpu.py --accuracy --skip-speed --skip-memory \\
        --models random experiments/demo_D2C_x4/models/net_g_latest.pth:options/demo_D2C_x4.yml
"""
import argparse
import glob
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util  # noqa: E402,I001  (puts the repository on sys.path)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import d2c_model  # noqa: E402,F401  (registers D2CNet; applies the compat shim before basicsr)
from d2c_arch import D2CNet  # noqa: E402
from d2c_inference.checkpoint_util import load_model  # noqa: E402
from d2c_inference.tile_util import GuardedForward, prepare_network, run_network, super_resolve  # noqa: E402
from d2c_utils.eval_util import tensor_psnr  # noqa: E402
from d2c_utils.img_util import read_image, split_input  # noqa: E402
from d2c_utils.precision_util import resolve_precision  # noqa: E402


def parse_size(text):
    w, h = (int(v) for v in text.lower().split('x'))
    return w, h


def parse_configs(text):
    return [tuple(int(v) for v in item.split('/')) for item in text.split(',')]


def paper_net(seed=0):
    """The paper's setting (D2CNet defaults) with random weights, in eval mode."""
    torch.manual_seed(seed)
    return D2CNet().eval()


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def smooth_input(width, height, seed=0):
    """A smooth random LR image (1, 3, H, W) in [0, 1]; speed does not depend on content."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((height, width, 3)).astype(np.float32), (7, 7), 2)
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).unsqueeze(0)


def measure_speed(args):
    net = prepare_network(paper_net(), args.channels_last)
    forward = GuardedForward(resolve_precision(args.precision, 'cpu', purpose='infer'), args.channels_last)
    width, height = args.size
    x = smooth_input(width, height)
    out_mp = width * height * net.upscale**2 / 1e6
    configs = [('untiled', 0, 0), (f'tile {args.tile} / pad {args.tile_pad}', args.tile, args.tile_pad)]
    rows = []
    for label, tile, pad in configs:
        # warm-up: the first call on each input shape sets up kernels; time the steady state
        super_resolve(net, x, net.upscale, tile=tile, tile_pad=pad, forward=forward)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            super_resolve(net, x, net.upscale, tile=tile, tile_pad=pad, forward=forward)
            times.append(time.perf_counter() - start)
        sec = statistics.median(times)
        rows.append((label, sec, 1 / sec, out_mp / sec, min(times), max(times)))
        print(
            f'  {label:22s} {sec:8.2f} s/img  {1 / sec:7.3f} img/s  {out_mp / sec:7.3f} out MP/s  '
            f'(runs {", ".join(f"{t:.2f}" for t in times)} s)',
            flush=True)
    return rows


# runs d2c-infer's main() and reports the process's peak RSS. VmHWM of /proc/self/status is
# per address space and starts afresh at exec, unlike ru_maxrss, which Linux carries over from
# the (large) parent that forked the child.
CHILD_CODE = """import sys
from d2c_tools import infer
code = infer.main(sys.argv[1:])
with open('/proc/self/status') as f:
    hwm = [line.split()[1] for line in f if line.startswith('VmHWM:')][0]
print('VMHWM_KIB', hwm, flush=True)
sys.exit(code)
"""


def peak_rss_of(infer_args):
    """Run d2c-infer in a fresh process; return (peak RSS in MiB, wall seconds, return code, output)."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, '-c', CHILD_CODE] + infer_args, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = res.stdout + res.stderr
    hwm = [line.split()[1] for line in res.stdout.splitlines() if line.startswith('VMHWM_KIB')]
    return (int(hwm[0]) / 1024 if hwm else float('nan')), seconds, res.returncode, output


def measure_memory(args, workdir):
    net = paper_net()
    pth, yml = osp.join(workdir, 'paper_random.pth'), osp.join(workdir, 'paper.yml')
    torch.save({'params': net.state_dict()}, pth)
    with open(yml, 'w') as f:
        yaml.safe_dump({'network_g': {'type': 'D2CNet'}}, f)  # D2CNet's defaults are the paper's setting
    width, height = args.memory_size
    results = []
    cases = (('baseline (16x16 input)', (16, 16), 0),
             (f'{width}x{height} -> {width * 4}x{height * 4}, tile {args.tile} / pad {args.tile_pad}', (width, height),
              args.tile))
    if args.memory_untiled:
        cases += ((f'{width}x{height} -> {width * 4}x{height * 4}, untiled', (width, height), 0), )
    for label, (w, h), tile in cases:
        img = (smooth_input(w, h, seed=1)[0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        src = osp.join(workdir, f'in_{w}x{h}.png')
        cv2.imwrite(src, img)
        infer_args = [
            '-i', src, '-o',
            osp.join(workdir, 'out'), '--model', pth, '--opt', yml, '--device', 'cpu', '-q', '--tile',
            str(tile), '--tile-pad',
            str(args.tile_pad), '--precision', args.precision, '--backend',
            getattr(args, 'backend', 'torch'), '--cache-dir', ''
        ]
        if not args.channels_last:
            infer_args.append('--no-channels-last')
        rss, sec, code, output = peak_rss_of(infer_args)
        if code != 0:
            raise RuntimeError(f'd2c-infer failed ({code}):\n{output}')
        results.append((label, rss, sec))
        print(f'  {label:44s} peak RSS {rss:8.0f} MiB  ({sec:.0f} s incl. start-up)', flush=True)
    return results


def accuracy_photos(root, count):
    """[(label, LR tensor)]: ``count`` DRealSR LR crops (128x128) and their HR resized to 256x256."""
    names = sorted(glob.glob(osp.join(root, 'LR', '*.png')))[:count]
    if not names:
        raise SystemExit(f'--accuracy: no PNG files in {root}/LR (pass --photos <folder with HR/ and LR/>)')
    photos = []
    for path in names:
        name = osp.splitext(osp.basename(path))[0]
        lr = read_image(path)
        hr = cv2.resize(read_image(osp.join(root, 'HR', osp.basename(path))), (256, 256), interpolation=cv2.INTER_AREA)
        for label, img in ((f'{name} LR', lr), (f'{name} HR->256', hr)):
            photos.append((f'{label} {img.shape[1]}x{img.shape[0]}', split_input(img)[0]))
    return photos


def measure_accuracy(args):
    photos = accuracy_photos(bench_util.photo_pairs_dir(args.photos, '--photos'), args.num_photos)
    print(f'  {"model":16s} {"photo":30s} {"tile/pad":>9s} {"max |diff| (8-bit)":>19s} {"PSNR vs untiled":>16s}')
    rows = []
    for spec in args.models:
        if spec == 'random':
            net, label = paper_net(), 'paper, random'
        else:
            pth, yml = spec.split(':', 1)
            net, _ = load_model(pth, yml)
            label = osp.basename(osp.dirname(osp.dirname(pth))) or osp.basename(pth)
        for photo, x in photos:
            ref = run_network(net, x).clamp(0, 1)
            for tile, pad in args.configs:
                out = super_resolve(net, x, net.upscale, tile=tile, tile_pad=pad)[0].clamp(0, 1)
                diff8 = int(((ref * 255).round() - (out * 255).round()).abs().max())
                value = tensor_psnr(ref, out)
                rows.append((label, photo, tile, pad, diff8, value))
                print(
                    f'  {label[:16]:16s} {photo[:30]:30s} {f"{tile}/{pad}":>9s} {diff8:19d} {value:13.2f} dB',
                    flush=True)
    print('\n  worst case per model and tile/pad:')
    for label in dict.fromkeys(r[0] for r in rows):
        for tile, pad in args.configs:
            sel = [r for r in rows if r[0] == label and r[2] == tile and r[3] == pad]
            print(f'  {label[:16]:16s} {f"{tile}/{pad}":>9s}  max |diff| {max(r[4] for r in sel):3d} levels, '
                  f'min PSNR {min(r[5] for r in sel):6.2f} dB')
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--size', type=parse_size, default=(256, 256), metavar='WxH', help='speed: input size')
    parser.add_argument('--tile', type=int, default=128, help='tile side (LR px) for the tiled runs')
    parser.add_argument('--tile-pad', type=int, default=32, help='context around each tile (LR px)')
    parser.add_argument('--repeats', type=int, default=2, help='speed: timed runs per configuration (median)')
    parser.add_argument(
        '--memory-size',
        type=parse_size,
        default=(960, 540),
        metavar='WxH',
        help='memory: input size of the tiled d2c-infer run')
    parser.add_argument(
        '--memory-untiled',
        action='store_true',
        help='memory: also run --memory-size untiled (needs several GB at 960x540)')
    parser.add_argument(
        '--precision',
        default='fp32',
        choices=['fp32', 'bf16', 'auto'],
        help="speed and memory: d2c-infer's --precision (benchmarks/bench_infer.py compares them)")
    parser.add_argument(
        '--channels-last',
        action='store_true',
        help="speed and memory: d2c-infer's default layout "
        '(without it: --no-channels-last, NCHW)')
    parser.add_argument(
        '--backend',
        default='torch',
        choices=['torch', 'onnxruntime', 'openvino'],
        help="memory: d2c-infer's --backend; with the others the export of the .pth is in the peak "
        '(no cache, as on a first run)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--skip-speed', action='store_true')
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument('--accuracy', action='store_true', help='also measure tiled against untiled outputs')
    parser.add_argument(
        '--models', nargs='+', default=['random'], help='accuracy: "random" and/or ckpt.pth:options.yml')
    parser.add_argument(
        '--photos', default=None, help=f'accuracy: folder with HR/ and LR/ PNG pairs (default: ${bench_util.DATA_ENV})')
    parser.add_argument('--num-photos', type=int, default=2, help='accuracy: photos taken from --photos')
    parser.add_argument(
        '--configs',
        type=parse_configs,
        default=parse_configs('64/16,64/32,128/16,128/32,128/64'),
        help='accuracy: tile/pad pairs, comma-separated')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ['OMP_NUM_THREADS'] = str(args.threads)  # for the d2c-infer subprocesses

    print(f'Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} '
          f'({torch.get_num_threads()} threads), Python {platform.python_version()}')
    net = paper_net()
    params = sum(p.numel() for p in net.parameters())
    print(f'Model: D2CNet paper setting (L=2, C=2, G=2, B=4, F=64, x4), random weights, {params / 1e6:.2f} M params')
    del net
    start = time.perf_counter()
    results = {}
    if not args.skip_speed:
        w, h = args.size
        print(f'\nSpeed, {w}x{h} -> {w * 4}x{h * 4} (median of {args.repeats} after a warm-up):', flush=True)
        results['speed'] = measure_speed(args)
    if not args.skip_memory:
        print('\nPeak resident memory of d2c-infer in a fresh process (VmHWM):', flush=True)
        with tempfile.TemporaryDirectory(prefix='bench_infer_') as workdir:
            results['memory'] = measure_memory(args, workdir)
    if args.accuracy:
        print('\nTiled against untiled (channel attention sees per-tile statistics):', flush=True)
        results['accuracy'] = measure_accuracy(args)
    print(f'\nTotal {time.perf_counter() - start:.0f} s')
    return results


if __name__ == '__main__':
    main()
