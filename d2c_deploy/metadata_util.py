"""What an exported file says about itself, read without torch: the ``d2c_sr.*`` metadata and optional packages.

:mod:`.export_util` writes the metadata (and imports torch); the runtimes' side
(:mod:`.runtime_util`, ``d2c-infer`` on an ONNX file) reads it with this module alone, so a
deployed run imports neither torch nor basicsr.
"""
import importlib
import json
from os import path as osp

from d2c_utils.errors import UserError

FORMAT = 'd2c-sr/onnx/1'  # metadata 'd2c_sr.format'; bump when the inputs/outputs change meaning
META_PREFIX = 'd2c_sr.'
OUTPUTS = {'fused': ('sr', ), 'all': ('sr', 'branches', 'weights')}
EXPORT_PRECISIONS = ('fp32', 'fp16')
# the export's settings d2c-export shows in its --help (export_util uses them; kept here, free of torch)
# 18: the lowest opset torch's exporter writes, so the widest range of runtimes reads it (tested: ONNX
# Runtime 1.32, OpenVINO 2026.4)
DEFAULT_OPSET = 18
# the example the graph is traced with, and the (different, odd) size it is checked on
TRACE_SIZE = (64, 64)
CHECK_SIZE = (45, 71)
EXTRAS = {'onnx': 'onnx', 'onnxscript': 'onnx', 'onnxruntime': 'onnx', 'openvino': 'openvino'}


def require(module, purpose):
    """Import an optional dependency or raise a UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = EXTRAS.get(module, module)
        raise UserError(f'{purpose} needs the Python package {module!r} ({err}); install it with '
                        f'pip install "d2c-sr[{extra}]" (or pip install -e ".[{extra}]" in a checkout)') from None


def parse_metadata(props, path):
    """Typed metadata from the ``d2c_sr.*`` strings (keys without the prefix); UserError if not ours."""
    if props.get('format') != FORMAT:
        found = f'format {props["format"]!r}' if 'format' in props else 'no d2c_sr.* metadata'
        raise UserError(f'{path} is not an ONNX file written by d2c-export ({found}, expected {FORMAT!r}); '
                        'export the checkpoint with d2c-export MODEL.pth -o MODEL.onnx')
    if 'num_branch' not in props and props.get('graphs'):  # a method other than D2CNet (export_graphs_onnx)
        return parse_method_metadata(props, path)
    meta = dict(props)
    for key in ('upscale', 'num_branch', 'tree_depth', 'tree_width', 'num_in_ch', 'size_multiple'):
        try:
            meta[key] = int(meta[key])
        except (KeyError, ValueError):
            meta[key] = None
        if meta[key] is None or meta[key] < 1:
            raise UserError(f'{path}: its metadata d2c_sr.{key}={props.get(key)!r} is not a positive integer; the '
                            'file is damaged or was edited: export the checkpoint again with d2c-export')
    try:
        meta['network_g'] = json.loads(meta.get('network_g') or '{}')
    except ValueError as err:
        raise UserError(f'{path}: its metadata d2c_sr.network_g is not valid JSON ({err}); export the checkpoint '
                        'again with d2c-export') from None
    if not isinstance(meta['network_g'], dict):
        raise UserError(f'{path}: its metadata d2c_sr.network_g is not a mapping; export the checkpoint again')
    for key, allowed in (('outputs', tuple(OUTPUTS)), ('precision', EXPORT_PRECISIONS)):
        if meta.get(key) not in allowed:
            raise UserError(f'{path}: its metadata d2c_sr.{key}={meta.get(key)!r} is not one of {allowed}; export '
                            'the checkpoint again with d2c-export')
    return meta


def graph_file(path, graph, index):
    """The file of the ``index``-th graph of an export to ``path``: ``path`` itself, then ``<stem>.<graph>.onnx``."""
    return path if index == 0 else f'{path[:-len(".onnx")] if path.endswith(".onnx") else path}.{graph}.onnx'


# typed metadata of the methods' graphs (export_graphs.py); the rest stays text
_INT_KEYS = ('upscale', 'kernel_size', 'code_length', 'loop', 'hf_channels', 'deg_channels', 'components')


def parse_method_metadata(props, path):
    """Typed metadata of a main file written by :func:`export_graphs_onnx` for DAN or SDFlow; UserError if damaged.

    Adds ``paths``: graph -> the file (beside ``path``), checked to exist.
    """

    def damaged(key, why):
        return UserError(f'{path}: its metadata d2c_sr.{key}={props.get(key)!r} {why}; the file is damaged or was '
                         'edited: export the checkpoint again with d2c-export')

    meta = dict(props)
    try:
        meta['graphs'] = json.loads(props['graphs'])
        meta['files'] = json.loads(props.get('files') or '{}')
        meta['network_g'] = json.loads(props.get('network_g') or '{}')
    except ValueError as err:
        raise damaged('graphs', f'is not valid JSON ({err})') from None
    for key in _INT_KEYS:
        if key in props:
            try:
                meta[key] = int(props[key])
            except ValueError:
                raise damaged(key, 'is not an integer') from None
    if 'temperature' in props:
        meta['temperature'] = float(props['temperature'])
    if 'has_downscaler' in props:
        meta['has_downscaler'] = props['has_downscaler'] == 'True'
    if meta.get('precision') not in EXPORT_PRECISIONS:
        raise damaged('precision', f'is not one of {EXPORT_PRECISIONS}')
    if not props.get('method') or not isinstance(meta['graphs'], list) or set(meta['graphs']) - set(meta['files']):
        raise damaged('files', f'does not name a file for every graph of {meta["graphs"]}')
    folder = osp.dirname(osp.abspath(path))
    meta['paths'] = {
        graph: path if i == 0 else osp.join(folder, osp.basename(meta['files'][graph]))
        for i, graph in enumerate(meta['graphs'])
    }
    missing = [p for p in meta['paths'].values() if not osp.isfile(p)]
    if missing:
        raise UserError(f'{path} needs {missing[0]} beside it (d2c-export writes one file per graph of '
                        f'{props["method"]}: {", ".join(meta["files"].values())}); copy the files together')
    return meta
