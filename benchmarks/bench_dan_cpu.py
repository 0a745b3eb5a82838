#!/usr/bin/env python
"""DANv2 at CPU scale: a small DAN trained on a few photos, scored on Gaussian8 Set5 x4 (NOT the paper's setting).

1. HR training photos: scikit-image's sample photographs (the demo's, installed with BasicSR).
2. PCA of 30,000 setting-1 kernels (21x21, sigma ~ U(0.2, 4.0)), 10 components.
3. ``d2c-train`` with DANModel: a small DAN (``--num-feat``, 2 groups of 4 blocks, loop 4),
   setting-1 kernels drawn every iteration, ``--iters`` iterations, batch 8, HR crops 96x96.
4. Gaussian8 from ``--set5`` HR x4 (mod-crop, the 8 widths of linspace(1.8, 3.2, 8), 21x21
   isotropic kernels, MATLAB bicubic, 8 bits): Y-PSNR (border 4) of bicubic, of the Restorer fed
   the true kernel's code, and of the full DAN loop; the mean |k_i - k_true| of every iteration.

    python benchmarks/bench_dan_cpu.py --set5 ../shared/data/Set5/HR      # ~10 min on 2 cores
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

import bench_util  # noqa: E402,F401,I001  (puts the repository on sys.path)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import d2c_model  # noqa: E402,F401  (registers DAN, DANModel; applies the compat shim before basicsr)
from basicsr.metrics import calculate_psnr  # noqa: E402
from basicsr.utils import tensor2img  # noqa: E402
from d2c_data import degradations  # noqa: E402
from d2c_inference.checkpoint_util import load_model  # noqa: E402
from d2c_utils.eval_util import bicubic_upscale  # noqa: E402
from scripts.demo import TRAIN_PHOTOS, load_photo  # noqa: E402

EXTRA_PHOTOS = ('chelsea', 'cat', 'coins')


def training_options(root, pca, args):
    return {
        'name': 'bench_dan',
        'model_type': 'DANModel',
        'scale': 4,
        'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {
            'train': {
                'name': 'skimage',
                'type': 'HRImageDataset',
                'dataroot_gt': osp.join(root, 'HR'),
                'io_backend': {
                    'type': 'disk'
                },
                'gt_size': 96,
                'use_hflip': True,
                'use_rot': True,
                'num_worker_per_gpu': 1,
                'batch_size_per_gpu': 8,
                'dataset_enlarge_ratio': 200,
            }
        },
        'network_g': {
            'type': 'DAN',
            'num_feat': args.num_feat,
            'num_group': 2,
            'num_block': 4,
            'upscale': 4,
            'code_length': 10,
            'kernel_size': 21,
            'loop': 4,
            'estimator_feat': 32,
            'estimator_blocks': 5,
            'pca_matrix': pca,
        },
        'path': {
            'pretrain_network_g': None,
            'strict_load_g': True,
            'resume_state': None
        },
        'train': {
            'ema_decay': 0,
            'total_iter': args.iters,
            'warmup_iter': -1,
            'precision': args.precision,
            'degradation': {
                'setting': 1,
                'sigma_range': [0.2, 4.0]
            },
            'optim_g': {
                'type': 'Adam',
                'lr': 4e-4,
                'betas': [0.9, 0.99]
            },
            'optim_e': {
                'lr': 4e-4
            },
            'scheduler': {
                'type': 'MultiStepLR',
                'milestones': [int(args.iters * 0.75)],
                'gamma': 0.5
            },
            'pixel_opt': {
                'type': 'L1Loss'
            },
            'kernel_opt': {
                'type': 'L1Loss'
            },
        },
        'logger': {
            'print_freq': 100,
            'save_checkpoint_freq': args.iters,
            'use_tb_logger': False
        },
    }


def to_tensor(bgr):
    return torch.from_numpy(bgr[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255.).unsqueeze(0).contiguous()


def y_psnr(sr, hr_bgr):
    return calculate_psnr(tensor2img(sr.clamp(0, 1)), hr_bgr, crop_border=4, test_y_channel=True)


@torch.no_grad()
def evaluate(net, set5_dir):
    """Per sigma: mean Y-PSNR of bicubic / Restorer with the true kernel / DAN, and kernel errors per iteration."""
    names = sorted(f for f in os.listdir(set5_dir) if f.lower().endswith(('.png', '.jpg', '.bmp')))
    rows = []
    for sigma in np.linspace(*degradations.GAUSSIAN8_SIGMAS[4], 8):
        kernel = torch.from_numpy(degradations.isotropic_kernel(sigma, 21))
        scores, errors = [], []
        for name in names:
            hr = cv2.imread(osp.join(set5_dir, name))
            hr = hr[:hr.shape[0] // 4 * 4, :hr.shape[1] // 4 * 4]
            lq = degradations.degrade(to_tensor(hr), kernel[None], 4)
            true_code = net.encode(kernel[None])
            restorer_sr = net.restorer(lq, true_code)
            srs, kernels = net(lq, return_all=True)
            bicubic = calculate_psnr(bicubic_upscale(lq, 4), hr, crop_border=4, test_y_channel=True)
            scores.append((bicubic, y_psnr(restorer_sr, hr), y_psnr(srs[-1], hr)))
            errors.append([float((k[0] - kernel).abs().mean()) for k in kernels])
        rows.append((sigma, np.mean(scores, axis=0), np.mean(errors, axis=0)))
    return rows, len(names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--set5', required=True, help='folder of Set5 HR images (../shared/data/Set5/HR here)')
    parser.add_argument('--iters', type=int, default=2000, help='training iterations')
    parser.add_argument('--num-feat', type=int, default=32, help='Restorer width')
    parser.add_argument('--precision', default='auto', choices=['fp32', 'bf16', 'auto'], help='training arithmetic')
    parser.add_argument('--keep', default=None, help='keep the work folder here (default: a temporary one)')
    args = parser.parse_args(argv)
    if not osp.isdir(args.set5):
        parser.error(f'--set5 {args.set5}: not a folder')
    work = args.keep or tempfile.mkdtemp(prefix='bench_dan_')
    os.makedirs(osp.join(work, 'HR'), exist_ok=True)
    for name in TRAIN_PHOTOS + EXTRA_PHOTOS:
        cv2.imwrite(osp.join(work, 'HR', f'{name}.png'), load_photo(name))
    kernels, _ = degradations.sample_kernels(30000, 1, 21, (0.2, 4.0), rng=np.random.default_rng(0))
    matrix, explained = degradations.pca_matrix(kernels, 10)
    pca = osp.join(work, 'pca.pth')
    torch.save({'pca_matrix': matrix}, pca)
    print(
        f'PCA of 30,000 setting-1 kernels: 10 components explain {100 * float(explained.sum()):.3f} % of the '
        'variance',
        flush=True)
    yml = osp.join(work, 'bench_dan.yml')
    with open(yml, 'w') as f:
        yaml.safe_dump(training_options(work, pca, args), f)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.train', '-opt', yml],
                            cwd=work,
                            capture_output=True,
                            text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:] + result.stderr[-3000:])
        return 1
    train_seconds = time.perf_counter() - start
    model = osp.join(work, 'experiments', 'bench_dan', 'models', 'net_g_latest.pth')
    net, _ = load_model(model, yml)
    params = sum(p.numel() for p in net.parameters())
    print(f'Trained DAN (num_feat {args.num_feat}, 2x4 DPCBs, loop 4; {params / 1e6:.2f} M params) for {args.iters} '
          f'iterations in {train_seconds:.0f} s ({args.precision}); {len(TRAIN_PHOTOS + EXTRA_PHOTOS)} scikit-image '
          'photos, setting-1 kernels')
    rows, count = evaluate(net, args.set5)
    print(f'\nGaussian8 Set5 x4 ({count} images per width), Y-PSNR dB (border 4); kernel error = mean |k_i - k_true| '
          'per iteration i:')
    print(f'{"sigma":>6s} {"bicubic":>8s} {"R(true k)":>10s} {"DAN":>7s}   kernel error i=1..4')
    for sigma, (bicubic, restorer, dan), errors in rows:
        print(f'{sigma:6.2f} {bicubic:8.2f} {restorer:10.2f} {dan:7.2f}   ' + ' '.join(f'{e:.2e}' for e in errors))
    means = np.mean([r[1] for r in rows], axis=0)
    errors = np.mean([r[2] for r in rows], axis=0)
    print(f'{"mean":>6s} {means[0]:8.2f} {means[1]:10.2f} {means[2]:7.2f}   ' + ' '.join(f'{e:.2e}' for e in errors))
    print(f'\nwork folder: {work}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
