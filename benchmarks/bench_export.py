#!/usr/bin/env python
"""Where D2C-SR runs fastest on this CPU: PyTorch, ONNX Runtime or OpenVINO, against plain fp32 PyTorch.

The paper's D2CNet (L=2, C=2, G=2, B=4, F=64, x4; random weights, or ``--model ckpt.pth:opt.yml``)
exported once with ``d2c-export``'s code (export time printed), opened the way ``d2c-infer`` opens
it (ONNX Runtime session time and OpenVINO compile time printed), then, in one process and
round-robin so that machine noise hits every configuration alike:

* plain  - ``net(x)`` in fp32, NCHW, under ``torch.no_grad()`` (the baseline, what BasicSR does)
* torch  - d2c-infer's own PyTorch path (its default precision here, channels_last)
* onnxruntime fp32, openvino at its default precision on this CPU, openvino fp32

each on real photos: a DRealSR LR crop (128x128), a DRealSR HR crop shrunk to 256x256, and a
960x540 mosaic of four DRealSR HR crops run tiled (tile 128, pad 32, as ``d2c-infer --tile 128``).
Printed per input: seconds per image (median of ``--repeats``; the tiled photo once), the
speed-up over plain and the agreement with plain (PSNR of the clamped outputs, peak 1, dB).
The last lines name the fastest configuration at >= 50 dB and check it against what
``d2c-infer --backend auto`` picks (d2c_deploy/runtime_util.py, AUTO_ORDER_CPU).

    python benchmarks/bench_export.py --data ../shared/data/DRealSR_x4_test_crops   # ~6 min on 2 cores
    python benchmarks/bench_export.py --repeats 1 --skip-tiled                       # quick
"""
import argparse
import copy
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

import bench_util  # noqa: E402,I001  (puts the repository on sys.path)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_infer_cpu import cpu_name, paper_net  # noqa: E402

import d2c_model  # noqa: E402,F401  (registers D2CNet; applies the compat shim before basicsr)
from d2c_deploy.export_util import export_onnx  # noqa: E402
from d2c_deploy.runtime_util import AUTO_ORDER_CPU, OnnxRuntimeModel, OpenVINOModel, read_onnx_metadata  # noqa: E402
from d2c_inference.checkpoint_util import load_model  # noqa: E402
from d2c_inference.tile_util import GuardedForward, prepare_network, run_network, super_resolve  # noqa: E402
from d2c_utils.eval_util import tensor_psnr  # noqa: E402
from d2c_utils.precision_util import cpu_has_native_bf16, precision_name, resolve_precision  # noqa: E402

MIN_AGREEMENT_DB = 50.


