"""Basic branch modules: the node of D2CNet's divergence tree.

Every node of the divergence tree is one *basic branch module* (paper Sec. 3.2). The
tree only needs a module that maps features ``(N, num_feat, H, W)`` to features of the
same shape, so the block type is pluggable: register a class in
``BRANCH_REGISTRY`` and select it with ``branch_type`` in D2CNet's options.

A branch class is called as ``cls(num_feat=..., num_group=..., num_block=...,
reduction=..., **branch_opt)``; it may ignore arguments that do not apply to it.
"""
from torch import nn as nn

from basicsr.archs.arch_util import ResidualBlockNoBN, make_layer
from basicsr.archs.rcan_arch import ResidualGroup
from basicsr.utils.registry import Registry

BRANCH_REGISTRY = Registry('d2c_branch')


@BRANCH_REGISTRY.register()
class RCANBranch(nn.Sequential):
    """The paper's basic branch module: ``num_group`` RCAN residual groups and a conv.

    Each residual group is BasicSR's RCAN ``ResidualGroup`` (``num_block`` residual channel
    attention blocks, a conv, and the group's skip connection). There is no skip around the
    whole branch: the tree's multi-branch deep residual structure provides it.

    Args:
        num_feat (int): Feature channels.
        num_group (int): Residual groups (G in the paper).
        num_block (int): RCAB blocks per group (B in the paper).
        reduction (int): Channel-attention squeeze factor. Default: 16.
        res_scale (float): Residual scale inside each RCAB. Default: 1.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """

    def __init__(self, num_feat, num_group, num_block, reduction=16, res_scale=1):
        groups = [
            ResidualGroup(num_feat=num_feat, num_block=num_block, squeeze_factor=reduction, res_scale=res_scale)
            for _ in range(num_group)
        ]
        super().__init__(*groups, nn.Conv2d(num_feat, num_feat, 3, 1, 1))


class _PlainResidualGroup(nn.Module):
    """``num_block`` EDSR residual blocks, a conv, and a skip around the group."""

    def __init__(self, num_feat, num_block, res_scale):
        super().__init__()
        self.body = make_layer(ResidualBlockNoBN, num_block, num_feat=num_feat, res_scale=res_scale)
        self.conv = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x):
        return self.conv(self.body(x)) + x


@BRANCH_REGISTRY.register()
class EDSRBranch(nn.Sequential):
    """A branch built from EDSR's residual blocks (no channel attention).

    Same grouping as :class:`RCANBranch` with BasicSR's ``ResidualBlockNoBN`` in place of
    RCAB: a lighter block for the D2C structure applied to other methods (paper Sec. 4.3).
    ``reduction`` is accepted and ignored.

    Shapes: ``(N, num_feat, H, W)`` -> ``(N, num_feat, H, W)``.
    """

    def __init__(self, num_feat, num_group, num_block, reduction=None, res_scale=1):
        groups = [_PlainResidualGroup(num_feat, num_block, res_scale) for _ in range(num_group)]
        super().__init__(*groups, nn.Conv2d(num_feat, num_feat, 3, 1, 1))
