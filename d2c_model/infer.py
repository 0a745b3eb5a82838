"""Super-resolve real photos with a trained D2C-SR model.

    d2c-infer -i photo.png --model net_g_latest.pth --opt options/train_D2C_RealSR_x4.yml
    python -m d2c_model.infer -i photos/ -o results/infer --model ... --opt ... --tile 128

Writes ``<name>_<suffix>.<ext>`` for every input image (an image or a folder of images) and,
on request, every branch's prediction, the weight maps as heatmaps, a grid picture and
Y-PSNR/SSIM against ground truth. Gray, RGB, RGBA and 16-bit images come out in the same kind.

Model files are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses pickled Python objects (that could run code) and loads only tensors and plain
containers. Exit status: 0 all images written; 1 some inputs were skipped (listed); 2 usage,
model or option errors (one line naming the file and what to do).
"""
import argparse
import csv
import os
import pickle
import re
import sys
from os import path as osp

import d2c_model  # noqa: F401  (registers D2CNet; applies the compat shim before basicsr)
import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

from basicsr.utils import img2tensor, tensor2img
from d2c_arch import D2CNet, bare_key, default_options, state_dict_differences
from d2c_model.eval_util import oracle_fusion, psnr_ssim_y
from d2c_model.precision_util import cpu_has_native_bf16, precision_name, resolve_precision
from d2c_model.tile_util import GuardedForward, prepare_network, super_resolve
from d2c_model.visual_util import labelled_grid, weight_heatmap

PROG = 'd2c-infer'
# documented default context around a tile, in LR pixels (see the README's tiling section)
DEFAULT_TILE_PAD = 32
MAX_LISTED_KEYS = 8


class InferError(Exception):
    """A usage, model or option problem: reported as one message, exit status 2."""


class ImageError(Exception):
    """One input cannot be processed: reported, skipped, exit status 1 at the end."""


# --------------------------------------------------------------------------- model loading


def load_checkpoint(path):
    """Read a model file safely.

    Only tensors and plain containers are unpickled (``weights_only=True``); anything that
    would need a Python global (a class, ``os.system``, ...) is refused.

    Raises:
        InferError: missing, unreadable, corrupt or refused file; the message names it.
    """
    if not osp.isfile(path):
        raise InferError(f'model file not found: {path} (pass --model <a .pth written by training>)')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r'GLOBAL\s+([\w.]+)', str(err))
        if match:
            raise InferError(f'refusing to load {path}: it holds a pickled Python object ({match.group(1)}) that '
                             'torch.load(weights_only=True) does not allow, because loading it could run code. '
                             'Only tensors and plain containers are accepted; re-save the weights as '
                             "torch.save({'params': net.state_dict()}, path) in a trusted environment.") from None
        raise InferError(f'cannot read {path}: corrupt or not a PyTorch checkpoint (weights_only load failed: '
                         f'{_first_line(err)})') from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged files
        raise InferError(f'cannot read {path}: corrupt or not a PyTorch checkpoint ({type(err).__name__}: '
                         f'{_first_line(err) or "empty or truncated file"})') from None


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights_only messages start with boilerplate; the specific reason comes later
    specific = [line for line in lines if not line.startswith(('Weights only load failed', 'Please file an issue',
                                                                'Check the documentation'))]
    return (specific or lines or [''])[0][:200]


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(ckpt, path, param_key=None):
    """The state dict of a checkpoint.

    Args:
        ckpt: What :func:`load_checkpoint` returned: BasicSR's ``{'params': ...,
            'params_ema': ...}``, or a bare state dict.
        path (str): The file, for messages.
        param_key (str | None): Key to use; default ``params_ema`` if present, else ``params``.

    Returns:
        tuple[dict, str | None]: state dict (``module.`` prefixes removed) and the key used
        (None for a bare state dict).
    """
    if not isinstance(ckpt, dict):
        raise InferError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict; expected BasicSR\'s '
                         "{'params': state_dict} or a state dict")
    if param_key is not None:
        if param_key not in ckpt:
            raise InferError(f'--param-key {param_key}: {path} has no such key; it has {sorted(map(str, ckpt))}')
        key = param_key
    elif 'params_ema' in ckpt:
        key = 'params_ema'
    elif 'params' in ckpt:
        key = 'params'
    elif _is_state_dict(ckpt):
        key = None
    else:
        raise InferError(f'{path} has neither "params" nor "params_ema" (keys: {sorted(map(str, ckpt))[:10]}); '
                         'pass --param-key <key holding the state dict>')
    state = ckpt if key is None else ckpt[key]
    if not _is_state_dict(state):
        raise InferError(f'{path}: "{key}" is not a state dict of tensors; pick another --param-key '
                         f'(keys: {sorted(map(str, ckpt))})')
    return {bare_key(k): v for k, v in state.items()}, key


