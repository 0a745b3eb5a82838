"""What an exported file says about itself, read without torch: the ``d2c_sr.*`` metadata and optional packages.

:mod:`.export_util` writes the metadata (and imports torch); the runtimes' side
(:mod:`.runtime_util`, ``d2c-infer`` on an ONNX file) reads it with this module alone, so a
deployed run imports neither torch nor basicsr.
"""
import importlib
import json

from d2c_utils.errors import UserError

FORMAT = 'd2c-sr/onnx/1'  # metadata 'd2c_sr.format'; bump when the inputs/outputs change meaning
META_PREFIX = 'd2c_sr.'
OUTPUTS = {'fused': ('sr', ), 'all': ('sr', 'branches', 'weights')}
EXPORT_PRECISIONS = ('fp32', 'fp16')
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
