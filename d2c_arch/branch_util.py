"""Basic branch modules: the nodes of D2CNet's divergence tree, one per backbone.

Every node of the divergence tree is one *basic branch module* (paper Sec. 3.2): a module
mapping features ``(N, num_feat, H, W)`` to features of the same shape. D2C-SR uses RCAN's
residual groups; Sec. 4.3 / Table 3 puts the same tree around other networks' basic modules.
Register a class in ``BRANCH_REGISTRY`` and select it with ``branch_type`` in D2CNet's options.

A branch class is built as ``cls(num_feat=..., [num_group=...,] [num_block=...,]
[reduction=...,] **branch_opt)``: D2CNet passes only the generic options its ``__init__``
names. Besides ``__init__`` a branch class has

* ``original``: the registered arch (BasicSR's or ours) whose basic module it is, for d2c-swap;
* ``depth_option``: the generic option d2c-swap lowers to fit a parameter budget;
* ``size_multiple``: inputs must be a multiple of it in height and width (SwinIR's window);
* ``read_options(node_state, num_feat)``: the options one node's weights determine (keys
  relative to ``tree.0.0.``), or None when the weights are not this branch's;
* ``counterpart(net_opt)``: D2CNet options that keep the original's hyper-parameters, and the
  original's depth in ``depth_option`` units (see d2c_convert/swap_util.py).

Where each backbone's global structure goes in the tree is written in each class's docstring;
the common rule: the original's *long skip* (and the conv just before it) is the tree's
multi-branch deep residual structure (``res_convs``), its *upsampler* is every leaf's tail
(``upsampler``, d2c_arch/upsample_util.py), everything in between is the node.
"""
import math
import re

from torch import nn as nn

from basicsr.archs.arch_util import ResidualBlockNoBN
from basicsr.archs.rcan_arch import ResidualGroup
from basicsr.archs.rrdbnet_arch import RRDB
from basicsr.archs.swinir_arch import RSTB, PatchEmbed, PatchUnEmbed
from basicsr.utils.registry import Registry
from .imdn_arch import DistillationFusion
from .rdn_arch import GlobalFeatureFusion

BRANCH_REGISTRY = Registry('d2c_branch')
DIV2K_MEAN = [0.4488, 0.4371, 0.4040]


def _indices(keys, pattern):
    """Distinct integers captured by ``pattern`` (a regex with one group) over ``keys``."""
    found = set()
    for key in keys:
        match = re.match(pattern, key)
        if match:
            found.add(int(match.group(1)))
    return found


def _no_mean(num_ch):
    return [0.] * num_ch


def _counterpart(net_opt, upsampler, **extra):
    """D2CNet options of an original with ``num_feat``/``num_block`` and no mean shift, and its depth."""
    opt = dict(
        num_feat=net_opt['num_feat'],
        num_block=net_opt['num_block'],
        img_range=1.,
        rgb_mean=_no_mean(net_opt['num_in_ch']),
        upsampler=upsampler,
        **extra)
    return opt, net_opt['num_block']


class _Branch:
    """Defaults of the branch protocol (see the module docstring)."""
    original = None
    depth_option = 'num_block'
    size_multiple = 1

    @classmethod
    def read_options(cls, node_state, num_feat):
        return None

    @classmethod
    def counterpart(cls, net_opt):
        raise NotImplementedError(f'{cls.__name__} has no original network to swap from.')


