"""D2CNet: the divergence network and the convergence network of D2C-SR in one module.

Paper: Li et al., "D2C-SR: A Divergence to Convergence Approach for Real-World Image
Super-Resolution", ECCV 2022, Sec. 3.2-3.3.
"""
import inspect

import torch
from torch import nn as nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY
from d2c_utils.errors import UserError
from .arch_util import accepted_options, reject_unknown_options
from .branch_util import BRANCH_REGISTRY, _indices
from .upsample_util import build_tail, read_tail

SUPPORTED_SCALES = (2, 3, 4, 8)
CONVERGENCE_PREFIX = 'convergence.'
WRAPPER_PREFIX = 'module.'  # what DataParallel / DistributedDataParallel put before every key
STAGES = ('full', 'divergence', 'convergence')
INPUT_SKIPS = (None, 'bilinear', 'bicubic')
# options every branch type may take; D2CNet passes a branch only those its __init__ names
GENERIC_BRANCH_OPTIONS = ('num_feat', 'num_group', 'num_block', 'reduction')


@ARCH_REGISTRY.register()
class D2CNet(nn.Module):
    """D2C-SR network: a tree of branches that diverge, fused per pixel.

    Divergence network (state-dict keys not starting with ``convergence.``):
    shallow conv ``head`` -> a tree of depth ``tree_depth`` (L) where every node has
    ``tree_width`` (C) children, each node a basic branch module (``tree.<level>.<node>``)
    -> for every one of the P = C^L leaves, the multi-branch deep residual structure
    (``res_convs.<leaf>.<k>``: walking from the leaf up, ``h = conv_k(h) + ancestor``, the
    last ancestor being the shallow features) -> its own upsampler and output conv
    (``tails.<leaf>``).

    Convergence network (keys ``convergence.*``): the P predictions concatenated
    (3P channels) -> conv-ReLU-conv-ReLU-conv(-ReLU) -> softmax over P -> one weight map
    per branch; the SR image is ``sum_i W_i * I_D^i`` (paper Eq. 8).

    Leaves are numbered depth-first: with L=2, C=2 the order is 11, 12, 21, 22 (the
    authors' release). Leaf ``k``'s ancestor on level ``l`` is node ``k // C**(L - l)``.

    Args:
        num_in_ch (int): Input channels. Default: 3.
        num_out_ch (int): Output channels. Default: 3.
        num_feat (int): Feature channels (F). Default: 64.
        tree_depth (int): Tree depth L >= 1. Default: 2.
        tree_width (int): Children per node C >= 1. Default: 2.
        num_group (int): Residual groups per branch module (G); RCANBranch only. Default: 2.
        num_block (int): Blocks per residual group (B), or per node for branch types without
            groups. Default: 4.
        reduction (int): Channel-attention squeeze factor of RCAB; RCANBranch only. Default: 16.
        upscale (int): Scale factor, one of 2, 3, 4, 8. Default: 4.
        img_range (float): Images are in [0, 1]; features see ``(x - rgb_mean) * img_range``.
            Default: 1.
        rgb_mean (sequence[float]): Mean subtracted from the input and added back after
            every tail (DIV2K's mean). Default: (0.4488, 0.4371, 0.4040).
        branch_type (str): Name in ``BRANCH_REGISTRY`` of the basic branch module
            (d2c_arch/branch_util.py: one per backbone of the paper's Table 3, and SwinIR).
            Default: 'RCANBranch'.
        branch_opt (dict | None): Options of the branch module beyond the generic ones
            (``res_scale``, ``num_grow_ch``, ``window_size``, ...).
        num_fusion_feat (int): Hidden channels of the convergence network. Default: 64.
        fusion_logit_relu (bool): ReLU on the weight logits before the softmax, as in the
            authors' release. Default: True.
        upsampler (str): Every leaf's tail (d2c_arch/upsample_util.py): 'pixelshuffle'
            (the paper's), 'pixelshuffledirect', 'nearest+conv', or 'interpolate' (the input
            is bicubic-interpolated before the head; VDSR). Default: 'pixelshuffle'.
        input_skip (str | None): Add the input interpolated to the output size ('bilinear',
            'bicubic') to every prediction instead of ``rgb_mean``: the image-level skip of
            MSRResNet (bilinear) and VDSR (bicubic). Default: None.
    """

    def __init__(self,
                 num_in_ch=3,
                 num_out_ch=3,
                 num_feat=64,
                 tree_depth=2,
                 tree_width=2,
                 num_group=2,
                 num_block=4,
                 reduction=16,
                 upscale=4,
                 img_range=1.,
                 rgb_mean=(0.4488, 0.4371, 0.4040),
                 branch_type='RCANBranch',
                 branch_opt=None,
                 num_fusion_feat=64,
                 fusion_logit_relu=True,
                 upsampler='pixelshuffle',
                 input_skip=None,
                 **unknown):
        if branch_type not in BRANCH_REGISTRY:
            raise ValueError(f'D2CNet: branch_type={branch_type!r} is not registered; known branch types: '
                             f'{sorted(BRANCH_REGISTRY.keys())}.')
        branch_cls = BRANCH_REGISTRY.get(branch_type)
        branch_keys = accepted_options(branch_cls)
        reject_unknown_options(
            type(self),
            unknown,
            hints={
                key: f'{branch_type} takes it: put it under branch_opt ({{{key}: ...}}) or run d2c-swap; '
                for key in branch_keys
            })
        super().__init__()
        if upscale not in SUPPORTED_SCALES:
            raise ValueError(f'D2CNet: upscale={upscale!r} is not supported; use one of {SUPPORTED_SCALES}.')
        for key, value in (('tree_depth', tree_depth), ('tree_width', tree_width), ('num_feat', num_feat)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'D2CNet: {key} must be a positive integer, got {value!r}.')
        if len(rgb_mean) != num_in_ch or num_in_ch != num_out_ch:
            raise ValueError(f'D2CNet: rgb_mean has {len(rgb_mean)} values but num_in_ch={num_in_ch} and '
                             f'num_out_ch={num_out_ch}; they must all be equal (the mean is added back '
                             'to the output).')
        if input_skip not in INPUT_SKIPS:
            raise ValueError(f'D2CNet: input_skip={input_skip!r}; use one of {INPUT_SKIPS}.')
        branch_kwargs = self._branch_kwargs(branch_cls, branch_keys, branch_opt, num_feat, num_group, num_block,
                                            reduction)

        self.tree_depth = tree_depth
        self.tree_width = tree_width
        self.num_branch = tree_width**tree_depth
        self.upscale = upscale
        self.img_range = img_range
        self.upsampler = upsampler
        self.input_skip = input_skip
        # not persistent: a constant of the architecture, not a learned weight
        self.register_buffer('mean', torch.tensor(rgb_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

        self.head = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        # tree[level - 1][node]: level l holds C**l nodes, none sharing weights
        self.tree = nn.ModuleList([
            nn.ModuleList([branch_cls(**branch_kwargs) for _ in range(tree_width**level)])
            for level in range(1, tree_depth + 1)
        ])
        # res_convs[leaf][k]: the k-th residual conv walking up from the leaf (P * L in all)
        self.res_convs = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(num_feat, num_feat, 3, 1, 1) for _ in range(tree_depth)])
            for _ in range(self.num_branch)
        ])
        self.tails = nn.ModuleList(
            [build_tail(upsampler, upscale, num_feat, num_out_ch) for _ in range(self.num_branch)])
        self.size_multiple = max(node.size_multiple for node in self.tree[0])

        fusion = [
            nn.Conv2d(num_out_ch * self.num_branch, num_fusion_feat, 3, 1, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_fusion_feat, num_fusion_feat, 3, 1, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_fusion_feat, self.num_branch, 3, 1, 1, bias=False),
        ]
        if fusion_logit_relu:
            fusion.append(nn.ReLU(inplace=True))
        self.convergence = nn.Sequential(*fusion)

    @staticmethod
    def _branch_kwargs(branch_cls, branch_keys, branch_opt, num_feat, num_group, num_block, reduction):
        """The keyword arguments of every node: the generic options it names, then ``branch_opt``."""
        # generic options a branch does not name (num_group, reduction: RCAN's) do not apply to it, so a
        # file switched from RCANBranch to another type keeps working
        given = dict(num_feat=num_feat, num_group=num_group, num_block=num_block, reduction=reduction)
        kwargs = {key: given[key] for key in GENERIC_BRANCH_OPTIONS if key in branch_keys}
        for key, value in (branch_opt or {}).items():
            if key in GENERIC_BRANCH_OPTIONS or key not in branch_keys:
                extra = ', '.join(k for k in branch_keys if k not in GENERIC_BRANCH_OPTIONS) or 'none'
                where = ' (it is a top-level network_g option)' if key in GENERIC_BRANCH_OPTIONS else ''
                raise UserError(f'network_g.branch_opt: {branch_cls.__name__} has no extra option {key!r}{where}; '
                                f'its extra options: {extra}.')
            kwargs[key] = value
        return kwargs

    def diverge(self, x):
        """Run the divergence network.

        Args:
            x (Tensor): LR images, (N, num_in_ch, H, W), range [0, 1].

        Returns:
            Tensor: the P predictions, (N, P, num_out_ch, sH, sW), roughly [0, 1] (not clamped).
        """
        in_h, in_w = x.shape[-2:]
        x = self._pad(x)
        mean = self.mean.to(x)
        out_size = (x.shape[-2] * self.upscale, x.shape[-1] * self.upscale)
        if self.upsampler == 'interpolate':
            x = F.interpolate(x, size=out_size, mode='bicubic', align_corners=False)
        # what every prediction is added to: the mean taken off, or the interpolated input (image-level skip)
        if self.input_skip is None:
            base = mean
        elif self.upsampler == 'interpolate' and self.input_skip == 'bicubic':
            base = x
        else:
            base = F.interpolate(x, size=out_size, mode=self.input_skip, align_corners=False)
        shallow = self.head((x - mean) * self.img_range)
        # feats[l][k]: output of node k on level l; level 0 is the shallow features (the root)
        feats = [[shallow]]
        for level_nodes in self.tree:
            parents = feats[-1]
            feats.append([node(parents[k // self.tree_width]) for k, node in enumerate(level_nodes)])

        preds = []
        for leaf in range(self.num_branch):
            h = feats[self.tree_depth][leaf]
            for step, conv in enumerate(self.res_convs[leaf]):
                level = self.tree_depth - 1 - step  # the ancestor this residual comes from
                h = conv(h) + feats[level][leaf // self.tree_width**(self.tree_depth - level)]
            preds.append(self.tails[leaf](h) / self.img_range + base)
        return torch.stack(preds, dim=1)[..., :in_h * self.upscale, :in_w * self.upscale]

    def _pad(self, x):
        """Pad on the bottom and right to a multiple of the branches' ``size_multiple`` (SwinIR's window).

        In an exported graph (ONNX) the pad is always there and always reflects, so the graph
        holds for every input size; such a graph needs inputs of at least ``size_multiple`` pixels.
        """
        m = self.size_multiple
        if m == 1:
            return x
        pad_h, pad_w = -x.shape[-2] % m, -x.shape[-1] % m
        if _tracing():
            # an exported graph must hold the pad for every input size, not the branch the example took
            return F.pad(x, (0, pad_w, 0, pad_h), mode='reflect')
        if not pad_h and not pad_w:
            return x
        mode = 'reflect' if pad_h < x.shape[-2] and pad_w < x.shape[-1] else 'replicate'
        return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)

    def converge(self, branches):
        """Fuse the predictions with per-pixel weights (paper Eq. 8).

        Args:
            branches (Tensor): (N, P, C, sH, sW) predictions of the divergence network.

        Returns:
            tuple[Tensor, Tensor]: SR image (N, C, sH, sW) and weights (N, P, sH, sW),
            non-negative and summing to 1 over P at every pixel.
        """
        n, p, c, h, w = branches.shape
        if p != self.num_branch:
            raise ValueError(f'D2CNet.converge: got {p} branches, the network has {self.num_branch}.')
        weights = F.softmax(self.convergence(branches.reshape(n, p * c, h, w)), dim=1)
        sr = (weights.unsqueeze(2) * branches).sum(dim=1)
        return sr, weights

    def summary_groups(self):
        """Parts ``d2c-summary`` reports, in order: (label, state-dict prefix, 'divergence' | 'convergence').

        Tree nodes are numbered 1-based per level, leaves 1-based depth-first (the order of the branches elsewhere).
        """
        groups = [('head (shallow conv)', 'head.', 'divergence')]
        for level in range(self.tree_depth):
            for node in range(self.tree_width**(level + 1)):
                groups.append((f'tree level {level + 1} node {node + 1}', f'tree.{level}.{node}.', 'divergence'))
        for leaf in range(self.num_branch):
            groups.append((f'residual convs, leaf {leaf + 1}', f'res_convs.{leaf}.', 'divergence'))
        for leaf in range(self.num_branch):
            groups.append((f'tail (upsampler + conv), leaf {leaf + 1}', f'tails.{leaf}.', 'divergence'))
        groups.append(('convergence network', 'convergence.', 'convergence'))
        return groups

    def summary_path(self):
        """State-dict prefixes of the last branch's own path (head, one node per level, its res convs and tail)."""
        leaf = self.num_branch - 1
        nodes = [
            f'tree.{level}.{leaf // self.tree_width**(self.tree_depth - level - 1)}.'
            for level in range(self.tree_depth)
        ]
        return ['head.'] + nodes + [f'res_convs.{leaf}.', f'tails.{leaf}.']

    def forward(self, x, return_branches=False, stage='full', fuse_detached=False):
        """Super-resolve ``x``.

        Args:
            x (Tensor): LR images (N, num_in_ch, H, W) in [0, 1]; for ``stage='convergence'``
                the predictions (N, P, C, sH, sW) instead.
            return_branches (bool): With ``stage='full'``, also return the predictions and
                the weight maps.
            stage (str): 'full' (LR -> SR), 'divergence' (LR -> predictions only) or
                'convergence' (predictions -> (SR, weights)). The model class uses the last
                two so that every training step still goes through ``forward`` (which
                DistributedDataParallel needs).
            fuse_detached (bool): With ``stage='full'``, fuse detached predictions, so the
                convergence loss does not reach the divergence network (joint training).

        Returns:
            'full': SR (N, C, sH, sW), or ``(sr, branches, weights)`` with shapes
            (N, C, sH, sW), (N, P, C, sH, sW), (N, P, sH, sW) if ``return_branches``.
            'divergence': branches. 'convergence': ``(sr, weights)``.
        """
        if stage == 'convergence':
            return self.converge(x)
        if stage not in STAGES:
            raise ValueError(f'D2CNet.forward: unknown stage {stage!r}; use one of {STAGES}.')
        branches = self.diverge(x)
        if stage == 'divergence':
            return branches
        sr, weights = self.converge(branches.detach() if fuse_detached else branches)
        if return_branches:
            return sr, branches, weights
        return sr


def _tracing():
    """True while torch.export / torch.onnx.export or the TorchScript tracer records the network."""
    exporting = getattr(torch.compiler, 'is_exporting', lambda: False)
    return exporting() or torch.jit.is_tracing()


def bare_key(name):
    """A parameter / state-dict key without the ``module.`` prefix of (Distributed)DataParallel."""
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name


def is_convergence_key(name):
    """True if a parameter / state-dict key of D2CNet belongs to the convergence network."""
    return bare_key(name).startswith(CONVERGENCE_PREFIX)


def default_options(cls=None):
    """Constructor defaults of D2CNet (the paper's setting, e.g. ``{'num_feat': 64, ...}``) or of ``cls``."""
    params = inspect.signature((cls or D2CNet).__init__).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def state_dict_differences(expected, loaded):
    """How a state dict to load differs from a network's own.

    Args:
        expected (dict): The network's ``state_dict()``.
        loaded (dict): The state dict to load (keys already stripped with :func:`bare_key`).

    Returns:
        tuple[list, list, list]: keys missing from ``loaded``, keys only in ``loaded`` and keys
        whose shapes differ, each in its dict's order; all empty when ``loaded`` fits.
    """
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    resized = [k for k in expected if k in loaded and tuple(loaded[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, resized


# options that leave no trace in the weights: a checkpoint cannot tell them, the option file must
NOT_INFERABLE = ('img_range', 'rgb_mean', 'fusion_logit_relu', 'input_skip')


def infer_options(state_dict):
    """D2CNet options that a state dict determines, read from its keys and shapes.

    What cannot be read is listed in ``NOT_INFERABLE`` (``img_range``, ``rgb_mean``,
    ``fusion_logit_relu``, ``input_skip``): those need the option file; ``upscale`` of an
    ``interpolate`` tail, and of a one-step ``nearest+conv`` tail (x2 or x3), neither.
    The node's own options come from its branch class's ``read_options``.
    ``module.`` prefixes must already be removed (:func:`bare_key`).

    Args:
        state_dict (dict[str, Tensor]): D2CNet weights.

    Returns:
        dict: some of num_in_ch, num_out_ch, num_feat, tree_depth, tree_width, num_group,
        num_block, reduction, upscale, branch_type, branch_opt, upsampler, num_fusion_feat
        (the keys that could be read), plus ``num_branch`` (not an option: the number of tails).

    Raises:
        ValueError: the keys do not look like D2CNet's (no ``head.weight`` / ``tails.*``).
    """
    keys = list(state_dict)
    if 'head.weight' not in state_dict or not _indices(keys, r'tails\.(\d+)\.'):
        raise ValueError(f'the weights do not look like D2CNet (no head.weight / tails.*); first keys: {keys[:5]}')
    head = state_dict['head.weight']
    opt = {'num_feat': head.shape[0], 'num_in_ch': head.shape[1]}
    levels = _indices(keys, r'tree\.(\d+)\.')
    opt['tree_depth'] = len(levels)
    opt['tree_width'] = len(_indices(keys, r'tree\.0\.(\d+)\.')) if levels else 1
    opt['num_branch'] = len(_indices(keys, r'tails\.(\d+)\.'))
    node = {k[len('tree.0.0.'):]: v for k, v in state_dict.items() if k.startswith('tree.0.0.')}
    for name in BRANCH_REGISTRY.keys():
        found = BRANCH_REGISTRY.get(name).read_options(node, opt['num_feat'])
        if found is not None:
            opt['branch_type'] = name
            opt.update(found)
            break
    tail = {k[len('tails.0.'):]: v for k, v in state_dict.items() if k.startswith('tails.0.')}
    opt.update(read_tail(tail, opt['num_feat'], opt['num_in_ch']))
    if 'convergence.0.weight' in state_dict:
        opt['num_fusion_feat'] = state_dict['convergence.0.weight'].shape[0]
    return opt
