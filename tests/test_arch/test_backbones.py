"""D2C on every Table 3 backbone: branch modules, the originals BasicSR lacks, option errors, Table 3 files."""
import glob
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO_ROOT, make_pairs, tiny_train_opt, write_yaml

from basicsr.archs import build_network
from basicsr.archs.swinir_arch import SwinIR
from d2c_arch import IMDN, RDN, VDSR, D2CNet, infer_options
from d2c_convert.swap_util import count_d2c_parameters
from d2c_utils.errors import UserError

F = 16  # feature channels of the small test networks


def conv(cin, cout, k=3, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


# independent counts of one node, written from the papers' block descriptions
def edsr_node(f, b):
    return b * 2 * conv(f, f) + conv(f, f)


def srresnet_node(f, b):
    return b * 2 * conv(f, f)


def rrdb_node(f, b, g):
    rdb = sum(conv(f + i * g, g) for i in range(4)) + conv(f + 4 * g, f)
    return b * 3 * rdb


def rdn_node(f, b, c, g):
    rdb = sum(conv(f + i * g, g) for i in range(c)) + conv(f + c * g, f, 1)
    return b * rdb + conv(b * f, f, 1) + conv(f, f)


def imdn_node(f, b):
    d, r = f // 4, f - f // 4
    imdb = conv(f, f) + 2 * conv(r, f) + conv(r, d) + conv(4 * d, f, 1) + conv(f, f // 16, 1) + conv(f // 16, f, 1)
    return b * imdb + conv(b * f, f, 1) + conv(f, f)


def vdsr_node(f, b):
    return b * conv(f, f)


def swinir_node(f, b, depth, heads, window, img_size):
    # BasicSR's SwinIR body (patch embedding norm, RSTBs, norm) as the reference
    ref = SwinIR(
        img_size=img_size,
        embed_dim=f,
        depths=[depth] * b,
        num_heads=[heads] * b,
        window_size=window,
        mlp_ratio=2.,
        upsampler='pixelshuffle',
        upscale=4)
    return sum(p.numel() for m in (ref.patch_embed, ref.layers, ref.norm) for p in m.parameters())


def tail(kind, f, scale=4, out=3):
    if kind == 'pixelshuffle':
        return (2 * conv(f, 4 * f) if scale == 4 else conv(f, scale * scale * f)) + conv(f, out)
    if kind == 'pixelshuffledirect':
        return conv(f, out * scale * scale)
    if kind == 'nearest+conv':
        return (2 if scale == 4 else 1) * conv(f, f) + conv(f, f) + conv(f, out)
    return conv(f, out)  # interpolate


BRANCHES = [
    ('RCANBranch', dict(num_group=2, num_block=2, reduction=4), {}, 'pixelshuffle', None),
    ('EDSRBranch', dict(num_block=2), dict(res_scale=0.1), 'pixelshuffle', lambda: edsr_node(F, 2)),
    ('SRResNetBranch', dict(num_block=2, input_skip='bilinear'), {}, 'pixelshuffle', lambda: srresnet_node(F, 2)),
    ('RRDBBranch', dict(num_block=1), dict(num_grow_ch=8), 'nearest+conv', lambda: rrdb_node(F, 1, 8)),
    ('RDNBranch', dict(num_block=2), dict(num_layer=3, num_grow_ch=8), 'pixelshuffle', lambda: rdn_node(F, 2, 3, 8)),
    ('IMDNBranch', dict(num_block=2), {}, 'pixelshuffledirect', lambda: imdn_node(F, 2)),
    ('VDSRBranch', dict(num_block=3, input_skip='bicubic'), {}, 'interpolate', lambda: vdsr_node(F, 3)),
    ('SwinIRBranch', dict(num_block=2), dict(depth=2, num_heads=2, window_size=4,
                                             img_size=8), 'pixelshuffle', lambda: swinir_node(F, 2, 2, 2, 4, 8)),
]


def build(branch_type, extra, branch_opt, upsampler, **more):
    opt = dict(
        num_feat=F,
        num_fusion_feat=8,
        branch_type=branch_type,
        branch_opt=branch_opt or None,
        upsampler=upsampler,
        **extra)
    opt.update(more)
    return D2CNet(**opt), opt


@pytest.mark.parametrize('branch_type,extra,branch_opt,upsampler,node_count', BRANCHES, ids=[b[0] for b in BRANCHES])
def test_every_branch_type_trains_and_has_its_parameter_count(branch_type, extra, branch_opt, upsampler, node_count):
    torch.manual_seed(0)
    net, opt = build(branch_type, extra, branch_opt, upsampler)
    x = torch.rand(2, 3, 10, 9)  # not a multiple of SwinIR's window: padded and cropped inside
    sr, branches, weights = net(x, return_branches=True)
    assert sr.shape == (2, 3, 40, 36) and branches.shape == (2, 4, 3, 40, 36) and weights.shape == (2, 4, 40, 36)
    sr.mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    assert count_d2c_parameters(opt) == total
    if node_count is not None:
        nodes, leaves = 6, 4  # tree 2x2
        expected = (
            conv(3, F) + nodes * node_count() + leaves * 2 * conv(F, F) + leaves * tail(upsampler, F) +
            conv(12, 8, bias=False) + conv(8, 8, bias=False) + conv(8, 4, bias=False))
        assert total == expected


@pytest.mark.parametrize('branch_type,extra,branch_opt,upsampler,node_count', BRANCHES, ids=[b[0] for b in BRANCHES])
def test_weights_tell_branch_type_and_options(branch_type, extra, branch_opt, upsampler, node_count):
    net, opt = build(branch_type, extra, branch_opt, upsampler)
    found = infer_options(net.state_dict())
    assert found['branch_type'] == branch_type and found['upsampler'] == upsampler
    for key in ('num_block', 'num_group'):
        if key in extra:
            assert found[key] == extra[key]
    for key, value in branch_opt.items():
        if key != 'res_scale':  # a scale leaves no trace in the weights
            assert found['branch_opt'][key] == value
    if upsampler != 'interpolate':  # an interpolating tail holds no scale
        assert found['upscale'] == 4
    # the inferred options rebuild a network the weights load into
    rebuilt = {k: v for k, v in found.items() if k != 'num_branch'}
    rebuilt.setdefault('upscale', 4)
    D2CNet(**dict(rebuilt, num_fusion_feat=8, input_skip=extra.get('input_skip'))).load_state_dict(net.state_dict())


def test_input_skip_adds_the_interpolated_image():
    """With zero tails, every prediction is exactly the interpolated input (MSRResNet's / VDSR's skip)."""
    x = torch.rand(1, 3, 5, 6)
    for skip, upsampler in (('bilinear', 'pixelshuffle'), ('bicubic', 'interpolate')):
        net, _ = build('VDSRBranch', dict(num_block=1, input_skip=skip), {}, upsampler)
        for t in net.tails:
            for p in t.parameters():
                torch.nn.init.zeros_(p)
        expected = torch.nn.functional.interpolate(x, scale_factor=4, mode=skip, align_corners=False)
        assert torch.allclose(net.diverge(x), expected.unsqueeze(1).expand(-1, 4, -1, -1, -1), atol=1e-6)


def test_originals_in_their_papers_configurations():
    count = (lambda net: sum(p.numel() for p in net.parameters()))  # noqa: E731
    assert count(VDSR()) == conv(3, 64) + 18 * conv(64, 64) + conv(64, 3) == 668_227  # "0.67M" (Table 3)
    assert count(IMDN()) == conv(3, 64) + imdn_node(64, 6) + conv(64, 48) == 715_176  # 715K in the IMDN paper
    assert count(RDN()) == conv(3, 64) + conv(64, 64) + rdn_node(64, 16, 8, 64) + tail('pixelshuffle', 64)
    assert round(count(RDN()) / 1e6, 1) == 22.3  # RDN paper: 22M
    x = torch.rand(1, 3, 6, 7)
    for net in (VDSR(num_feat=8, num_block=2,
                     upscale=3), RDN(num_feat=8, num_block=2, num_layer=2, num_grow_ch=4,
                                     upscale=3), IMDN(num_feat=8, num_block=2, upscale=3)):
        assert net(x).shape == (1, 3, 18, 21)


def test_unknown_network_keys_name_key_arch_and_accepted_keys():
    with pytest.raises(UserError) as err:
        D2CNet(branch_type='EDSRBranch', res_scale=1)
    message = str(err.value)
    assert "D2CNet has no option 'res_scale'" in message and 'EDSRBranch takes it: put it under branch_opt' in message
    assert 'num_feat' in message and '\n' not in message
    with pytest.raises(UserError, match="IMDN has no option 'res_scale'.*num_block"):
        IMDN(res_scale=1)
    with pytest.raises(UserError, match="branch_opt: RRDBBranch has no extra option 'num_grow'.*num_grow_ch"):
        D2CNet(branch_type='RRDBBranch', upsampler='nearest+conv', branch_opt={'num_grow': 8})


@pytest.mark.slow
def test_training_with_a_misplaced_key_exits_2_with_one_line(tmp_path):
    """The issue's example: BasicSR's EDSR keys kept under D2CNet stop before training, no traceback."""
    make_pairs(str(tmp_path / 'data' / 'train'))
    make_pairs(str(tmp_path / 'data' / 'val'), seed=1)
    opt = tiny_train_opt(str(tmp_path / 'data'))
    opt['network_g'].update(branch_type='EDSRBranch', res_scale=1)
    yml = write_yaml(tmp_path / 'bad.yml', opt)
    result = subprocess.run([sys.executable, '-m', 'd2c_tools.train', '-opt', yml],
                            cwd=str(tmp_path),
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "d2c-train: error: network_g: D2CNet has no option 'res_scale'" in result.stderr
    assert 'Traceback' not in result.stderr


TABLE3 = sorted(glob.glob(os.path.join(REPO_ROOT, 'options', 'table3', 'train_*.yml')))


def test_table3_files_build_and_d2c_is_not_larger():
    originals = [p for p in TABLE3 if '/train_D2C-' not in p]
    assert len(originals) == 17 and len(TABLE3) == 34  # 6 networks x 3 scales, RRDBNet has no x3
    for path in originals:
        counterpart = path.replace('/train_', '/train_D2C-')
        counts = []
        for p in (path, counterpart):
            opt = yaml.safe_load(open(p))
            with torch.device('meta'):
                net = build_network(dict(opt['network_g']))
            counts.append(sum(t.numel() for t in net.parameters()))
            assert opt['network_g'].get('upscale', opt['network_g'].get('scale')) == opt['scale']
        assert counts[1] <= counts[0], path


@pytest.mark.slow
def test_table3_files_are_what_the_generator_writes():
    result = subprocess.run([sys.executable, 'scripts/make_table3_options.py', '--check'],
                            cwd=REPO_ROOT,
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
