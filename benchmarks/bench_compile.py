"""``torch.compile`` against eager: one training step of every method, and D2CNet inference, in one run.

    python benchmarks/bench_compile.py [--iters 10] [--rounds 3] [--methods d2c-divergence,dan,...]
        [--mode default] [--backend inductor]

Builds each model twice from the same options (``train.compile: false`` and ``true``), feeds
both the same random batch and times full optimiser steps (forward, losses, backward, step);
the first compiled step (which compiles) is timed on its own. Eager and compiled models run
round-robin so machine noise hits them alike; the median over rounds is reported, with the
compiled/eager speed ratio (> 1: compile is faster). Networks are CPU-scale versions of the
option files (the demo's D2CNet; DAN and SDFlow narrowed, printed on every line): a CPU run of
the full-size networks takes hours to compile and time. Inference: D2CNet's forward on a
128x128 LR image, eager vs ``torch.compile`` (what ``d2c-infer --compile`` does).

Prints one line per method. Name the CPU (``lscpu``) beside the numbers you report.
"""
import argparse
import os
import statistics
import tempfile
import time
from copy import deepcopy

import bench_util  # noqa: E402,F401,I001  (puts the repository on sys.path)
import torch
import yaml

import d2c_model  # noqa: E402,F401
from basicsr.models import build_model  # noqa: E402
from d2c_inference.checkpoint_util import build_network  # noqa: E402
from d2c_utils.compile_util import CompiledCall, compile_options  # noqa: E402

METHODS = ('d2c-divergence', 'd2c-convergence', 'd2c-joint', 'dan', 'sdflow')


def d2c_opt(phase):
    with open(os.path.join(bench_util.REPO_ROOT, 'options', 'demo_D2C_x4.yml')) as f:
        opt = yaml.safe_load(f)
    opt['train'].update(total_iter=10**6, phases=[{'name': phase, 'iters': 10**6}])
    opt['train'].pop('alpha_schedule', None)
    return opt, (8, 96)


def dan_opt(pca_path):
    with open(os.path.join(bench_util.REPO_ROOT, 'options', 'dan', 'train_DANv2_setting1_x4.yml')) as f:
        opt = yaml.safe_load(f)
    opt['network_g'].update(
        num_feat=32, num_group=2, num_block=2, estimator_feat=32, estimator_blocks=2, pca_matrix=pca_path)
    opt['train'].update(total_iter=10**6)
    return opt, (4, 96)


def sdflow_opt():
    with open(os.path.join(bench_util.REPO_ROOT, 'options', 'sdflow', 'train_SDFlow_x4.yml')) as f:
        opt = yaml.safe_load(f)
    opt['network_g'].update(
        num_feat=16,
        hidden_channels=16,
        flow_steps=4,
        hf_steps=2,
        hf_blocks=2,
        deg_steps=2,
        deg_blocks=1,
        encoder_blocks=2,
        encoder_mod_convs=2)
    opt['train'].update(total_iter=10**6)
    return opt, (4, 64)


def build(opt, compile_opt):
    opt = deepcopy(opt)
    opt['train']['compile'] = compile_opt
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = {'pretrain_network_g': None}
    opt.setdefault('logger', {})
    return build_model(opt)


