import copy

import pytest
import torch
import yaml

from basicsr.archs import build_network
from d2c_arch import BRANCH_REGISTRY, D2CNet, bare_key, default_options, is_convergence_key
from d2c_arch.d2cnet_arch import state_dict_differences

SMALL = dict(num_feat=8, num_group=1, num_block=1, reduction=4)


def conv_params(cin, cout, k=3, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def paper_param_count(upscale, feat=64, depth=2, width=2, groups=2, blocks=4, reduction=16):
    """Parameter count of the paper's structure, counted from its description (facts note)."""
    rcab = 2 * conv_params(feat, feat) + conv_params(feat, feat // reduction, 1) + conv_params(
        feat // reduction, feat, 1)
    node = groups * (blocks * rcab + conv_params(feat, feat)) + conv_params(feat, feat)
    nodes = sum(width**level for level in range(1, depth + 1))
    leaves = width**depth
    ups = {2: [4], 3: [9], 4: [4, 4], 8: [4, 4, 4]}[upscale]
    tail = sum(conv_params(feat, m * feat) for m in ups) + conv_params(feat, 3)
    fusion = conv_params(
        3 * leaves, 64, bias=False) + conv_params(
            64, 64, bias=False) + conv_params(
                64, leaves, bias=False)
    return conv_params(3, feat) + nodes * node + leaves * depth * conv_params(feat, feat) + leaves * tail + fusion


@pytest.mark.parametrize('upscale', [2, 3, 4, 8])
@pytest.mark.parametrize('depth,width', [(1, 2), (2, 2), (2, 3), (3, 2)])
def test_output_shapes_and_weights(upscale, depth, width):
    net = D2CNet(upscale=upscale, tree_depth=depth, tree_width=width, **SMALL).eval()
    x = torch.rand(2, 3, 6, 5)
    with torch.no_grad():
        sr = net(x)
        sr2, branches, weights = net(x, return_branches=True)
    leaves = width**depth
    assert sr.shape == (2, 3, 6 * upscale, 5 * upscale)
    assert branches.shape == (2, leaves, 3, 6 * upscale, 5 * upscale)
    assert weights.shape == (2, leaves, 6 * upscale, 5 * upscale)
    assert torch.equal(sr, sr2)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=1), torch.ones_like(weights[:, 0]), atol=1e-6)
    # Eq. 8: the output is the weighted sum of the branches
    assert torch.allclose(sr, (weights.unsqueeze(2) * branches).sum(1), atol=1e-6)
    assert len(net.res_convs) == leaves and all(len(convs) == depth for convs in net.res_convs)


@pytest.mark.parametrize('upscale', [2, 3, 4, 8])
def test_paper_setting_parameter_count(upscale):
    net = D2CNet(upscale=upscale)
    count = sum(p.numel() for p in net.parameters())
    assert count == paper_param_count(upscale)
    if upscale == 4:  # paper: 5.88M for its baseline; the described structure gives 5.77M
        assert 5.7e6 < count < 5.9e6


def test_state_dict_split_between_divergence_and_convergence():
    net = D2CNet(**SMALL)
    keys = list(net.state_dict())
    conv_keys = [k for k in keys if is_convergence_key(k)]
    assert conv_keys == ['convergence.0.weight', 'convergence.2.weight', 'convergence.4.weight']
    assert all(k.startswith(('head.', 'tree.', 'res_convs.', 'tails.')) for k in keys if k not in conv_keys)
    assert is_convergence_key('module.convergence.0.weight')
    assert 'mean' not in keys  # the mean shift is a constant, not a weight


def _perturb_node_effect(net, level, node, x):
    """Which leaves change when the output of tree node (level, node) is perturbed."""
    with torch.no_grad():
        base = net(x, stage='divergence')
        handle = net.tree[level - 1][node].register_forward_hook(lambda m, i, o: o + 10.)
        moved = net(x, stage='divergence')
        handle.remove()
    return [leaf for leaf in range(base.size(1)) if not torch.allclose(base[:, leaf], moved[:, leaf])]


def test_tree_wiring_depth_first_leaves_and_ancestors():
    torch.manual_seed(0)
    net = D2CNet(tree_depth=2, tree_width=2, **SMALL).eval()
    x = torch.rand(1, 3, 4, 4)
    assert _perturb_node_effect(net, 1, 0, x) == [0, 1]  # body1 feeds leaves 11 and 12
    assert _perturb_node_effect(net, 1, 1, x) == [2, 3]
    assert _perturb_node_effect(net, 2, 2, x) == [2]
    net3 = D2CNet(tree_depth=3, tree_width=2, **SMALL).eval()
    assert _perturb_node_effect(net3, 2, 1, x) == [2, 3]
    assert _perturb_node_effect(net3, 1, 1, x) == [4, 5, 6, 7]


