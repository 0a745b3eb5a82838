#!/usr/bin/env python
"""Training-loader throughput: full-size PNG pairs versus sub-image LMDB.

Prepares an HR/LR folder pair with ``scripts/prepare_data.py`` (generic preset, train
split, sub-images + LMDB) into a temporary folder, then times BasicSR's
``PairedImageDataset`` behind a ``torch.utils.data.DataLoader`` at the paper's patch size
(LR 96x96, i.e. gt_size 384 at x4, batch 4, random crop + flips + rotations) for:

* ``full PNG``:       full-size images from ``train/HR`` and ``train/LR`` (io_backend disk)
* ``sub-image PNG``:  sub-images from ``train/HR_sub`` and ``train/LR_sub`` (disk), for reference
* ``sub-image LMDB``: the same sub-images from ``train/HR.lmdb`` and ``train/LR.lmdb`` (lmdb)

and prints samples per second (median of ``--repeats`` timed runs of ``--batches`` batches,
after ``--warmup`` batches; the configurations take turns), the LMDB / full-PNG ratio, and the
in-process cost of one ``__getitem__`` (read + decode + crop + augment), which is less
sensitive to other load on a shared machine than the loader rate.

The default data are the DRealSR x4 test crops (512x512 HR / 128x128 LR), so the sub-images
use crop 384 (HR) with step 128: 4 sub-images per crop.

Example::

    python benchmarks/bench_loader.py --num-workers 2 --batches 40
"""
import argparse
import os.path as osp
import random
import shutil
import statistics
import sys
import tempfile
import time

import bench_util  # noqa: E402,I001  (puts the repository on sys.path)

import d2c_compat  # noqa: E402  (must run before basicsr is imported)

d2c_compat.apply()
sys.path.insert(0, osp.join(bench_util.REPO_ROOT, 'scripts'))

import prepare_data  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from basicsr.data.paired_image_dataset import PairedImageDataset  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        '--data',
        default=None,
        help=f'folder with HR/ and LR/ holding same-named PNG pairs (default: ${bench_util.DATA_ENV})')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--gt-size', type=int, default=384, help='HR patch size (LR 96 x 4 as in the paper)')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--crop-size', type=int, default=384, help='sub-image size in HR px')
    parser.add_argument('--step', type=int, default=128, help='sub-image stride in HR px')
    parser.add_argument('--num-workers', type=int, default=2, help='DataLoader worker processes')
    parser.add_argument('--batches', type=int, default=40, help='timed batches per run')
    parser.add_argument('--warmup', type=int, default=3, help='untimed batches before each run')
    parser.add_argument('--items', type=int, default=60, help='in-process __getitem__ calls timed per run')
    parser.add_argument('--repeats', type=int, default=3, help='timed runs per configuration (median reported)')
    parser.add_argument('--workdir', help='where to prepare the data (default: a temporary folder, removed after)')
    parser.add_argument('--seed', type=int, default=0)
    return parser.parse_args(argv)


def infinite_batches(loader):
    """Yield batches forever, epoch after epoch."""
    while True:
        yield from loader


def time_loader(gt, lq, backend, args):
    """Time one run: return (loader samples/s, ms per __getitem__ in process, data set length)."""
    opt = dict(
        dataroot_gt=gt,
        dataroot_lq=lq,
        io_backend={'type': backend},
        gt_size=args.gt_size,
        use_hflip=True,
        use_rot=True,
        scale=args.scale,
        phase='train')
    dataset = PairedImageDataset(opt)
    # single-process cost of one __getitem__ (read + decode + crop + augment + to tensor), no loader
    rng = random.Random(args.seed)
    dataset[0]  # opens the file client / LMDB environments
    start = time.perf_counter()
    for _ in range(args.items):
        dataset[rng.randrange(len(dataset))]
    item_ms = (time.perf_counter() - start) / args.items * 1000
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        drop_last=True,
        persistent_workers=args.num_workers > 0)
    batches = infinite_batches(loader)
    for _ in range(args.warmup):  # also hides the worker start-up
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(batches)
        assert batch['gt'].shape[-1] == args.gt_size
    rate = args.batches * args.batch_size / (time.perf_counter() - start)
    del batches, loader  # stop the workers before the next configuration starts its own
    return rate, item_ms, len(dataset)


def main(argv=None):
    args = parse_args(argv)
    args.data = bench_util.photo_pairs_dir(args.data, '--data')
    workdir = args.workdir or tempfile.mkdtemp(prefix='bench_loader_')
    out = osp.join(workdir, 'data')
    try:
        if not osp.isdir(osp.join(out, 'train')):
            code = prepare_data.main([
                '--preset', 'generic', '--split', 'train', '--hr-dir',
                osp.join(args.data, 'HR'), '--lr-dir',
                osp.join(args.data, 'LR'), '--scale',
                str(args.scale), '--output', out, '--crop-size',
                str(args.crop_size), '--step',
                str(args.step), '--lmdb'
            ])
            if code:
                sys.exit(f'error: prepare_data.py failed with exit code {code}')
        train = osp.join(out, 'train')
        configs = [
            ('full PNG', osp.join(train, 'HR'), osp.join(train, 'LR'), 'disk'),
            ('sub-image PNG', osp.join(train, 'HR_sub'), osp.join(train, 'LR_sub'), 'disk'),
            ('sub-image LMDB', osp.join(train, 'HR.lmdb'), osp.join(train, 'LR.lmdb'), 'lmdb'),
        ]
        print(f'\nData: {args.data} prepared into {out} (sub-images: crop {args.crop_size}, step {args.step}); '
              f'gt_size {args.gt_size} (LR {args.gt_size // args.scale}), batch {args.batch_size}, '
              f'num_workers {args.num_workers}, {args.batches} batches x {args.repeats} runs, '
              f'torch threads {torch.get_num_threads()}')
        # Round-robin over the configurations so that load from other processes on this shared
        # machine spreads over all of them instead of biasing one.
        rates = {name: [] for name, *_ in configs}
        item_ms = {name: [] for name, *_ in configs}
        lengths = {}
        torch.manual_seed(args.seed)
        for _ in range(args.repeats):
            for name, gt, lq, backend in configs:
                rate, ms, lengths[name] = time_loader(gt, lq, backend, args)
                rates[name].append(rate)
                item_ms[name].append(ms)
        results = {name: statistics.median(r) for name, r in rates.items()}
        for name, *_ in configs:
            print(
                f'{name:15s} {lengths[name]:5d} items  {results[name]:7.1f} samples/s  (runs: '
                f'{", ".join(f"{r:.1f}" for r in rates[name])});  {statistics.median(item_ms[name]):5.2f} ms '
                'per __getitem__ in process',
                flush=True)
        print(f'ratio sub-image LMDB / full PNG: {results["sub-image LMDB"] / results["full PNG"]:.2f}x')
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
