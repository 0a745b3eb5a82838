"""DAN checkpoints in ``d2c-infer``: loading, one kernel estimate per image, tiles restored with it.

DAN's Estimator pools over its whole input, so tiles run through the full loop would each get a
kernel of their own. ``d2c-infer`` instead estimates the kernel once per image, on the central
``kernel_crop`` x ``kernel_crop`` LR pixels (the whole image when it is smaller: then the result
equals ``net(lq)`` exactly), and restores the whole image or every tile with the Restorer and that
one code (c_{T-1}, the code the loop's last SR image is made with). An exported DAN
(``d2c_deploy.runtime_util.DANRuntimeModel``) offers the same two steps, ``estimate_code`` and ``restore``.
"""
import torch
from torch import nn as nn

from d2c_utils.errors import UserError


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
    if getattr(net, 'runs_exported', False):  # ONNX Runtime / OpenVINO (d2c_deploy.runtime_util.DANRuntimeModel)
        code, kernel = net.estimate_code(window, dtype)
        return code.float(), kernel[0].float()
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
        # an exported DAN: the tiling code calls run(), which restores with the runtime's ``restore`` graph
        self.runs_exported = getattr(net, 'runs_exported', False)
        self.register_buffer('code', code, persistent=False)

    def forward(self, lq, return_branches=False):
        if return_branches:
            raise UserError('DAN has no branches or weight maps; drop --save-branches / --save-weights')
        return self.net.restorer(lq, self.code.expand(lq.size(0), -1).to(lq.dtype))

    def run(self, lq, return_branches=False, dtype=None):
        """What :func:`d2c_inference.tile_util.run_network` calls for an exported DAN (float32 on the host)."""
        if return_branches:
            raise UserError('DAN has no branches or weight maps; drop --save-branches / --save-weights')
        return self.net.restore(lq, self.code, dtype)


def one_kernel_per_image(net, lq, options, device, forward):
    """DAN's step before tiling (``process_image``'s ``per_image``): the kernel, then a Restorer with its code.

    Returns:
        tuple[FixedKernelRestorer, Tensor]: what the tiles run through, and the kernel (l, l) to save.
    """
    code, kernel = estimate_kernel(net, lq, options.kernel_crop, device, getattr(forward, 'dtype', None))
    return FixedKernelRestorer(net, code), kernel
