"""DAN checkpoints in ``d2c-infer``: loading, one kernel estimate per image, tiles restored with it.

DAN's Estimator pools over its whole input, so tiles run through the full loop would each get a
kernel of their own. ``d2c-infer`` instead estimates the kernel once per image, on the central
``kernel_crop`` x ``kernel_crop`` LR pixels (the whole image when it is smaller: then the result
equals ``net(lq)`` exactly), and restores the whole image or every tile with the Restorer and that
one code (c_{T-1}, the code the loop's last SR image is made with).
"""
import torch
import yaml
from torch import nn as nn

from d2c_arch import DAN, infer_dan_options
from d2c_utils.errors import UserError
from .checkpoint_util import load_arch_checkpoint, load_checkpoint

DAN_KEY = 'restorer.image_head.weight'
SDFLOW_KEY = 'lr_encoder.conv_first.weight'
# options the weights cannot tell; a checkpoint without options runs with these (and a warning)
DAN_ASSUMED = {'loop': 4, 'group_skip': 'double'}


def model_type(model_path, opt_path=None):
    """'DAN', 'SDFlow' or 'D2CNet': what ``--model`` (with ``--opt``) holds, from the option file or the keys."""
    if model_path.lower().endswith('.onnx'):
        return 'D2CNet'
    if opt_path:
        try:
            with open(opt_path, encoding='utf-8') as f:
                network = (yaml.safe_load(f) or {}).get('network_g') or {}
        except (OSError, yaml.YAMLError):
            return 'D2CNet'  # the D2CNet loader reports the problem with the file
        return network.get('type') if network.get('type') in ('DAN', 'SDFlow') else 'D2CNet'
    try:
        ckpt = load_checkpoint(model_path)
    except UserError:
        return 'D2CNet'
    state = ckpt.get('params_ema', ckpt.get('params', ckpt)) if isinstance(ckpt, dict) else None
    if isinstance(state, dict) and any(k.endswith(SDFLOW_KEY) for k in state):
        return 'SDFlow'
    return 'DAN' if isinstance(state, dict) and any(k.endswith(DAN_KEY) for k in state) else 'D2CNet'


def load_dan(model_path, opt_path=None, param_key=None, device='cpu'):
    """Build DAN and load a checkpoint (weights only; the PCA matrix comes from the checkpoint).

    Returns:
        tuple[DAN, dict]: the network in eval mode, and ``param_key``, ``opt_source``,
        ``net_opt``, ``warnings`` (as :func:`d2c_inference.checkpoint_util.load_model`).
    """
    net, info = load_arch_checkpoint(
        model_path,
        opt_path,
        param_key,
        device,
        DAN,
        lambda state: dict(infer_dan_options(state), **DAN_ASSUMED),
        f'no options: loop={DAN_ASSUMED["loop"]} and group_skip={DAN_ASSUMED["group_skip"]} assumed (the weights '
        'cannot tell them); pass --opt <the training option file> if they differ',
        # the checkpoint's buffer is loaded; no need for the PCA file here
        fixed={'pca_matrix': None})
    if not bool(net.pca_matrix.any()):  # found here, not at the first image
        raise UserError(f'{model_path}: its PCA matrix (the buffer pca_matrix) is all zeros, so DAN cannot encode '
                        'kernels; convert the official weights with d2c-convert-dan --pca <pca_matrix.pth>, or use '
                        'a checkpoint written by training with network_g.pca_matrix set')
    return net, info


def central_crop(lq, size):
    """The central ``size`` x ``size`` window of (N, C, H, W) (the whole image where it is smaller)."""
    height, width = lq.shape[-2:]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return lq[..., top:top + size, left:left + size]


@torch.no_grad()
def estimate_kernel(net, lq, kernel_crop, device, dtype=None):
    """One kernel estimate for an image.

    Args:
        net (DAN): In eval mode on ``device``.
        lq (Tensor): (1, C, H, W) in [0, 1], host memory.
        kernel_crop (int): Side of the central LR window the loop runs on; 0 = the whole image.
        dtype (torch.dtype | None): Autocast dtype.

    Returns:
        tuple[Tensor, Tensor]: code c_{T-1} (1, t) float32 and kernel k_T (l, l) float32, on ``device``.
    """
    from d2c_utils.precision_util import autocast
    window = central_crop(lq, kernel_crop) if kernel_crop else lq
    window = window.contiguous().to(device)
    with autocast(window.device.type, dtype):
        code, kernel = net.estimate_code(window)
    return code.float(), kernel[0].float()


class FixedKernelRestorer(nn.Module):
    """DAN's Restorer with one code, behind D2CNet's call (what the tiling code runs).

    Shapes: lq (N, C, h, w) in [0, 1] -> SR (N, C, sh, sw).
    """

    def __init__(self, net, code):
        super().__init__()
        self.net = net
        self.upscale = net.upscale
        self.register_buffer('code', code, persistent=False)

    def forward(self, lq, return_branches=False):
        if return_branches:
            raise UserError('DAN has no branches or weight maps; drop --save-branches / --save-weights')
        return self.net.restorer(lq, self.code.expand(lq.size(0), -1).to(lq.dtype))
