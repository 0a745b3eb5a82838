#!/usr/bin/env python
"""What a user waits for: ``d2c-infer`` end to end, from the command to the exit, default vs plain fp32 PyTorch.

Every row runs the console script in a fresh process, as a user does, and times it with the clock
on the wall (start-up, imports, loading, export or compile where caches are cold, every image read,
run and written). The model is the paper's D2CNet x4 with random weights (as
``benchmarks/bench_infer_cpu.py``'s ``paper_net``), saved as a checkpoint and option file.

* start-up alone: ``--help`` of every console script (median of three);
* default (``--backend auto`` and its defaults) against plain (``--backend torch --precision fp32
  --no-channels-last``), caches warm: 1 and 4 real 128x128 photos, every photo of ``--data``
  (the DRealSR x4 LR crops: 93), one 960x540 photo tiled (``--tile 128``, a mosaic of four HR crops);
* the first run (a cold ``--cache-dir``: export and compile included) and the ONNX file itself as
  ``--model`` (the deployed path);
* agreement of the default's outputs with plain's: PSNR over the 8-bit PNGs (peak 255).

    python benchmarks/bench_e2e.py --data ../shared/data/DRealSR_x4_test_crops     # ~15 min on 2 cores
    python benchmarks/bench_e2e.py --quick                                          # without the 93 photos
"""
import argparse
import glob
import importlib.metadata
import os
import os.path as osp
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util  # noqa: E402,I001  (puts the repository on sys.path)
import cv2  # noqa: E402
import numpy as np  # noqa: E402

TOOLS = ('d2c-infer', 'd2c-export', 'd2c-summary', 'd2c-train', 'd2c-test', 'd2c-swap', 'd2c-convert-official',
         'd2c-convert-dan', 'd2c-convert-sdflow')
PLAIN = ['--backend', 'torch', '--precision', 'fp32', '--no-channels-last']


def tool(name):
    """The console script beside this Python (the installed one), else ``python -m d2c_tools.<module>``."""
    script = osp.join(osp.dirname(sys.executable), name)
    if osp.isfile(script):
        return [script]
    return [sys.executable, '-m', 'd2c_tools.' + name[len('d2c-'):].replace('-', '_')]


def timed(cmd, env=None):
    """Seconds from the start of ``cmd`` to its exit; exits with its output if it fails."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f'error: {" ".join(cmd)} exited with {result.returncode}:\n{result.stderr[-3000:]}')
    return seconds


def write_model(root):
    """The paper's D2CNet x4 (random weights) as ``paper.pth`` + ``paper.yml``; returns both paths."""
    import torch
    import yaml
    from bench_infer_cpu import paper_net
    pth, yml = osp.join(root, 'paper.pth'), osp.join(root, 'paper.yml')
    torch.save({'params': paper_net().state_dict()}, pth)
    with open(yml, 'w') as f:
        yaml.safe_dump({'name': 'paper_random', 'network_g': {'type': 'D2CNet'}}, f)
    return pth, yml


def input_sets(data, root):
    """{label: folder} of the inputs: 1 and 4 photos, every photo, one 960x540 mosaic."""
    names = sorted(os.listdir(osp.join(data, 'LR')))
    sets = {}
    for label, count in (('1 photo 128x128', 1), ('4 photos 128x128', 4), (f'{len(names)} photos 128x128', len(names))):
        folder = osp.join(root, 'in', str(count))
        os.makedirs(folder)
        for name in names[:count]:
            shutil.copy(osp.join(data, 'LR', name), folder)
        sets[label] = folder
    hr = [cv2.resize(cv2.imread(osp.join(data, 'HR', n)), (480, 270), interpolation=cv2.INTER_AREA) for n in names[:4]]
    folder = osp.join(root, 'in', 'mosaic')
    os.makedirs(folder)
    cv2.imwrite(osp.join(folder, 'mosaic.png'), np.vstack([np.hstack(hr[:2]), np.hstack(hr[2:])]))
    sets['one 960x540 photo, --tile 128'] = folder
    return sets


def agreement_db(out_a, out_b):
    """PSNR (dB, peak 255) of all of ``out_a``'s PNGs against ``out_b``'s of the same names."""
    errors = []
    for path in sorted(glob.glob(osp.join(out_a, '*.png'))):
        a = cv2.imread(path).astype(np.float64)
        b = cv2.imread(osp.join(out_b, osp.basename(path))).astype(np.float64)
        errors.append(((a - b)**2).mean())
    mse = float(np.mean(errors))
    return float('inf') if mse == 0 else 10 * np.log10(255.**2 / mse)


