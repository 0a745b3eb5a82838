"""Forward passes of D2CNet for inference: one call, whole image or tile by tile.

:func:`run_network` is the only place that calls the network, so that precision and memory
layout (autocast, channels_last) are applied in one spot; :class:`GuardedForward` adds the
fall-back to fp32 when a reduced precision breaks the output.
:func:`super_resolve` keeps the whole image in host memory and sends only (padded) tiles to
the device; the outputs are stitched into host tensors.

Tiling is exact for the convolutions as long as ``tile_pad`` covers their receptive field, but
not for RCAN's channel attention: every RCAB pools its features over the *whole input* it is
given (a global average), so a tile sees the statistics of its padded window instead of those of
the image. A larger ``tile_pad`` (and larger tiles) bring the window statistics closer to the
image's; docs/inference.md (Tiling) gives measured differences.
"""
import warnings

import torch
from torch.nn import functional as F

from d2c_utils.eval_util import tensor_psnr
from d2c_utils.precision_util import autocast, precision_name
# the tiles and their windows: one definition for the PyTorch and the numpy path (same stitching)
from .array_infer_util import split_even, tile_boxes  # noqa: F401

# mean distance (range 0-1) between an SR image's block averages and its input beyond which the
# output is treated as broken; a trained D2CNet is near 0.01, a random one near 0.13
WRONG_OUTPUT_LEVEL = 0.2
# reduced-precision and fp32 outputs that agree at least this well (PSNR, dB) are the same image
AGREEMENT_DB = 30.


@torch.no_grad()
def run_network(net, lq, return_branches=False, dtype=None, channels_last=False):
    """One forward pass of D2CNet on a batch that is already on the network's device.

    Args:
        net (nn.Module | RuntimeModel): D2CNet in eval mode (in the channels_last layout if
            ``channels_last``, see :func:`prepare_network`), or an exported D2CNet run by ONNX
            Runtime / OpenVINO (:mod:`d2c_deploy.runtime_util`).
        lq (Tensor): LR images (N, 3, h, w), float32, range [0, 1], on the network's device.
        return_branches (bool): Also return the P predictions and the weight maps.
        dtype (torch.dtype | None): Autocast dtype (torch.bfloat16 / torch.float16) or None
            for plain fp32 (see :func:`d2c_utils.precision_util.resolve_precision`).
        channels_last (bool): Feed the input in the channels_last (NHWC) memory layout.

    Returns:
        Tensor | tuple[Tensor, Tensor, Tensor]: float32 tensors on ``lq``'s device, not
        clamped: SR (N, 3, sh, sw) roughly in [0, 1]; with ``return_branches`` also branches
        (N, P, 3, sh, sw) and weights (N, P, sh, sw) in [0, 1], summing to 1 over P.
    """
    if getattr(net, 'runs_exported', False):  # an exported network: the runtime has its own layouts and precisions
        return net.run(lq, return_branches, dtype)
    if channels_last:
        lq = lq.contiguous(memory_format=torch.channels_last)
    with autocast(lq.device.type, dtype):
        out = net(lq, return_branches=return_branches)
    if return_branches:
        return tuple(t.float() for t in out)
    return out.float()