def make_batch(opt, size):
    batch, gt_size = size
    gen = torch.Generator().manual_seed(0)
    scale = opt['scale']
    data = {'gt': torch.rand(batch, 3, gt_size, gt_size, generator=gen)}
    if opt['model_type'] != 'DANModel':  # DAN makes its LR batch from the HR one
        data['lq'] = torch.rand(batch, 3, gt_size // scale, gt_size // scale, generator=gen)
    return data


def time_steps(model, batch, iters, start_iter):
    begin = time.perf_counter()
    for it in range(start_iter, start_iter + iters):
        model.update_learning_rate(it)
        model.feed_data(batch)
        model.optimize_parameters(it)
    return (time.perf_counter() - begin) / iters


def bench_training(name, opt, size, args):
    compile_opt = {'mode': args.mode, 'backend': args.backend} if args.mode else {'backend': args.backend}
    torch._dynamo.reset()  # each method compiles from scratch
    torch.manual_seed(0)
    eager = build(opt, False)
    torch.manual_seed(0)
    compiled = build(opt, compile_opt)
    batch = make_batch(opt, size)
    time_steps(eager, batch, 2, 1)  # warm-up: oneDNN picks kernels on the first calls
    begin = time.perf_counter()
    time_steps(compiled, batch, 1, 1)
    compile_s = time.perf_counter() - begin
    time_steps(compiled, batch, 1, 2)  # the backward graph may compile lazily at its first use
    times = {'eager': [], 'compiled': []}
    it = 3
    for _ in range(args.rounds):
        times['eager'].append(time_steps(eager, batch, args.iters, it))
        times['compiled'].append(time_steps(compiled, batch, args.iters, it))
        it += args.iters
    fell_back = any(call.compiled is None for _, call in compiled._compiled.values())
    report(name, f'batch {size[0]}, HR {size[1]}px', times, compile_s, fell_back)


def bench_inference(args):
    with open(os.path.join(bench_util.REPO_ROOT, 'options', 'demo_D2C_x4.yml')) as f:
        net_opt = yaml.safe_load(f)['network_g']
    torch.manual_seed(0)
    net = build_network(net_opt, 'demo_D2C_x4.yml').eval()
    options = compile_options({'mode': args.mode, 'backend': args.backend} if args.mode else {'backend': args.backend})
    torch._dynamo.reset()
    compiled = CompiledCall(net, options, warn=print, name='D2CNet')
    lq = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(lq)
        begin = time.perf_counter()
        out_c = compiled(lq)
        compile_s = time.perf_counter() - begin
        diff = (out_c - net(lq)).abs().max().item()
        times = {'eager': [], 'compiled': []}
        for _ in range(args.rounds):
            for key, fn in (('eager', net), ('compiled', compiled)):
                begin = time.perf_counter()
                for _ in range(args.iters):
                    fn(lq)
                times[key].append((time.perf_counter() - begin) / args.iters)
    report('d2c-infer', f'1x128x128 LR, max |compiled - eager| {diff:.1e}', times, compile_s, compiled.compiled is None)


def report(name, what, times, compile_s, fell_back):
    eager, comp = statistics.median(times['eager']), statistics.median(times['compiled'])
    note = ' (FELL BACK TO EAGER)' if fell_back else ''
    print(
        f'{name:16s} eager {eager * 1000:8.1f} ms  compiled {comp * 1000:8.1f} ms  ratio {eager / comp:4.2f}x  '
        f'first compiled step {compile_s:6.1f} s  [{what}]{note}',
        flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=10, help='timed steps per model and round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--methods', default=','.join(METHODS + ('infer', )), help='comma-separated subset')
    parser.add_argument('--mode', default=None, help='torch.compile mode (default: torch\'s)')
    parser.add_argument('--backend', default='inductor', help='torch.compile backend (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: all cores)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(',')
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, mode '
        f'{args.mode or "default"}; {args.iters} steps x {args.rounds} rounds, medians',
        flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            if name.startswith('d2c-') and name != 'd2c-infer':
                bench_training(name, *d2c_opt(name[len('d2c-'):]), args)
            elif name == 'dan':
                pca = os.path.join(tmp, 'pca.pth')
                q, _ = torch.linalg.qr(torch.randn(21 * 21, 10, generator=torch.Generator().manual_seed(0)))
                torch.save({'pca_matrix': q.contiguous()}, pca)
                bench_training(name, *dan_opt(pca), args)
            elif name == 'sdflow':
                bench_training(name, *sdflow_opt(), args)
            elif name == 'infer':
                bench_inference(args)
            else:
                parser.error(f'unknown method {name!r}; use {", ".join(METHODS + ("infer", ))}')


if __name__ == '__main__':
    main()
