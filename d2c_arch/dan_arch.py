"""DANv2: a Restorer and an Estimator that alternate, unrolled and trained end to end.

Paper: Luo et al., "End-to-end Alternating Optimization for Blind Super Resolution" (DANv2,
arXiv 2105.06878; DAN, NeurIPS 2020). Notation: LR image y (N, C, h, w), scale s, kernel side l,
PCA matrix P (l*l, t), code c (N, t), sg = stop-gradient (``detach``).

    c_0 = vec(delta) P                   (the code of a centred delta kernel)
    for i = 1..T:  x_i = R(y, sg(c_{i-1}))   k_i = E(sg(x_i), y)   c_i = vec(k_i) P

The same R and E serve every iteration. Because of the two stop-gradients, R learns only from a
loss on x and E only from a loss on k (tests check both).
"""
import torch
from torch import nn as nn
from torch.nn import functional as F

from basicsr.archs.arch_util import Upsample
from basicsr.utils.registry import ARCH_REGISTRY
from d2c_utils.errors import UserError
from .arch_util import reject_unknown_options

GROUP_SKIPS = ('double', 'residual')


class DPCB(nn.Module):
    """Dual-path conditional block: the image path is gated by the condition path.

    ``feat + body_f(feat) * body_c(cond)`` and ``cond + body_c(cond)``, where each body is
    conv-LeakyReLU(0.2)-conv. The condition may be 1x1 spatially (the Restorer's code), then the
    product broadcasts it over the image.

    Args:
        num_feat (int): Channels of both paths.
        image_kernel (int): Convolution side on the image path.
        cond_kernel (int): Convolution side on the condition path (1 for a 1x1 code map).

    Shapes: feat (N, F, H, W), cond (N, F, H, W) or (N, F, 1, 1) -> the same shapes.
    """

    def __init__(self, num_feat, image_kernel=3, cond_kernel=1):
        super().__init__()
        self.image_body = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, image_kernel, 1, image_kernel // 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(num_feat, num_feat, image_kernel, 1, image_kernel // 2))
        self.cond_body = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, cond_kernel, 1, cond_kernel // 2), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(num_feat, num_feat, cond_kernel, 1, cond_kernel // 2))

    def forward(self, feat, cond):
        cond_feat = self.cond_body(cond)
        return feat + self.image_body(feat) * cond_feat, cond + cond_feat


class DPCG(nn.Module):
    """A group of DPCBs with a group skip.

    ``skip='residual'`` adds the group's input to the chain's output, the design as described.
    ``skip='double'`` returns twice the chain's output and drops the input: what the official
    code computes (its blocks update the list they are given in place, so the "input" it adds
    is the chain's output itself), and so what the released weights were trained with.

    Shapes: as :class:`DPCB`.
    """

    def __init__(self, num_feat, num_block, image_kernel=3, cond_kernel=1, skip='double'):
        super().__init__()
        if skip not in GROUP_SKIPS:
            raise ValueError(f'DAN: group_skip={skip!r}; use one of {GROUP_SKIPS}.')
        self.skip = skip
        self.blocks = nn.ModuleList([DPCB(num_feat, image_kernel, cond_kernel) for _ in range(num_block)])

    def forward(self, feat, cond):
        out_feat, out_cond = feat, cond
        for block in self.blocks:
            out_feat, out_cond = block(out_feat, out_cond)
        if self.skip == 'double':
            return out_feat * 2, out_cond * 2
        return feat + out_feat, cond + out_cond


class Restorer(nn.Module):
    """SR image from the LR image and a kernel code.

    Image head (3x3) and code head (1x1 on the code as a (t, 1, 1) map), ``num_group`` DPCGs of
    ``num_block`` DPCBs (3x3 image path, 1x1 code path), a 3x3 fusion conv, BasicSR's
    ``Upsample`` (conv + pixel shuffle) and a 3x3 output conv. No image skip, no clamp.

    Shapes: lq (N, C, h, w) in [0, 1], code (N, t) -> SR (N, C, sh, sw), roughly [0, 1].
    """

    def __init__(self,
                 num_in_ch=3,
                 num_feat=64,
                 num_group=5,
                 num_block=10,
                 upscale=4,
                 code_length=10,
                 group_skip='double'):
        super().__init__()
        self.image_head = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.code_head = nn.Conv2d(code_length, num_feat, 1, 1, 0)
        self.groups = nn.ModuleList([DPCG(num_feat, num_block, 3, 1, group_skip) for _ in range(num_group)])
        self.fusion = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = Upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_in_ch, 3, 1, 1)

    def forward(self, lq, code):
        feat = self.image_head(lq)
        cond = self.code_head(code[:, :, None, None])
        for group in self.groups:
            feat, cond = group(feat, cond)
        return self.conv_last(self.upsample(self.fusion(feat)))


