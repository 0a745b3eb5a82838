#!/usr/bin/env python
"""Write DANv2's training option files (the official recipe) into options/dan/, or check them.

    python scripts/make_dan_options.py            # (re)write options/dan/train_DANv2_setting*.yml
    python scripts/make_dan_options.py --check    # exit 1 if a committed file differs from this script's output

One template, five files: setting 1 (isotropic kernels) at x2, x3, x4 and setting 2 (anisotropic
with kernel noise) at x2 and x4, with the sizes and ranges of the official release and its
issues (docs/dan.md, facts in the module docstring of d2c_data/degradations.py).
"""
import argparse
import os
import sys
from os import path as osp

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from d2c_data.degradations import default_kernel_options  # noqa: E402

OUT_DIR = osp.join(ROOT, 'options', 'dan')
CONFIGS = [(1, 2), (1, 3), (1, 4), (2, 2), (2, 4)]
# setting 2 x4: the released test file's 31x31 kernels and 15-long code; everything else t = 10
CODE_LENGTH = {(2, 4): 15}
HR_CROP = {2: 128, 3: 192, 4: 256}  # LR patches of 64x64, as the official files

TEMPLATE = """\
# DANv2 (Luo et al., "End-to-end Alternating Optimization for Blind Super Resolution"), setting {setting} x{scale}:
# {setting_text}
# Written by scripts/make_dan_options.py (edit the script, not this file, to change all five).
#   d2c-train -opt options/dan/{name}.yml --auto_resume        (or python basicsr/train.py -opt ...)
# Data: DIV2K + Flickr2K HR (3,450 images) cut into sub-images, as BasicSR's scripts/data_preparation
# (extract_subimages.py, create_lmdb.py) make them; docs/dan.md. The LR images are made on the fly.
# PCA: python scripts/make_dan_pca.py --setting {setting} --scale {scale} -o {pca}

name: {name}
model_type: DANModel          # d2c_model/dan_model.py
scale: {scale}
num_gpu: auto                 # the recipe: 8 GPUs, batch 64 in all (8 per GPU); 0 = CPU
manual_seed: 0

datasets:
  train:
    name: DIV2K_Flickr2K
    type: HRImageDataset      # HR crops only (d2c_data/hr_image_dataset.py); folders or LMDB
    dataroot_gt: datasets/DF2K/HR_sub.lmdb
    io_backend:
      type: lmdb              # disk for a folder of PNGs
    gt_size: {hr_crop}              # HR crop: LR patches of 64x64
    use_hflip: true           # the official augmentation: flips and transposes
    use_rot: true
    num_worker_per_gpu: 8
    batch_size_per_gpu: 8     # x 8 GPUs = the recipe's 64
    dataset_enlarge_ratio: 1
    prefetch_mode: ~

  val:                        # Gaussian8 from Set5 (scripts/make_blur_testset.py gaussian8 --scale {scale})
    name: Set5_gaussian8_x{scale}
    type: PairedImageDataset
    dataroot_gt: datasets/Set5_gaussian8_x{scale}/HR_all
    dataroot_lq: datasets/Set5_gaussian8_x{scale}/LR
    dataroot_kernel: datasets/Set5_gaussian8_x{scale}/kernels   # <name>.npy per LR image: kernel error logged
    io_backend:
      type: disk

network_g:
  type: DAN                   # d2c_arch/dan_arch.py
  num_in_ch: 3
  num_feat: 64                # Restorer width
  num_group: 5                # DPCGs of the Restorer
  num_block: 10               # DPCBs per group
  upscale: {scale}
  code_length: {code_length}            # t: PCA code length
  kernel_size: {kernel_size}            # l: kernel side; the Estimator outputs l x l kernels
  loop: 4                     # T: Restorer/Estimator alternations (every official file)
  estimator_feat: 32
  estimator_blocks: 5
  pca_matrix: {pca}   # saved into every checkpoint as a buffer
  group_skip: double          # the official code's group skip (twice the chain); residual: the design as described

path:
  pretrain_network_g: ~
  param_key_g: params
  strict_load_g: true
  resume_state: ~

train:
  ema_decay: 0
  total_iter: 800000          # DANv2: 800k iterations (DANv1: 400k)
  warmup_iter: -1
  precision: fp32             # fp32 | bf16 | fp16 | auto (as D2CModel)
  channels_last: false
  nonfinite: error            # error | skip: the official code's users report NaN losses after 20k-115k iterations
  degradation:
    setting: {setting}
    kernel_size: {kernel_size}
    sigma_range: {sigma_range}{noise_line}
    downsample: bicubic       # bicubic (MATLAB-style, the official code and test sets) | decimate (the paper's model)
  optim_g:                    # the Restorer's group; type and betas apply to both
    type: Adam
    lr: !!float 4e-4
    weight_decay: 0
    betas: [0.9, 0.99]
  optim_e:                    # the Estimator's group: missing from every official file (a crash); 4e-4 as the Restorer
    lr: !!float 4e-4
  scheduler:
    type: MultiStepLR
    milestones: [200000, 400000, 600000]
    gamma: 0.5
  pixel_opt:                  # on the last iteration's SR image
    type: L1Loss
    loss_weight: 1.0
    reduction: mean
  kernel_opt:                 # on the last iteration's kernel
    type: L1Loss
    loss_weight: 1.0
    reduction: mean

val:
  val_freq: !!float 2.5e3     # as the official files
  save_img: false
  pbar: true
  metrics:                    # the papers' tables: Y channel, border = scale
    psnr:
      type: calculate_psnr
      crop_border: {scale}
      test_y_channel: true
    ssim:
      type: calculate_ssim
      crop_border: {scale}
      test_y_channel: true

logger:
  print_freq: 100
  save_checkpoint_freq: !!float 5e3
  use_tb_logger: true
  wandb:
    project: ~
    resume_id: ~

dist_params:
  backend: ~                  # nccl on GPUs, gloo on CPUs
  port: 29500
"""


