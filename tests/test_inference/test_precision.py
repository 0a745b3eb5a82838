"""Reduced precision and channels_last at inference: agreement with fp32, the fp32 fall-back, options."""
import os

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from d2c_arch import D2CNet
from d2c_inference.checkpoint_util import load_model
from d2c_inference.tile_util import GuardedForward, output_problem, prepare_network, run_network, super_resolve
from d2c_tools import infer
from d2c_utils import precision_util
from d2c_utils.eval_util import tensor_psnr
from d2c_utils.precision_util import resolve_precision


def photo_tensor(path):
    """A PNG as (1, 3, H, W) RGB float32 in [0, 1]."""
    bgr = cv2.imread(path)
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1))).float().unsqueeze(0) / 255.


class FakeSR(nn.Module):
    """x2 nearest-neighbour "super-resolution" that breaks on request under autocast.

    ``broken``: None, 'nan' (NaN under autocast), 'black' (zeros under autocast) or 'shift'
    (colours shifted by 0.5 under autocast);
    ``always_black``: zeros in every precision (a model that is simply bad).
    Records in ``self.autocast_calls`` whether each call ran under CPU autocast.
    """
    upscale = 2

    def __init__(self, broken=None, always_black=False):
        super().__init__()
        self.broken, self.always_black = broken, always_black
        self.autocast_calls = []

    def forward(self, x, return_branches=False):
        under_autocast = torch.is_autocast_enabled('cpu')
        self.autocast_calls.append(under_autocast)
        sr = F.interpolate(x, scale_factor=2, mode='nearest')
        if self.always_black or (under_autocast and self.broken == 'black'):
            sr = torch.zeros_like(sr)
        if under_autocast and self.broken == 'nan':
            sr = sr * float('nan')
        if under_autocast and self.broken == 'shift':
            sr = sr + 0.5
        if return_branches:
            n, _, h, w = sr.shape
            return sr, torch.stack([sr, sr], dim=1), torch.full((n, 2, h, w), 0.5)
        return sr


def gray_input():
    torch.manual_seed(0)
    return 0.3 + 0.4 * torch.rand(1, 3, 6, 8)


# ------------------------------------------------------------------------- option resolution


def test_auto_precision_per_device_and_purpose(monkeypatch):
    monkeypatch.setattr(precision_util, 'cpu_has_native_bf16', lambda: True)
    assert resolve_precision('auto', 'cpu', 'infer') == torch.bfloat16
    monkeypatch.setattr(precision_util, 'cpu_has_native_bf16', lambda: False)
    assert resolve_precision('auto', 'cpu', 'infer') is None  # emulated bf16 would be slower than fp32
    # inference on CUDA: fp16 (more mantissa than bf16; overflow is guarded by the fall-back)
    assert resolve_precision('auto', 'cuda', 'infer') == torch.float16
    assert resolve_precision('fp32', 'cuda', 'infer') is None and resolve_precision(None, 'cpu') is None
    with pytest.raises(ValueError, match='fp16 needs CUDA'):
        resolve_precision('fp16', 'cpu', 'infer')
    # training on a GPU without bf16 (before compute capability 8.0): fp16 with a gradient scaler
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    assert resolve_precision('auto', 'cuda', 'train') == torch.float16
    with pytest.raises(ValueError, match='no bf16 support'):
        resolve_precision('bf16', 'cuda', 'infer')
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert resolve_precision('auto', 'cuda', 'train') == torch.bfloat16


# ------------------------------------------------------------------------------- run_network


def test_run_network_returns_float32_in_every_precision_and_layout():
    torch.manual_seed(0)
    net = D2CNet(num_feat=8, num_group=1, num_block=1, reduction=4, num_fusion_feat=8, upscale=2).eval()
    x = torch.rand(1, 3, 10, 12)
    reference = run_network(net, x, return_branches=True)
    for dtype in (None, torch.bfloat16):
        for channels_last in (False, True):
            prepare_network(net, channels_last)
            assert net.head.weight.is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            sr, branches, weights = run_network(net, x, True, dtype, channels_last)
            assert (sr.shape, branches.shape, weights.shape) == ((1, 3, 20, 24), (1, 4, 3, 20, 24), (1, 4, 20, 24))
            assert sr.dtype == branches.dtype == weights.dtype == torch.float32
            # the layout only changes the order of the sums: fp32 agrees to rounding; bf16 to ~3 digits
            floor = 100 if dtype is None else 40
            for got, want in zip((sr, branches, weights), reference):
                assert tensor_psnr(got, want) > floor


# ---------------------------------------------------------------------------- GuardedForward


@pytest.mark.parametrize('broken,reason', [('nan', 'non-finite'), ('black', 'a flat image'),
                                           ('shift', 'an image far from the input')])
def test_broken_reduced_precision_falls_back_to_fp32_once_and_for_all(broken, reason):
    net, x, warnings = FakeSR(broken=broken), gray_input(), []
    forward = GuardedForward(torch.bfloat16, warn=warnings.append)
    out = forward(net, x)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode='nearest'))  # the fp32 result
    assert net.autocast_calls == [True, False]  # tried bf16, recomputed in fp32
    assert forward.dtype is None and reason in forward.fallback_reason
    assert len(warnings) == 1 and 'bf16 gave' in warnings[0] and 'falling back to fp32' in warnings[0]
    sr, branches, weights = forward(net, x, return_branches=True)  # later passes: fp32 directly
    assert net.autocast_calls == [True, False, False] and len(warnings) == 1
    assert torch.isfinite(branches).all() and sr.shape == (1, 3, 12, 16)