def _index_set(keys, prefix):
    """Distinct integers right after ``prefix`` in ``keys`` (``tails.3.x`` -> 3 for prefix ``tails.``)."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split('.', 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def infer_network_opt(state):
    """D2CNet options that a state dict determines (from its keys and shapes).

    ``img_range``, ``rgb_mean`` and ``fusion_logit_relu`` leave no trace in the weights, so they
    cannot be inferred; that is why inference needs the option file.

    Returns:
        dict: some of num_in_ch, num_out_ch, num_feat, tree_depth, tree_width, num_group,
        num_block, reduction, upscale, branch_type, num_fusion_feat (and ``num_branch``, not an
        option but the number of tails).

    Raises:
        InferError: the keys do not look like D2CNet's.
    """
    keys = list(state)
    if 'head.weight' not in state or not _index_set(keys, 'tails.'):
        raise InferError('the weights do not look like D2CNet (no head.weight / tails.*); first keys: '
                         f'{keys[:5]}')
    opt = {'num_feat': state['head.weight'].shape[0], 'num_in_ch': state['head.weight'].shape[1]}
    levels = _index_set(keys, 'tree.')
    opt['tree_depth'] = len(levels)
    opt['tree_width'] = len(_index_set(keys, 'tree.0.')) if levels else 1
    opt['num_branch'] = len(_index_set(keys, 'tails.'))
    node = [k for k in keys if k.startswith('tree.0.0.')]
    if any('.residual_group.' in k for k in node):
        opt['branch_type'] = 'RCANBranch'
        opt['num_block'] = len(_index_set(keys, 'tree.0.0.0.residual_group.'))
        squeeze = state.get('tree.0.0.0.residual_group.0.rcab.3.attention.1.weight')
        if squeeze is not None:
            opt['reduction'] = opt['num_feat'] // squeeze.shape[0]
    elif any('.body.' in k for k in node):
        opt['branch_type'] = 'EDSRBranch'
        opt['num_block'] = len(_index_set(keys, 'tree.0.0.0.body.'))
    if node:
        opt['num_group'] = len(_index_set(keys, 'tree.0.0.')) - 1  # the last entry is the node's final conv
    # tails.0.0 is BasicSR's Upsample: log2(s) x (conv F->4F, PixelShuffle(2)) or conv F->9F, PixelShuffle(3)
    up_convs = sorted(_index_set(keys, 'tails.0.0.'))
    if up_convs:
        ratio = state[f'tails.0.0.{up_convs[0]}.weight'].shape[0] // opt['num_feat']
        opt['upscale'] = 3 if ratio == 9 else 2**len(up_convs)
    out_keys = [k for k in keys
                if k.startswith('tails.0.') and k.endswith('.weight') and not k.startswith('tails.0.0.')]
    if out_keys:
        opt['num_out_ch'] = state[out_keys[-1]].shape[0]
    if 'convergence.0.weight' in state:
        opt['num_fusion_feat'] = state['convergence.0.weight'].shape[0]
    return opt


def network_options(ckpt, opt_path, model_path):
    """``network_g`` for the checkpoint: from ``--opt`` if given, else carried by the checkpoint.

    Returns:
        tuple[dict, str]: the network_g options (with ``type``) and where they came from.
    """
    if opt_path:
        if not osp.isfile(opt_path):
            raise InferError(f'option file not found: {opt_path} (pass --opt <the training .yml>)')
        try:
            with open(opt_path, encoding='utf-8') as f:
                opt = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise InferError(f'cannot parse option file {opt_path}: {_first_line(err)}') from None
        if not isinstance(opt, dict) or not isinstance(opt.get('network_g'), dict):
            raise InferError(f'option file {opt_path} has no network_g block; pass the option file the model was '
                             'trained with')
        net_opt, source = opt['network_g'], opt_path
    else:
        net_opt = None
        if isinstance(ckpt, dict):
            carried = ckpt.get('network_g')
            if carried is None and isinstance(ckpt.get('opt'), dict):
                carried = ckpt['opt'].get('network_g', ckpt['opt'] if 'type' in ckpt['opt'] else None)
            net_opt = carried if isinstance(carried, dict) else None
        if net_opt is None:
            raise InferError(f'{model_path} holds weights only: checkpoints written by training (d2c-train / BasicSR) '
                             'do not store the network options, so --opt is required: pass the option file the model '
                             'was trained with (BasicSR copies it into experiments/<name>/), e.g. '
                             '--opt options/train_D2C_RealSR_x4.yml')
        source = f'{model_path} (carried options)'
    net_type = net_opt.get('type', 'D2CNet')
    if net_type != 'D2CNet':
        raise InferError(f'{source}: network_g type is {net_type!r}; {PROG} runs D2CNet models only')
    return dict(net_opt), source


def build_network(net_opt, source):
    """D2CNet from network_g options; bad options name the source."""
    kwargs = {k: v for k, v in net_opt.items() if k != 'type'}
    unknown = sorted(set(kwargs) - set(default_options()))
    if unknown:
        raise InferError(f'{source}: network_g has options D2CNet does not know: {unknown}')
    try:
        return D2CNet(**kwargs)
    except (TypeError, ValueError) as err:
        raise InferError(f'{source}: network_g is not valid: {err}') from None


def _listed(keys, limit=MAX_LISTED_KEYS):
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... and {len(keys) - limit} more' if len(keys) > limit else '')


def compare_state_dicts(net, state, net_opt, opt_source, model_desc):
    """Check that the weights fit the network built from the options.

    Returns:
        str | None: None when keys and shapes agree; otherwise a message listing the options
        that differ (inferred from the weights) and the differing keys.
    """
    expected = net.state_dict()
    missing, unexpected, shapes = state_dict_differences(expected, state)
    if not (missing or unexpected or shapes):
        return None
    lines = [f'{model_desc} does not match network_g of {opt_source}:']
    try:
        inferred = infer_network_opt(state)
    except InferError:
        inferred = {}
    defaults = default_options()
    differ = []
    for key, value in inferred.items():
        if key == 'num_branch':
            configured = net.num_branch
        else:
            configured = net_opt.get(key, defaults.get(key))
        if configured != value:
            differ.append(f'{key}: options {configured!r}, checkpoint {value!r}')
    if differ:
        lines.append(f'  options that differ ({len(differ)}): ' + '; '.join(differ))
    if missing:
        lines.append(f'  keys missing from the checkpoint ({len(missing)}): {_listed(missing)}')
    if unexpected:
        lines.append(f'  keys only in the checkpoint ({len(unexpected)}): {_listed(unexpected)}')
    if shapes:
        shown = [f'{k} checkpoint {tuple(state[k].shape)} vs options {tuple(expected[k].shape)}' for k in shapes]
        lines.append(f'  shape mismatches ({len(shapes)}): {_listed(shown, MAX_LISTED_KEYS // 2)}')
    lines.append('  pass the option file this checkpoint was trained with (--opt), or fix network_g to match')
    return '\n'.join(lines)


def load_model(model_path, opt_path=None, param_key=None, device='cpu'):
    """Build D2CNet and load its weights, checking everything on the way.

    Returns:
        tuple[D2CNet, dict]: the network in eval mode on ``device``, and a description dict
        (``param_key``, ``opt_source``, ``net_opt``).
    """
    ckpt = load_checkpoint(model_path)
    state, key = select_state_dict(ckpt, model_path, param_key)
    net_opt, opt_source = network_options(ckpt, opt_path, model_path)
    net = build_network(net_opt, opt_source)
    model_desc = f'checkpoint {model_path}' + (f' ({key})' if key else '')
    problem = compare_state_dicts(net, state, net_opt, opt_source, model_desc)
    if problem:
        raise InferError(problem)
    net.load_state_dict(state, strict=True)
    net.eval().to(device)
    return net, {'param_key': key, 'opt_source': opt_source, 'net_opt': net_opt}


# ------------------------------------------------------------------------------ image I/O


def read_image(path):
    """Decode an image file as stored (works with non-ASCII paths).

    Returns:
        ndarray: uint8 or uint16, (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA (gray + alpha
        PNGs decode as BGRA).

    Raises:
        ImageError: unreadable file, not an image, unsupported pixel type or channel count.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise ImageError(f'cannot read: {err.strerror or err}') from None
    if data.size == 0:
        raise ImageError('empty file')
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError('not an image OpenCV can decode (unknown format or damaged file)')
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f'unsupported pixel type {img.dtype}; 8- and 16-bit images are supported')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] not in (3, 4):
        raise ImageError(f'unsupported number of channels {img.shape[2]}; gray, RGB and RGBA are supported')
    return img


