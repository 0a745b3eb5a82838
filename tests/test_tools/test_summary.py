"""d2c-summary: parameter and MAC counts, shape inference from checkpoint keys."""
import os
import subprocess
import sys

import pytest
import torch
import yaml

from d2c_arch import D2CNet, infer_options, is_convergence_key
from d2c_tools import summary
from d2c_utils import summary_util

TINY = {'num_feat': 8, 'num_group': 1, 'num_block': 1, 'reduction': 4, 'upscale': 4, 'num_fusion_feat': 8}


def save(tmp_path, name, **overrides):
    opt = dict(TINY, **overrides)
    torch.manual_seed(0)
    net = D2CNet(**opt)
    pth, yml = tmp_path / f'{name}.pth', tmp_path / f'{name}.yml'
    torch.save({'params': net.state_dict()}, str(pth))
    yml.write_text(yaml.safe_dump({'network_g': dict(opt, type='D2CNet')}))
    return str(pth), str(yml), net


@pytest.mark.parametrize('overrides', [
    {},
    {
        'tree_depth': 1,
        'tree_width': 3,
        'upscale': 3,
        'branch_type': 'EDSRBranch',
        'num_block': 2
    },
    {
        'tree_depth': 3,
        'tree_width': 1,
        'upscale': 8,
        'num_group': 2,
        'reduction': 2,
        'num_feat': 4
    },
    {
        'upscale': 2,
        'num_fusion_feat': 16
    },
])
def test_tree_shape_is_inferred_from_keys(overrides):
    opt = dict(TINY, **overrides)
    net = D2CNet(**opt)
    inferred = infer_options(net.state_dict())
    for key, value in opt.items():
        if key in ('reduction', 'num_group') and opt.get('branch_type') == 'EDSRBranch':
            assert key not in inferred  # EDSR branches have neither channel attention nor groups
            continue
        assert inferred[key] == value, key
    assert inferred['num_branch'] == net.num_branch
    assert inferred.get('branch_type', 'RCANBranch') == opt.get('branch_type', 'RCANBranch')


def test_parameter_counts_split_by_part():
    net = D2CNet(**TINY)
    counts = summary_util.count_params(net)
    total = sum(p.numel() for p in net.parameters())
    conv = sum(p.numel() for n, p in net.named_parameters() if is_convergence_key(n))
    assert sum(counts.values()) == total
    assert counts['convergence.'] == conv
    assert counts['tree.1.3.'] == sum(p.numel() for p in net.tree[1][3].parameters())
    assert counts['tails.0.'] == sum(p.numel() for p in net.tails[0].parameters())


def test_macs_per_output_pixel_match_the_formula_and_do_not_depend_on_size():
    net = D2CNet(**TINY)
    f, s, p, ff = TINY['num_feat'], TINY['upscale'], net.num_branch, TINY['num_fusion_feat']
    small, small_ca = summary_util.count_macs(net, lr_size=6)
    large, large_ca = summary_util.count_macs(net, lr_size=11)
    for prefix in small:
        assert small[prefix] == pytest.approx(large[prefix]), prefix
    assert small_ca == large_ca
    # analytic: head conv 3 -> F at LR (1/s^2 of an output pixel); fusion convs at SR
    assert small['head.'] == pytest.approx(3 * f * 9 / s**2)
    assert small['convergence.'] == pytest.approx(9 * (3 * p * ff + ff * ff + ff * p))
    # one RCAB's channel attention: F -> F/r -> F on a 1x1 pooled map, per image
    assert small_ca['tree.0.0.'] == 2 * f * (f // TINY['reduction'])


def test_cli_opt_and_model_agree(tmp_path, capsys):
    pth, yml, net = save(tmp_path, 'tiny')
    total = sum(p.numel() for p in net.parameters())
    assert summary.main(['--opt', yml]) == 0
    from_opt = capsys.readouterr().out
    assert summary.main(['--model', pth]) == 0
    from_model = capsys.readouterr().out
    assert 'shape inferred from the keys' in from_model
    assert f'{total:,d}' in from_opt and f'{total:,d}' in from_model
    assert from_opt.split('\n', 1)[1] == from_model.split('\n', 1)[1]  # same table, different source line
    assert 'tree level 2 node 4' in from_model and 'residual convs, leaf 4' in from_model
    assert 'FlopCounterMode' in from_model


def test_cli_mismatch_and_bad_files(tmp_path, capsys):
    pth, _, _ = save(tmp_path, 'tiny')
    _, other, _ = save(tmp_path, 'other', upscale=2)
    assert summary.main(['--model', pth, '--opt', other]) == 2
    err = capsys.readouterr().err
    assert 'upscale: options 2, checkpoint 4' in err and 'tails.0.0.2.weight' in err
    assert summary.main(['--model', str(tmp_path / 'missing.pth')]) == 2
    assert 'not found' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summary.main([])


def test_help(tmp_path):
    res = subprocess.run([sys.executable, '-m', 'd2c_tools.summary', '--help'],
                         capture_output=True,
                         text=True,
                         cwd=str(tmp_path),
                         timeout=120,
                         env=dict(os.environ))
    assert res.returncode == 0 and '--model' in res.stdout and '--opt' in res.stdout and 'MAC' in res.stdout
