#!/usr/bin/env python
"""Inference speed of D2C-SR per precision and memory layout, against a plain fp32 forward.

Speed (one process, round-robin so that machine noise hits every configuration alike): the
paper's D2CNet (L=2, C=2, G=2, B=4, F=64, x4; random weights, or ``--model ckpt.pth:opt.yml``)
on smooth random inputs of ``--sizes`` (default 128x128 and 256x256). The baseline is (a) a
plain ``net(x)`` in fp32 with the NCHW layout under ``torch.no_grad()``, what BasicSR does;
against it (b) ``d2c-infer``'s path (``super_resolve`` + ``GuardedForward``, untiled) in each
precision and layout this machine can run. Every configuration is warmed up once, then timed
``--repeats`` times (median). Printed: seconds per image, output megapixels per second, the
speed-up over (a) and the agreement with (a): PSNR of the clamped outputs, peak 1, in dB.

Quality guard (a trained model on a real photo): the demo's model (``make demo`` writes it;
``--guard-model``) on scikit-image's ``chelsea`` photo (451x300 -> 1804x1200, held out from the
demo's training), degraded like the demo's LR images: agreement of the default path with fp32
and both outputs' Y-PSNR against the photo. Skipped with a note when there is no such model.

Memory: the real ``d2c-infer`` (default precision and layout) in a fresh process on a
``--memory-size`` image (default 960x540 -> 3840x2160, a 4K output) with ``--tile``; peak resident
memory is the process's ``VmHWM``; the run fails (exit 1) above ``--memory-limit-gib``.

The last line is ``speedup_vs_naive_fp32=<x> agreement_db=<y>`` for the default path on the
largest ``--sizes`` input.

    python benchmarks/bench_infer.py                 # 2.5 to 3 minutes on 2 cores
    python benchmarks/bench_infer.py --sizes 64x64 --repeats 1 --skip-memory --skip-guard   # quick
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

os.environ.setdefault('KINETO_LOG_LEVEL', '5')  # keep the profiler's start/stop chatter off the table
import bench_util  # noqa: E402,I001  (puts the repository on sys.path)
import d2c_model  # noqa: E402,F401  (registers D2CNet; applies the compat shim before basicsr)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_infer_cpu import cpu_name, measure_memory, paper_net, parse_size, smooth_input  # noqa: E402
from d2c_inference.checkpoint_util import load_model  # noqa: E402
from d2c_utils.eval_util import tensor_psnr  # noqa: E402
from d2c_utils.precision_util import autocast, cpu_has_native_bf16, precision_name, resolve_precision  # noqa: E402
from d2c_utils.summary_util import count_macs  # noqa: E402
from d2c_inference.tile_util import GuardedForward, prepare_network, run_network, super_resolve  # noqa: E402

DEMO_MODEL = 'experiments/demo_D2C_x4/models/net_g_latest.pth:options/demo_D2C_x4.yml'


def configurations(device_type):
    """(label, autocast dtype, channels_last, is_default) of our path that this machine runs."""
    default_dtype = resolve_precision('auto', device_type, purpose='infer')
    dtypes = [None, torch.bfloat16] if device_type == 'cpu' else [None, torch.float16, torch.bfloat16]
    configs = []
    for dtype in dtypes:
        for channels_last in (False, True):
            is_default = dtype == default_dtype and channels_last
            label = f'd2c-infer {precision_name(dtype)} {"channels_last" if channels_last else "NCHW"}'
            configs.append((label + (' (default)' if is_default else ''), dtype, channels_last, is_default))
    return configs


@torch.no_grad()
def plain_forward(net, x):
    """(a): what a plain BasicSR test does: fp32, NCHW, the whole image at once."""
    return net(x)


def measure_speed(net, sizes, repeats, device):
    """Time the baseline and every configuration on every size; returns rows of dicts."""
    nets = {
        False: copy.deepcopy(net).eval().to(device),
        True: prepare_network(copy.deepcopy(net).eval().to(device), True)
    }
    configs = configurations(device.type)
    rows = []
    for width, height in sizes:
        x = smooth_input(width, height).to(device)
        out_mp = width * height * net.upscale**2 / 1e6
        runners = [('plain fp32 NCHW net(x) (baseline)', lambda: plain_forward(nets[False], x), False, None)]
        for label, dtype, channels_last, is_default in configs:
            guard = GuardedForward(dtype, channels_last)
            runners.append((label, lambda g=guard, cl=channels_last: super_resolve(
                nets[cl], x.cpu(), net.upscale, device=device, forward=g)[0], is_default, guard))
        outputs, times = [], [[] for _ in runners]
        for index, (_, run, _, _) in enumerate(runners):  # warm-up; keeps each output for the agreement
            outputs.append(run().float().cpu().clamp(0, 1))
        for _ in range(repeats):
            for index, (_, run, _, _) in enumerate(runners):
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                times[index].append(time.perf_counter() - start)
        base = statistics.median(times[0])
        print(f'\n{width}x{height} -> {width * net.upscale}x{height * net.upscale} '
              f'(median of {repeats} after a warm-up)')
        print(f'  {"path":44s} {"s/img":>8s} {"out MP/s":>9s} {"speed-up":>9s} {"agreement":>10s}')
        for index, (label, _, is_default, guard) in enumerate(runners):
            sec = statistics.median(times[index])
            agreement = tensor_psnr(outputs[index], outputs[0]) if index else float('inf')
            note = f'  [fell back: {guard.fallback_reason}]' if guard is not None and guard.fallback_reason else ''
            agreement_text = 'reference' if index == 0 else f'{agreement:7.1f} dB'
            print(
                f'  {label:44s} {sec:8.3f} {out_mp / sec:9.3f} {base / sec:8.2f}x {agreement_text:>10s}{note}',
                flush=True)
            rows.append(
                dict(
                    size=(width, height),
                    label=label,
                    seconds=sec,
                    mp_per_s=out_mp / sec,
                    speedup=base / sec,
                    agreement_db=agreement,
                    default=is_default))
    return rows


def profile_forward(net, x, dtype, channels_last):
    """One forward under the profiler: seconds spent in convolutions, pixel_shuffle and the rest."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_network(net, x, dtype=dtype, channels_last=channels_last)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    conv = sum(e.self_cpu_time_total for e in events if 'convolution' in e.key) / 1e6
    shuffle = sum(e.self_cpu_time_total for e in events if 'pixel_shuffle' in e.key) / 1e6
    return dict(total=total, conv=conv, shuffle=shuffle, other=total - conv - shuffle)