def prepare_network(net, channels_last):
    """Put the convolution weights of ``net`` in the layout :func:`run_network` feeds (in place)."""
    if getattr(net, 'runs_exported', False):
        return net
    return net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def output_problem(lq, out):
    """Why a forward pass's output is unusable, or None if it looks sane.

    Unusable: non-finite values anywhere; a flat SR image (standard deviation below 1 % of the
    input's: the black or grey images of an fp16 overflow); or an SR image whose block averages
    (one block per input pixel) are on average more than ``WRONG_OUTPUT_LEVEL`` away from the
    input, which a super-resolution model does not do (trained models: about 0.01; random
    weights: about 0.13).

    Args:
        lq (Tensor): (N, 3, h, w) input in [0, 1].
        out (Tensor | tuple[Tensor, ...]): what :func:`run_network` returned.
    """
    outs = out if isinstance(out, tuple) else (out, )
    if not all(bool(torch.isfinite(t).all()) for t in outs):
        return 'non-finite values (inf/NaN)'
    sr, lq = outs[0], lq.float()
    if float(sr.std()) <= 0.01 * float(lq.std()):
        return f'a flat image (standard deviation {float(sr.std()):.2g}, input {float(lq.std()):.2g})'
    scale = max(1, sr.size(-1) // lq.size(-1))
    distance = float((F.avg_pool2d(sr, scale) - lq).abs().mean())
    if distance > WRONG_OUTPUT_LEVEL:
        return f'an image far from the input (mean |block average - input| = {distance:.3f} of the range 0-1)'
    return None


class GuardedForward:
    """:func:`run_network` at a reduced precision, with a fall-back to fp32 for broken outputs.

    Every output of a reduced-precision pass is checked (:func:`output_problem`). A suspicious
    one is recomputed in fp32; if the fp32 output is sane (or the two agree to less than
    ``AGREEMENT_DB``), the reduced precision is at fault: the fp32 output is used, ``warn``
    is called once with the reason, and all later passes run in fp32. If fp32 gives a similar
    flat or far output, it is the model's own behaviour (or the input's: an untrained network's
    output is far from its input) and the reduced precision stays for the later passes (this one
    returns the fp32 output it paid for); those two checks are then switched off, so they are not
    paid for again: one extra pass per run at most.
    Non-finite values always mean a fall-back.

    Args:
        dtype (torch.dtype | None): Autocast dtype, None for plain fp32 (no checks).
        channels_last (bool): Passed to :func:`run_network`.
        warn (callable): ``warn(message)``; default :func:`warnings.warn`.
        hint (str): How to avoid the attempt, appended to the warning.

    Attributes:
        dtype: The dtype used now (None after a fall-back).
        fallback_reason (str | None): Why it fell back, if it did.
    """

    def __init__(self,
                 dtype=None,
                 channels_last=False,
                 warn=None,
                 hint='use --precision fp32 to skip the reduced-precision attempt'):
        self.dtype = dtype
        self.hint = hint
        self.channels_last = channels_last
        self.warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self.fallback_reason = None
        self._check_distance = True

    def __call__(self, net, lq, return_branches=False):
        out = run_network(net, lq, return_branches, self.dtype, self.channels_last)
        if self.dtype is None:
            return out
        problem = output_problem(lq, out)
        finite = problem is None or not problem.startswith('non-finite')
        if problem is None or (finite and not self._check_distance):
            return out
        reference = run_network(net, lq, return_branches, None, self.channels_last)
        if finite and output_problem(lq, reference) is not None:
            first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
            if tensor_psnr(first(out), first(reference)) >= AGREEMENT_DB:
                self._check_distance = False  # fp32 does the same: the model's (or input's) doing, not an overflow
                return reference  # paid for already, and the more exact of the two
        self.fallback_reason = f'{precision_name(self.dtype)} gave {problem}'
        self.warn(f'{self.fallback_reason}; falling back to fp32 for this and all further passes ({self.hint})')
        self.dtype = None
        return reference


def super_resolve(net,
                  img,
                  scale,
                  tile=0,
                  tile_pad=0,
                  pre_pad=0,
                  device=None,
                  return_branches=False,
                  forward=run_network,
                  tile_callback=None):
    """Super-resolve one host image, whole or tile by tile.

    Args:
        net (nn.Module): D2CNet in eval mode, on ``device``.
        img (Tensor): LR image (1, 3, H, W), float32, range [0, 1], in host memory.
        scale (int): The network's scale factor s.
        tile (int): Tile side in LR pixels; 0 = the whole image in one pass.
        tile_pad (int): LR pixels of context around each tile (see :func:`tile_boxes`).
        pre_pad (int): Reflection padding added to the bottom and right of the whole image
            before inference and cut off afterwards (fewer border artefacts for some models);
            clipped to ``min(H, W) - 1``. 0 leaves the image as it is.
        device (torch.device | None): Where tiles are computed; default ``img.device``.
        return_branches (bool): Also return branches and weight maps (P times more host memory).
        forward (callable): ``forward(net, lq, return_branches)`` -> like :func:`run_network`
            (e.g. a :class:`GuardedForward` for reduced precision).
        tile_callback (callable | None): Called with ``(index, num_tiles)`` after every tile.

    Returns:
        tuple[Tensor, Tensor | None, Tensor | None]: float32 host tensors, not clamped:
        SR (1, 3, sH, sW), branches (1, P, 3, sH, sW) and weights (1, P, sH, sW) (None unless
        ``return_branches``).
    """
    if img.dim() != 4 or img.size(0) != 1:
        raise ValueError(f'super_resolve: expected one image (1, C, H, W), got shape {tuple(img.shape)}')
    device = img.device if device is None else torch.device(device)
    height, width = img.shape[2:]
    pre_pad = max(0, min(int(pre_pad), height - 1, width - 1))
    if pre_pad:
        img = F.pad(img, (0, pre_pad, 0, pre_pad), mode='reflect')
    pad_h, pad_w = img.shape[2:]

    sr = branches = weights = None
    boxes = tile_boxes(pad_h, pad_w, tile, tile_pad)
    for index, ((y0, y1, x0, x1), (wy0, wy1, wx0, wx1)) in enumerate(boxes):
        # a slice of the image is a strided view; convolutions on it take a much slower path
        window = img[:, :, wy0:wy1, wx0:wx1].contiguous().to(device)
        out = forward(net, window, return_branches=return_branches)
        out = out if return_branches else (out, )
        # where the tile sits inside the window's output
        oy0, ox0 = (y0 - wy0) * scale, (x0 - wx0) * scale
        oy1, ox1 = oy0 + (y1 - y0) * scale, ox0 + (x1 - x0) * scale
        if sr is None:  # allocate the host outputs once the number of branches is known
            sr = torch.empty(1, out[0].size(1), pad_h * scale, pad_w * scale)
            if return_branches:
                branches = torch.empty(1, *out[1].shape[1:3], pad_h * scale, pad_w * scale)
                weights = torch.empty(1, out[2].size(1), pad_h * scale, pad_w * scale)
        dst = (Ellipsis, slice(y0 * scale, y1 * scale), slice(x0 * scale, x1 * scale))
        src = (Ellipsis, slice(oy0, oy1), slice(ox0, ox1))
        sr[dst] = out[0][src].cpu()
        if return_branches:
            branches[dst] = out[1][src].cpu()
            weights[dst] = out[2][src].cpu()
        del out, window
        if tile_callback is not None:
            tile_callback(index + 1, len(boxes))

    if pre_pad:
        crop = (Ellipsis, slice(0, height * scale), slice(0, width * scale))
        sr = sr[crop].contiguous()
        if return_branches:
            branches, weights = branches[crop].contiguous(), weights[crop].contiguous()
    return sr, branches, weights