def write_image(path, img):
    """Encode by the file's extension and write (works with non-ASCII paths)."""
    ok, buf = cv2.imencode(osp.splitext(path)[1], img)
    if not ok:
        raise ImageError(f'OpenCV could not encode {osp.basename(path)}')
    buf.tofile(path)


def image_kind(img):
    """'gray', 'rgb' or 'rgba' and the maximum value (255 or 65535) of a decoded image."""
    kind = 'gray' if img.ndim == 2 else ('rgba' if img.shape[2] == 4 else 'rgb')
    return kind, (65535. if img.dtype == np.uint16 else 255.)


def split_input(img):
    """Decoded image -> network input and what is needed to rebuild the same kind of image.

    Returns:
        tuple[Tensor, ndarray | None]: LR (1, 3, H, W) float32 RGB in [0, 1] (16-bit images keep
        full precision) and the alpha channel (H, W) float32 in [0, 1] or None.
    """
    kind, max_value = image_kind(img)
    img = img.astype(np.float32) / max_value
    alpha = None
    if kind == 'gray':
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)  # the network is RGB: run gray as 3 equal channels
    elif kind == 'rgba':
        alpha, img = img[..., 3], img[..., :3]
    return img2tensor(img, bgr2rgb=True, float32=True).unsqueeze(0), alpha