def to_tensor(bgr):
    """uint8 BGR (H, W, 3) -> (1, 3, H, W) float32 RGB in [0, 1]."""
    return torch.from_numpy(bgr[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255.).unsqueeze(0).contiguous()


def photos(data_dir):
    """(label, LR tensor, tile) of the three real-photo inputs."""
    names = sorted(os.listdir(osp.join(data_dir, 'LR')))
    lr = cv2.imread(osp.join(data_dir, 'LR', names[0]))
    hr = [cv2.imread(osp.join(data_dir, 'HR', n)) for n in names[1:5]]
    small = cv2.resize(hr[0], (256, 256), interpolation=cv2.INTER_AREA)
    mosaic = np.vstack([np.hstack(hr[:2]), np.hstack(hr[2:4])])[:540, :960]
    return [(f'128x128 ({names[0]} LR)', to_tensor(lr[:128, :128]), 0),
            (f'256x256 ({names[1]} HR shrunk)', to_tensor(small), 0),
            ('960x540 photo, tile 128/32', to_tensor(np.ascontiguousarray(mosaic)), 128)]


def configurations(net, onnx_path):
    """(label, network, forward) for every configuration; ``forward(net, lq)`` -> SR."""
    torch_dtype = resolve_precision('auto', 'cpu', purpose='infer')
    net_cl = prepare_network(copy.deepcopy(net), True)  # the layout d2c-infer's path runs in
    meta = read_onnx_metadata(onnx_path)
    start = time.perf_counter()
    ort_model = OnnxRuntimeModel(onnx_path, meta, torch.device('cpu'))
    ort_seconds = time.perf_counter() - start
    ov_model = OpenVINOModel(onnx_path, meta)
    ov_default = ov_model.default_dtype
    for dtype in {ov_default, None}:
        ov_model.compiled_for(dtype)
    print(
        f'ONNX Runtime session {ort_seconds:.2f} s; OpenVINO read + compile {ov_model.prepare_seconds:.2f} s for '
        f'{len(ov_model.compiled)} precision(s) (its default here: {precision_name(ov_default)}); '
        'both once per process, dynamic shapes: no recompilation per image size or tile',
        flush=True)
    return [
        ('plain fp32 NCHW (baseline)', net, lambda n, x: run_network(n, x)),
        (f'torch default ({precision_name(torch_dtype)}, channels_last)', net_cl, GuardedForward(torch_dtype, True)),
        ('onnxruntime fp32', ort_model, lambda n, x: run_network(n, x)),
        (f'openvino default ({precision_name(ov_default)})', ov_model, GuardedForward(ov_default)),
        ('openvino fp32', ov_model, lambda n, x: run_network(n, x)),
    ]


def run_config(net, forward, lq, tile):
    """One super-resolution of ``lq`` through d2c-infer's tiling code: (SR clamped to [0, 1], seconds)."""
    begin = time.perf_counter()
    sr = super_resolve(net, lq, 4, tile=tile, tile_pad=32, forward=lambda n, x, return_branches=False: forward(n, x))[0]
    return sr.clamp(0, 1), time.perf_counter() - begin


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--data', default=None, help=f'folder with HR/ and LR/ real photos (or ${bench_util.DATA_ENV})')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per configuration on 128x128 and 256x256')
    parser.add_argument(
        '--model', default=None, metavar='CKPT:YML', help='a trained model instead of the paper setting')
    parser.add_argument('--skip-tiled', action='store_true', help='skip the 960x540 tiled photo')
    args = parser.parse_args(argv)
    data_dir = bench_util.photo_pairs_dir(args.data, '--data')
    print(f'Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, native bf16: {cpu_has_native_bf16()}, '
          f'torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}')
    import onnxruntime
    import openvino
    print(f'onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}')
    if args.model:
        pth, yml = args.model.split(':', 1)
        net, _ = load_model(pth, yml)
        print(f'Model: {pth} (options {yml})')
    else:
        net = paper_net()
        print('Model: D2CNet paper setting (L=2, C=2, G=2, B=4, F=64, x4), random weights, '
              f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params')
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='bench_export_') as workdir:
        onnx_path = osp.join(workdir, 'd2c.onnx')
        result = export_onnx(net, onnx_path, outputs='fused', source='benchmark')
        print(f'Export (d2c-export, fused output, fp32): {result["seconds"]:.1f} s, '
              f'{result["bytes"] / 2**20:.1f} MiB')
        configs = configurations(net, onnx_path)
        winners = []
        for label, lq, tile in photos(data_dir) if not args.skip_tiled else photos(data_dir)[:2]:
            repeats = 1 if tile else args.repeats
            times, outputs = {c[0]: [] for c in configs}, {}
            for name, model, forward in configs:  # warm-up (first calls allocate, OpenVINO shapes its graph)
                if not tile:
                    run_config(model, forward, lq, tile)
            for _ in range(repeats):
                for name, model, forward in configs:
                    outputs[name], seconds = run_config(model, forward, lq, tile)
                    times[name].append(seconds)
            base_name = configs[0][0]
            base = statistics.median(times[base_name])
            print(f'\n{label} -> x4, median of {repeats}:')
            print(f'  {"configuration":38s} {"s/img":>8s} {"speed-up":>9s} {"agreement":>10s}')
            rows = []
            for name, _, _ in configs:
                seconds = statistics.median(times[name])
                agreement = tensor_psnr(outputs[name], outputs[base_name]) if name != base_name else float('inf')
                rows.append((name, base / seconds, agreement))
                shown = '-' if name == base_name else f'{agreement:.1f} dB'
                print(f'  {name:38s} {seconds:8.3f} {base / seconds:8.2f}x {shown:>10s}', flush=True)
            good = [r for r in rows[1:] if r[2] >= MIN_AGREEMENT_DB]
            winners.append(max(good, key=lambda r: r[1])[0] if good else None)
    print(f'\nTotal {time.perf_counter() - total:.0f} s')
    fastest = max(set(winners), key=winners.count)
    chosen = {'openvino': 'openvino default', 'torch': 'torch default', 'onnxruntime': 'onnxruntime'}[AUTO_ORDER_CPU[0]]
    agrees = fastest is not None and fastest.startswith(chosen)
    print(f'fastest at >= {MIN_AGREEMENT_DB:.0f} dB on most inputs: {fastest}; d2c-infer --backend auto picks '
          f'{AUTO_ORDER_CPU[0]} first on CPUs: {"consistent" if agrees else "NOT consistent, update AUTO_ORDER_CPU"}')
    return 0 if agrees else 1


if __name__ == '__main__':
    sys.exit(main())