class Estimator(nn.Module):
    """Blur kernel from the LR image and an SR image.

    LR head (5x5) and SR head (a (4s+1)-wide conv with stride s, bringing the SR image to the LR
    grid), one DPCG whose image path is the LR features and whose condition the SR features
    (3x3 on both), then conv 3x3 to twice the width, global average pooling, 1x1 conv to l*l
    logits and a softmax: an explicit kernel, non-negative and summing to 1.

    Shapes: sr (N, C, sh, sw), lq (N, C, h, w) -> kernel (N, l, l).
    """

    def __init__(self, num_in_ch=3, num_feat=32, num_block=5, upscale=4, kernel_size=21, group_skip='double'):
        super().__init__()
        self.kernel_size = kernel_size
        self.lr_head = nn.Conv2d(num_in_ch, num_feat, 5, 1, 2)
        self.sr_head = nn.Conv2d(num_in_ch, num_feat, 4 * upscale + 1, upscale, 2 * upscale)
        self.group = DPCG(num_feat, num_block, 3, 3, group_skip)
        self.tail = nn.Sequential(
            nn.Conv2d(num_feat, num_feat * 2, 3, 1, 1), nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat * 2, kernel_size**2, 1, 1, 0))

    def forward(self, sr, lq):
        feat, _ = self.group(self.lr_head(lq), self.sr_head(sr))
        logits = self.tail(feat).flatten(1)
        return F.softmax(logits, dim=1).view(-1, self.kernel_size, self.kernel_size)


def load_pca_matrix(source, kernel_size, code_length, what='network_g.pca_matrix'):
    """The PCA matrix (l*l, t) from a file or tensor, checked against the network's sizes.

    Args:
        source (str | Tensor): A .pth holding the matrix: a bare tensor (l*l, t) or (1, l*l, t)
            (the official files), or a dict with ``pca_matrix`` (scripts/make_dan_pca.py).
        kernel_size (int): l.
        code_length (int): t.
        what (str): How the user names it, for messages.

    Raises:
        UserError: unreadable file, or a matrix whose shape does not fit (both shapes named).
    """
    if isinstance(source, str):
        try:
            loaded = torch.load(source, map_location='cpu', weights_only=True)
        except FileNotFoundError:
            raise UserError(f'{what}: file not found: {source}') from None
        except Exception as err:
            raise UserError(f'{what}: cannot read {source} ({type(err).__name__}: {err})') from None
        name = source
    else:
        loaded, name = source, 'the given matrix'
    if isinstance(loaded, dict):
        loaded = loaded.get('pca_matrix', loaded.get('encoder'))
    if not torch.is_tensor(loaded):
        raise UserError(f'{what}: {name} holds no PCA matrix (a tensor, or a dict with "pca_matrix")')
    matrix = loaded.float()
    if matrix.dim() == 3 and matrix.shape[0] == 1:
        matrix = matrix[0]
    want = (kernel_size**2, code_length)
    if tuple(matrix.shape) != want:
        raise UserError(f'{what}: {name} has shape {tuple(matrix.shape)}, the network needs (kernel_size**2, '
                        f'code_length) = {want} (kernel_size {kernel_size}, code_length {code_length}); use the PCA '
                        'file made for these sizes (scripts/make_dan_pca.py) or change network_g')
    return matrix.contiguous()