def to_bgr(tensor):
    """(1, 3, H, W) or (3, H, W) RGB tensor -> (H, W, 3) float32 BGR ndarray, clamped to [0, 1]."""
    rgb = tensor.reshape(-1, *tensor.shape[-2:]).clamp(0, 1).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def compose_output(bgr, kind, max_value, alpha=None, size=None):
    """Network output -> an image of the input's kind.

    Args:
        bgr (ndarray): (sH, sW, 3) float32 BGR in [0, 1].
        kind (str): 'gray' (converted back from 3 channels), 'rgb' or 'rgba'.
        max_value (float): 255 (uint8 out) or 65535 (uint16 out).
        alpha (ndarray | None): LR alpha (H, W) in [0, 1], upscaled here with cv2 INTER_LINEAR.
        size (tuple[int, int] | None): Final (width, height) (``--outscale``), resized with
            cv2 INTER_LANCZOS4 before quantisation; None keeps the network's size.

    Returns:
        ndarray: uint8 / uint16, (H', W') gray, (H', W', 3) BGR or (H', W', 4) BGRA.
    """
    out = bgr
    if kind == 'gray':
        out = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)
    elif kind == 'rgba':
        up_alpha = cv2.resize(alpha, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_LINEAR)
        out = np.dstack([out, up_alpha])
    if size is not None and size != (out.shape[1], out.shape[0]):
        out = cv2.resize(out, size, interpolation=cv2.INTER_LANCZOS4)
    dtype = np.uint16 if max_value > 255 else np.uint8
    return (np.clip(out, 0, 1) * max_value).round().astype(dtype)


