#!/usr/bin/env python
"""Where each method runs fastest on this CPU: PyTorch, ONNX Runtime or OpenVINO, against plain fp32 PyTorch.

For D2CNet (the paper's setting, x4), DANv2 x4 (as benchmarks/bench_dan_cpu.py builds it: F=32, 2 groups
of 4 blocks, loop 4, kernel 21, code 10) and SDFlow x4 (benchmarks/bench_sdflow_cpu.py's SMALL), random
weights (``--paper`` for DAN's and SDFlow's full-size defaults): exported once with d2c-export's code
(``export_util.export_graphs_onnx``), opened as ``d2c-infer`` opens them, then, in one process and
round-robin so that machine noise hits every configuration alike, on smooth random 128x128 and 256x256
LR inputs:

* plain        - the network in fp32, NCHW, ``torch.no_grad()`` (``net(x)``; SDFlow ``super_resolve``)
* torch        - d2c-infer's own PyTorch path (its default precision here, channels_last where the method
                 uses it, DAN's kernel estimate then the Restorer with its code, SDFlow's seeded sample)
* onnxruntime  - the exported graphs on ONNX Runtime, fp32, through the same inference code
* openvino     - the exported graphs on OpenVINO at its default precision on this CPU

Printed: a Markdown table per method and size: seconds per image (median of ``--repeats``), the speed-up
over plain measured in the same run, and the agreement with plain (PSNR of the clamped outputs, peak 1,
dB; SDFlow with the same seed, so the same noise). The last lines give each method's fastest backend at
>= 50 dB and what ``d2c-infer --backend auto`` runs (d2c_deploy/runtime_util.py, AUTO_ORDER).

    python benchmarks/bench_export_methods.py                 # ~10 min on 2 cores
    python benchmarks/bench_export_methods.py --repeats 1 --methods DAN SDFlow
"""
import argparse
import copy
import os.path as osp
import statistics
import sys
import tempfile
import time

import bench_util  # noqa: F401,I001  (puts the repository on sys.path)
import torch  # noqa: E402
from bench_infer_cpu import cpu_name, paper_net, smooth_input  # noqa: E402

from d2c_arch import DAN, SDFlow  # noqa: E402
from d2c_deploy.export_util import export_graphs_onnx  # noqa: E402
from d2c_deploy.runtime_util import AUTO_ORDER, installed, load_method_runtime_model  # noqa: E402
from d2c_inference.dan_infer_util import one_kernel_per_image  # noqa: E402
from d2c_inference.infer_util import OutputOptions  # noqa: E402
from d2c_inference.registry import method_named  # noqa: E402
from d2c_inference.sdflow_infer_util import SampledSR  # noqa: E402
from d2c_inference.tile_util import GuardedForward  # noqa: E402
from d2c_utils.eval_util import tensor_psnr  # noqa: E402
from d2c_utils.precision_util import precision_name, resolve_precision  # noqa: E402

MIN_AGREEMENT_DB = 50.
SIZES = (128, 256)
# benchmarks/bench_dan_cpu.py's network_g (its --num-feat default 32) and bench_sdflow_cpu.py's SMALL
DAN_BENCH = dict(
    num_feat=32,
    num_group=2,
    num_block=4,
    upscale=4,
    code_length=10,
    kernel_size=21,
    loop=4,
    estimator_feat=32,
    estimator_blocks=5)
SDFLOW_BENCH = dict(
    num_feat=32,
    hidden_channels=32,
    flow_steps=4,
    hf_steps=4,
    hf_blocks=2,
    deg_steps=4,
    deg_blocks=2,
    encoder_blocks=4,
    encoder_mod_convs=2)
SEED = 0


def build(method, paper):
    """The network (eval mode, random weights) of ``method``."""
    torch.manual_seed(0)
    if method == 'D2CNet':
        return paper_net(), {}
    if method == 'DAN':
        opt = {} if paper else DAN_BENCH
        net = DAN(**opt).eval()
        size = net.kernel_size**2
        net.pca_matrix.copy_(torch.linalg.qr(torch.randn(size, net.code_length))[0])
        return net, opt
    opt = {} if paper else SDFLOW_BENCH
    return SDFlow(**opt).eval(), opt


def plain_call(method, net, lq):
    """The network in plain fp32 PyTorch, as BasicSR would call it; float32 (1, 3, 4h, 4w) on the host."""
    with torch.no_grad():
        if method == 'SDFlow':
            return net.super_resolve(lq, net.temperature, torch.Generator().manual_seed(SEED))
        return net(lq)


