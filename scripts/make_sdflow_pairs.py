#!/usr/bin/env python
"""Turn a folder of HR photos into LR/HR training pairs with a trained SDFlow downscaler (D2C from HR alone).

    python scripts/make_sdflow_pairs.py --model experiments/SDFlow/models/net_g_latest.pth \\
        -i datasets/my_hr_photos -o datasets/my_pairs_x4 --samples 2 --lmdb

Every image of ``--input`` (not subfolders) is read as 8-bit RGB, mod-cropped at the bottom/right
to a multiple of 4, and downscaled ``--samples`` times by SDFlow at ``--temperature`` (seeds
``seed + i``: a rerun gives the same pairs). Written, ready for the D2C option files
(``PairedImageDataset`` with ``dataroot_gt: <out>/HR``, ``dataroot_lq: <out>/LR``, or with
``--lmdb`` the LMDBs and ``io_backend: {type: lmdb}``)::

    <out>/HR/<stem>_s<i>.png    the mod-cropped HR photo (hard links to one copy where possible)
    <out>/LR/<stem>_s<i>.png    SDFlow sample i of its LR image (x4 smaller)
    <out>/HR.lmdb, LR.lmdb      BasicSR LMDBs of both (--lmdb)

The downscaler runs whole images (its flows are convolutional but it keeps every activation of
a photo): cut large photos into sub-images first (BasicSR's ``extract_subimages.py``, or
``scripts/prepare_data.py --crop-size``). Everything is written to ``<out>.tmp-*`` and renamed at
the end: an error or Ctrl-C leaves no partial output. Unreadable files stop the run with their
name; ``--skip-bad`` skips them instead (listed at the end).
"""
import argparse
import os
import shutil
import sys
import tempfile
from os import path as osp

import cv2
import numpy as np
import torch
from tqdm import tqdm

import d2c_model  # noqa: F401  (registers SDFlow; applies the compat shim before basicsr)
from d2c_data.unpaired_image_dataset import IMAGE_SUFFIXES
from d2c_inference.checkpoint_util import load_model
from d2c_inference.infer_util import select_device, select_precision
from d2c_utils.errors import UserError
from d2c_utils.output_util import atomic_write_bytes
from d2c_utils.precision_util import autocast

PROG = 'make_sdflow_pairs'


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-i', '--input', required=True, help='folder of HR photos')
    parser.add_argument('-o', '--output', required=True, help='output folder (must not exist)')
    parser.add_argument('-m', '--model', required=True, help='SDFlow checkpoint with the downscaler')
    parser.add_argument('--opt', default=None, help='training option file (network_g), if the weights are not enough')
    parser.add_argument('--param-key', default=None, help='default: params_ema if present, else params')
    parser.add_argument('--samples', type=int, default=1, help='LR images per HR photo (default: %(default)s)')
    parser.add_argument(
        '--temperature', type=float, default=None, help="sampling temperature (default: the checkpoint's, 0.8)")
    parser.add_argument('--seed', type=int, default=0, help='seed of the first sample (default: %(default)s)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument(
        '--precision',
        default='fp32',
        choices=['auto', 'fp32', 'bf16', 'fp16'],
        help='of the condition networks '
        '(the flows always run in fp32) (default: %(default)s)')
    parser.add_argument('--lmdb', action='store_true', help='also write <out>/HR.lmdb and <out>/LR.lmdb')
    parser.add_argument('--skip-bad', action='store_true', help='skip unreadable or too small images')
    parser.add_argument('-q', '--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error('--samples must be >= 1')
    if args.temperature is not None and args.temperature < 0:
        parser.error('--temperature must be >= 0')
    return args


def read_hr(path):
    """8-bit BGR (H', W', 3), mod-cropped to multiples of 4; UserError naming the file when unusable."""
    img = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f'{path} is not a readable image')
    height, width = img.shape[0] // 4 * 4, img.shape[1] // 4 * 4
    if height < 8 or width < 8:
        raise UserError(f'{path} is {img.shape[1]}x{img.shape[0]}: too small to downscale x4 (at least 8x8)')
    return img[:height, :width]