def output_ext(requested, input_path, kind, max_value):
    """File extension for an output and a note when the requested format cannot hold it."""
    ext = osp.splitext(input_path)[1].lower().lstrip('.') if requested == 'auto' else requested
    if kind == 'rgba' and ext not in ('png', 'tif', 'tiff', 'webp'):
        return 'png', f'{ext or "no extension"} cannot hold an alpha channel: writing PNG'
    if max_value > 255 and ext not in ('png', 'tif', 'tiff'):
        return 'png', f'{ext or "no extension"} cannot hold 16-bit samples: writing PNG'
    if not ext or not cv2.haveImageWriter(f'x.{ext}'):
        return 'png', f'OpenCV cannot write .{ext} files: writing PNG'
    return ext, None


def list_inputs(path):
    """One file, or the non-hidden files of a folder (sorted); raises InferError if none."""
    if osp.isfile(path):
        return [path]
    if osp.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith('.') and osp.isfile(osp.join(path, n)))
        if not names:
            raise InferError(f'input folder {path} has no files')
        return [osp.join(path, n) for n in names]
    raise InferError(f'input not found: {path} (pass -i <image or folder>)')


# ------------------------------------------------------------------------------- inference


def select_device(name):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise InferError('--device cuda: CUDA is not available here (torch.cuda.is_available() is False); '
                         'use --device cpu or auto')
    return torch.device(name)


