#!/usr/bin/env python
"""CPU-scale check of the paper's Table 3: the D2C structure on other networks.

    python benchmarks/bench_table3_cpu.py --data /path/to/DRealSR_x4_test_crops [--iters 1000]
        [--backbones msrresnet imdn] [--work results/bench_table3] [--seed 0]

D2C-SR's Table 3 claims that applying the D2C structure to other networks (SRResNet, IMDN, ...)
gives better PSNR with fewer parameters. For each backbone this benchmark

1. writes the original network's BasicSR option file (``SRModel``, ``PairedImageDataset`` on the
   training split, L1 loss, Adam) as users do, and makes its D2C counterpart with the project's
   swap library (``d2c_convert.swap_util.swap_options``, what ``d2c-swap`` runs): D2CNet sized to at
   most the original's parameters, 90% divergence / 10% convergence of the same ``total_iter``;
2. trains both with ``d2c_tools.train`` (BasicSR's training loop, CPU) for ``--iters`` iterations;
3. super-resolves every held-out LR image whole and scores, on the Y channel with a 4-pixel
   border shaved (``psnr_ssim_y``): bicubic, the original, the D2C fused output, every D2C
   branch (the best one is reported) and the D2C oracle (per-pixel best branch).

Data: real camera LR/HR pairs (HR/ and LR/ folders of same-named x4 PNGs, e.g. the DRealSR x4
test crops; ``--data`` or ``$D2C_SR_DATA``). The pairs are sorted by file name and every
``--holdout-every``-th one (the 5th, 10th, ...) is held out for testing; the rest are linked into
``<work>/data/train`` for training. Nothing is copied into the repository: option files,
experiments (``<work>/experiments/<name>``), ``table3.json`` and ``table3.md`` go to ``--work``.

This is a CPU-scale experiment: small networks (``--msrresnet`` / ``--imdn`` F,B) and a few
hundred iterations, far from the paper's training; read the numbers as a trend, not as a
reproduction of the paper's values.
"""
import argparse
import json
import logging
import os
import os.path as osp
import shutil
import sys
import time

import bench_util  # noqa: E402,I001  (puts the repository on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import d2c_model  # noqa: E402,F401  (registers D2CNet, IMDN, the losses and D2CModel; applies the compat shim)
from basicsr.utils import img2tensor, tensor2img  # noqa: E402
from basicsr.utils import logger as basicsr_logger  # noqa: E402
from basicsr.utils.registry import ARCH_REGISTRY  # noqa: E402
from d2c_convert.swap_util import swap_options  # noqa: E402
from d2c_inference.checkpoint_util import load_checkpoint, load_model, select_state_dict  # noqa: E402
from d2c_tools import train as d2c_train  # noqa: E402
from d2c_utils.errors import UserError  # noqa: E402
from d2c_utils.eval_util import bicubic_upscale, oracle_fusion, psnr_ssim_y  # noqa: E402
from d2c_utils.img_util import read_image  # noqa: E402

SCALE = 4
# backbone flag -> (BasicSR arch type, label as in the paper's Table 3)
BACKBONES = {'msrresnet': ('MSRResNet', 'SRResNet'), 'imdn': ('IMDN', 'IMDN')}
DEFAULT_ITERS = 1000

ORIGINAL_OPT = """\
# {label} (original network) for bench_table3_cpu.py; its D2C counterpart is made from this file
# by d2c_convert.swap_util.swap_options (what d2c-swap runs).
name: {name}
model_type: SRModel
scale: {scale}
num_gpu: 0
manual_seed: {seed}

datasets:
  train:
    name: table3_train
    type: PairedImageDataset
    dataroot_gt: {train_hr}
    dataroot_lq: {train_lr}
    io_backend:
      type: disk
    gt_size: {gt_size}
    use_hflip: true
    use_rot: true
    num_worker_per_gpu: 0
    batch_size_per_gpu: {batch}
    dataset_enlarge_ratio: 100

network_g:
  type: {arch}
  num_in_ch: 3
  num_out_ch: 3
  num_feat: {num_feat}
  num_block: {num_block}
  upscale: {scale}

path:
  pretrain_network_g: ~
  strict_load_g: true
  resume_state: ~

train:
  ema_decay: 0
  optim_g:
    type: Adam
    lr: !!float {lr}
    weight_decay: 0
    betas: [0.9, 0.99]
  scheduler:
    type: MultiStepLR
    milestones: [{milestone}]
    gamma: 0.5
  total_iter: {iters}
  warmup_iter: -1
  pixel_opt:
    type: L1Loss
    loss_weight: 1.0
    reduction: mean

logger:
  print_freq: {print_freq}
  save_checkpoint_freq: !!float 1e9
  use_tb_logger: false
  wandb:
    project: ~
    resume_id: ~
"""