def test_multi_branch_deep_residual_uses_parent_and_shallow_features():
    """Leaf k: h = res_convs[k][0](leaf) + parent; h = res_convs[k][1](h) + shallow."""
    torch.manual_seed(0)
    net = D2CNet(tree_depth=2, tree_width=2, **SMALL).eval()
    x = torch.rand(1, 3, 4, 4)
    feats = {}
    hooks = [
        net.head.register_forward_hook(lambda m, i, o: feats.__setitem__('shallow', o)),
        net.tree[0][1].register_forward_hook(lambda m, i, o: feats.__setitem__('parent', o)),
        net.tree[1][3].register_forward_hook(lambda m, i, o: feats.__setitem__('leaf', o))
    ]
    with torch.no_grad():
        branches = net(x, stage='divergence')
        h = net.res_convs[3][0](feats['leaf']) + feats['parent']
        h = net.res_convs[3][1](h) + feats['shallow']
        expected = net.tails[3](h) + net.mean
    for hook in hooks:
        hook.remove()
    assert torch.allclose(branches[:, 3], expected, atol=1e-6)


def test_stages_compose_to_full_forward():
    net = D2CNet(**SMALL).eval()
    x = torch.rand(1, 3, 5, 5)
    with torch.no_grad():
        sr, branches, weights = net(x, return_branches=True)
        branches2 = net(x, stage='divergence')
        sr2, weights2 = net(branches2, stage='convergence')
    assert torch.equal(branches, branches2) and torch.equal(sr, sr2) and torch.equal(weights, weights2)


def test_fuse_detached_blocks_gradient_into_divergence():
    net = D2CNet(**SMALL)
    sr, branches, _ = net(torch.rand(1, 3, 4, 4), return_branches=True, fuse_detached=True)
    sr.sum().backward()
    assert net.head.weight.grad is None
    assert net.convergence[0].weight.grad is not None


def test_build_network_from_yaml():
    opt = yaml.safe_load("""
    type: D2CNet
    num_in_ch: 3
    num_out_ch: 3
    num_feat: 8
    tree_depth: 2
    tree_width: 3
    num_group: 1
    num_block: 2
    reduction: 4
    upscale: 3
    img_range: 1.
    rgb_mean: [0.5, 0.5, 0.5]
    branch_type: EDSRBranch
    """)
    net = build_network(copy.deepcopy(opt))
    assert isinstance(net, D2CNet) and net.num_branch == 9 and net.upscale == 3
    assert torch.equal(net.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert 'EDSRBranch' in BRANCH_REGISTRY and 'RCANBranch' in BRANCH_REGISTRY
    assert net(torch.rand(1, 3, 4, 4)).shape == (1, 3, 12, 12)


@pytest.mark.parametrize('kwargs,match', [
    (dict(upscale=5), 'upscale=5'),
    (dict(tree_depth=0), 'tree_depth'),
    (dict(branch_type='Nope'), 'branch_type'),
    (dict(rgb_mean=(0.5, 0.5)), 'rgb_mean'),
])
def test_bad_options_give_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        D2CNet(**{**SMALL, **kwargs})


def test_wrong_branch_count_for_convergence():
    net = D2CNet(**SMALL)
    with pytest.raises(ValueError, match='got 3 branches'):
        net(torch.rand(1, 3, 3, 8, 8), stage='convergence')


def test_state_dict_key_helpers():
    assert bare_key('module.head.weight') == 'head.weight' and bare_key('head.weight') == 'head.weight'
    assert is_convergence_key('module.convergence.0.weight') and not is_convergence_key('tails.0.1.weight')
    expected = {'a': torch.zeros(2), 'b': torch.zeros(3), 'c': torch.zeros(1)}
    loaded = {'b': torch.zeros(4), 'c': torch.zeros(1), 'd': torch.zeros(1)}
    assert state_dict_differences(expected, loaded) == (['a'], ['d'], ['b'])
    assert state_dict_differences(expected, dict(expected)) == ([], [], [])
    defaults = default_options()  # the paper's setting
    assert (defaults['num_feat'], defaults['tree_depth'], defaults['tree_width'], defaults['num_group'],
            defaults['num_block'], defaults['upscale']) == (64, 2, 2, 2, 4, 4)