def render(setting, scale):
    kernel = default_kernel_options(setting, scale)
    name = f'train_DANv2_setting{setting}_x{scale}'
    if setting == 1:
        text = (f'isotropic Gaussian kernels, sigma ~ U({kernel["sigma_range"][0]}, {kernel["sigma_range"][1]:.1f}) '
                '(the author\'s range for this scale;\n#   the official files use U(0.2, 4.0) at every scale), '
                f'{kernel["kernel_size"]}x{kernel["kernel_size"]}')
        noise = ''
    else:
        text = ('anisotropic Gaussian kernels, sigma_x, sigma_y ~ U(0.6, 5), theta ~ U(-pi, pi), each tap x (1 + '
                f'U(0, 0.25)),\n#   {kernel["kernel_size"]}x{kernel["kernel_size"]} (tested on DIV2KRK)')
        noise = f'\n    noise: {kernel["noise"]}                # every tap x (1 + U(0, noise)), renormalised'
    sigma = '[' + ', '.join(f'{v:.1f}' for v in kernel['sigma_range']) + ']'
    return name, TEMPLATE.format(
        setting=setting,
        scale=scale,
        name=name,
        setting_text=text,
        hr_crop=HR_CROP[scale],
        code_length=CODE_LENGTH.get((setting, scale), 10),
        kernel_size=kernel['kernel_size'],
        sigma_range=sigma,
        noise_line=noise,
        pca=f'pca/DANv2_setting{setting}_x{scale}.pth')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--check', action='store_true', help='only compare with the committed files')
    args = parser.parse_args(argv)
    stale = []
    for setting, scale in CONFIGS:
        name, text = render(setting, scale)
        path = osp.join(OUT_DIR, f'{name}.yml')
        if args.check:
            with open(path, encoding='utf-8') as f:
                if f.read() != text:
                    stale.append(path)
            continue
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        print(f'wrote {path}')
    if stale:
        print(f'differ from scripts/make_dan_options.py: {stale}; run it to rewrite them', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
