"""Training speed of D2CModel per precision / memory layout, measured in one process.

    python benchmarks/bench_train.py [--opt options/demo_D2C_x4.yml] [--iters 20] [--rounds 3]

Builds the model of the option file (default: the demo's) once per variant, feeds random
batches of the option file's shape (batch_size_per_gpu, gt_size) and times full training
iterations of each phase (divergence, convergence). Variants run round-robin so machine noise
hits them alike; the median over rounds is reported with the speed-up over plain fp32 NCHW,
BasicSR's default. Prints one line per variant and phase.
"""
import argparse
import statistics
import time
from copy import deepcopy

import bench_util  # noqa: E402,F401,I001  (puts the repository on sys.path)
import torch
import yaml

import d2c_model  # noqa: E402,F401
from basicsr.models import build_model  # noqa: E402

VARIANTS = (('fp32', False), ('fp32', True), ('bf16', False), ('bf16', True))


def build(opt, precision, channels_last, phase):
    opt = deepcopy(opt)
    opt['train'].update(
        precision=precision, channels_last=channels_last, total_iter=10**6, phases=[{
            'name': phase,
            'iters': 10**6
        }])
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = {'pretrain_network_g': None}
    return build_model(opt)


def time_iters(model, batch, iters, start_iter):
    model.feed_data(batch)
    begin = time.perf_counter()
    for it in range(start_iter, start_iter + iters):
        model.update_learning_rate(it)
        model.optimize_parameters(it)
    return (time.perf_counter() - begin) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--opt', default='options/demo_D2C_x4.yml')
    parser.add_argument('--iters', type=int, default=20, help='timed iterations per variant and round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: all cores)')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.opt) as f:
        opt = yaml.safe_load(f)
    train_set = opt['datasets']['train']
    scale, gt_size, batch_size = opt['scale'], train_set['gt_size'], train_set['batch_size_per_gpu']
    gen = torch.Generator().manual_seed(0)
    batch = {
        'lq': torch.rand(batch_size, 3, gt_size // scale, gt_size // scale, generator=gen),
        'gt': torch.rand(batch_size, 3, gt_size, gt_size, generator=gen)
    }
    print(f'{args.opt}: batch {batch_size}, gt_size {gt_size}, x{scale}, {torch.get_num_threads()} threads, '
          f'torch {torch.__version__}')
    for phase in ('divergence', 'convergence'):
        models = {variant: build(opt, *variant, phase) for variant in VARIANTS}
        for model in models.values():  # warm-up: oneDNN picks kernels on the first calls
            time_iters(model, batch, 3, 1)
        times = {variant: [] for variant in VARIANTS}
        for round_index in range(args.rounds):
            for variant, model in models.items():
                times[variant].append(time_iters(model, batch, args.iters, 4 + round_index * args.iters))
        base = statistics.median(times[('fp32', False)])
        for (precision, channels_last), values in times.items():
            sec = statistics.median(values)
            layout = 'channels_last' if channels_last else 'NCHW'
            print(f'{phase:11s} {precision:4s} {layout:13s} {sec * 1000:8.1f} ms/iter {1 / sec:6.2f} it/s '
                  f'speed-up {base / sec:4.2f}x')


if __name__ == '__main__':
    main()
