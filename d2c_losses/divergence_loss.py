import itertools

import torch
from torch import nn as nn

from basicsr.utils.color_util import rgb2ycbcr_pt
from basicsr.utils.registry import LOSS_REGISTRY

VARIANTS = ('paper', 'release')


def common_parent_level(leaf_i, leaf_j, tree_depth, tree_width):
    """Tree level l of the closest common parent of two leaves (the root is level 1).

    Leaves are numbered depth-first, so leaf ``k`` written in base ``tree_width`` with
    ``tree_depth`` digits is its path from the root. Two leaves whose paths share their
    first ``m`` digits meet at a node of level ``m + 1``. With L=2, C=2: siblings
    (0, 1) -> 2, cousins (0, 2) -> 1.
    """
    level = 1
    for step in range(tree_depth - 1, 0, -1):
        if leaf_i // tree_width**step != leaf_j // tree_width**step:
            break
        level += 1
    return level


@LOSS_REGISTRY.register()
class DivergenceLoss(nn.Module):
    """Divergence loss L_D = L2^D + alpha * T_D (paper Eq. 1-7).

    ``L2^D`` sums, over the P branches, the mean squared error between each prediction
    and HR. ``T_D`` is a triplet term that pushes the branches apart in texture:

    * ``G(I) = (Y - mean(Y)) / std(Y)``, Y the luma of I (Eq. 2);
    * ``res_i = |G(I_D^i) - G(I_HR)|`` (Eq. 3);
    * ``trip(a, p, n) = max(d(a, p) - d(a, n) + margin, 0)`` with d the mean squared
      distance and the positive a zero map, so ``d(res_i, 0) = mean(res_i^2)`` (Eq. 4);
    * ``T_D = sum_{i != j} beta_ij * trip(res_i, 0, res_j) / (P (P - 1))`` (Eq. 5) with
      ``beta_ij = theta^(l - 1)``, l the level of the common parent of leaves i and j,
      root = 1 (Eq. 6).

    Variants:
        'paper': Y of BT.601, mean/std per image, distances and hinge per image, then
            averaged over the batch.
        'release': the authors' MegEngine release: the channel mean instead of Y, and
            mean/std and distances over the whole batch.

    Unlike the authors' release, the triplet term stays in the autograd graph.

    Args:
        alpha (float): Weight of the triplet term. The two-phase model overrides it with
            its alpha schedule. Default: 2e-5.
        theta (float): Attenuation in (0, 1] for related branches. Default: 0.8.
        margin (float | list[float]): Triplet margin: one number, or one per level of the
            common parent, ``[root level (cousins with L=2), ..., last level (siblings)]``,
            length ``tree_depth``. Default: [5e-5, 2e-5] (the release).
        tree_depth (int): L of the D2CNet. Default: 2.
        tree_width (int): C of the D2CNet. Default: 2.
        variant (str): 'paper' or 'release'. Default: 'paper'.
        loss_weight (float): Scales the total. Default: 1.0.
        reduction (str): 'mean' or 'sum' for the per-branch L2 term. Default: 'mean'.
        eps (float): Added to std in G(). Default: 1e-8.

    Call: ``total, parts = loss(branches, gt)`` with branches (N, P, 3, H, W) and gt
    (N, 3, H, W), both in [0, 1]. ``parts`` holds the unweighted terms ``l_div_l2`` and
    ``l_div_triplet`` (tensors) for logging; ``total = loss_weight * (l2 + alpha * T_D)``.
    """

    def __init__(self,
                 alpha=2e-5,
                 theta=0.8,
                 margin=(5e-5, 2e-5),
                 tree_depth=2,
                 tree_width=2,
                 variant='paper',
                 loss_weight=1.0,
                 reduction='mean',
                 eps=1e-8):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f'DivergenceLoss: variant={variant!r} is unknown; use one of {VARIANTS}.')
        if reduction not in ('mean', 'sum'):
            raise ValueError(f"DivergenceLoss: reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
        if not 0 < theta <= 1:
            raise ValueError(f'DivergenceLoss: theta={theta!r} must lie in (0, 1].')
        num_branch = tree_width**tree_depth
        if num_branch < 2:
            raise ValueError(f'DivergenceLoss: tree_depth={tree_depth}, tree_width={tree_width} give '
                             f'{num_branch} branch; the divergence loss needs at least 2 (tree_width >= 2).')
        margins = list(margin) if isinstance(margin, (list, tuple)) else [margin] * tree_depth
        if len(margins) != tree_depth:
            raise ValueError(f'DivergenceLoss: margin has {len(margins)} values but tree_depth={tree_depth}; '
                             'give one number or one per tree level (root level first).')

        self.alpha = alpha
        self.variant = variant
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.eps = eps
        self.num_branch = num_branch

        beta = torch.zeros(num_branch, num_branch)
        pair_margin = torch.zeros(num_branch, num_branch)
        for i, j in itertools.permutations(range(num_branch), 2):
            level = common_parent_level(i, j, tree_depth, tree_width)
            beta[i, j] = theta**(level - 1)
            pair_margin[i, j] = margins[level - 1]
        # the diagonal stays 0: a branch is never its own negative
        self.register_buffer('beta', beta, persistent=False)
        self.register_buffer('pair_margin', pair_margin, persistent=False)

    def standardise(self, img):
        """G(): standardised luma. (N, P, 3, H, W) or (N, 3, H, W) -> (N, P, H, W) or (N, H, W)."""
        if self.variant == 'paper':
            # ITU-R BT.601 Y; its offset of 16/255 cancels in the standardisation
            luma = rgb2ycbcr_pt(img.reshape(-1, *img.shape[-3:]), y_only=True).reshape(*img.shape[:-3], *img.shape[-2:])
            dims = (-2, -1)  # per image
        else:
            luma = img.mean(dim=-3)
            dims = (0, -2, -1)  # over the batch, per branch
        mean = luma.mean(dim=dims, keepdim=True)
        std = luma.std(dim=dims, keepdim=True, unbiased=False)
        return (luma - mean) / (std + self.eps)

    def triplet(self, branches, gt):
        """T_D (Eq. 5) for branches (N, P, 3, H, W) and gt (N, 3, H, W); a scalar tensor."""
        if branches.size(2) != 3 and self.variant == 'paper':
            raise ValueError(f"DivergenceLoss: the 'paper' variant needs RGB images, got {branches.size(2)} "
                             "channels; use variant: release for other channel counts.")
        res = (self.standardise(branches) - self.standardise(gt).unsqueeze(1)).abs()  # (N, P, H, W)
        if self.variant == 'release':
            res = res.transpose(0, 1).unsqueeze(0)  # (1, P, N, H, W): one distance over the batch
        res = res.flatten(2)
        sq = res.pow(2).mean(dim=2)  # d(res_i, 0): (N, P)
        cross = torch.einsum('npk,nqk->npq', res, res) / res.size(2)
        # d(res_i, res_j) = mean(res_i^2) + mean(res_j^2) - 2 mean(res_i res_j)
        dist_neg = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * cross).clamp_min(0)
        trip = (sq.unsqueeze(2) - dist_neg + self.pair_margin).clamp_min(0)  # anchor i (rows), negative j
        num = self.num_branch
        return (self.beta * trip).sum(dim=(1, 2)).mean() / (num * (num - 1))

    def forward(self, branches, gt, **kwargs):
        if branches.dim() != 5 or branches.size(1) != self.num_branch:
            raise ValueError(f'DivergenceLoss: expected branches of shape (N, {self.num_branch}, C, H, W), '
                             f'got {tuple(branches.shape)}; check tree_depth/tree_width against network_g.')
        if gt.shape != branches[:, 0].shape:
            raise ValueError(f'DivergenceLoss: gt shape {tuple(gt.shape)} does not match a branch '
                             f'{tuple(branches[:, 0].shape)}.')
        sq_err = (branches - gt.unsqueeze(1)).pow(2)
        if self.reduction == 'mean':
            l2 = sq_err.mean(dim=(0, 2, 3, 4)).sum()
        else:
            l2 = sq_err.sum()
        if self.alpha:
            triplet = self.triplet(branches, gt)
            total = l2 + self.alpha * triplet
        else:  # keep the gradient exactly the L2 one; T_D is still worth logging
            with torch.no_grad():
                triplet = self.triplet(branches, gt)
            total = l2
        return self.loss_weight * total, {'l_div_l2': l2, 'l_div_triplet': triplet}