def write_png(path, img):
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise UserError(f'OpenCV could not encode {path}')
    atomic_write_bytes(path, buf.tobytes())


def make_pairs(args, net, device, dtype, tmp_dir):
    """Write the pairs into ``tmp_dir``; returns (keys written, skipped files)."""
    inputs = sorted(
        osp.join(args.input, f) for f in os.listdir(args.input)
        if f.lower().endswith(IMAGE_SUFFIXES) and osp.isfile(osp.join(args.input, f)))
    if not inputs:
        raise UserError(f'--input {args.input} holds no images ({", ".join(IMAGE_SUFFIXES)})')
    for role in ('HR', 'LR'):
        os.makedirs(osp.join(tmp_dir, role))
    temperature = net.temperature if args.temperature is None else args.temperature
    keys, skipped = [], []
    for path in tqdm(inputs, unit='img', disable=args.quiet, file=sys.stderr):
        try:
            hr = read_hr(path)
        except UserError as err:
            if not args.skip_bad:
                raise UserError(f'{err}; remove it or pass --skip-bad') from None
            skipped.append(path)
            continue
        stem = osp.splitext(osp.basename(path))[0]
        tensor = torch.from_numpy(np.ascontiguousarray(hr[..., ::-1].transpose(2, 0, 1))).float().div(255)[None]
        first_hr = None
        for i in range(args.samples):
            gen = torch.Generator(device=device)
            gen.manual_seed(args.seed + i)
            with torch.no_grad(), autocast(device.type, dtype):
                lq = net.downscale(tensor.to(device), temperature, gen).float().cpu()
            lq = (lq[0].clamp(0, 1).numpy().transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8)
            key = f'{stem}_s{i}'
            hr_path = osp.join(tmp_dir, 'HR', f'{key}.png')
            if first_hr is None:
                write_png(hr_path, hr)
                first_hr = hr_path
            else:
                try:
                    os.link(first_hr, hr_path)
                except OSError:
                    shutil.copyfile(first_hr, hr_path)
            write_png(osp.join(tmp_dir, 'LR', f'{key}.png'), lq)
            keys.append(key)
    if not keys:
        raise UserError(f'no usable image in {args.input}')
    return keys, skipped


def build_lmdbs(tmp_dir, keys):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    for role in ('HR', 'LR'):
        folder = osp.join(tmp_dir, role)
        raw = sum(osp.getsize(osp.join(folder, f'{k}.png')) for k in keys)
        make_lmdb_from_imgs(
            folder, osp.join(tmp_dir, f'{role}.lmdb'), [f'{k}.png' for k in keys], keys, map_size=raw * 4 + (64 << 20))


def main(argv=None):
    args = parse_args(argv)
    out = osp.abspath(args.output)
    tmp_dir = None
    try:
        if osp.exists(out):
            raise UserError(f'--output {args.output} exists; choose a new folder (nothing is overwritten)')
        if not osp.isdir(args.input):
            raise UserError(f'--input {args.input} is not a folder')
        device = select_device(args.device)
        dtype = select_precision(args.precision, device, lambda m: print(f'{PROG}: warning: {m}', file=sys.stderr))
        net, info = load_model(args.model, args.opt, args.param_key, device)
        if not net.has_downscaler:
            raise UserError(f'{args.model} holds the SR path only (no lr_flow / deg_flow): it cannot downscale')
        for line in info['warnings']:
            print(f'{PROG}: warning: {args.model}: {line}', file=sys.stderr)
        os.makedirs(osp.dirname(out) or '.', exist_ok=True)
        tmp_dir = tempfile.mkdtemp(prefix=osp.basename(out) + '.tmp-', dir=osp.dirname(out))
        keys, skipped = make_pairs(args, net, device, dtype, tmp_dir)
        if args.lmdb:
            build_lmdbs(tmp_dir, keys)
        os.rename(tmp_dir, out)
        tmp_dir = None
    except UserError as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        return 2
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f'{len(keys)} LR/HR pair(s) written to {out} (HR/, LR/{", HR.lmdb, LR.lmdb" if args.lmdb else ""})')
    if skipped:
        print(f'{PROG}: {len(skipped)} file(s) skipped: {", ".join(skipped)}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