def inference_call(method, net, lq, forward):
    """d2c-infer's way to run ``net`` (a module or an exported model) on ``lq`` (one whole image)."""
    with torch.no_grad():
        if method == 'DAN':
            restorer, _ = one_kernel_per_image(net, lq, OutputOptions('.'), torch.device('cpu'), forward)
            return forward(restorer, lq)
        if method == 'SDFlow':
            return forward(SampledSR(net, net.temperature, torch.Generator().manual_seed(SEED)), lq)
        return forward(net, lq)


def configurations(method, net, folder, log):
    """name -> (callable(lq) -> SR, precision shown), and the export time."""
    entry = method_named(method)
    plain = net
    configs = {'plain': (lambda lq: plain_call(method, plain, lq), 'fp32')}
    dtype = resolve_precision('auto', 'cpu', purpose='infer')
    ours = entry.prepare(copy.deepcopy(net), argparse.Namespace(channels_last=True, compile=False), lambda m: None)
    guarded = GuardedForward(dtype, entry.channels_last)
    configs['torch'] = (lambda lq: inference_call(method, ours, lq, guarded), precision_name(dtype))
    start = time.perf_counter()
    path = osp.join(folder, f'{method}.onnx')
    export_graphs_onnx(entry.export_graphs(net), path, method, metadata={'upscale': net.upscale})
    export_seconds = time.perf_counter() - start
    for backend in ('onnxruntime', 'openvino'):
        if not installed(backend):
            log(f'{backend} is not installed: skipped')
            continue
        model = load_method_runtime_model(path, backend, torch.device('cpu'))
        model_dtype = None if backend == 'onnxruntime' else model.default_dtype
        forward = GuardedForward(model_dtype)
        configs[backend] = (lambda lq, m=model, f=forward: inference_call(method, m, lq, f),
                            precision_name(model_dtype))
    return configs, export_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--methods', nargs='+', default=['D2CNet', 'DAN', 'SDFlow'], choices=['D2CNet', 'DAN', 'SDFlow'])
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per configuration (median)')
    parser.add_argument('--paper', action='store_true', help="DAN's and SDFlow's full-size defaults")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f'CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}')
    fastest = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods:
            net, opt = build(method, args.paper)
            configs, export_seconds = configurations(method, net, folder, print)
            shown = ', '.join(f'{k}={v}' for k, v in opt.items()) or 'defaults (the paper\'s setting)'
            print(f'\n### {method} x{net.upscale} ({shown}); {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M '
                  f'parameters, exported in {export_seconds:.1f} s\n')
            print('| input | configuration | precision | seconds | speed-up vs plain | agreement with plain (dB) |')
            print('|---|---|---|---|---|---|')
            for size in SIZES:
                lq = smooth_input(size, size)
                outputs = {name: call(lq).float().clamp(0, 1) for name, (call, _) in configs.items()}  # warm-up
                times = {name: [] for name in configs}
                for _ in range(args.repeats):
                    for name, (call, _) in configs.items():
                        start = time.perf_counter()
                        call(lq)
                        times[name].append(time.perf_counter() - start)
                medians = {name: statistics.median(t) for name, t in times.items()}
                for name, (_, precision) in configs.items():
                    db = tensor_psnr(outputs[name], outputs['plain']) if name != 'plain' else float('inf')
                    speed = medians['plain'] / medians[name]
                    print(f'| {size}x{size} | {name} | {precision} | {medians[name]:.3f} | {speed:.2f}x | '
                          f'{"-" if name == "plain" else f"{db:.1f}"} |')
                    if name != 'plain' and db >= MIN_AGREEMENT_DB:
                        fastest.setdefault(method, {}).setdefault(name, []).append(speed)
    print()
    for method, speeds in fastest.items():
        ranking = sorted(speeds, key=lambda name: -statistics.mean(speeds[name]))
        mean = ', '.join(f'{name} {statistics.mean(speeds[name]):.2f}x' for name in ranking)
        order = AUTO_ORDER.get(method)
        print(f'{method}: mean speed-up over the sizes at >= {MIN_AGREEMENT_DB:.0f} dB: {mean}; fastest {ranking[0]}; '
              f'd2c-infer --backend auto tries {" then ".join(order)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
