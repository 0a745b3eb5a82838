"""D2CNet to ONNX: one export function, the metadata the runtimes read back, and the self-check.

The file takes LR images ``lq`` (N, C, H, W), float32 in [0, 1], with dynamic batch, height and
width, and gives ``sr`` (N, C, sH, sW) and, with ``outputs='all'``, ``branches``
(N, P, C, sH, sW) and ``weights`` (N, P, sH, sW), float32, not clamped (as ``D2CNet.forward``).
An fp16 file stores and computes in half precision but keeps float32 inputs and outputs, so
every caller feeds it the same arrays.

The export uses torch's maintained exporter (``torch.onnx.export(dynamo=True)``, torch.export
underneath). The TorchScript tracer (``dynamo=False``) is faster but records Python-level
decisions on shapes as constants: SwinIR's attention mask, for one, is then the traced size's
at every size. The self-check (:func:`check_export`) catches such graphs.
"""
import contextlib
import importlib  # noqa: F401  (tests patch export_util.importlib.import_module)
import io
import json
import time
from copy import deepcopy

import numpy as np
import torch
from torch import nn as nn

from d2c_utils.errors import UserError
from d2c_utils.output_util import atomic_write
# what the runtimes read back needs no torch: d2c-infer's deployed path imports it alone
from .metadata_util import EXPORT_PRECISIONS, EXTRAS, FORMAT, META_PREFIX, OUTPUTS, parse_metadata, require  # noqa: F401

# 18: the lowest opset torch's exporter writes, so the widest range of runtimes reads it (tested: ONNX
# Runtime 1.32, OpenVINO 2026.4)
DEFAULT_OPSET = 18
# the example the graph is traced with, and the (different, odd) size it is checked on
TRACE_SIZE = (64, 64)
CHECK_SIZE = (45, 71)
# Agreement the self-check requires, PSNR over the [0, 1] range. fp32: the runtime only reorders
# float32 sums, which stays near 1e-7 (about 130 dB); 80 dB (RMS 1e-4, 1/40 of an 8-bit level) sits far
# above that and far below any graph that computes something else: a shape baked into the graph
# (SwinIR's attention mask of the traced size) measured 60-70 dB. fp16: a 10-bit mantissa gives
# 55-70 dB on these networks; 45 dB stays 5 dB under the 50 dB at which the runtimes are compared.
MIN_AGREEMENT_DB = {'fp32': 80., 'fp16': 45.}


class ExportWrapper(nn.Module):
    """What the ONNX file computes: D2CNet's outputs for float32 inputs, in fp32 or fp16.

    Args:
        net (D2CNet): In eval mode (moved to fp16 here for ``precision='fp16'``; pass a copy).
        outputs (str): 'fused' (the SR image) or 'all' (also branches and weight maps).
        precision (str): 'fp32' or 'fp16'.
    """

    def __init__(self, net, outputs='fused', precision='fp32'):
        super().__init__()
        self.half = precision == 'fp16'
        self.net = net.half() if self.half else net
        self.all = outputs == 'all'

    def forward(self, lq):
        out = self.net(lq.half() if self.half else lq, return_branches=self.all)
        out = out if isinstance(out, tuple) else (out, )
        return tuple(t.float() for t in out) if self.half else out


def network_metadata(net, net_opt=None, outputs='fused', precision='fp32', source=''):
    """The ``d2c_sr.*`` metadata written into the file (strings, as ONNX stores them)."""
    meta = {
        'format': FORMAT,
        'upscale': net.upscale,
        'num_branch': net.num_branch,
        'tree_depth': net.tree_depth,
        'tree_width': net.tree_width,
        'num_in_ch': net.head.in_channels,
        'branch_type': type(net.tree[0][0]).__name__,
        'size_multiple': net.size_multiple,
        'outputs': outputs,
        'precision': precision,
        'network_g': json.dumps(net_opt or {}, sort_keys=True, default=list),
        'source': source,
    }
    return {META_PREFIX + k: str(v) for k, v in meta.items()}


def read_metadata(model_proto, path):
    """``d2c_sr.*`` metadata of a loaded ONNX model as a dict with typed values.

    Raises:
        UserError: the file was not written by d2c-export (or by an incompatible version).
    """
    props = {p.key[len(META_PREFIX):]: p.value for p in model_proto.metadata_props if p.key.startswith(META_PREFIX)}
    return parse_metadata(props, path)


def _dynamic_shapes(size_multiple):
    dim = torch.export.Dim
    # SwinIR's window partition divides by the batch: torch.export keeps the batch at 1 there
    return {
        'lq': {
            0: dim('batch', min=1, max=4096),
            2: dim('height', min=max(2, size_multiple), max=1 << 16),
            3: dim('width', min=max(2, size_multiple), max=1 << 16),
        }
    }


