"""Export to ONNX: any method's graphs, the metadata the runtimes read back, and the self-check.

What a method exports is its list of :class:`~d2c_inference.export_graphs.ExportGraph` (D2CNet: one
graph; DAN: the loop and the Restorer alone; SDFlow: SR and the downscaler), written one file per
graph by :func:`export_graphs_onnx` (the first at the given path, the others ``<stem>.<graph>.onnx``
beside it, named in the main file's metadata) and checked by :func:`check_graphs`;
:func:`export_method` is ``d2c-export``'s whole job for any method.

D2CNet's file takes LR images ``lq`` (N, C, H, W), float32 in [0, 1], with dynamic batch, height and
width, and gives ``sr`` (N, C, sH, sW) and, with ``outputs='all'``, ``branches``
(N, P, C, sH, sW) and ``weights`` (N, P, sH, sW), float32, not clamped (as ``D2CNet.forward``).
An fp16 file stores and computes in half precision but keeps float32 inputs and outputs, so
every caller feeds it the same arrays.

D2CNet is exported by torch's maintained exporter (``torch.onnx.export(dynamo=True)``, torch.export
underneath). The TorchScript tracer (``dynamo=False``) is faster but records Python-level
decisions on shapes as constants: SwinIR's attention mask, for one, is then the traced size's
at every size. DAN and SDFlow take the tracer (a graph's ``metadata['exporter'] = 'tracer'``): their
sizes flow through tensor operations only, and torch.export took 10x longer on them (a tiny SDFlow:
81 s against 8 s; the paper's would take minutes on every first ``d2c-infer`` run). The self-check
(:func:`check_graphs`, on another size than the traced one) catches a graph with a size baked in.
"""
import contextlib
import importlib  # noqa: F401  (tests patch export_util.importlib.import_module)
import io
import json
import os
import time
import warnings
from copy import deepcopy
from os import path as osp

import numpy as np
import torch
from torch import nn as nn

from d2c_utils.errors import UserError
from d2c_utils.output_util import atomic_write
# what the runtimes read back needs no torch: d2c-infer's deployed path imports it alone
from .metadata_util import (
    CHECK_SIZE,
    DEFAULT_OPSET,
    EXPORT_PRECISIONS,
    FORMAT,
    META_PREFIX,
    OUTPUTS,
    TRACE_SIZE,
    graph_file,
    parse_metadata,
    require,
)

# Agreement the self-check requires, PSNR over the [0, 1] range. fp32: the runtime only reorders
# float32 sums, which stays near 1e-7 (about 130 dB); 80 dB (RMS 1e-4, 1/40 of an 8-bit level) sits far
# above that and far below any graph that computes something else: a shape baked into the graph
# (SwinIR's attention mask of the traced size) measured 60-70 dB. fp16: a 10-bit mantissa gives
# 55-70 dB on these networks; 45 dB stays 5 dB under the 50 dB at which the runtimes are compared.
MIN_AGREEMENT_DB = {'fp32': 80., 'fp16': 45.}


def half_precision(module):
    """``module`` computing in fp16 behind float32 inputs and outputs (what an fp16 file computes).

    The casts are forward hooks, so the module keeps its ``forward`` signature (the graph's input names).
    ``module`` is moved to fp16 in place: pass a copy.
    """

    def inputs_to_half(_, inputs):
        return tuple(t.half() if t.is_floating_point() else t for t in inputs)

    def outputs_to_float(_, inputs, out):
        out = out if isinstance(out, tuple) else (out, )
        return tuple(t.float() if t.is_floating_point() else t for t in out)

    module = module.half()
    module.register_forward_pre_hook(inputs_to_half)
    module.register_forward_hook(outputs_to_float)
    return module


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


def _dims(graph, min_size):
    """torch.export's dynamic shapes of a graph: its size names as ``Dim``s (one per name, shared by inputs)."""
    dim = torch.export.Dim
    made = {}

    def size(spec):
        factor, _, name = spec.rpartition('*')
        if name not in made:
            low = 1 if name == 'batch' else (1 if factor else min_size)
            # SwinIR's window partition divides by the batch: torch.export keeps the batch at 1 there
            made[name] = dim(name, min=low, max=4096 if name == 'batch' else 1 << 16)
        return int(factor) * made[name] if factor else made[name]

    return {
        name: {
            axis: size(spec)
            for axis, spec in graph.dynamic.get(name, {}).items()
        } or None
        for name in graph.example_inputs
    }


