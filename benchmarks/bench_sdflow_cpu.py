"""CPU-scale evidence for SDFlow: unpaired training on real photos, downscaling, and D2C trained on its pairs.

NOT the paper's setting (a 2 M-parameter SDFlow, a few thousand iterations, 40 + 39 photos):
it shows that the pieces work together on real data, not the paper's numbers.

    python benchmarks/bench_sdflow_cpu.py --data ../shared/data/DRealSR_x4_test_crops     # ~25 min on 2 cores

The 93 DRealSR x4 pairs (HR 512, LR 128, real camera degradation) are split by sorted name:
every 7th pair is held out (14 pairs, never seen in training); of the rest, alternate pairs give
the LR source (their LR images only, 40) and the HR source (their HR images only, 39). Then:

1. SDFlow (small) is trained unpaired on those LR and HR images (``d2c_tools.train``).
2. (a) The held-out HR images are downscaled by SDFlow (temperature 0.8 and 0) and by bicubic
   (MATLAB-style, BasicSR's ``imresize``) and compared with their real LR: Y-PSNR/SSIM, the colour
   shift (mean |per-channel mean difference| in 8-bit levels) and the noise level (std of the
   Y high-pass residual, image minus Gaussian blur sigma 1) against the real LR's.
3. (b) The HR-source images become LR/HR pairs twice, with SDFlow's downscaler
   (``scripts/make_sdflow_pairs.py``) and with bicubic; the demo-size D2C is trained on each
   (``options/demo_D2C_x4.yml``, iterations x ``--d2c-iters-scale``) and scored on the held-out real pairs.
4. A picture of SR samples and LR samples (``--figure``).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from os import path as osp

import bench_util  # noqa: F401  (puts the repository on sys.path)
import cv2
import numpy as np
import torch
import yaml

import d2c_model  # noqa: F401,E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402
from d2c_inference.checkpoint_util import load_model  # noqa: E402
from d2c_utils.eval_util import psnr_ssim_y  # noqa: E402
from d2c_utils.visual_util import labelled_grid  # noqa: E402

REPO = bench_util.REPO_ROOT
SMALL = dict(
    num_feat=32,
    hidden_channels=32,
    flow_steps=4,
    hf_steps=4,
    hf_blocks=2,
    deg_steps=4,
    deg_blocks=1,
    encoder_blocks=4,
    encoder_mod_convs=2,
    mixture_components=16)


def split(names):
    held = names[::7]
    rest = [n for n in names if n not in held]
    return held, rest[0::2], rest[1::2]


def link(src_dir, names, dst_dir):
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        os.symlink(osp.abspath(osp.join(src_dir, name)), osp.join(dst_dir, name))
    return dst_dir


def train(opt, work):
    yml = osp.join(work, f'{opt["name"]}.yml')
    with open(yml, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    start = time.time()
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.train', '-opt', yml],
                            cwd=work,
                            capture_output=True,
                            text=True)
    if result.returncode:
        sys.exit(f'training {opt["name"]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return osp.join(work, 'experiments', opt['name'], 'models', 'net_g_latest.pth'), time.time() - start


def sdflow_options(work, iters):
    return {
        'name': 'bench_sdflow', 'model_type': 'SDFlowModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {
            'name': 'unpaired', 'type': 'UnpairedImageDataset', 'dataroot_lq': osp.join(work, 'lr_src'),
            'dataroot_gt': osp.join(work, 'hr_src'), 'io_backend': {'type': 'disk'}, 'gt_size': 64,
            'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0, 'batch_size_per_gpu': 8,
            'dataset_enlarge_ratio': 100}},
        'network_g': dict(SMALL, type='SDFlow'),
        'network_d': {'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 32},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'optim_g': {'type': 'Adam', 'lr': 5e-4, 'betas': [0.9, 0.99]},
            'optim_d': {'type': 'Adam', 'lr': 5e-5, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [iters * 3 // 4], 'gamma': 0.5},
            'total_iter': iters, 'warmup_iter': -1, 'grad_clip': 1.0, 'nonfinite': 'skip',
            'nll_hr_weight': 1.0, 'nll_lr_weight': 1.0,
            'content_opt': {'type': 'L1Loss', 'loss_weight': 0.5},
            'fidelity_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
            'cycle_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
            'gan_opt': {'type': 'GANLoss', 'gan_type': 'lsgan', 'loss_weight': 0.05}},
        'logger': {'print_freq': 100, 'save_checkpoint_freq': 500, 'use_tb_logger': False},
    }  # yapf: disable


def read(path):
    return cv2.imread(path, cv2.IMREAD_COLOR)


def to_tensor(img):
    return torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float().div(255)[None]


def to_img(tensor):
    return (tensor[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8)


def noise_level(img):
    y = cv2.cvtColor(img, cv2.COLOR_BGR2YCrCb)[..., 0].astype(np.float64)
    return float((y - cv2.GaussianBlur(y, (0, 0), 1.0)).std())


def bicubic_down(hr):
    return np.clip(imresize(hr.astype(np.float64) / 255., 0.25) * 255, 0, 255).round().astype(np.uint8)


@torch.no_grad()
def downscaling_scores(net, data, held):
    rows = {'SDFlow t=0.8': [], 'SDFlow t=0': [], 'bicubic': []}
    real_noise = []
    for name in held:
        hr, real = read(osp.join(data, 'HR', name)), read(osp.join(data, 'LR', name))
        real_noise.append(noise_level(real))
        outs = {
            'SDFlow t=0.8': to_img(net.downscale(to_tensor(hr), 0.8,
                                                 torch.Generator().manual_seed(0))),
            'SDFlow t=0': to_img(net.downscale(to_tensor(hr), 0.0,
                                               torch.Generator().manual_seed(0))),
            'bicubic': bicubic_down(hr),
        }
        for label, out in outs.items():
            psnr, ssim = psnr_ssim_y(out, real, crop_border=0)
            colour = float(np.abs(out.reshape(-1, 3).mean(0) - real.reshape(-1, 3).mean(0)).mean())
            rows[label].append((psnr, ssim, colour, noise_level(out)))
    table = {label: tuple(float(np.mean([r[i] for r in vals])) for i in range(4)) for label, vals in rows.items()}
    return table, float(np.mean(real_noise))


@torch.no_grad()
def sr_scores(model_path, opt_path, data, held):
    net, _ = load_model(model_path, opt_path, device='cpu')
    scores = []
    for name in held:
        lq, hr = read(osp.join(data, 'LR', name)), read(osp.join(data, 'HR', name))
        scores.append(psnr_ssim_y(to_img(net(to_tensor(lq)).float()), hr, crop_border=4))
    return tuple(float(np.mean([s[i] for s in scores])) for i in range(2))


def bicubic_pairs(hr_dir, names, out):
    for role in ('HR', 'LR'):
        os.makedirs(osp.join(out, role))
    for name in names:
        hr = read(osp.join(hr_dir, name))
        cv2.imwrite(osp.join(out, 'HR', name), hr)
        cv2.imwrite(osp.join(out, 'LR', name), bicubic_down(hr))
    return out


def d2c_options(name, pair_dir, scale):
    with open(osp.join(REPO, 'options', 'demo_D2C_x4.yml')) as f:
        opt = yaml.safe_load(f)
    sys.path.insert(0, osp.join(REPO, 'scripts'))
    from demo import scaled_options
    opt = scaled_options(opt, scale)
    opt['name'] = name
    opt['datasets']['train'].update(dataroot_gt=osp.join(pair_dir, 'HR'), dataroot_lq=osp.join(pair_dir, 'LR'))
    del opt['datasets']['val'], opt['val']  # scored afterwards on the held-out pairs, not during training
    return opt


@torch.no_grad()
def figure(net, data, held, path):
    # the most textured of the better-aligned half of the held-out pairs (about 27 of the 93 DRealSR
    # pairs are shifted by depth of field)
    aligned = {
        n: psnr_ssim_y(bicubic_down(read(osp.join(data, 'HR', n))), read(osp.join(data, 'LR', n)), crop_border=0)[0]
        for n in held
    }
    better = sorted(held, key=aligned.get)[len(held) // 2:]
    name = max(better, key=lambda n: float(read(osp.join(data, 'HR', n))[128:384, 128:384].std()))
    lq = read(osp.join(data, 'LR', name))[32:96, 32:96]
    hr_full = read(osp.join(data, 'HR', name))
    srs = [
        to_img(net.super_resolve(to_tensor(lq), t,
                                 torch.Generator().manual_seed(s))) for t, s in ((0.0, 0), (0.8, 0), (0.8, 1), (0.8, 2))
    ]
    up = cv2.resize(lq, (256, 256), interpolation=cv2.INTER_CUBIC)
    hr = hr_full[128:384, 128:384]
    row1 = [up, *srs, hr]
    labels1 = ['real LR (bicubic up)', 'SR t=0', 'SR t=0.8 #1', 'SR t=0.8 #2', 'SR t=0.8 #3', 'real HR']
    lrs = [to_img(net.downscale(to_tensor(hr), 0.8, torch.Generator().manual_seed(s))) for s in range(3)]
    zoom = [cv2.resize(x, (256, 256), interpolation=cv2.INTER_NEAREST) for x in [lq, bicubic_down(hr), *lrs]]
    row2 = [hr, *zoom]
    labels2 = ['HR input', 'real LR', 'bicubic LR', 'SDFlow LR #1', 'SDFlow LR #2', 'SDFlow LR #3']
    grid = labelled_grid([row1, row2], [labels1, labels2])
    cv2.imwrite(path, grid, [cv2.IMWRITE_JPEG_QUALITY, 88])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=None, help='folder with HR/ and LR/ real pairs (or $D2C_SR_DATA)')
    parser.add_argument('--work', default='results/bench_sdflow_cpu', help='scratch folder (rebuilt)')
    parser.add_argument('--sdflow-iters', type=int, default=2000, help='SDFlow training iterations')
    parser.add_argument('--d2c-iters-scale', type=float, default=0.3, help='x the demo D2C iterations (1400)')
    parser.add_argument('--figure', default=None, help='write the samples picture here (e.g. docs/sdflow_samples.jpg)')
    parser.add_argument('--skip-d2c', action='store_true', help='only train SDFlow and score the downscaling')
    args = parser.parse_args(argv)
    data = osp.abspath(bench_util.photo_pairs_dir(args.data, '--data'))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = osp.abspath(args.work)
    if osp.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work)
    names = sorted(f for f in os.listdir(osp.join(data, 'HR')) if f.endswith('.png'))
    held, lr_names, hr_names = split(names)
    link(osp.join(data, 'LR'), lr_names, osp.join(work, 'lr_src'))
    link(osp.join(data, 'HR'), hr_names, osp.join(work, 'hr_src'))
    held_dir = osp.join(work, 'held')
    link(osp.join(data, 'HR'), held, osp.join(held_dir, 'HR'))
    link(osp.join(data, 'LR'), held, osp.join(held_dir, 'LR'))
    print(f'{len(lr_names)} LR-source photos, {len(hr_names)} HR-source photos, {len(held)} held-out pairs')

    model, seconds = train(sdflow_options(work, args.sdflow_iters), work)
    print(f'SDFlow ({sum(p.numel() for p in load_model(model)[0].parameters()) / 1e6:.2f} M) trained '
          f'{args.sdflow_iters} iterations in {seconds:.0f} s')
    net, _ = load_model(model)
    results = {'sdflow_iters': args.sdflow_iters, 'sdflow_seconds': seconds}
    table, real_noise = downscaling_scores(net, data, held)
    results['downscaling'] = table
    results['real_lr_noise'] = real_noise
    print(f'\n(a) downscaling the {len(held)} held-out HR photos, against their real LR '
          f'(real LR noise level {real_noise:.2f}):')
    print('| LR made by | Y-PSNR (dB) | SSIM | colour shift (8-bit levels) | noise level (real: '
          f'{real_noise:.2f}) |\n|---|---|---|---|---|')
    for label, (psnr, ssim, colour, noise) in table.items():
        print(f'| {label} | {psnr:.2f} | {ssim:.4f} | {colour:.2f} | {noise:.2f} |')
    if args.figure:
        figure(net, data, held, args.figure)
        print(f'figure written to {args.figure}')

    if not args.skip_d2c:
        sdflow_pairs = osp.join(work, 'pairs_sdflow')
        result = subprocess.run([
            sys.executable,
            osp.join(REPO, 'scripts', 'make_sdflow_pairs.py'), '--model', model, '-i',
            osp.join(work, 'hr_src'), '-o', sdflow_pairs, '-q'
        ],
                                capture_output=True,
                                text=True)
        if result.returncode:
            sys.exit(result.stderr)
        bicubic_dir = bicubic_pairs(osp.join(work, 'hr_src'), hr_names, osp.join(work, 'pairs_bicubic'))
        results['d2c'] = {}
        for label, pairs in (('SDFlow pairs', sdflow_pairs), ('bicubic pairs', bicubic_dir)):
            opt = d2c_options(f'd2c_{label.split()[0].lower()}', pairs, args.d2c_iters_scale)
            ckpt, secs = train(opt, work)
            opt_path = osp.join(work, f'{opt["name"]}.yml')
            results['d2c'][label] = sr_scores(ckpt, opt_path, data, held) + (secs, )
        bicubic_up = [
            psnr_ssim_y(
                cv2.resize(read(osp.join(data, 'LR', n)), (512, 512), interpolation=cv2.INTER_CUBIC),
                read(osp.join(data, 'HR', n)),
                crop_border=4) for n in held
        ]
        results['bicubic_upscaling'] = tuple(float(np.mean([s[i] for s in bicubic_up])) for i in range(2))
        print(f'\n(b) demo-size D2C ({opt["train"]["total_iter"]} iterations) trained on pairs made from the '
              f'{len(hr_names)} HR-source photos, scored on the {len(held)} held-out real pairs (Y, border 4):')
        print('| training pairs | Y-PSNR (dB) | SSIM | train time |\n|---|---|---|---|')
        for label, (psnr, ssim, secs) in results['d2c'].items():
            print(f'| {label} | {psnr:.2f} | {ssim:.4f} | {secs:.0f} s |')
        print(f'| (bicubic upscaling of the real LR) | {results["bicubic_upscaling"][0]:.2f} | '
              f'{results["bicubic_upscaling"][1]:.4f} | - |')
    with open(osp.join(work, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print(f'\nresults written to {osp.join(work, "results.json")}')


if __name__ == '__main__':
    main()