def export_onnx(net,
                path,
                outputs='fused',
                precision='fp32',
                opset=DEFAULT_OPSET,
                trace_size=TRACE_SIZE,
                net_opt=None,
                source=''):
    """Export ``net`` to an ONNX file with dynamic batch, height and width (written atomically).

    Args:
        net (D2CNet): Trained network in eval mode (not modified; a copy is exported).
        path (str): The .onnx file to write (weights inside the file, up to ONNX's 2 GiB).
        outputs (str): 'fused' or 'all' (see :data:`OUTPUTS`).
        precision (str): 'fp32' or 'fp16' (weights and arithmetic; inputs/outputs stay float32).
        opset (int): ONNX opset (>= 18).
        trace_size (tuple[int, int]): (H, W) of the example input the graph is recorded with.
        net_opt (dict | None): The ``network_g`` options, stored in the metadata.
        source (str): Where the weights came from, stored in the metadata.

    Returns:
        dict: ``seconds`` (export time), ``dynamic_batch`` (False for SwinIR branches: the file
        then takes one image at a time), ``opset``, ``bytes``.
    """
    onnx = require('onnx', 'ONNX export')
    require('onnxscript', 'ONNX export')
    if outputs not in OUTPUTS:
        raise UserError(f'outputs={outputs!r}; use one of {sorted(OUTPUTS)}')
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f'precision={precision!r}; use one of {EXPORT_PRECISIONS}')
    if opset < DEFAULT_OPSET:
        raise UserError(f'opset {opset}: torch.onnx.export writes opset {DEFAULT_OPSET} or newer')
    wrapper = ExportWrapper(deepcopy(net).cpu().float(), outputs, precision).eval()
    example = torch.rand(1, net.head.in_channels, *trace_size)
    start = time.perf_counter()
    try:  # the exporter prints its progress on stdout; the tools print their own summary
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                wrapper, (example, ),
                None,
                dynamo=True,
                input_names=['lq'],
                output_names=list(OUTPUTS[outputs]),
                opset_version=opset,
                dynamic_shapes=_dynamic_shapes(net.size_multiple),
                verbose=False)
    except Exception as err:  # torch.export's errors are long; the first line says what failed
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f'torch.onnx.export failed for {source or "the network"}: {first[:300]}') from err
    proto = program.model_proto
    for key, value in network_metadata(net, net_opt, outputs, precision, source).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = 'd2c-sr'
    seconds = time.perf_counter() - start
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))
    return {
        'seconds': seconds,
        'dynamic_batch': bool(dims[0].dim_param),
        'opset': opset,
        'bytes': proto.ByteSize(),
    }


def psnr_db(a, b):
    """PSNR (dB) of two float arrays/tensors over the [0, 1] range; inf when equal."""
    mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double())**2).mean())
    return float('inf') if mse == 0 else -10. * torch.log10(torch.tensor(mse)).item()


@torch.no_grad()
def check_export(net, path, precision='fp32', size=CHECK_SIZE, seed=0):
    """Run the exported file with ONNX Runtime and compare every output with PyTorch fp32.

    The input is a smooth random image (random LR pixels bicubic-upscaled, so the network sees
    image-like structure) of ``size``, which differs from the traced size, so a shape recorded
    as a constant shows up.

    Args:
        net (D2CNet): The exported network (eval mode).
        path (str): The ONNX file.
        precision (str): The file's precision; sets the required agreement (:data:`MIN_AGREEMENT_DB`).
        size (tuple[int, int]): (H, W) of the test input.

    Returns:
        dict[str, float]: output name -> PSNR (dB) against PyTorch.

    Raises:
        UserError: an output disagrees by more than the threshold (the file is then removed by
        the caller) or ONNX Runtime cannot run it.
    """
    ort = require('onnxruntime', 'checking the export with ONNX Runtime')
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, net.head.in_channels, size[0] // 4 + 2, size[1] // 4 + 2, generator=generator)
    lq = torch.nn.functional.interpolate(coarse, size=size, mode='bicubic', align_corners=False).clamp(0, 1)
    try:
        session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
        names = [o.name for o in session.get_outputs()]
        got = session.run(None, {session.get_inputs()[0].name: lq.numpy()})
    except Exception as err:
        raise UserError(f'ONNX Runtime cannot run {path}: {str(err).splitlines()[0][:300]}') from None
    reference = net.float().eval()(lq.to(next(net.parameters()).device), return_branches=True)
    reference = dict(zip(OUTPUTS['all'], (t.cpu() for t in reference)))
    nonfinite = [name for name, array in zip(names, got) if not np.isfinite(array).all()]
    nonfinite += [name for name in names if name not in nonfinite and not bool(torch.isfinite(reference[name]).all())]
    if nonfinite:
        raise UserError(f'the exported model gives NaN/inf ({", ".join(nonfinite)}) on a {size[1]}x{size[0]} input '
                        '(WxH): the weights hold NaN/inf or overflow; export a checkpoint from before training '
                        'diverged')
    agreement = {name: psnr_db(torch.from_numpy(array), reference[name]) for name, array in zip(names, got)}
    need = MIN_AGREEMENT_DB[precision]
    bad = {name: db for name, db in agreement.items() if not db >= need}  # NaN compares False: a failure
    if bad:
        shown = ', '.join(f'{name} {db:.1f} dB' for name, db in bad.items())
        raise UserError(
            f'the exported graph disagrees with PyTorch on a {size[1]}x{size[0]} input (WxH): {shown}, '
            f'{precision} needs >= {need:.0f} dB; the graph recorded something of the traced '
            f'{TRACE_SIZE[1]}x{TRACE_SIZE[0]} input as a constant. Please report it with the network_g block')
    return agreement