@ARCH_REGISTRY.register()
class DAN(nn.Module):
    """DANv2: Restorer and Estimator alternating ``loop`` times (weights shared across iterations).

    Args:
        num_in_ch (int): Image channels. Default: 3.
        num_feat (int): Restorer width. Default: 64.
        num_group (int): Restorer DPCGs. Default: 5.
        num_block (int): DPCBs per Restorer group. Default: 10.
        upscale (int): Scale s: 2, 3 or 4. Default: 4.
        code_length (int): PCA code length t. Default: 10.
        kernel_size (int): Kernel side l (odd). Default: 21.
        loop (int): Iterations T. Default: 4 (every official option file).
        estimator_feat (int): Estimator width. Default: 32.
        estimator_blocks (int): DPCBs of the Estimator's group. Default: 5.
        pca_matrix (str | None): A .pth with the PCA matrix (l*l, t). None: zeros until a checkpoint
            (which always holds the matrix, as the buffer ``pca_matrix``) is loaded.
        group_skip (str): 'double' (the official code's, needed by the released weights) or
            'residual' (see :class:`DPCG`). Default: 'double'.

    ``forward(lq)`` returns the SR image of the last iteration (N, C, sh, sw), so BasicSR's SRModel,
    test and inference code work unchanged; ``return_kernel`` adds the last kernel (N, l, l);
    ``return_all`` returns the lists of every iteration's SR images and kernels instead.
    """

    def __init__(self,
                 num_in_ch=3,
                 num_feat=64,
                 num_group=5,
                 num_block=10,
                 upscale=4,
                 code_length=10,
                 kernel_size=21,
                 loop=4,
                 estimator_feat=32,
                 estimator_blocks=5,
                 pca_matrix=None,
                 group_skip='double',
                 **unknown):
        reject_unknown_options(type(self), unknown)
        super().__init__()
        if upscale not in (2, 3, 4):
            raise ValueError(f'DAN: upscale={upscale!r}; use 2, 3 or 4.')
        if kernel_size % 2 != 1:
            raise ValueError(f'DAN: kernel_size={kernel_size!r} must be odd (a kernel has a centre tap).')
        if loop < 1:
            raise ValueError(f'DAN: loop={loop!r} must be >= 1.')
        self.upscale, self.loop, self.kernel_size, self.code_length = upscale, loop, kernel_size, code_length
        self.restorer = Restorer(num_in_ch, num_feat, num_group, num_block, upscale, code_length, group_skip)
        self.estimator = Estimator(num_in_ch, estimator_feat, estimator_blocks, upscale, kernel_size, group_skip)
        matrix = torch.zeros(kernel_size**2, code_length)
        if pca_matrix is not None:
            matrix = load_pca_matrix(pca_matrix, kernel_size, code_length)
        # a buffer: saved with the weights, so a checkpoint runs without the PCA file
        self.register_buffer('pca_matrix', matrix)
        self._pca_checked = False

    def _check_pca(self):
        if not self._pca_checked:
            if not bool(self.pca_matrix.any()):
                raise UserError('DAN: no PCA matrix: set network_g.pca_matrix to a .pth made by '
                                'scripts/make_dan_pca.py (or the official pca_matrix.pth), or load a checkpoint')
            self._pca_checked = True

    def encode(self, kernel):
        """Kernel code ``vec(k) P`` (no mean subtracted, as the official code): (N, l, l) -> (N, t)."""
        return kernel.flatten(1) @ self.pca_matrix.to(kernel.dtype)

    def initial_code(self, batch):
        """c_0, the code of a centred delta kernel: row ``l*l // 2`` of P, for every image (N, t)."""
        self._check_pca()
        return self.pca_matrix[self.kernel_size**2 // 2].expand(batch, -1)

    def forward(self, lq, return_kernel=False, return_all=False):
        """Alternate ``loop`` times.

        Args:
            lq (Tensor): (N, C, h, w) in [0, 1].
            return_kernel (bool): Also return the last kernel estimate (N, l, l).
            return_all (bool): Return ``(srs, kernels)``: lists of the ``loop`` SR images
                (N, C, sh, sw) and kernels (N, l, l), in order.
        """
        code = self.initial_code(lq.size(0)).to(lq.dtype)
        srs, kernels = [], []
        for _ in range(self.loop):
            sr = self.restorer(lq, code.detach())
            kernel = self.estimator(sr.detach(), lq)
            code = self.encode(kernel)
            srs.append(sr)
            kernels.append(kernel)
        if return_all:
            return srs, kernels
        if return_kernel:
            return srs[-1], kernels[-1]
        return srs[-1]

    @torch.no_grad()
    def estimate_code(self, lq):
        """The code the last SR image is made with, c_{T-1}, and the last kernel k_T, for ``lq`` (N, C, h, w).

        Tiled inference runs the loop once on the whole image (the Estimator pools over all of
        it), then restores every tile with this code, so all tiles share one kernel.
        """
        code = self.initial_code(lq.size(0)).to(lq.dtype)
        kernel = None
        for step in range(self.loop):
            sr = self.restorer(lq, code)
            kernel = self.estimator(sr, lq)
            if step < self.loop - 1:
                code = self.encode(kernel)
        return code, kernel


def infer_dan_options(state_dict):
    """DAN options read from its weights (keys without the ``module.`` prefix of DataParallel; strip it first).

    Read: num_in_ch, num_feat, num_group, num_block, upscale, code_length, kernel_size,
    estimator_feat, estimator_blocks. Not readable: ``loop`` (weights are shared across
    iterations) and ``group_skip`` (no trace in the weights); they keep the defaults (4, 'double').

    Raises:
        ValueError: the keys do not look like DAN's.
    """
    keys = list(state_dict)
    if 'restorer.image_head.weight' not in state_dict or 'estimator.lr_head.weight' not in state_dict:
        raise ValueError(f'the weights do not look like DAN (no restorer.image_head / estimator.lr_head); '
                         f'first keys: {keys[:5]}')
    head = state_dict['restorer.image_head.weight']
    groups = {k.split('.')[2] for k in keys if k.startswith('restorer.groups.')}
    blocks = {k.split('.')[4] for k in keys if k.startswith('restorer.groups.0.blocks.')}
    est_blocks = {k.split('.')[3] for k in keys if k.startswith('estimator.group.blocks.')}
    tail = state_dict['estimator.tail.2.weight']
    sr_head = state_dict['estimator.sr_head.weight']
    return {
        'num_in_ch': head.shape[1],
        'num_feat': head.shape[0],
        'num_group': len(groups),
        'num_block': len(blocks),
        'upscale': (sr_head.shape[-1] - 1) // 4,
        'code_length': state_dict['restorer.code_head.weight'].shape[1],
        'kernel_size': int(round(tail.shape[0]**0.5)),
        'estimator_feat': state_dict['estimator.lr_head.weight'].shape[0],
        'estimator_blocks': len(est_blocks),
    }