def bicubic_bgr8(lq, scale):
    """The input upscaled with cv2 INTER_CUBIC in float, as uint8 BGR (sH, sW, 3) (metric baseline)."""
    lr = to_bgr(lq)
    up = cv2.resize(lr, (lr.shape[1] * scale, lr.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
    return (np.clip(up, 0, 1) * 255).round().astype(np.uint8)


def reference_metrics(ref_path, lq, sr, branches, scale):
    """Y-PSNR/SSIM (BasicSR, crop_border = scale) of bicubic, each branch, fused and oracle.

    Args:
        ref_path (str): Ground-truth image, size (sH, sW).
        lq (Tensor): (1, 3, H, W) input; sr (1, 3, sH, sW); branches (1, P, 3, sH, sW).

    Returns:
        dict[str, tuple[float, float]]: method -> (psnr, ssim), in the order bicubic,
        branch1..P, fused, oracle. Images are compared as 8-bit BGR, as BasicSR does.
    """
    hr, _ = split_input(read_image(ref_path))
    if hr.shape[2:] != sr.shape[2:]:
        raise ImageError(f'reference {ref_path} is {hr.shape[3]}x{hr.shape[2]}, the output '
                         f'{sr.shape[3]}x{sr.shape[2]} (WxH); no metrics for this image')
    hr8 = tensor2img(hr)
    images = [('bicubic', bicubic_bgr8(lq, scale))]
    images += [(f'branch{i + 1}', tensor2img(branches[:, i])) for i in range(branches.size(1))]
    # the oracle chooses among the branch images as written (clamped to [0, 1])
    images += [('fused', tensor2img(sr)), ('oracle', tensor2img(oracle_fusion(branches.clamp(0, 1), hr)))]
    return {name: psnr_ssim_y(img, hr8, crop_border=scale) for name, img in images}


def write_grid(path, lq, branches, weights, sr, scale, max_side):
    """Input (bicubic) | branches | fused, and the weight heatmaps under the branches."""
    cells = [bicubic_bgr8(lq, scale)] + [tensor2img(branches[:, i]) for i in range(branches.size(1))]
    cells.append(tensor2img(sr))
    heat = [weight_heatmap(w) for w in weights[0].numpy()]
    height, width = cells[0].shape[:2]
    if max_side and max(height, width) > max_side:  # keep the picture a viewable size
        factor = max_side / max(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        cells = [cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in cells]
        heat = [cv2.resize(h, size, interpolation=cv2.INTER_AREA) for h in heat]
    num = branches.size(1)
    rows = [cells, [None] + heat + [None]]
    labels = [['input (bicubic)'] + [f'branch {i + 1}' for i in range(num)] + ['fused'],
              [''] + [f'weight {i + 1}' for i in range(num)] + ['']]
    write_image(path, labelled_grid(rows, labels))


def process_image(path, net, args, device, forward):
    """Super-resolve one file and write its outputs; returns the metrics dict or None."""
    img = read_image(path)
    kind, max_value = image_kind(img)
    lq, alpha = split_input(img)
    scale = net.upscale
    ref_path = None
    if args.reference:
        ref_path = osp.join(args.reference, osp.basename(path))
        if not osp.isfile(ref_path):
            tqdm.write(f'{PROG}: warning: no reference {ref_path} for {path}; no metrics for it', file=sys.stderr)
            ref_path = None
    need_branches = args.save_branches or args.save_weights or ref_path is not None
    sr, branches, weights = super_resolve(net, lq, scale, tile=args.tile, tile_pad=args.tile_pad,
                                          pre_pad=args.pre_pad, device=device, return_branches=need_branches,
                                          forward=forward)

    height, width = lq.shape[2:]
    size = None
    if args.outscale is not None and args.outscale != scale:
        size = (max(1, int(round(width * args.outscale))), max(1, int(round(height * args.outscale))))
    ext, note = output_ext(args.ext, path, kind, max_value)
    if note:
        tqdm.write(f'{PROG}: note: {osp.basename(path)}: {note}', file=sys.stderr)
    stem = osp.splitext(osp.basename(path))[0]
    name = f'{stem}_{args.suffix}' if args.suffix else stem
    write_image(osp.join(args.output, f'{name}.{ext}'), compose_output(to_bgr(sr), kind, max_value, alpha, size))
    if args.save_branches:
        for i in range(branches.size(1)):
            out = compose_output(to_bgr(branches[:, i]), kind, max_value, alpha, size)
            write_image(osp.join(args.output, f'{stem}_branch{i + 1}.{ext}'), out)
    if args.save_weights:
        for i, weight in enumerate(weights[0].numpy()):
            write_image(osp.join(args.output, f'{stem}_weight{i + 1}.png'), weight_heatmap(weight))
        write_grid(osp.join(args.output, f'{stem}_grid.png'), lq, branches, weights, sr, scale, args.grid_size)
    if ref_path is None:
        return None
    try:
        return reference_metrics(ref_path, lq, sr, branches, scale)
    except ImageError as err:
        tqdm.write(f'{PROG}: warning: {err}', file=sys.stderr)
        return None


def write_metrics(out_dir, rows):
    """Print a table of Y-PSNR/SSIM per image and the mean; write ``metrics.csv``.

    Args:
        rows (list[tuple[str, dict]]): (image file name, method -> (psnr, ssim)).
    """
    methods = list(rows[0][1])
    means = {m: tuple(float(np.mean([r[m][j] for _, r in rows])) for j in range(2)) for m in methods}
    csv_path = osp.join(out_dir, 'metrics.csv')
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['image'] + [f'{m}_{k}' for m in methods for k in ('psnr_y', 'ssim_y')])
        for name, row in rows + [('mean', means)]:
            writer.writerow([name] + [f'{row[m][j]:.4f}' for m in methods for j in range(2)])
    width = max(12, max(len(name) for name, _ in rows) + 1)
    print(f'\nY-channel PSNR (dB) / SSIM, BasicSR, border of `scale` pixels shaved ({len(rows)} image(s)):')
    print(f'{"image":{width}s}' + ''.join(f'{m:>16s}' for m in methods))
    for name, row in rows + [('mean', means)]:
        print(f'{name:{width}s}' + ''.join(f'{row[m][0]:.2f}/{row[m][1]:.4f}'.rjust(16) for m in methods))
    print(f'Metrics written to {csv_path}')


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group('input and output')
    io.add_argument('-i', '--input', required=True, help='an image or a folder of images')
    io.add_argument('-o', '--output', default='results/infer', help='output folder (default: %(default)s)')
    io.add_argument('-s', '--outscale', type=float, default=None,
                    help='final scale: the network output is resized with cv2 LANCZOS4 when this differs from '
                    "the network's scale (default: the network's scale)")
    io.add_argument('--suffix', default='out', help='outputs are <name>_<suffix>.<ext>; empty: <name>.<ext> '
                    '(default: %(default)s)')
    io.add_argument('--ext', default='auto', choices=['auto', 'png', 'jpg'],
                    help="output format; auto = the input's (PNG where the format cannot hold alpha or 16 bits)")
    model = parser.add_argument_group('model')
    model.add_argument('-m', '--model', required=True, help='checkpoint written by training (.pth)')
    model.add_argument('--opt', default=None,
                       help='training option file whose network_g is used; required unless the checkpoint '
                       'carries its options (training checkpoints do not)')
    model.add_argument('--param-key', default=None,
                       help='state dict in the checkpoint (default: params_ema if present, else params)')
    run = parser.add_argument_group('running')
    run.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='default: %(default)s')
    run.add_argument('--precision', default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
                     help='arithmetic of the forward pass (autocast): auto = bf16 on a CPU with native bf16 '
                     '(AVX512-BF16/AMX), fp16 on CUDA, fp32 otherwise; fp16 needs CUDA. A reduced precision '
                     'that gives non-finite or broken output falls back to fp32 with a warning (default: '
                     '%(default)s)')
    run.add_argument('--no-channels-last', dest='channels_last', action='store_false',
                     help='keep the NCHW memory layout instead of channels_last (NHWC), which is faster for '
                     'these convolutions on CPUs and tensor-core GPUs')
    run.add_argument('--fp16', action='store_true',
                     help='old spelling of --precision fp16 (on a CPU: a warning, and fp32)')
    run.add_argument('-t', '--tile', type=int, default=0,
                     help='tile side in input pixels; 0 = whole image at once (default: %(default)s)')
    run.add_argument('--tile-pad', type=int, default=DEFAULT_TILE_PAD,
                     help='context around each tile in input pixels (default: %(default)s)')
    run.add_argument('--pre-pad', type=int, default=0,
                     help='reflection padding at the bottom/right of the input, removed afterwards (default: 0)')
    extra = parser.add_argument_group('pictures and metrics')
    extra.add_argument('--save-branches', action='store_true', help="also write each branch's prediction "
                       '<name>_branch<i>.<ext>')
    extra.add_argument('--save-weights', action='store_true',
                       help='also write the weight maps as heatmaps <name>_weight<i>.png and <name>_grid.png '
                       '(input, branches, weights, fused)')
    extra.add_argument('--grid-size', type=int, default=512,
                       help='longest side of a cell of the grid picture; larger outputs are shrunk, 0 = full size '
                       '(default: %(default)s)')
    extra.add_argument('--reference', metavar='HR_DIR', default=None,
                       help='ground-truth folder (same file names): print Y-PSNR/SSIM of bicubic, each branch, '
                       'fused and the oracle fusion and write <output>/metrics.csv')
    parser.add_argument('-q', '--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    for name in ('tile', 'tile_pad', 'pre_pad', 'grid_size'):
        if getattr(args, name) < 0:
            parser.error(f'--{name.replace("_", "-")} must be >= 0')
    if args.outscale is not None and args.outscale <= 0:
        parser.error('--outscale must be positive')
    if args.reference and not osp.isdir(args.reference):
        parser.error(f'--reference: folder not found: {args.reference}')
    return args


def select_precision(args, device):
    """The autocast dtype (None = fp32) for ``--precision`` / ``--fp16`` on ``device``."""
    if args.fp16:
        if device.type != 'cuda':
            print(f'{PROG}: warning: --fp16 needs CUDA; running in float32 on the {device.type}', file=sys.stderr)
            return None
        args.precision = 'fp16'
    if args.precision == 'bf16' and device.type == 'cpu' and not cpu_has_native_bf16():
        print(f'{PROG}: warning: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated and likely '
              'slower than --precision fp32', file=sys.stderr)
    try:
        return resolve_precision(args.precision, device.type, purpose='infer')
    except ValueError as err:
        raise InferError(f'--precision {args.precision}: {err}') from None


def main(argv=None):
    """Entry point of ``d2c-infer``; returns the exit status (0, 1 some inputs skipped, 2 errors)."""
    args = parse_args(argv)
    try:
        device = select_device(args.device)
        dtype = select_precision(args, device)
        inputs = list_inputs(args.input)
        net, info = load_model(args.model, args.opt, args.param_key, device)
        prepare_network(net, args.channels_last)
        try:
            os.makedirs(args.output, exist_ok=True)
        except OSError as err:
            raise InferError(f'cannot create the output folder {args.output}: {err.strerror or err}') from None
    except InferError as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        return 2
    tiling = f'tile {args.tile}, pad {args.tile_pad}' if args.tile else 'no tiling'
    weights = args.model + (f' [{info["param_key"]}]' if info['param_key'] else '')
    print(f'D2CNet x{net.upscale}, {net.num_branch} branches (L={net.tree_depth}, C={net.tree_width}); weights '
          f'{weights}; options {info["opt_source"]}; {device.type}, {precision_name(dtype)}, '
          f'{"channels_last" if args.channels_last else "NCHW"}; {tiling}; {len(inputs)} input(s) -> {args.output}')
    if args.reference and dtype is not None:
        print(f'{PROG}: note: metrics of a {precision_name(dtype)} run can be a few hundredths of a dB below fp32\'s '
              '(8-bit rounding of slightly different outputs); use --precision fp32 for numbers you report',
              file=sys.stderr)
    forward = GuardedForward(dtype, args.channels_last,
                             warn=lambda message: tqdm.write(f'{PROG}: warning: {message}', file=sys.stderr))

    failed, rows = [], []
    for path in tqdm(inputs, unit='img', disable=args.quiet, file=sys.stderr):
        try:
            metrics = process_image(path, net, args, device, forward)
        except ImageError as err:
            failed.append(path)
            tqdm.write(f'{PROG}: skipped {path}: {err}', file=sys.stderr)
            continue
        except OSError as err:  # e.g. the output folder became unwritable
            failed.append(path)
            tqdm.write(f'{PROG}: skipped {path}: {err}', file=sys.stderr)
            continue
        if metrics is not None:
            rows.append((osp.basename(path), metrics))
    if rows:
        write_metrics(args.output, rows)
    print(f'{len(inputs) - len(failed)} of {len(inputs)} image(s) written to {args.output}')
    if failed:
        print(f'{PROG}: {len(failed)} input(s) skipped: {", ".join(failed)}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