def parse_size(text):
    try:
        num_feat, num_block = (int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: give F,B (num_feat,num_block), e.g. 32,8') from None
    return num_feat, num_block


def split_pairs(data, every):
    """Sorted same-named HR/LR pairs -> (train names, test names); every ``every``-th is held out."""
    hr_names = sorted(f for f in os.listdir(osp.join(data, 'HR')) if not f.startswith('.'))
    names = [f for f in hr_names if osp.isfile(osp.join(data, 'LR', f))]
    if len(names) < every:
        sys.exit(f'error: {data} has {len(names)} same-named HR/LR pairs; need at least {every}')
    test = [name for i, name in enumerate(names) if i % every == every - 1]
    train = [name for i, name in enumerate(names) if i % every != every - 1]
    return train, test


def link_train_split(data, names, root):
    """``root/{HR,LR}`` with a symbolic link per training pair (rebuilt every run)."""
    for sub in ('HR', 'LR'):
        folder = osp.join(root, sub)
        if osp.isdir(folder):
            shutil.rmtree(folder)
        os.makedirs(folder)
        for name in names:
            os.symlink(osp.abspath(osp.join(data, sub, name)), osp.join(folder, name))
    return osp.abspath(osp.join(root, 'HR')), osp.abspath(osp.join(root, 'LR'))


def train(opt_path, name, work):
    """Run ``d2c_tools.train`` on ``opt_path`` with experiments under ``work``; returns (checkpoint, seconds)."""
    exp_dir = osp.join(work, 'experiments', name)
    if osp.isdir(exp_dir):  # a previous run of the same configuration; BasicSR would archive it
        shutil.rmtree(exp_dir)
    # BasicSR sets its logger up once per process; forget it so that this run logs to its own folder
    root_logger = logging.getLogger('basicsr')
    for handler in list(root_logger.handlers):
        root_logger.removeHandler(handler)
        handler.close()
    basicsr_logger.initialized_logger.pop('basicsr', None)
    cwd = os.getcwd()
    os.chdir(work)
    start = time.time()
    try:
        d2c_train.main(['-opt', osp.abspath(opt_path)])
    finally:
        os.chdir(cwd)
    seconds = time.time() - start
    ckpt = osp.join(exp_dir, 'models', 'net_g_latest.pth')
    if not osp.isfile(ckpt):
        sys.exit(f'error: training {name} wrote no {ckpt}')
    return ckpt, seconds


def load_original(ckpt, arch, net_opt):
    net = ARCH_REGISTRY.get(arch)(**{k: v for k, v in net_opt.items() if k != 'type'})
    state, _ = select_state_dict(load_checkpoint(ckpt), ckpt, param_key='params')
    net.load_state_dict(state, strict=True)
    return net.eval()


def to_tensor(img):
    return img2tensor(img.astype(np.float32) / 255., bgr2rgb=True, float32=True).unsqueeze(0)


@torch.no_grad()
def evaluate(original, d2c, data, names):
    """Mean (PSNR, SSIM) per output over the held-out pairs, and per-image PSNRs."""
    scores = {}

    def add(label, img, hr):
        scores.setdefault(label, []).append(psnr_ssim_y(img, hr, crop_border=SCALE))

    for index, name in enumerate(names):
        hr = read_image(osp.join(data, 'HR', name))
        lr = read_image(osp.join(data, 'LR', name))
        lq, gt = to_tensor(lr), to_tensor(hr)
        add('bicubic', bicubic_upscale(lq, SCALE), hr)
        add('original', tensor2img([original(lq).clamp(0, 1)]), hr)
        sr, branches, _ = d2c(lq, return_branches=True)
        add('d2c_fused', tensor2img([sr.clamp(0, 1)]), hr)
        for i in range(branches.size(1)):
            add(f'branch{i + 1}', tensor2img([branches[:, i].clamp(0, 1)]), hr)
        add('oracle', tensor2img([oracle_fusion(branches, gt)]), hr)
        print(
            f'  {index + 1}/{len(names)} {name}: bicubic {scores["bicubic"][-1][0]:.2f}, original '
            f'{scores["original"][-1][0]:.2f}, D2C {scores["d2c_fused"][-1][0]:.2f} dB',
            flush=True)
    means = {
        label: [float(np.mean([s[0] for s in values])),
                float(np.mean([s[1] for s in values]))]
        for label, values in scores.items()
    }
    per_image = {label: [round(float(s[0]), 3) for s in values] for label, values in scores.items()}
    return means, per_image


def run_backbone(key, size, args, train_dirs, test_names):
    arch, label = BACKBONES[key]
    num_feat, num_block = size
    name = f'table3_{arch}_f{num_feat}b{num_block}_i{args.iters}_s{args.seed}'
    text = ORIGINAL_OPT.format(
        label=label,
        name=name,
        scale=SCALE,
        seed=args.seed,
        train_hr=train_dirs[0],
        train_lr=train_dirs[1],
        gt_size=args.gt_size,
        batch=args.batch,
        arch=arch,
        num_feat=num_feat,
        num_block=num_block,
        lr=args.lr,
        milestone=max(1, args.iters // 2),
        iters=args.iters,
        print_freq=max(1, args.iters // 10))
    opt_dir = osp.join(args.work, 'options')
    os.makedirs(opt_dir, exist_ok=True)
    opt_path = osp.join(opt_dir, f'{name}.yml')
    with open(opt_path, 'w') as f:
        f.write(text)
    try:
        swapped = swap_options(text, opt_path)
    except UserError as err:
        sys.exit(f'error: {label} F={num_feat} B={num_block}: {err}')
    d2c_opt = yaml.safe_load(swapped.text)
    d2c_path = osp.join(opt_dir, f'{d2c_opt["name"]}.yml')
    with open(d2c_path, 'w') as f:
        f.write(swapped.text)
    net = swapped.network
    print(
        f'\n=== {label}: {arch} F={num_feat} B={num_block} ({swapped.original_params:,} parameters) vs D2C-{label}: '
        f'D2CNet {net["tree_depth"]}x{net["tree_width"]} tree, F={net["num_feat"]}, {net["num_block"]} blocks per '
        f'node ({swapped.params:,} parameters); options in {opt_dir}/',
        flush=True)
    for notice in swapped.notices:
        print(f'  note: {notice}')

    print(f'--- training {label} (original) for {args.iters} iterations ...', flush=True)
    ckpt, original_seconds = train(opt_path, name, args.work)
    phases = ' + '.join(f'{phase["name"]} {phase["iters"]}' for phase in d2c_opt['train']['phases'])
    print(f'--- training D2C-{label} for {args.iters} iterations ({phases}) ...', flush=True)
    d2c_ckpt, d2c_seconds = train(d2c_path, d2c_opt['name'], args.work)

    print(f'--- scoring {len(test_names)} held-out pairs ...', flush=True)
    original = load_original(ckpt, arch, yaml.safe_load(text)['network_g'])
    d2c, _ = load_model(d2c_ckpt, d2c_path, param_key='params')
    means, per_image = evaluate(original, d2c, args.data, test_names)
    branches = sorted(k for k in means if k.startswith('branch'))
    best = max(branches, key=lambda k: means[k][0])
    return {
        'backbone': label,
        'arch': arch,
        'original_network': yaml.safe_load(text)['network_g'],
        'd2c_network': dict(net, type='D2CNet'),
        'params_original': swapped.original_params,
        'params_d2c': swapped.params,
        'train_seconds_original': round(original_seconds, 1),
        'train_seconds_d2c': round(d2c_seconds, 1),
        'phases': d2c_opt['train']['phases'],
        'option_files': [opt_path, d2c_path],
        'checkpoints': [ckpt, d2c_ckpt],
        'metrics': means,
        'best_branch': best,
        'per_image_psnr': per_image,
    }


def fmt(score):
    return f'{score[0]:.2f}/{score[1]:.4f}'


def table(rows):
    header = [
        'backbone', 'params orig', 'params D2C', 'bicubic', 'original', 'D2C fused', 'best branch', 'oracle',
        'train orig', 'train D2C'
    ]
    lines = [header]
    for row in rows:
        m, best = row['metrics'], row['best_branch']
        lines.append([
            row['backbone'], f'{row["params_original"]:,}', f'{row["params_d2c"]:,}',
            fmt(m['bicubic']),
            fmt(m['original']),
            fmt(m['d2c_fused']), f'{fmt(m[best])} ({best[len("branch"):]})',
            fmt(m['oracle']), f'{row["train_seconds_original"]:.0f} s', f'{row["train_seconds_d2c"]:.0f} s'
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = '\n'.join('  '.join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
    rows_md = ['| ' + ' | '.join(line) + ' |' for line in lines]
    markdown = '\n'.join([rows_md[0], '|' + '|'.join('---' for _ in header) + '|'] + rows_md[1:])
    return text, markdown


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help=f'folder with HR/ and LR/ x4 PNG pairs (default: ${bench_util.DATA_ENV})')
    parser.add_argument('--work', default='results/bench_table3', help='where everything is written (%(default)s)')
    parser.add_argument(
        '--iters',
        type=int,
        default=DEFAULT_ITERS,
        help='training iterations of every network, original and D2C alike (default: %(default)s, about 25 '
        'minutes for both backbones on 2 CPU cores)')
    parser.add_argument(
        '--backbones', nargs='+', choices=sorted(BACKBONES), default=list(BACKBONES), help='default: all')
    parser.add_argument('--seed', type=int, default=0, help='manual_seed of every training (default: %(default)s)')
    parser.add_argument(
        '--msrresnet', type=parse_size, default=(32, 8), metavar='F,B', help='original MSRResNet size (default: 32,8)')
    parser.add_argument(
        '--imdn',
        type=parse_size,
        default=(32, 6),
        metavar='F,B',
        help='original IMDN size (default: 32,6; 32,4 has no D2C counterpart within its parameters)')
    parser.add_argument('--gt-size', type=int, default=128, help='HR training patch (default: %(default)s)')
    parser.add_argument('--batch', type=int, default=8, help='training batch size (default: %(default)s)')
    parser.add_argument(
        '--lr',
        type=float,
        default=5e-4,
        help='Adam learning rate, halved at half of --iters '
        '(default: %(default)s; high because the runs are short)')
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads (default: %(default)s: on a shared 2-core machine, 2 OpenMP threads made an '
        'iteration of the D2C networks, which run many small operations, 5-50 times slower than 1 thread)')
    parser.add_argument(
        '--holdout-every', type=int, default=5, help='hold out every N-th pair by sorted name (default: %(default)s)')
    args = parser.parse_args(argv)
    if args.iters < 10:
        parser.error('--iters must be at least 10 (the convergence phase is 10%% of it)')
    if args.threads < 1:
        parser.error('--threads must be at least 1')
    if args.holdout_every < 2:
        parser.error('--holdout-every must be at least 2')
    args.data = osp.abspath(bench_util.photo_pairs_dir(args.data, '--data'))
    args.work = osp.abspath(args.work)
    torch.set_num_threads(args.threads)
    start = time.time()

    train_names, test_names = split_pairs(args.data, args.holdout_every)
    train_dirs = link_train_split(args.data, train_names, osp.join(args.work, 'data', 'train'))
    split = (f'{len(train_names) + len(test_names)} pairs sorted by name: every {args.holdout_every}th '
             f'(index % {args.holdout_every} == {args.holdout_every - 1}) held out -> {len(train_names)} train, '
             f'{len(test_names)} test')
    print(f'Data {args.data}: {split}; {torch.get_num_threads()} threads, torch {torch.__version__}', flush=True)
    print(f'Test pairs: {", ".join(test_names)}', flush=True)

    sizes = {'msrresnet': args.msrresnet, 'imdn': args.imdn}
    rows = [run_backbone(key, sizes[key], args, train_dirs, test_names) for key in args.backbones]

    text, markdown = table(rows)
    total = time.time() - start
    caption = (f'Held-out {len(test_names)} pairs of {args.data} (x{SCALE}, whole LR images), Y-channel PSNR/SSIM '
               f'with a {SCALE}-pixel border shaved; every network trained {args.iters} iterations (batch '
               f'{args.batch}, HR patch {args.gt_size}, Adam lr {args.lr:g}, L1; D2C: 90% divergence / 10% '
               f'convergence) on CPU (torch threads: {torch.get_num_threads()}), seed {args.seed}. Split: {split}. '
               '"best branch" is the D2C branch with the highest mean PSNR (its number in brackets); "oracle" takes '
               'every pixel from the branch closest to HR.')
    os.makedirs(args.work, exist_ok=True)
    result = {
        'caption': caption,
        'data': args.data,
        'split': {
            'rule': split,
            'train': train_names,
            'test': test_names
        },
        'iters': args.iters,
        'seed': args.seed,
        'gt_size': args.gt_size,
        'batch': args.batch,
        'lr': args.lr,
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'total_seconds': round(total, 1),
        'rows': rows,
    }
    json_path, md_path = osp.join(args.work, 'table3.json'), osp.join(args.work, 'table3.md')
    with open(json_path, 'w') as f:
        json.dump(result, f, indent=2)
    with open(md_path, 'w') as f:
        f.write(f'# D2C structure on other networks (paper Table 3), CPU scale\n\n{markdown}\n\n{caption}\n')
    print(f'\n{caption}\n\n{text}\n\nWritten {json_path} and {md_path}. Total time {total:.0f} s.')
    return result


if __name__ == '__main__':
    main()