@torch.no_grad()
def conv_throughput(dtype, channels_last, size=256, repeats=5):
    """GFLOP/s of one 64->64 3x3 convolution on (1, 64, size, size) features: what this CPU can do."""
    conv = prepare_network(torch.nn.Conv2d(64, 64, 3, 1, 1).eval(), channels_last)
    x = torch.rand(1, 64, size, size)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with autocast('cpu', dtype):
        conv(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            times.append(time.perf_counter() - start)
    return 2 * 64 * 64 * 9 * size * size / statistics.median(times) / 1e9


def explain_limits(net, size, baseline_seconds, default_seconds):
    """Print where the default forward's time goes and how fast this CPU's convolutions can be.

    (The plain fp32 NCHW forward is not profiled: under the profiler it runs about twice as long
    as when timed, which would misstate its shares.)
    """
    width, height = size
    x = smooth_input(width, height)
    dtype = resolve_precision('auto', 'cpu', purpose='infer')
    per_pixel, _ = count_macs(net)
    flops = 2 * sum(per_pixel.values()) * width * height * net.upscale**2
    fast = prepare_network(copy.deepcopy(net).eval(), True)
    run_network(fast, x, dtype=dtype, channels_last=True)  # warm-up
    prof = profile_forward(fast, x, dtype, True)
    print(f'\nWhere the time goes ({width}x{height}, one forward of the default path under torch.profiler; '
          f'{flops / 1e9:.0f} GFLOP of convolutions):')
    print(f'  default {precision_name(dtype)} channels_last {prof["total"]:.2f} s: convolutions {prof["conv"]:.2f} s '
          f'({100 * prof["conv"] / prof["total"]:.0f} %, {flops / prof["conv"] / 1e9:.0f} GFLOP/s), pixel_shuffle '
          f'{prof["shuffle"]:.2f} s, other {prof["other"]:.2f} s')
    peaks = {
        name: conv_throughput(dtype_, cl)
        for name, dtype_, cl in (('fp32 NCHW', None, False), ('fp32 channels_last', None, True), ('bf16 channels_last',
                                                                                                  torch.bfloat16, True))
    }
    print('  one 64->64 3x3 convolution on 64x256x256 features alone: ' + ', '.join(f'{name} {value:.0f} GFLOP/s'
                                                                                    for name, value in peaks.items()))
    print(f'  plain fp32 NCHW forward (timed above): {baseline_seconds:.2f} s = {flops / baseline_seconds / 1e9:.0f} '
          'GFLOP/s of convolutions, all its other work included')
    best = flops / (max(peaks.values()) * 1e9)
    print(f'  ceiling: all convolutions at the fastest single-convolution rate and nothing else would take '
          f'{best:.2f} s = {baseline_seconds / best:.2f}x the plain forward; the default path reaches '
          f'{baseline_seconds / default_seconds:.2f}x')


def demo_lr(hr_bgr):
    """The demo's degradation of an HR photo (uint8 BGR) -> LR uint8 BGR, x4."""
    from scripts.demo import degrade  # the same blur/noise/JPEG as the demo's held-out photo
    return degrade(hr_bgr, rng_seed=1000)


def measure_guard(spec, device):
    """Agreement of the default path with fp32 for a trained model on a real photo.

    Two inputs: the held-out photo degraded like the demo's LR (112x75; Y-PSNR against the
    photo too) and the whole photo itself as the input (448x300 -> 1792x1200, the large one).

    Returns:
        float | None: the lowest agreement (dB), None when there is no model.
    """
    pth, yml = spec.split(':', 1)
    if not (osp.isfile(pth) and osp.isfile(yml)):
        print(f'\nQuality guard skipped: no trained model at {pth} (run `make demo`, or pass --guard-model '
              'ckpt.pth:options.yml)')
        return None
    from skimage import data

    from basicsr.metrics import calculate_psnr
    from basicsr.utils import tensor2img
    rgb = data.chelsea()
    hr = cv2.cvtColor(rgb[:rgb.shape[0] // 4 * 4, :rgb.shape[1] // 4 * 4], cv2.COLOR_RGB2BGR)
    net, _ = load_model(pth, yml, device=device)
    default_dtype = resolve_precision('auto', device.type, 'infer')
    print(f'\nQuality guard: trained model {pth}, real photo (scikit-image chelsea, held out from the demo\'s '
          f'training); default path ({precision_name(default_dtype)}, channels_last) against fp32 NCHW')
    worst = float('inf')
    for label, lr, gt in (('demo-degraded LR', demo_lr(hr), hr), ('the photo itself', hr, None)):
        x = torch.from_numpy(lr[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255.).unsqueeze(0)
        outputs = {}
        for name, dtype, channels_last in (('fp32', None, False), ('default', default_dtype, True)):
            prepare_network(net, channels_last)
            guard = GuardedForward(dtype, channels_last)
            begin = time.perf_counter()
            sr = super_resolve(net, x, net.upscale, device=device, forward=guard)[0].clamp(0, 1)
            outputs[name] = (sr, time.perf_counter() - begin, precision_name(guard.dtype))
        (ref, ref_sec, _), (fast, fast_sec, used) = outputs['fp32'], outputs['default']
        agreement = tensor_psnr(fast, ref)
        worst = min(worst, agreement)
        diff8 = ((fast * 255).round() - (ref * 255).round()).abs()
        h, w = lr.shape[:2]
        text = (f'  {label:17s} {w}x{h} -> {w * net.upscale}x{h * net.upscale}: agreement {agreement:5.1f} dB, '
                f'8-bit outputs differ in {100 * float((diff8 > 0).float().mean()):.2f} % of values '
                f'(max {int(diff8.max())}); fp32 {ref_sec:.2f} s, default ran {used} {fast_sec:.2f} s')
        if gt is not None:
            y_ref, y_fast = (
                calculate_psnr(tensor2img(t), gt, crop_border=net.upscale, test_y_channel=True) for t in (ref, fast))
            text += f'; Y-PSNR vs photo fp32 {y_ref:.4f} / default {y_fast:.4f} dB'
        print(text, flush=True)
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        '--sizes',
        type=lambda t: [parse_size(s) for s in t.split(',')],
        default=[(128, 128), (256, 256)],
        metavar='WxH[,WxH]',
        help='speed: input sizes')
    parser.add_argument('--repeats', type=int, default=3, help='speed: timed runs per configuration (median)')
    parser.add_argument(
        '--model',
        default=None,
        metavar='CKPT:YML',
        help='speed: a trained model instead of the paper setting with random weights')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument('--guard-model', default=DEMO_MODEL, metavar='CKPT:YML', help='quality guard: trained model')
    parser.add_argument(
        '--memory-size',
        type=parse_size,
        default=(960, 540),
        metavar='WxH',
        help='memory: input size of the tiled d2c-infer run')
    parser.add_argument('--tile', type=int, default=128, help='memory: tile side (LR px)')
    parser.add_argument('--tile-pad', type=int, default=32, help='memory: context around each tile (LR px)')
    parser.add_argument('--memory-limit-gib', type=float, default=3.0, help='memory: fail above this peak RSS')
    parser.add_argument('--skip-guard', action='store_true')
    parser.add_argument(
        '--skip-profile', action='store_true', help='skip the profile of where the time goes (CPU only)')
    parser.add_argument('--skip-memory', action='store_true')
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error('--repeats must be >= 1')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available here')
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ['OMP_NUM_THREADS'] = str(args.threads)  # for the d2c-infer subprocess
    device = torch.device(args.device)
    os.chdir(bench_util.REPO_ROOT)  # the default model paths are relative to the repository

    print(f'Machine: {cpu_name()}, {os.cpu_count()} logical CPUs, native bf16: {cpu_has_native_bf16()}, '
          f'torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}')
    if args.model:
        pth, yml = args.model.split(':', 1)
        net, _ = load_model(pth, yml)
        print(f'Model: {pth} (options {yml})')
    else:
        net = paper_net()
        print('Model: D2CNet paper setting (L=2, C=2, G=2, B=4, F=64, x4), random weights, '
              f'{sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params')
    start = time.perf_counter()
    rows = measure_speed(net, args.sizes, args.repeats, device)
    largest = max(args.sizes, key=lambda s: s[0] * s[1])
    if not args.skip_profile and device.type == 'cpu':
        baseline = [r for r in rows if r['size'] == largest][0]['seconds']
        default = [r for r in rows if r['size'] == largest and r['default']][0]['seconds']
        explain_limits(net, largest, baseline, default)
    del net
    if not args.skip_guard:
        measure_guard(args.guard_model, device)
    status = 0
    if not args.skip_memory:
        print(
            '\nPeak resident memory of d2c-infer (default precision and layout) in a fresh process (VmHWM):',
            flush=True)
        args.memory_untiled, args.precision, args.channels_last = False, 'auto', True  # d2c-infer's defaults
        with tempfile.TemporaryDirectory(prefix='bench_infer_') as workdir:
            memory = measure_memory(args, workdir)
        peak_gib = memory[-1][1] / 1024
        verdict = 'within' if peak_gib < args.memory_limit_gib else 'OVER'
        print(f'  {peak_gib:.2f} GiB: {verdict} the {args.memory_limit_gib:g} GiB limit')
        status = 0 if peak_gib < args.memory_limit_gib else 1
    print(f'\nTotal {time.perf_counter() - start:.0f} s')
    final = [r for r in rows if r['default'] and r['size'] == largest][0]
    print(f'speedup_vs_naive_fp32={final["speedup"]:.2f} agreement_db={final["agreement_db"]:.1f}')
    return status


if __name__ == '__main__':
    sys.exit(main())