@BRANCH_REGISTRY.register()
class RCANBranch(_Branch, nn.Sequential):
    """The paper's basic branch module: ``num_group`` RCAN residual groups and a conv.

    Each residual group is BasicSR's RCAN ``ResidualGroup`` (``num_block`` residual channel
    attention blocks, a conv, and the group's skip connection). RCAN's long skip (``conv_after_body``
    + residual) is the tree's residual structure, so there is no skip around the whole branch.

    Args:
        num_feat (int): Feature channels.
        num_group (int): Residual groups (G in the paper).
        num_block (int): RCAB blocks per group (B in the paper).
        reduction (int): Channel-attention squeeze factor. Default: 16.
        res_scale (float): Residual scale inside each RCAB. Default: 1.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'RCAN'
    depth_option = 'num_group'

    def __init__(self, num_feat, num_group, num_block, reduction=16, res_scale=1):
        groups = [
            ResidualGroup(num_feat=num_feat, num_block=num_block, squeeze_factor=reduction, res_scale=res_scale)
            for _ in range(num_group)
        ]
        super().__init__(*groups, nn.Conv2d(num_feat, num_feat, 3, 1, 1))

    @classmethod
    def read_options(cls, node_state, num_feat):
        groups = _indices(node_state, r'(\d+)\.residual_group\.\d+\.rcab\.')
        if not groups:
            return None
        found = {'num_group': len(groups), 'num_block': len(_indices(node_state, r'0\.residual_group\.(\d+)\.rcab\.'))}
        squeeze = node_state.get('0.residual_group.0.rcab.3.attention.1.weight')
        if squeeze is not None:
            found['reduction'] = num_feat // squeeze.shape[0]
        return found

    @classmethod
    def counterpart(cls, net_opt):
        opt = dict(
            num_feat=net_opt['num_feat'],
            num_group=net_opt['num_group'],
            num_block=net_opt['num_block'],
            reduction=net_opt['squeeze_factor'],
            img_range=net_opt['img_range'],
            rgb_mean=list(net_opt['rgb_mean']),
            upsampler='pixelshuffle',
            branch_opt={'res_scale': net_opt['res_scale']})
        return opt, net_opt['num_group']


@BRANCH_REGISTRY.register()
class EDSRBranch(_Branch, nn.Sequential):
    """EDSR's body as a node: ``num_block`` residual blocks (no BN) and a conv.

    EDSR = conv_first, ``num_block`` x ``ResidualBlockNoBN``, ``conv_after_body``, long skip,
    upsampler. The node holds the blocks and ``conv_after_body``; the long skip is the tree's
    residual structure, the upsampler each leaf's tail.

    Args:
        num_feat (int): Feature channels.
        num_block (int): Residual blocks per node.
        res_scale (float): EDSR's residual scaling (0.1 in the 43M EDSR). Default: 1.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'EDSR'

    def __init__(self, num_feat, num_block, res_scale=1):
        blocks = [ResidualBlockNoBN(num_feat=num_feat, res_scale=res_scale) for _ in range(num_block)]
        super().__init__(*blocks, nn.Conv2d(num_feat, num_feat, 3, 1, 1))

    @classmethod
    def read_options(cls, node_state, num_feat):
        blocks = _indices(node_state, r'(\d+)\.conv1\.weight')
        if not blocks or f'{len(blocks)}.weight' not in node_state:
            return None
        return {'num_block': len(blocks)}

    @classmethod
    def counterpart(cls, net_opt):
        opt = dict(
            num_feat=net_opt['num_feat'],
            num_block=net_opt['num_block'],
            img_range=net_opt['img_range'],
            rgb_mean=list(net_opt['rgb_mean']),
            upsampler='pixelshuffle',
            branch_opt={'res_scale': net_opt['res_scale']})
        return opt, net_opt['num_block']


@BRANCH_REGISTRY.register()
class SRResNetBranch(_Branch, nn.Sequential):
    """SRResNet's body as a node: ``num_block`` residual blocks without BN (BasicSR's ``MSRResNet``).

    ``MSRResNet`` has no conv after its body and no feature-level long skip; its global skip
    is the bilinear interpolation of the input added to the output, which D2CNet's
    ``input_skip: bilinear`` adds to every leaf's prediction. The tree's residual structure
    adds SRResNet's (Ledig et al.) long skip back.

    Args:
        num_feat (int): Feature channels.
        num_block (int): Residual blocks per node.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'MSRResNet'

    def __init__(self, num_feat, num_block):
        super().__init__(*[ResidualBlockNoBN(num_feat=num_feat) for _ in range(num_block)])

    @classmethod
    def read_options(cls, node_state, num_feat):
        blocks = _indices(node_state, r'(\d+)\.conv1\.weight')
        if not blocks or f'{len(blocks)}.weight' in node_state:
            return None
        return {'num_block': len(blocks)}

    @classmethod
    def counterpart(cls, net_opt):
        return _counterpart(net_opt, 'pixelshuffle', input_skip='bilinear')


@BRANCH_REGISTRY.register()
class RRDBBranch(_Branch, nn.Sequential):
    """RRDBNet's (ESRGAN's) body as a node: ``num_block`` residual-in-residual dense blocks.

    RRDBNet = conv_first, RRDBs, ``conv_body``, long skip, nearest-interpolation upsampler.
    The node holds the RRDBs; ``conv_body`` and the long skip are the tree's residual
    structure; the tail is ``upsampler: nearest+conv``. RRDBNet's pixel-unshuffle input for x1/x2
    is not kept: D2CNet works at the LR size for every scale.

    Args:
        num_feat (int): Feature channels.
        num_block (int): RRDBs per node.
        num_grow_ch (int): Growth channels inside each dense block. Default: 32.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'RRDBNet'

    def __init__(self, num_feat, num_block, num_grow_ch=32):
        super().__init__(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])

    @classmethod
    def read_options(cls, node_state, num_feat):
        blocks = _indices(node_state, r'(\d+)\.rdb1\.conv1\.weight')
        if not blocks:
            return None
        return {'num_block': len(blocks), 'branch_opt': {'num_grow_ch': node_state['0.rdb1.conv1.weight'].shape[0]}}

    @classmethod
    def counterpart(cls, net_opt):
        return _counterpart(net_opt, 'nearest+conv', branch_opt={'num_grow_ch': net_opt['num_grow_ch']})


