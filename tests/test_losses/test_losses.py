import itertools

import numpy as np
import pytest
import torch

from basicsr.losses import build_loss
from d2c_losses import ConvergenceLoss, DivergenceLoss, common_parent_level


def gray(values, batch=1):
    """(batch, 3, 1, W) image whose three channels all hold ``values``."""
    row = torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)
    return row.expand(batch, 3, 1, -1).clone()


def test_hand_computed_example():
    """P = 2 (L=1, C=2), a 1x2 gray image, computed on paper.

    gt = [0, 1] -> G = [-1, 1]; branch 0 = gt -> res_0 = [0, 0];
    branch 1 = [1, 0] -> G = [1, -1] -> res_1 = [2, 2].
    d(res_0, 0) = 0, d(res_1, 0) = 4, d(res_0, res_1) = 4.
    trip(res_0, 0, res_1) = max(0 - 4 + m, 0) = 0; trip(res_1, 0, res_0) = max(4 - 4 + m, 0) = m.
    beta = theta^0 = 1 (the common parent is the root). T = (0 + m) / (2 * 1) = m / 2.
    L2 = 0 + mean((1-0)^2, (0-1)^2) = 1. With m = 0.5, alpha = 2: L = 1 + 2 * 0.25 = 1.5.
    """
    loss = DivergenceLoss(alpha=2.0, theta=0.8, margin=0.5, tree_depth=1, tree_width=2)
    gt = gray([0., 1.])
    branches = torch.stack([gray([0., 1.]), gray([1., 0.])], dim=1)
    total, parts = loss(branches, gt)
    assert parts['l_div_l2'].item() == pytest.approx(1.0)
    assert parts['l_div_triplet'].item() == pytest.approx(0.25, abs=1e-6)
    assert total.item() == pytest.approx(1.5, abs=1e-6)
    assert DivergenceLoss(alpha=2.0, margin=0.5, tree_depth=1, loss_weight=2.)(branches, gt)[0].item() == \
        pytest.approx(3.0, abs=1e-6)


def reference_triplet(branches, gt, beta, margin, variant):
    """Eq. 2-5 written out with numpy loops, independent of the implementation."""
    b = branches.double().numpy()
    g = gt.double().numpy()
    n, p = b.shape[:2]

    def luma(img):  # (..., 3, H, W)
        if variant == 'paper':
            return 65.481 / 255 * img[..., 0, :, :] + 128.553 / 255 * img[..., 1, :, :] + 24.966 / 255 * img[...,
                                                                                                             2, :, :]
        return img.mean(axis=-3)

    def standardise(y, axes):
        return (y - y.mean(axis=axes, keepdims=True)) / (y.std(axis=axes, keepdims=True) + 1e-8)

    if variant == 'paper':
        gb = standardise(luma(b), (2, 3))
        gg = standardise(luma(g), (1, 2))
        total = 0.
        for k in range(n):
            res = [np.abs(gb[k, i] - gg[k]) for i in range(p)]
            for i, j in itertools.permutations(range(p), 2):
                d_ap = np.mean(res[i]**2)
                d_an = np.mean((res[i] - res[j])**2)
                total += beta[i][j] * max(d_ap - d_an + margin[i][j], 0)
        return total / n / (p * (p - 1))
    gb = np.stack([standardise(luma(b[:, i]), (0, 1, 2)) for i in range(p)], axis=1)
    gg = standardise(luma(g), (0, 1, 2))
    res = [np.abs(gb[:, i] - gg) for i in range(p)]
    total = 0.
    for i, j in itertools.permutations(range(p), 2):
        total += beta[i][j] * max(np.mean(res[i]**2) - np.mean((res[i] - res[j])**2) + margin[i][j], 0)
    return total / (p * (p - 1))


@pytest.mark.parametrize('variant', ['paper', 'release'])
def test_triplet_matches_reference(variant):
    torch.manual_seed(0)
    gt = torch.rand(3, 3, 6, 5)
    branches = (gt.unsqueeze(1) + 0.2 * torch.randn(3, 4, 3, 6, 5)).clamp(0, 1)
    loss = DivergenceLoss(alpha=1., theta=0.7, margin=[0.3, 0.1], variant=variant)
    _, parts = loss(branches, gt)
    expected = reference_triplet(branches, gt, loss.beta.tolist(), loss.pair_margin.tolist(), variant)
    assert parts['l_div_triplet'].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    l2 = sum(((branches[:, i] - gt)**2).mean() for i in range(4))
    assert parts['l_div_l2'].item() == pytest.approx(l2.item(), rel=1e-6)