def versions():
    found = []
    for name in ('torch', 'onnxruntime', 'openvino'):
        try:
            found.append(f'{name} {importlib.metadata.version(name)}')
        except importlib.metadata.PackageNotFoundError:
            pass
    return ', '.join(found)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=None, help='folder with HR/ and LR/ real photo pairs (or $D2C_SR_DATA)')
    parser.add_argument('--quick', action='store_true', help='skip the row of every photo')
    parser.add_argument('--repeats', type=int, default=1, help='runs per row (the median is shown; default 1)')
    args = parser.parse_args()
    data = bench_util.photo_pairs_dir(args.data, '--data')
    from bench_infer_cpu import cpu_name

    root = tempfile.mkdtemp(prefix='bench_e2e_')
    try:
        print(f'# d2c-infer end to end: {cpu_name()}, {os.cpu_count()} cores; {versions()}\n')
        rows = []
        for name in TOOLS:
            seconds = statistics.median(timed(tool(name) + ['--help']) for _ in range(3))
            rows.append(f'| `{name} --help` | {seconds:.2f} s |')
        print('| start-up | wall time |\n|---|---|\n' + '\n'.join(rows) + '\n', flush=True)

        pth, yml = write_model(root)
        sets = input_sets(data, root)
        infer = tool('d2c-infer') + ['--model', pth, '--opt', yml, '-q']
        cache = osp.join(root, 'cache')
        rows = []
        four = sets['4 photos 128x128']
        cold = timed(infer + ['-i', four, '-o', osp.join(root, 'out', 'cold'), '--cache-dir', cache])
        warm = timed(infer + ['-i', four, '-o', osp.join(root, 'out', 'warm'), '--cache-dir', cache])
        print(
            f'4 photos, default: first run (cold cache: export + compile) {cold:.2f} s, later run {warm:.2f} s',
            file=sys.stderr,
            flush=True)
        onnx = osp.join(root, 'paper.onnx')
        timed(tool('d2c-export') + [pth, '--opt', yml, '-o', onnx])
        for label, folder in sets.items():
            if args.quick and label.endswith('photos 128x128') and not label.startswith('4 '):
                continue
            tile = ['--tile', '128'] if 'tile' in label else []
            out_plain, out_default = osp.join(root, 'out', label, 'plain'), osp.join(root, 'out', label, 'default')
            plain = statistics.median(
                timed(infer + ['-i', folder, '-o', out_plain] + tile + PLAIN) for _ in range(args.repeats))
            default = statistics.median(
                timed(infer + ['-i', folder, '-o', out_default, '--cache-dir', cache] + tile)
                for _ in range(args.repeats))
            db = agreement_db(out_default, out_plain)
            rows.append(f'| {label} | {plain:.2f} s | {default:.2f} s | **{plain / default:.2f}x** | {db:.1f} dB |')
            print(rows[-1], file=sys.stderr, flush=True)
        out_onnx = osp.join(root, 'out', 'onnx')
        deployed = timed(tool('d2c-infer') + ['--model', onnx, '-q', '-i', four, '-o', out_onnx, '--cache-dir', cache])
        plain_four = next(r for r in rows if r.startswith('| 4 photos'))
        plain_seconds = float(plain_four.split('|')[2].strip().rstrip(' s'))
        rows.append(f'| 4 photos, `--model paper.onnx` (deployed) | {plain_seconds:.2f} s | {deployed:.2f} s | '
                    f'**{plain_seconds / deployed:.2f}x** | '
                    f'{agreement_db(out_onnx, osp.join(root, "out", "4 photos 128x128", "plain")):.1f} dB |')
        rows.append(f'| 4 photos, first run (cold cache: export, compile) | {plain_seconds:.2f} s | {cold:.2f} s | '
                    f'{plain_seconds / cold:.2f}x | - |')
        print('| input (paper D2CNet x4, random weights) | plain fp32 PyTorch | default | speed-up | agreement |')
        print('|---|---|---|---|---|')
        print('\n'.join(rows))
        print(f'\nOne run per row (median of {args.repeats}); wall time of the whole command, start-up included. '
              f'Plain: d2c-infer {" ".join(PLAIN)}. Default: no flags (warm cache, except the first-run row).')
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