@BRANCH_REGISTRY.register()
class SwinIRBranch(_Branch, nn.Module):
    """SwinIR's deep feature extraction as a node: patch embedding, RSTBs, LayerNorm, unembedding.

    SwinIR = conv_first, [patch_embed, RSTBs, norm, patch_unembed], ``conv_after_body``, long
    skip, reconstruction. The bracket is the node (BasicSR's ``RSTB``, ``PatchEmbed`` and
    ``PatchUnEmbed``); ``conv_after_body`` and the long skip are the tree's residual structure;
    the reconstruction is the tail (``upsampler`` as SwinIR's option). D2CNet pads inputs to a
    multiple of ``window_size`` and crops the output, as BasicSR's SwinIR test code does.
    Stochastic depth grows linearly over the RSTBs of one node (SwinIR over its whole body).

    Args:
        num_feat (int): Embedding dimension (SwinIR's ``embed_dim``); divisible by ``num_heads``.
        num_block (int): RSTBs per node.
        depth (int): Swin layers per RSTB. Default: 6.
        num_heads (int): Attention heads. Default: 6.
        window_size (int): Attention window. Default: 8.
        mlp_ratio (float): MLP hidden size / ``num_feat``. Default: 2.
        img_size (int): Training patch size (LR); fixes the size of the stored attention masks,
            as in SwinIR. Default: 64.
        resi_connection (str): '1conv' or '3conv', the conv at the end of each RSTB. Default: '1conv'.
        drop_path_rate (float): Stochastic depth at the last layer. Default: 0.1.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``, H and W multiples of ``window_size``.
    """
    original = 'SwinIR'

    def __init__(self,
                 num_feat,
                 num_block,
                 depth=6,
                 num_heads=6,
                 window_size=8,
                 mlp_ratio=2.,
                 img_size=64,
                 resi_connection='1conv',
                 drop_path_rate=0.1):
        super().__init__()
        if num_feat % num_heads:
            raise ValueError(f'SwinIRBranch: num_feat={num_feat} must be divisible by num_heads={num_heads}.')
        self.size_multiple = window_size
        self.patch_embed = PatchEmbed(img_size, 1, num_feat, num_feat, norm_layer=nn.LayerNorm)
        self.patch_unembed = PatchUnEmbed(img_size, 1, num_feat, num_feat)
        resolution = tuple(self.patch_embed.patches_resolution)
        total = num_block * depth
        # plain floats: torch.linspace(...).item() would fail when built on the meta device
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList([
            RSTB(
                dim=num_feat,
                input_resolution=resolution,
                depth=depth,
                num_heads=num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                drop_path=rates[i * depth:(i + 1) * depth],
                img_size=img_size,
                patch_size=1,
                resi_connection=resi_connection) for i in range(num_block)
        ])
        self.norm = nn.LayerNorm(num_feat)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # SwinIR's initialisation
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)

    def forward(self, x):
        x_size = (x.shape[2], x.shape[3])
        h = self.patch_embed(x)
        for layer in self.layers:
            h = layer(h, x_size)
        return self.patch_unembed(self.norm(h), x_size)

    @classmethod
    def read_options(cls, node_state, num_feat):
        blocks = _indices(node_state, r'layers\.(\d+)\.residual_group\.')
        if not blocks:
            return None
        prefix = 'layers.0.residual_group.blocks.'
        table = node_state[prefix + '0.attn.relative_position_bias_table']
        window = int(round((math.sqrt(table.shape[0]) + 1) / 2))
        branch_opt = {
            'depth': len(_indices(node_state, r'layers\.0\.residual_group\.blocks\.(\d+)\.')),
            'num_heads': table.shape[1],
            'window_size': window,
            'mlp_ratio': node_state[prefix + '0.mlp.fc1.weight'].shape[0] / num_feat,
            'resi_connection': '1conv' if 'layers.0.conv.weight' in node_state else '3conv',
        }
        mask = node_state.get(prefix + '1.attn_mask')
        if mask is not None:  # (windows, w*w, w*w): the stored masks fix the training patch size
            branch_opt['img_size'] = int(round(math.sqrt(mask.shape[0]))) * window
        return {'num_block': len(blocks), 'branch_opt': branch_opt}

    @classmethod
    def counterpart(cls, net_opt):
        depths, heads = list(net_opt['depths']), list(net_opt['num_heads'])
        if len(set(depths)) > 1 or len(set(heads)) > 1:
            raise ValueError(f'SwinIR: depths={depths} / num_heads={heads} differ between RSTBs; the D2C '
                             'counterpart needs one depth and one head count for all of them.')
        upsampler = net_opt['upsampler'] or 'pixelshuffle'
        num_ch = net_opt['in_chans']
        opt = dict(
            num_in_ch=num_ch,
            num_out_ch=num_ch,
            num_feat=net_opt['embed_dim'],
            num_block=len(depths),
            img_range=net_opt['img_range'],
            rgb_mean=DIV2K_MEAN if num_ch == 3 else _no_mean(num_ch),  # as SwinIR itself
            upsampler=upsampler,
            branch_opt={
                'depth': depths[0],
                'num_heads': heads[0],
                'window_size': net_opt['window_size'],
                'mlp_ratio': net_opt['mlp_ratio'],
                'img_size': net_opt['img_size'],
                'resi_connection': net_opt['resi_connection'],
                'drop_path_rate': net_opt['drop_path_rate'],
            })
        return opt, len(depths)