def test_variants_differ_on_a_batch():
    torch.manual_seed(1)
    gt = torch.rand(2, 3, 4, 4)
    gt[1] *= 0.3  # different statistics per image
    branches = torch.rand(2, 4, 3, 4, 4)
    paper = DivergenceLoss(alpha=1.)(branches, gt)[1]['l_div_triplet']
    release = DivergenceLoss(alpha=1., variant='release')(branches, gt)[1]['l_div_triplet']
    assert not torch.isclose(paper, release)


def test_beta_for_every_pair():
    theta = 0.8
    loss = DivergenceLoss(theta=theta, tree_depth=2, tree_width=2, margin=[5e-5, 2e-5])
    expected = [[0, theta, 1, 1], [theta, 0, 1, 1], [1, 1, 0, theta], [1, 1, theta, 0]]
    assert torch.allclose(loss.beta, torch.tensor(expected))
    assert loss.pair_margin[0, 1].item() == pytest.approx(2e-5)  # siblings
    assert loss.pair_margin[0, 2].item() == pytest.approx(5e-5)  # cousins

    loss3 = DivergenceLoss(theta=theta, tree_depth=3, tree_width=2, margin=0.)
    for i, j in itertools.permutations(range(8), 2):
        shared_prefix = 0
        for digit in range(3):  # leaves' paths from the root, most significant first
            if (i >> (2 - digit)) & 1 != (j >> (2 - digit)) & 1:
                break
            shared_prefix += 1
        assert common_parent_level(i, j, 3, 2) == shared_prefix + 1
        assert loss3.beta[i, j].item() == pytest.approx(theta**shared_prefix)
    assert loss3.beta[0, 1].item() == pytest.approx(theta**2)  # siblings
    assert loss3.beta[0, 2].item() == pytest.approx(theta)  # share a level-1 parent
    assert loss3.beta[0, 4].item() == pytest.approx(1.)  # only the root
    assert torch.all(loss3.beta.diagonal() == 0)


def _branch_grad(alpha, branches, gt):
    branches = branches.clone().requires_grad_(True)
    total, _ = DivergenceLoss(alpha=alpha, margin=0.5)(branches, gt)
    total.backward()
    return branches.grad


def test_triplet_term_reaches_the_gradients():
    torch.manual_seed(2)
    gt = torch.rand(2, 3, 8, 8)
    branches = (gt.unsqueeze(1) + 0.1 * torch.randn(2, 4, 3, 8, 8)).clamp(0, 1)
    grad0 = _branch_grad(0., branches, gt)
    # at alpha = 0 the gradient is exactly the one of sum_i mean((b_i - gt)^2)
    expected = 2 * (branches - gt.unsqueeze(1)) / gt.numel()
    assert torch.allclose(grad0, expected, atol=1e-9)
    grad1 = _branch_grad(1., branches, gt)
    assert (grad1 - grad0).abs().max() > 1e-4


def test_build_from_yaml_dicts_and_convergence_loss():
    div = build_loss({
        'type': 'DivergenceLoss',
        'alpha': 2e-5,
        'theta': 0.8,
        'margin': [5e-5, 2e-5],
        'tree_depth': 2,
        'tree_width': 2,
        'variant': 'release'
    })
    assert isinstance(div, DivergenceLoss) and div.variant == 'release'
    conv = build_loss({'type': 'ConvergenceLoss', 'loss_weight': 2.0})
    assert isinstance(conv, ConvergenceLoss)
    sr, gt = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert conv(sr, gt).item() == pytest.approx(2.0)  # Eq. 9 times loss_weight


@pytest.mark.parametrize('kwargs,match', [
    (dict(tree_depth=2, tree_width=1), 'at least 2'),
    (dict(margin=[1., 2., 3.]), 'margin has 3 values'),
    (dict(theta=0.), 'theta'),
    (dict(variant='megengine'), 'variant'),
    (dict(reduction='none'), 'reduction'),
])
def test_bad_loss_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DivergenceLoss(**kwargs)


def test_wrong_branch_shape_is_reported():
    with pytest.raises(ValueError, match=r'expected branches of shape \(N, 4'):
        DivergenceLoss()(torch.rand(1, 2, 3, 4, 4), torch.rand(1, 3, 4, 4))