def test_model_that_is_bad_in_fp32_too_keeps_reduced_precision():
    net, x, warnings = FakeSR(always_black=True), gray_input(), []
    forward = GuardedForward(torch.bfloat16, warn=warnings.append)
    assert float(forward(net, x).abs().max()) == 0
    assert net.autocast_calls == [True, False] and forward.dtype == torch.bfloat16 and not warnings
    forward(net, x)  # fp32 agreed: the distance check is off, no second fp32 pass
    assert net.autocast_calls == [True, False, True]


def test_fp32_and_healthy_outputs_are_not_recomputed():
    net, x = FakeSR(), gray_input()
    GuardedForward(None)(net, x)
    GuardedForward(torch.bfloat16)(net, x)
    assert net.autocast_calls == [False, True]
    assert output_problem(x, F.interpolate(x, scale_factor=2)) is None
    assert 'non-finite' in output_problem(x, (x.repeat(1, 1, 2, 2), torch.full((1, 2), float('inf'))))
    # a flat input may give a flat output: checked once against fp32, then accepted
    flat, warnings = torch.full((1, 3, 6, 8), 0.5), []
    forward = GuardedForward(torch.bfloat16, warn=warnings.append)
    forward(net, flat)
    forward(net, flat)
    assert net.autocast_calls[2:] == [True, False, True] and not warnings and forward.dtype == torch.bfloat16


def test_fallback_inside_tiled_super_resolve_covers_every_tile():
    net, warnings = FakeSR(broken='nan'), []
    x = gray_input().repeat(1, 1, 3, 3)  # 18x24, 6 tiles of 8 (with padding)
    sr, _, _ = super_resolve(
        net, x, 2, tile=8, tile_pad=2, forward=GuardedForward(torch.bfloat16, warn=warnings.append))
    assert torch.isfinite(sr).all() and len(warnings) == 1
    torch.testing.assert_close(sr, F.interpolate(x, scale_factor=2, mode='nearest'))


# ------------------------------------------------------------- quality guard, trained model


@pytest.mark.slow
def test_bf16_channels_last_agrees_with_fp32_on_a_real_photo_with_the_demo_model(demo_run):
    """The issue's quality guard: >= 50 dB against fp32 NCHW, trained demo model, real photo."""
    net, _ = load_model(demo_run['model'], demo_run['opt'])
    lq = photo_tensor(demo_run['lr'])[:, :, :48, :64]  # the held-out cat, 64x48 -> 256x192
    reference = run_network(net, lq, return_branches=True)
    prepare_network(net, True)
    forward = GuardedForward(torch.bfloat16, channels_last=True)
    fast = forward(net, lq, return_branches=True)
    assert forward.fallback_reason is None
    agreement = tensor_psnr(fast[0].clamp(0, 1), reference[0].clamp(0, 1))
    assert agreement >= 50, f'bf16 + channels_last agrees with fp32 at only {agreement:.1f} dB'
    for got, want in zip(fast[1:], reference[1:]):  # branches and weight maps too
        assert tensor_psnr(got.clamp(0, 1), want.clamp(0, 1)) >= 45


@pytest.mark.slow
def test_d2c_infer_precision_flags(demo_run, tmp_path, capsys):
    common = ['-i', demo_run['lr'], '--model', demo_run['model'], '--opt', demo_run['opt'], '--device', 'cpu', '-q']
    common += ['--backend', 'torch']  # PyTorch's precisions; the other backends: test_export.py
    assert infer.main(common + ['-o', str(tmp_path / 'fp32'), '--precision', 'fp32', '--no-channels-last']) == 0
    assert 'cpu, fp32, NCHW' in capsys.readouterr().out
    assert infer.main(common + ['-o', str(tmp_path / 'bf16'), '--precision', 'bf16']) == 0
    assert 'cpu, bf16, channels_last' in capsys.readouterr().out
    assert infer.main(common + ['-o', str(tmp_path / 'auto')]) == 0
    expected = 'bf16' if precision_util.cpu_has_native_bf16() else 'fp32'
    assert f'cpu, {expected}, channels_last' in capsys.readouterr().out
    slow, fast = (cv2.imread(str(tmp_path / d / 'chelsea_out.png')).astype(int) for d in ('fp32', 'bf16'))
    diff = np.abs(slow - fast)
    # ~64 dB agreement is an rms difference of ~0.16 of an 8-bit level: some values round the other way
    assert diff.max() <= 1 and (diff > 0).mean() < 0.25

    hr_dir = os.path.dirname(demo_run['hr'])
    assert infer.main(common + ['-o', str(tmp_path / 'm'), '--precision', 'bf16', '--reference', hr_dir]) == 0
    assert 'use --precision fp32 for numbers you report' in capsys.readouterr().err
    assert infer.main(common + ['-o', str(tmp_path / 'x'), '--precision', 'fp16']) == 2
    err = capsys.readouterr().err
    assert '--precision fp16' in err and 'needs CUDA' in err


def test_tensor_psnr_by_hand():
    zeros = torch.zeros(1, 3, 4, 4)
    assert tensor_psnr(zeros, torch.full_like(zeros, 0.1)) == pytest.approx(20.)  # mse 0.01 -> 20 dB
    assert tensor_psnr(zeros, zeros) == float('inf')