@BRANCH_REGISTRY.register()
class RDNBranch(_Branch, GlobalFeatureFusion):
    """RDN's body as a node: ``num_block`` residual dense blocks and global feature fusion.

    RDN = two shallow convs, RDBs, global feature fusion (concat of all RDB outputs, 1x1 and
    3x3 convs), global residual from the first shallow conv, upsampler. The node holds the
    RDBs with their global feature fusion (fusion is per node: it concatenates that node's
    RDBs); the global residual is the tree's residual structure; D2CNet's ``head`` is the first
    shallow conv (the second one is dropped: with the tree's residual convs it adds nothing new).

    Args:
        num_feat (int): G0, channels between blocks.
        num_block (int): RDBs per node.
        num_layer (int): Conv layers per RDB (C). Default: 8.
        num_grow_ch (int): Growth rate (G). Default: 64.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'RDN'

    def __init__(self, num_feat, num_block, num_layer=8, num_grow_ch=64):
        super().__init__(num_feat, num_grow_ch, num_layer, num_block)

    @classmethod
    def read_options(cls, node_state, num_feat):
        blocks = _indices(node_state, r'blocks\.(\d+)\.layers\.')
        if not blocks:
            return None
        branch_opt = {
            'num_layer': len(_indices(node_state, r'blocks\.0\.layers\.(\d+)\.')),
            'num_grow_ch': node_state['blocks.0.layers.0.0.weight'].shape[0]
        }
        return {'num_block': len(blocks), 'branch_opt': branch_opt}

    @classmethod
    def counterpart(cls, net_opt):
        branch_opt = {'num_layer': net_opt['num_layer'], 'num_grow_ch': net_opt['num_grow_ch']}
        return _counterpart(net_opt, 'pixelshuffle', branch_opt=branch_opt)


@BRANCH_REGISTRY.register()
class IMDNBranch(_Branch, DistillationFusion):
    """IMDN's body as a node: ``num_block`` IMDBs and their distillation fusion.

    IMDN = a shallow conv, IMDBs, concat of all IMDB outputs fused by 1x1 conv + LeakyReLU and
    a 3x3 conv, skip from the shallow features, one-step pixel-shuffle upsampler. The node holds
    the IMDBs with their fusion; the skip is the tree's residual structure; the tail is
    ``upsampler: pixelshuffledirect``.

    Args:
        num_feat (int): Feature channels, divisible by 4.
        num_block (int): IMDBs per node.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'IMDN'

    def __init__(self, num_feat, num_block):
        super().__init__(num_feat, num_block)

    @classmethod
    def read_options(cls, node_state, num_feat):
        blocks = _indices(node_state, r'blocks\.(\d+)\.c1\.weight')
        return {'num_block': len(blocks)} if blocks else None

    @classmethod
    def counterpart(cls, net_opt):
        return _counterpart(net_opt, 'pixelshuffledirect')


@BRANCH_REGISTRY.register()
class VDSRBranch(_Branch, nn.Sequential):
    """VDSR's body as a node: ``num_block`` conv-ReLU layers.

    VDSR = bicubic interpolation first, 20 conv layers (ReLU between), global residual (the
    interpolated image). In D2C-VDSR the whole tree runs at the output size
    (``upsampler: interpolate``: D2CNet's head sees the interpolated image), every leaf ends in
    one output conv and adds the interpolated image (``input_skip: bicubic``).

    Args:
        num_feat (int): Feature channels.
        num_block (int): Conv-ReLU layers per node.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """
    original = 'VDSR'

    def __init__(self, num_feat, num_block):
        layers = []
        for _ in range(num_block):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.ReLU(inplace=True)]
        super().__init__(*layers)

    @classmethod
    def read_options(cls, node_state, num_feat):
        if not node_state or any(not re.fullmatch(r'\d+\.(weight|bias)', k) for k in node_state):
            return None
        return {'num_block': len(_indices(node_state, r'(\d+)\.weight'))}

    @classmethod
    def counterpart(cls, net_opt):
        return _counterpart(net_opt, 'interpolate', input_skip='bicubic')
