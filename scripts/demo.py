"""The demo main job: train a small D2C-SR on real photographs on CPU and show what it does.

    python scripts/demo.py [--iters-scale 1.0] [--out results/demo]     (what `make demo` runs)

1. Builds ``datasets/demo_x4`` from scikit-image's sample photographs (installed with
   BasicSR; no download): HR photos and LR images made with BasicSR's degradation functions
   (random Gaussian / generalised blur, x4 bicubic down-sampling, Gaussian noise, JPEG).
   ``chelsea`` (a cat) is held out for validation and the final picture.
2. Trains ``options/demo_D2C_x4.yml`` through both phases (divergence, then convergence)
   with BasicSR's training loop, logging progress every 50 iterations.
3. Super-resolves the held-out photo and writes to ``--out``: the fused SR, every branch,
   the weight maps as heatmaps, and ``<photo>_compare.png`` (bicubic | branches | fused | HR,
   weight maps below the branches); prints PSNR / SSIM (Y channel, 4-pixel border shaved)
   for bicubic, each branch, the fused output and the oracle fusion.
"""
import argparse
import os
import random
import sys
import time

import cv2
import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import d2c_model  # noqa: E402,F401  (registers D2CNet, the losses, D2CModel; applies the compat shim)
from basicsr.data.degradations import random_add_gaussian_noise, random_mixed_kernels  # noqa: E402
from basicsr.utils import img2tensor, tensor2img  # noqa: E402
from d2c_inference.checkpoint_util import load_model  # noqa: E402
from d2c_tools import train as d2c_train  # noqa: E402
from d2c_utils.eval_util import bicubic_upscale, oracle_fusion, psnr_ssim_y  # noqa: E402
from d2c_utils.img_util import read_image  # noqa: E402
from d2c_utils.visual_util import labelled_grid, weight_heatmap  # noqa: E402

DEMO_OPT = 'options/demo_D2C_x4.yml'
TRAIN_PHOTOS = ('astronaut', 'coffee', 'hubble_deep_field', 'immunohistochemistry', 'stereo_motorcycle', 'retina',
                'rocket')
HELD_OUT = 'chelsea'
SCALE = 4