def _export_graph(graph, precision, opset, trace_size, source):
    """The ONNX ModelProto of one :class:`~d2c_inference.export_graphs.ExportGraph`."""
    module = half_precision(deepcopy(graph.module)) if precision == 'fp16' else graph.module
    inputs = graph.example_inputs if trace_size is None else graph.inputs_at(*trace_size)
    tracer = graph.metadata.get('exporter') == 'tracer'
    try:  # the exporter prints its progress on stdout; the tools print their own summary
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the tracer's notes on Python values it records (checked below)
            if tracer:  # see the module docstring: only for graphs whose shapes flow through tensor ops only
                buffer = io.BytesIO()
                axes = {
                    name: {
                        axis: spec.rpartition('*')[2]
                        for axis, spec in dims.items()
                    }
                    for name, dims in graph.dynamic.items()
                }
                torch.onnx.export(
                    module.eval(),
                    tuple(inputs.values()),
                    buffer,
                    dynamo=False,
                    input_names=list(inputs),
                    output_names=list(graph.output_names),
                    opset_version=opset,
                    dynamic_axes=axes)
                return require('onnx', 'ONNX export').load_model_from_string(buffer.getvalue())
            program = torch.onnx.export(
                module.eval(),
                tuple(inputs.values()),
                None,
                dynamo=True,
                input_names=list(inputs),
                output_names=list(graph.output_names),
                opset_version=opset,
                dynamic_shapes=_dims(graph, int(graph.metadata.get('min_size', 2))),
                verbose=False)
    except Exception as err:  # torch.export's errors are long; the first line says what failed
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f'torch.onnx.export failed for {source or "the network"} (graph {graph.name}): '
                        f'{first[:300]}') from err
    return program.model_proto


def export_graphs_onnx(graphs,
                       path,
                       method,
                       precision='fp32',
                       opset=DEFAULT_OPSET,
                       trace_size=None,
                       metadata=None,
                       files=None):
    """Export a method's graphs to ONNX: one file per graph, the first at ``path`` (written atomically).

    The main file's metadata names the method (``d2c_sr.method``), its graphs (``d2c_sr.graphs``, JSON list)
    and their files (``d2c_sr.files``, JSON graph -> file name in the main file's folder), with ``metadata``
    and every graph's metadata; each other file carries the format, method, graph and precision.

    Args:
        graphs (list[ExportGraph]): From the method's ``export_graphs`` (:mod:`d2c_inference.export_graphs`).
        path (str): The main file (.onnx); the others are :func:`graph_file` beside it.
        method (str): The method's name (the registry's).
        precision (str): 'fp32' or 'fp16' (weights and arithmetic; inputs/outputs keep their types).
        opset (int): ONNX opset (>= 18).
        trace_size (tuple[int, int] | None): LR (H, W) the graphs are traced at; None: their examples.
        metadata (dict | None): More ``d2c_sr.*`` entries of the main file (key without the prefix -> str).
        files (list[str] | None): Where to write each graph instead of :func:`graph_file` (the checked export
            writes under temporary names); the metadata names the :func:`graph_file` names.

    Returns:
        dict: ``seconds`` (export time), ``dynamic_batch`` (of the main graph), ``opset``, ``bytes`` (all
        files), ``files`` (graph -> path written).
    """
    onnx = require('onnx', 'ONNX export')
    require('onnxscript', 'ONNX export')
    if precision not in EXPORT_PRECISIONS:
        raise UserError(f'precision={precision!r}; use one of {EXPORT_PRECISIONS}')
    if precision == 'fp16' and not all(graph.metadata.get('fp16', False) for graph in graphs):
        raise UserError(f'--precision fp16: {method} is exported in fp32 only (fp16 files are made for D2CNet); '
                        'use --precision fp32 (OpenVINO can still compute in bf16: d2c-infer --precision bf16)')
    if opset < DEFAULT_OPSET:
        raise UserError(f'opset {opset}: torch.onnx.export writes opset {DEFAULT_OPSET} or newer')
    names = {graph.name: osp.basename(graph_file(path, graph.name, i)) for i, graph in enumerate(graphs)}
    targets = files or [graph_file(path, graph.name, i) for i, graph in enumerate(graphs)]
    start = time.perf_counter()
    protos = [_export_graph(graph, precision, opset, trace_size, names[graphs[0].name]) for graph in graphs]
    seconds = time.perf_counter() - start
    common = {'format': FORMAT, 'method': method, 'precision': precision}
    main = dict(common, graphs=json.dumps(list(names)), files=json.dumps(names, sort_keys=True))
    for graph in graphs:
        main.update({k: v for k, v in graph.metadata.items() if k not in ('fp16', 'min_size', 'exporter')})
    main.update(metadata or {})
    for i, (graph, proto) in enumerate(zip(graphs, protos)):
        entries = main if i == 0 else dict(common, graph=graph.name, main=names[graphs[0].name])
        for key, value in dict(entries, graph=graph.name).items():
            entry = proto.metadata_props.add()
            entry.key = key if key.startswith(META_PREFIX) else META_PREFIX + key
            entry.value = value if isinstance(value, str) else str(value)
        proto.producer_name = 'd2c-sr'
    written = []
    try:
        for proto, target in zip(protos, targets):
            atomic_write(target, lambda tmp, proto=proto: onnx.save_model(proto, tmp))
            written.append(target)
    except BaseException:
        for target in written:  # all files or none
            if osp.exists(target):
                os.remove(target)
        raise
    dims = protos[0].graph.input[0].type.tensor_type.shape.dim
    return {
        'seconds': seconds,
        'dynamic_batch': bool(dims[0].dim_param),
        'opset': opset,
        'bytes': sum(proto.ByteSize() for proto in protos),
        'files': dict(zip((graph.name for graph in graphs), targets)),
    }