def degrade(hr, rng_seed):
    """HR uint8 BGR (H, W, 3), H and W multiples of 4 -> LR uint8 BGR (H/4, W/4, 3).

    Blur with a random isotropic / anisotropic / generalised Gaussian kernel (sigma 0.2-1.2),
    bicubic x4 down-sampling, Gaussian noise (sigma 1-5 of 255) and JPEG (quality 75-95): a
    camera-like degradation that a small network can learn to invert in a few minutes.
    """
    np.random.seed(rng_seed)
    random.seed(rng_seed)
    img = hr.astype(np.float32) / 255.
    kernel = random_mixed_kernels(['iso', 'aniso', 'generalized_iso'], [0.45, 0.45, 0.1],
                                  kernel_size=21,
                                  sigma_x_range=(0.2, 1.2),
                                  sigma_y_range=(0.2, 1.2),
                                  betag_range=(0.5, 4))
    img = cv2.filter2D(img, -1, kernel)
    h, w = img.shape[:2]
    img = cv2.resize(img, (w // SCALE, h // SCALE), interpolation=cv2.INTER_CUBIC)
    img = random_add_gaussian_noise(img, sigma_range=(1, 5), gray_prob=0.3)
    img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    quality = int(np.random.randint(75, 96))
    return cv2.imdecode(cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_COLOR)


def load_photo(name, max_size=512):
    """A scikit-image sample photo as uint8 BGR, centre-cropped to at most ``max_size`` and to
    multiples of the scale (the crop keeps real camera statistics; small files load fast)."""
    from skimage import data
    rgb = getattr(data, name)()
    if isinstance(rgb, tuple):  # stereo_motorcycle: (left, right, disparity)
        rgb = rgb[0]
    h, w = (min(size, max_size) // SCALE * SCALE for size in rgb.shape[:2])
    top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
    return cv2.cvtColor(rgb[top:top + h, left:left + w], cv2.COLOR_RGB2BGR)


def build_data(root):
    """Write ``root/{train,val}/{HR,LR}``; returns the number of training pairs."""
    for split, names in (('train', TRAIN_PHOTOS), ('val', (HELD_OUT, ))):
        for sub in ('HR', 'LR'):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for index, name in enumerate(names):
            hr = load_photo(name)
            cv2.imwrite(os.path.join(root, split, 'HR', f'{name}.png'), hr)
            cv2.imwrite(os.path.join(root, split, 'LR', f'{name}.png'), degrade(hr, rng_seed=1000 + index))
    return len(TRAIN_PHOTOS)


def scaled_options(opt, iters_scale):
    """Scale all iteration counts (phases, milestones, alpha start, val/save/print intervals)."""

    def scale(n):
        return max(1, int(round(n * iters_scale)))

    train = opt['train']
    for phase in train['phases']:
        phase['iters'] = scale(phase['iters'])
    train['total_iter'] = sum(p['iters'] for p in train['phases'])
    train['scheduler']['milestones'] = [scale(m) for m in train['scheduler']['milestones']]
    train['alpha_schedule']['start_iter'] = scale(train['alpha_schedule']['start_iter'])
    for section, key in (('val', 'val_freq'), ('logger', 'save_checkpoint_freq'), ('logger', 'print_freq')):
        opt[section][key] = scale(opt[section][key])
    return opt


@torch.no_grad()
def evaluate(net, lr, hr, out_dir, name):
    """Super-resolve one photo, write the pictures and return rows of (label, psnr, ssim)."""
    lq = img2tensor(lr.astype(np.float32) / 255., bgr2rgb=True, float32=True).unsqueeze(0)
    gt = img2tensor(hr.astype(np.float32) / 255., bgr2rgb=True, float32=True).unsqueeze(0)
    sr, branches, weights = net(lq, return_branches=True)
    outputs = [('bicubic', bicubic_upscale(lq, SCALE))]
    outputs += [(f'branch{i + 1}', tensor2img([branches[:, i]])) for i in range(branches.size(1))]
    outputs += [('fused', tensor2img([sr])), ('oracle', tensor2img([oracle_fusion(branches, gt)]))]

    os.makedirs(out_dir, exist_ok=True)
    for label, img in outputs:
        cv2.imwrite(os.path.join(out_dir, f'{name}_{label}.png'), img)
    heatmaps = [weight_heatmap(w, vmax=2. / weights.size(1)) for w in weights[0].numpy()]
    for i, heat in enumerate(heatmaps):
        cv2.imwrite(os.path.join(out_dir, f'{name}_weight{i + 1}.png'), heat)

    # comparison picture on a centre crop, so that details are visible at README size
    crop = min(192, hr.shape[0], hr.shape[1])
    top, left = (hr.shape[0] - crop) // 2, (hr.shape[1] - crop) // 2

    def cut(img):
        return img[top:top + crop, left:left + crop]

    shown = [img for label, img in outputs if label != 'oracle'] + [hr]
    shown_labels = [label for label, _ in outputs if label != 'oracle'] + ['HR']
    num_branch = len(heatmaps)
    rows = [[cut(img) for img in shown], [None] + [cut(h) for h in heatmaps] + [None, None]]
    labels = [shown_labels, [''] + [f'weight {i + 1}' for i in range(num_branch)] + ['', '']]
    cv2.imwrite(os.path.join(out_dir, f'{name}_compare.png'), labelled_grid(rows, labels))
    return [(label, *psnr_ssim_y(img, hr, crop_border=SCALE)) for label, img in outputs]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--opt', default=DEMO_OPT, help='demo option file (default: %(default)s)')
    parser.add_argument('--data', default='datasets/demo_x4', help='where to build the demo data set')
    parser.add_argument('--out', default='results/demo', help='where to write pictures and metrics')
    parser.add_argument(
        '--iters-scale', type=float, default=1.0, help='multiply every iteration count (e.g. 0.01 for a smoke test)')
    parser.add_argument(
        '--precision',
        choices=['fp32', 'bf16', 'fp16', 'auto'],
        default=None,
        help="training precision (train.precision); default: the option file's (fp32). A run "
        'that is not fp32 is named <name>_<precision> so that it does not overwrite the fp32 run')
    parser.add_argument(
        '--channels-last', action='store_true', help='train in the channels_last memory layout (train.channels_last)')
    args = parser.parse_args(argv)
    if not os.path.isfile(args.opt):
        parser.error(f'option file not found: {args.opt} (run from the repository root)')
    if args.iters_scale <= 0:
        parser.error('--iters-scale must be positive')
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.time()

    print(f'[1/3] Building the demo data set in {args.data} from scikit-image photographs ...', flush=True)
    build_data(args.data)
    with open(args.opt) as f:
        opt = scaled_options(yaml.safe_load(f), args.iters_scale)
    if args.precision not in (None, 'fp32'):
        opt['train']['precision'] = args.precision
        opt['name'] += f'_{args.precision}'
    if args.channels_last:
        opt['train']['channels_last'] = True
        opt['name'] += '_cl'
    for dataset in opt['datasets'].values():
        for key in ('dataroot_gt', 'dataroot_lq'):
            dataset[key] = dataset[key].replace('datasets/demo_x4', args.data)
    os.makedirs(args.out, exist_ok=True)
    run_opt = os.path.join(args.out, 'demo_options.yml')
    with open(run_opt, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)

    plan = ' then '.join(f'{phase["name"]} for {phase["iters"]} iterations' for phase in opt['train']['phases'])
    print(f'[2/3] Training {opt["name"]}: {plan} (progress below) ...', flush=True)
    train_start = time.time()
    d2c_train.main(['-opt', run_opt])
    train_seconds = time.time() - train_start
    total_iter = opt['train']['total_iter']

    print(f'[3/3] Super-resolving the held-out photo "{HELD_OUT}" ...', flush=True)
    ckpt = os.path.join('experiments', opt['name'], 'models', 'net_g_latest.pth')
    net, _ = load_model(ckpt, run_opt, param_key='params')
    hr = read_image(os.path.join(args.data, 'val', 'HR', f'{HELD_OUT}.png'))
    lr = read_image(os.path.join(args.data, 'val', 'LR', f'{HELD_OUT}.png'))
    rows = evaluate(net, lr, hr, args.out, HELD_OUT)

    lines = [f'{"":10s} {"PSNR(Y)":>8s} {"SSIM(Y)":>8s}'] + [f'{label:10s} {p:8.2f} {s:8.4f}' for label, p, s in rows]
    table = '\n'.join(lines)
    with open(os.path.join(args.out, 'metrics.txt'), 'w') as f:
        f.write(table + '\n')
    print(f'\nHeld-out photo "{HELD_OUT}" ({hr.shape[1]}x{hr.shape[0]} HR, x{SCALE}), '
          f'Y channel, {SCALE}-pixel border shaved:\n{table}')
    print(f'\nPictures in {args.out}/ ({HELD_OUT}_compare.png shows bicubic | branches | fused | HR).')
    precision = opt['train'].get('precision', 'fp32') + (', channels_last' if opt['train'].get('channels_last') else '')
    print(f'Model: {ckpt}. Total time: {time.time() - start:.0f} s; training ({precision}) {total_iter} iterations '
          f'in {train_seconds:.0f} s = {total_iter / train_seconds:.2f} it/s (incl. validation and checkpoints).')
    return rows


if __name__ == '__main__':
    main()