def export_onnx(net,
                path,
                outputs='fused',
                precision='fp32',
                opset=DEFAULT_OPSET,
                trace_size=TRACE_SIZE,
                net_opt=None,
                source=''):
    """Export a D2CNet to an ONNX file with dynamic batch, height and width (written atomically).

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
    require('onnx', 'ONNX export')
    if outputs not in OUTPUTS:
        raise UserError(f'outputs={outputs!r}; use one of {sorted(OUTPUTS)}')
    from d2c_inference.export_graphs import d2cnet_graphs
    graphs = d2cnet_graphs(net, outputs)
    meta = {k[len(META_PREFIX):]: v for k, v in network_metadata(net, net_opt, outputs, precision, source).items()}
    return export_graphs_onnx(graphs, path, 'D2CNet', precision, opset, trace_size, meta)


def psnr_db(a, b):
    """PSNR (dB) of two float arrays/tensors over the [0, 1] range; inf when equal."""
    mse = float(((torch.as_tensor(a).double() - torch.as_tensor(b).double())**2).mean())
    return float('inf') if mse == 0 else -10. * torch.log10(torch.tensor(mse)).item()


@torch.no_grad()
def require_agreement(agreement, precision, size):
    """``agreement`` (output name -> dB against PyTorch) if every output meets ``MIN_AGREEMENT_DB``; else UserError."""
    need = MIN_AGREEMENT_DB[precision]
    bad = {name: db for name, db in agreement.items() if not db >= need}  # NaN compares False: a failure
    if bad:
        shown = ', '.join(f'{name} {db:.1f} dB' for name, db in bad.items())
        raise UserError(
            f'the exported graph disagrees with PyTorch on a {size[1]}x{size[0]} input (WxH): {shown}, '
            f'{precision} needs >= {need:.0f} dB; the graph recorded something of the traced '
            f'{TRACE_SIZE[1]}x{TRACE_SIZE[0]} input as a constant. Please report it with the network_g block')
    return agreement


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
    return require_agreement(agreement, precision, size)


@torch.no_grad()
def check_graphs(graphs, files, precision='fp32', size=CHECK_SIZE, seed=0):
    """Run every exported graph with ONNX Runtime and compare its outputs with the graph's module in fp32.

    The inputs are the graph's own (:meth:`ExportGraph.inputs_at`) at an LR ``size`` other than the traced
    one, so a shape recorded as a constant shows up.

    Args:
        graphs (list[ExportGraph]): What was exported.
        files (dict[str, str]): Graph name -> its ONNX file (:func:`export_graphs_onnx`'s ``files``).
        precision (str): The files' precision; sets the required agreement (:data:`MIN_AGREEMENT_DB`).
        size (tuple[int, int]): LR (H, W) of the test inputs.

    Returns:
        dict[str, float]: output name (``<graph>.<output>`` when there are several graphs) -> PSNR (dB).

    Raises:
        UserError: an output disagrees by more than the threshold or is not finite, or ONNX Runtime
        cannot run a file.
    """
    ort = require('onnxruntime', 'checking the export with ONNX Runtime')
    agreement = {}
    for graph in graphs:
        inputs = graph.inputs_at(*size, seed=seed)
        path = files[graph.name]
        try:
            session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
            got = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})
        except Exception as err:
            raise UserError(f'ONNX Runtime cannot run {path}: {str(err).splitlines()[0][:300]}') from None
        reference = graph.module.float().eval()(*inputs.values())
        reference = reference if isinstance(reference, tuple) else (reference, )
        prefix = f'{graph.name}.' if len(graphs) > 1 else ''
        names = [prefix + name for name in graph.output_names]
        nonfinite = [
            name for name, array, ref in zip(names, got, reference)
            if not (np.isfinite(array).all() and bool(torch.isfinite(ref).all()))
        ]
        if nonfinite:
            raise UserError(f'the exported model gives NaN/inf ({", ".join(nonfinite)}) on a {size[1]}x{size[0]} '
                            'input (WxH): the weights hold NaN/inf or overflow; export a checkpoint from before '
                            'training diverged')
        agreement.update({
            name: psnr_db(torch.from_numpy(array), ref)
            for name, array, ref in zip(names, got, reference)
        })
    return require_agreement(agreement, precision, size)


def unchecked_path(output):
    """Where a file is written and checked before it is renamed to ``output`` (hidden, in the same folder).

    Named like :func:`d2c_utils.output_util.atomic_write`'s temporary files, so one left by a killed run
    is removed by the next write into that folder.
    """
    folder, name = osp.split(osp.abspath(output))
    return osp.join(folder, f'.{name}.d2c-{os.getpid()}-unchecked.tmp')


def export_method(net,
                  method,
                  path,
                  outputs='fused',
                  precision='fp32',
                  opset=DEFAULT_OPSET,
                  net_opt=None,
                  source='',
                  check=True,
                  check_size=CHECK_SIZE,
                  force=False):
    """``d2c-export``'s work for any method: its graphs written, checked against PyTorch, then put in place.

    Every file is written and checked under a temporary name in the output's folder: existing files
    (``force``) are replaced only by files that passed, and a failure or a kill leaves none behind.

    Args:
        net (nn.Module): The loaded network (eval mode; not modified).
        method (str): Its method's name in :mod:`d2c_inference.registry` (which says what it exports).
        path (str): The main .onnx file; a method with several graphs also writes ``<stem>.<graph>.onnx``.
        outputs (str): D2CNet: 'fused' or 'all'; other methods have one output set.
        check (bool): Run :func:`check_graphs` (ONNX Runtime) before the files are put in place.
        check_size (tuple[int, int]): LR (H, W) of the check.
        force (bool): Replace existing files.

    Returns:
        tuple[dict, dict | None]: :func:`export_graphs_onnx`'s result with ``summary`` (a line saying what
        was written) and ``files`` (graph -> final path), and the agreement (None without ``check``).
    """
    from d2c_inference.registry import method_named

    entry = method_named(method)
    graphs = entry.export_graphs(net, outputs)
    finals = [graph_file(path, graph.name, i) for i, graph in enumerate(graphs)]
    existing = [f for f in finals if osp.exists(f)]
    if existing and not force:
        raise UserError(f'{existing[0]} exists; pass --force to overwrite it')
    if len(set(map(osp.abspath, finals))) != len(finals):
        raise UserError(f'{path}: the files of the graphs {[g.name for g in graphs]} collide; use another name')
    unchecked = [unchecked_path(f) for f in finals]
    meta = {
        'upscale': net.upscale,
        'network_g': json.dumps(net_opt or {}, sort_keys=True, default=list),
        'source': source
    }
    try:
        result = export_graphs_onnx(graphs, path, method, precision, opset, None, meta, files=unchecked)
        agreement = None
        if check:
            agreement = check_graphs(graphs, result['files'], precision, check_size)
        for tmp, final in zip(unchecked, finals):
            os.replace(tmp, final)
    finally:
        for tmp in unchecked:
            if osp.exists(tmp):
                os.remove(tmp)  # a file that computes something else must not be used
    result['files'] = dict(zip((graph.name for graph in graphs), finals))
    shown = '; '.join(f'{g.name}: {", ".join(g.example_inputs)} -> {", ".join(g.output_names)}' for g in graphs)
    result['summary'] = f'{method} x{net.upscale}, {len(graphs)} graph(s) ({shown})'
    return result, agreement
