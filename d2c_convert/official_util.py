"""Convert the authors' released D2C-SR checkpoint (MegEngine) into a BasicSR checkpoint for D2CNet.

The library behind ``d2c-convert-official`` (:mod:`d2c_tools.convert_official`)::

    d2c-convert-official checkpoint.pkl D2C_official_x4.pth [--opt-out official_x4.yml]

The authors' ``train.py`` saves ``megengine.save({'state_dict_D': D.state_dict(), 'state_dict_C':
C.state_dict()}, 'checkpoint.pkl')``: a plain Python pickle whose state dicts hold ``numpy.ndarray``
values. This module reads it **without MegEngine and without running any code from the file**:
:class:`SafeUnpickler` only lets through the few globals a pickle of numpy arrays needs (see
``ALLOWED_GLOBALS``) and refuses everything else by name (``posix.system``,
``torch._utils._rebuild_tensor_v2``, ...).

What the conversion does
------------------------
* Every key of the authors' ``D_Net`` / ``C_Net`` maps to exactly one D2CNet parameter and every
  D2CNet parameter is filled; anything left over on either side, or any shape mismatch, is an
  error that names the keys (see :func:`official_key` for the table).
* MegEngine conv biases of shape (1, C, 1, 1) become PyTorch's (C,).
* The authors' mean-shift layers ``sub_mean`` / ``add_mean`` are **trained** 1x1 convs in every
  real checkpoint of the release. Their ``MeanShift`` means to set a fixed DIV2K-mean shift with
  ``self.weight.data = ...`` / ``self.bias.data = ...``, but in MegEngine assigning ``.data`` only
  sets a Python attribute and leaves the parameter unchanged; so both layers keep MegEngine's
  random initialisation and are trained with the rest of the network. D2CNet has no such layers
  (it subtracts a constant ``rgb_mean``), so by default the converter folds both 1x1 convs
  exactly into the head conv and the output convs (:func:`fold_mean_shift`) and says so in one
  line. Where they do hold the fixed DIV2K shift (``MeanShift`` as intended, rgb_range 1, e.g. a
  file written by :func:`export_official`), they are checked and dropped, and D2CNet's default
  ``rgb_mean`` does the same. ``--strict-mean-shift`` refuses anything but the fixed shift.
* Channel order. The authors read every image with ``cv2.imread`` and never convert it
  (``dataset/dataset.py``), so their network was trained on, and expects, **BGR** input and
  produces BGR output. BasicSR feeds RGB. With ``--channel-order rgb`` (default) the converter
  reverses the colour channels of the head conv's input, of every tail's output conv and of the
  convergence net's input (per branch), and reverses the mean, so the converted D2CNet computes
  the authors' function on RGB images. ``--channel-order bgr`` keeps the authors' order.
  Either way the converted network needs ``network_g.rgb_mean`` as printed (for ``rgb``:
  ``[0.404, 0.4371, 0.4488]``, the reverse of the option files' default), which is why the
  converter prints the ``network_g`` snippet and can write it (``--opt-out``), or a whole test
  option file from a template (``--template``).
* The scale is read from the tail shapes: x2 has one upsampler conv F -> 4F, x3 one conv
  F -> 9F, x4 two and x8 three convs F -> 4F. F, G, B and the channel-attention reduction are
  read from the shapes too and reported (the paper's release: F=64, G=2, B=4, reduction 16).

:func:`export_official` is the inverse mapping (D2CNet state dict -> the authors' two state
dicts), used by the tests to check that a round trip is bit-identical.
"""
import collections
import importlib
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from d2c_arch import default_options
from d2c_arch.upsample_util import upsampler_scale
from d2c_convert.convert_util import (
    check_mapping,
    check_outputs,
    load_strictly,
    options_lines,
    options_snippet,
    short_list,
    source_record,
    target_shapes,
    write_converted,
)
from d2c_utils.errors import UserError
from d2c_utils.option_check import dump_option_yaml, read_option_file

PROG = 'd2c-convert-official'
SECTIONS = ('state_dict_D', 'state_dict_C')
NODE_NAMES = (('1', '2'), ('11', '12', '21', '22'))  # the authors' body<name>, per tree level
LEAF_NAMES = NODE_NAMES[-1]  # leaves 0..3 in D2CNet's depth-first order = the authors' 11, 12, 21, 22
MEAN_SHIFT_KEYS = ('sub_mean.weight', 'sub_mean.bias', 'add_mean.weight', 'add_mean.bias')
CHANNEL_ORDERS = ('rgb', 'bgr')
MEAN_ATOL = 1e-6  # the file stores float32; the authors' constants survive that to ~3e-8
TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c  # first pickle of a pre-1.6 ``torch.save`` file

# The only globals a pickle of (Ordered)dicts of numpy arrays and numpy scalars refers to.
# numpy >= 2 writes ``numpy._core.*``, numpy 1.x (the authors' MegEngine era) ``numpy.core.*``;
# protocol 5 uses ``_frombuffer``, protocol 2 pickles bytes through ``_codecs.encode``.
ALLOWED_GLOBALS = (
    ('collections', 'OrderedDict'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),
    ('numpy._core.numeric', '_frombuffer'),
    ('_codecs', 'encode'),
)


class UnsafePickleError(UserError):
    """The checkpoint refers to a global that a pickle of numpy arrays does not need."""


def _resolve_allowed(module, name):
    """The object for an allowed global, taken from where this numpy keeps it.

    The file may name ``numpy.core`` (numpy 1.x) while numpy 2 keeps the functions in
    ``numpy._core`` (``numpy.core`` is a deprecated alias there) and the other way round, so the
    module is looked up under both names instead of importing the one the file gives.
    """
    if module == 'collections':
        return collections.OrderedDict
    if module == 'numpy':
        return getattr(np, name)
    if module == '_codecs':
        import _codecs
        return _codecs.encode
    submodule = module.split('.', 2)[2]  # 'multiarray' or 'numeric'
    for package in ('numpy._core', 'numpy.core'):
        try:
            return getattr(importlib.import_module(f'{package}.{submodule}'), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafePickleError(f"this numpy ({np.__version__}) has no {module}.{name}, which the checkpoint needs")


class SafeUnpickler(pickle.Unpickler):
    """A pickle reader that only builds dicts, numpy arrays and numpy scalars.

    ``pickle`` runs whatever callables a file names, so a checkpoint from the internet must not be
    read with ``pickle.load``. Here every global the file asks for is checked against
    ``ALLOWED_GLOBALS`` before anything is called; anything else (``os.system``, ``builtins.eval``,
    torch's or MegEngine's tensor classes, ...) raises :class:`UnsafePickleError` naming it.
    Persistent ids (what ``torch.save`` uses for storages) are refused as well.
    """

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            hint = ''
            if module.split('.')[0] == 'torch':
                hint = ' (this is a PyTorch pickle; an already converted checkpoint needs no conversion)'
            elif module.split('.')[0] == 'megengine':
                hint = (' (the state dicts hold MegEngine tensors, not numpy arrays; save them with '
                        'Module.state_dict(), which gives numpy arrays)')
            raise UnsafePickleError(f"refused global '{module}.{name}': a checkpoint of numpy arrays never needs it, "
                                    f'so nothing from this file is run{hint}')
        return _resolve_allowed(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError('refused a persistent id: the file is not a plain pickle of numpy arrays '
                                '(torch.save writes those for its storages)')


def load_official(path):
    """Read the authors' checkpoint safely.

    Args:
        path (str): The ``.pkl`` written by the authors' ``train.py`` (``megengine.save``).

    Returns:
        tuple[dict, dict, list[str]]: ``state_dict_D`` and ``state_dict_C`` as dicts of numpy
        arrays, and the names of the other top-level entries (ignored: optimiser states, epoch,
        PSNR...).

    Raises:
        UserError: unreadable file, refused global, or not the authors' layout.
    """
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file (pass the authors\' checkpoint .pkl)')
    with open(path, 'rb') as f:
        magic = f.read(4)
        f.seek(0)
        if magic.startswith(b'PK\x03\x04'):
            raise UserError(f'{path}: this is a zip archive (a torch.save checkpoint?), not the authors\' '
                            'MegEngine pickle; a BasicSR checkpoint needs no conversion (set '
                            'path.pretrain_network_g to it)')
        try:
            obj = SafeUnpickler(f).load()
        except UserError as err:
            raise UserError(f'{path}: {err}') from None
        except Exception as err:  # noqa: BLE001  (pickle fails in many ways; all mean "not a usable pickle")
            raise UserError(f'{path}: not a readable pickle ({type(err).__name__}: {err}); '
                            'pass the checkpoint .pkl written by the authors\' train.py') from None
    return split_checkpoint(obj, path)


def split_checkpoint(obj, path='checkpoint'):
    """Take ``state_dict_D`` / ``state_dict_C`` out of the unpickled object and check their values.

    Args:
        obj: What the pickle held.
        path (str): File name for the messages.

    Returns:
        tuple[dict, dict, list[str]]: the two state dicts (numpy arrays) and the ignored entries.
    """
    if not isinstance(obj, Mapping):
        if isinstance(obj, int) and obj == TORCH_LEGACY_MAGIC:
            raise UserError(f'{path}: this is a legacy torch.save checkpoint, not the authors\' MegEngine pickle')
        raise UserError(f"{path}: the top level is a {type(obj).__name__}; expected a dict with 'state_dict_D' "
                        "and 'state_dict_C' as written by the authors' train.py")
    missing = [name for name in SECTIONS if name not in obj]
    if missing:
        if 'params' in obj or 'params_ema' in obj:
            hint = ' (it looks like a BasicSR checkpoint, which needs no conversion)'
        elif 'head.0.weight' in obj:
            hint = ' (it looks like a bare D_Net state dict; the convergence net (state_dict_C) is needed too)'
        else:
            hint = ''
        raise UserError(f'{path}: missing {", ".join(repr(m) for m in missing)} at the top level; found '
                        f'{short_list(repr(k) for k in obj)}{hint}')
    sections = []
    for name in SECTIONS:
        section = obj[name]
        if not isinstance(section, Mapping):
            raise UserError(f'{path}: {name} is a {type(section).__name__}, expected a dict of numpy arrays')
        arrays = OrderedDict()
        for key, value in section.items():
            if not isinstance(key, str):
                raise UserError(f'{path}: {name} has a non-string key {key!r}')
            if not isinstance(value, np.ndarray) or value.dtype.kind != 'f':
                kind = f'an array of {value.dtype}' if isinstance(value, np.ndarray) else f'a {type(value).__name__}'
                raise UserError(f'{path}: {name}[{key!r}] is {kind}, expected a float numpy array')
            arrays[key] = value
        sections.append(arrays)
    ignored = [str(k) for k in obj if k not in SECTIONS]
    return sections[0], sections[1], ignored


# ----------------------------------------------------------------------------------------------
# The key table
# ----------------------------------------------------------------------------------------------
_NODE = r'tree\.(?P<level>\d+)\.(?P<node>\d+)\.(?P<g>\d+)'
_D2C_TO_OFFICIAL = (
    (r'head\.(?P<p>weight|bias)', lambda m, nb: ('D', f'head.0.{m["p"]}')),
    (_NODE + r'\.residual_group\.(?P<b>\d+)\.rcab\.(?P<k>[02])\.(?P<p>weight|bias)', lambda m, nb:
     ('D', f'body{_node_name(m)}.{m["g"]}.body.{m["b"]}.body.{m["k"]}.{m["p"]}')),
    # BasicSR's ChannelAttention is Sequential(pool, conv, ReLU, conv, Sigmoid): convs at 1, 3;
    # the authors' CALayer.conv_du is Sequential(conv, ReLU, conv, Sigmoid): convs at 0, 2
    (_NODE + r'\.residual_group\.(?P<b>\d+)\.rcab\.3\.attention\.(?P<k>[13])\.(?P<p>weight|bias)', lambda m, nb:
     ('D', f'body{_node_name(m)}.{m["g"]}.body.{m["b"]}.body.3.conv_du.{int(m["k"]) - 1}.{m["p"]}')),
    # the conv closing a residual group sits after the B RCABs in the authors' ResidualGroup.body
    (_NODE + r'\.conv\.(?P<p>weight|bias)', lambda m, nb: ('D', f'body{_node_name(m)}.{m["g"]}.body.{nb}.{m["p"]}')),
    # the conv closing a node: index G in both Sequentials
    (_NODE + r'\.(?P<p>weight|bias)', lambda m, nb: ('D', f'body{_node_name(m)}.{m["g"]}.{m["p"]}')),
    # leaf i: k=0 (then + parent) is res_conv(2i+1), k=1 (then + shallow features) res_conv(2i+2)
    (r'res_convs\.(?P<leaf>\d+)\.(?P<k>[01])\.(?P<p>weight|bias)', lambda m, nb:
     ('D', f'res_conv{2 * _leaf(m) + int(m["k"]) + 1}.{m["p"]}')),
    (r'tails\.(?P<leaf>\d+)\.0\.(?P<k>\d+)\.(?P<p>weight|bias)', lambda m, nb:
     ('D', f'tail{LEAF_NAMES[_leaf(m)]}.0.{m["k"]}.{m["p"]}')),
    (r'tails\.(?P<leaf>\d+)\.1\.(?P<p>weight|bias)', lambda m, nb: ('D', f'tail{LEAF_NAMES[_leaf(m)]}.1.{m["p"]}')),
    # D2CNet.convergence is Sequential(conv, ReLU, conv, ReLU, conv, ReLU); the authors wrap each
    # conv with its ReLU in a BasicConv
    (r'convergence\.(?P<i>[024])\.weight', lambda m, nb: ('C', f'fusion_final.{int(m["i"]) // 2}.conv.weight')),
)


def _node_name(match):
    level, node = int(match['level']), int(match['node'])
    if level >= len(NODE_NAMES) or node >= len(NODE_NAMES[level]):
        raise UserError(f'tree.{level}.{node} does not exist in the authors\' tree (depth 2, width 2)')
    return NODE_NAMES[level][node]


def _leaf(match):
    leaf = int(match['leaf'])
    if leaf >= len(LEAF_NAMES):
        raise UserError(f'leaf {leaf} does not exist in the authors\' tree (4 leaves)')
    return leaf


def official_key(d2c_key, num_block):
    """Where a D2CNet state-dict key lives in the authors' checkpoint.

    Args:
        d2c_key (str): A key of ``D2CNet(tree_depth=2, tree_width=2, ...).state_dict()``.
        num_block (int): B, RCABs per residual group (the index of the group's closing conv).

    Returns:
        tuple[str, str]: (``'state_dict_D'`` or ``'state_dict_C'``, the authors' key).

    Raises:
        UserError: the key has no counterpart (e.g. a deeper or wider tree).
    """
    for pattern, target in _D2C_TO_OFFICIAL:
        match = re.fullmatch(pattern, d2c_key)
        if match:
            section, key = target(match, num_block)
            return ('state_dict_D' if section == 'D' else 'state_dict_C'), key
    raise UserError(f'D2CNet key {d2c_key!r} has no counterpart in the authors\' D_Net/C_Net '
                    '(they have tree_depth=2, tree_width=2 and RCAN branches)')


def _swap_rb(state_dict, num_branch):
    """Reverse the colour channels where D2CNet meets images (an involution: RGB <-> BGR).

    The head conv's input channels, each tail's output conv and the convergence net's input
    (P groups of 3 channels, one per branch). Returns a new dict; other entries are shared.
    """
    out = OrderedDict(state_dict)
    out['head.weight'] = out['head.weight'][:, ::-1]
    for leaf in range(num_branch):
        for param in ('weight', 'bias'):
            key = f'tails.{leaf}.1.{param}'
            out[key] = out[key][::-1]
    perm = [3 * branch + (2 - c) for branch in range(num_branch) for c in range(3)]
    out['convergence.0.weight'] = out['convergence.0.weight'][:, perm]
    return out


def _d2c_default_rgb_mean():
    return tuple(float(v) for v in default_options()['rgb_mean'])


# ----------------------------------------------------------------------------------------------
# Layout and mean shift
# ----------------------------------------------------------------------------------------------
def _require(sd, key, section='state_dict_D'):
    if key not in sd:
        raise UserError(f'{section} has no {key!r}, which every checkpoint of the authors\' D_Net has')
    return sd[key]


def infer_layout(sd_d, sd_c):
    """Read F, G, B, the reduction, the scale and the fusion width from the shapes.

    Returns:
        dict: num_feat, num_group, num_block, reduction, upscale, num_fusion_feat.
    """
    head = _require(sd_d, 'head.0.weight')
    if head.ndim != 4 or head.shape[1] != 3:
        raise UserError(f"head.0.weight has shape {tuple(head.shape)}; expected (F, 3, 3, 3)")
    num_feat = int(head.shape[0])
    groups = [int(m[1]) for m in (re.fullmatch(r'body1\.(\d+)\.weight', k) for k in sd_d) if m]
    if len(groups) != 1:
        raise UserError('cannot find the conv closing node body1 (body1.<G>.weight) in state_dict_D')
    blocks = [int(m[1]) for m in (re.fullmatch(r'body1\.0\.body\.(\d+)\.weight', k) for k in sd_d) if m]
    if len(blocks) != 1:
        raise UserError('cannot find the conv closing residual group body1.0 (body1.0.body.<B>.weight) '
                        'in state_dict_D')
    squeeze = _require(sd_d, 'body1.0.body.0.body.3.conv_du.0.weight')
    if squeeze.ndim != 4 or squeeze.shape[0] < 1 or num_feat % squeeze.shape[0]:
        raise UserError(f'body1.0.body.0.body.3.conv_du.0.weight has shape {tuple(squeeze.shape)}; '
                        f'expected (F / reduction, F, 1, 1) with F={num_feat}')
    upscale = _infer_scale(sd_d, num_feat)
    fusion = _require(sd_c, 'fusion_final.0.conv.weight', 'state_dict_C')
    return dict(
        num_feat=num_feat,
        num_group=groups[0],
        num_block=blocks[0],
        reduction=num_feat // int(squeeze.shape[0]),
        upscale=upscale,
        num_fusion_feat=int(fusion.shape[0]))


def _infer_scale(sd_d, num_feat):
    """The scale from the upsampler of tail11 (see :func:`d2c_arch.upsampler_scale`); convs at 0, 2, 4."""
    convs = {}
    for key, value in sd_d.items():
        match = re.fullmatch(r'tail11\.0\.(\d+)\.weight', key)
        if match:
            convs[int(match[1])] = int(value.shape[0])
    indices, outs = sorted(convs), [convs[i] for i in sorted(convs)]
    scale = upsampler_scale(outs, num_feat) if indices == list(range(0, 2 * len(indices), 2)) else None
    if scale is None:
        raise UserError(f'cannot tell the scale from the upsampler of tail11: convs at tail11.0.{indices} with '
                        f'{outs} output channels; expected one conv with {4 * num_feat} (x2) or {9 * num_feat} (x3), '
                        f'or two (x4) / three (x8) with {4 * num_feat}')
    return scale


def _mean_shift(sd_d):
    """The authors' sub_mean / add_mean as 3x3 matrices and biases (float64)."""
    found = {}
    for key in MEAN_SHIFT_KEYS:
        value = _require(sd_d, key)
        expected = (3, 3, 1, 1) if key.endswith('weight') else (1, 3, 1, 1)
        if value.size != int(np.prod(expected)) or (key.endswith('weight') and value.shape != expected):
            raise UserError(f'{key} has shape {tuple(value.shape)}; expected {expected} (a 1x1 conv on RGB)')
        found[key] = np.asarray(value, dtype=np.float64)
    return (found['sub_mean.weight'][:, :, 0, 0], found['sub_mean.bias'].reshape(3),
            found['add_mean.weight'][:, :, 0, 0], found['add_mean.bias'].reshape(3))


def check_mean_shift(sd_d, rgb_mean):
    """Check that sub_mean / add_mean are the authors' MeanShift(rgb_range=1) with ``rgb_mean``.

    Returns:
        str | None: None if they are; otherwise why not (one line naming the key).
    """
    sub_w, sub_b, add_w, add_b = _mean_shift(sd_d)
    mean = np.asarray(rgb_mean, dtype=np.float64)
    for key, value, expected in (('sub_mean.weight', sub_w, np.eye(3)), ('sub_mean.bias', sub_b, -mean),
                                 ('add_mean.weight', add_w, np.eye(3)), ('add_mean.bias', add_b, mean)):
        deviation = float(np.abs(value - expected).max())
        if not deviation <= MEAN_ATOL:  # also catches NaN
            return (f'{key} = {np.round(value, 5).tolist()} is not the authors\' fixed mean shift '
                    f'({np.round(expected, 5).tolist()}, max deviation {deviation:.3g})')
    return None


def fold_mean_shift(sd_d):
    """Fold general (e.g. trained) sub_mean / add_mean 1x1 convs into the head and the tails.

    With ``sub_mean(x) = A x + b`` and ``m = -A^-1 b``: ``head(sub_mean(x)) = head'(x - m)`` with
    ``head' = head . A``, exact even at the zero-padded border because ``A 0 = 0``. With
    ``add_mean(y) = A2 y + b2`` after each tail's output conv ``T``: ``add_mean(T h + t) =
    (A2 T) h + (A2 t + b2 - m) + m``, which is D2CNet's ``tail'(h) + m``.

    Args:
        sd_d (dict): The authors' D_Net state dict (numpy arrays); not modified.

    Returns:
        tuple[dict, tuple[float]]: the state dict with head and tails folded (no mean-shift keys)
        and ``m``, the mean D2CNet must subtract (in the file's channel order).
    """
    sub_w, sub_b, add_w, add_b = _mean_shift(sd_d)
    if not np.all(np.isfinite(sub_w)) or np.linalg.cond(sub_w) > 1e6:
        raise UserError(f'sub_mean.weight = {np.round(sub_w, 5).tolist()} is not invertible, so it cannot be '
                        'folded into a mean shift')
    mean = -np.linalg.solve(sub_w, sub_b)
    out = OrderedDict((k, v) for k, v in sd_d.items() if k not in MEAN_SHIFT_KEYS)
    head = np.asarray(sd_d['head.0.weight'], dtype=np.float64)
    out['head.0.weight'] = np.einsum('oikl,ij->ojkl', head, sub_w).astype(np.float32)
    for leaf in LEAF_NAMES:
        weight_key, bias_key = f'tail{leaf}.1.weight', f'tail{leaf}.1.bias'
        weight = np.asarray(_require(sd_d, weight_key), dtype=np.float64)
        bias = np.asarray(_require(sd_d, bias_key), dtype=np.float64)
        if weight.shape[0] != 3 or bias.size != 3:
            raise UserError(f'{weight_key} / {bias_key} have shapes {tuple(weight.shape)} / {tuple(bias.shape)}; '
                            'expected 3 output channels')
        out[weight_key] = np.einsum('ij,jokl->iokl', add_w, weight).astype(np.float32)
        out[bias_key] = (add_w @ bias.reshape(3) + add_b - mean).astype(np.float32).reshape(bias.shape)
    return out, tuple(float(np.float32(v)) for v in mean)


# ----------------------------------------------------------------------------------------------
# Conversion both ways
# ----------------------------------------------------------------------------------------------
def official_network_options(layout, rgb_mean):
    """The ``network_g`` options of the converted weights (an OrderedDict, YAML order)."""
    return OrderedDict([
        ('type', 'D2CNet'),
        ('num_in_ch', 3),
        ('num_out_ch', 3),
        ('num_feat', layout['num_feat']),
        ('tree_depth', 2),
        ('tree_width', 2),
        ('num_group', layout['num_group']),
        ('num_block', layout['num_block']),
        ('reduction', layout['reduction']),
        ('upscale', layout['upscale']),
        ('img_range', 1.),
        ('rgb_mean', [float(v) for v in rgb_mean]),
        ('num_fusion_feat', layout['num_fusion_feat']),
        ('fusion_logit_relu', True),  # the authors' last BasicConv has relu=True
    ])


def convert_state_dicts(sd_d, sd_c, channel_order='rgb', fold=True, scale=None):
    """The authors' two state dicts -> a D2CNet state dict and its ``network_g`` options.

    Args:
        sd_d, sd_c (dict[str, ndarray]): ``state_dict_D`` / ``state_dict_C`` of the authors'
            checkpoint. Biases may be (1, C, 1, 1) (MegEngine) or (C,).
        channel_order (str): 'rgb' (default; for BasicSR, which feeds RGB) or 'bgr' (the
            authors' order, as they read images with cv2).
        fold (bool): Fold mean-shift layers that are not the fixed DIV2K shift (the release's are
            trained) into head and tails; False refuses them (``--strict-mean-shift``). Default: True.
        scale (int | None): If given, the scale the file must have.

    Returns:
        tuple[OrderedDict, OrderedDict, dict]: ``{D2CNet key: float32 torch.Tensor}``, the
        ``network_g`` options (with the ``rgb_mean`` these weights need) and notes for the user
        (``layout``, ``mean``: 'constant' | 'folded').

    Raises:
        UserError: keys left over on either side, shape mismatches, a mean shift that is
        not the fixed DIV2K shift (with ``fold=False``) or cannot be folded, a wrong scale.
    """
    import torch
    if channel_order not in CHANNEL_ORDERS:
        raise UserError(f'channel order {channel_order!r} is not one of {CHANNEL_ORDERS}')
    layout = infer_layout(sd_d, sd_c)
    if scale is not None and scale != layout['upscale']:
        raise UserError(f'the checkpoint is x{layout["upscale"]} (read from its tail shapes), not x{scale} '
                        'as --scale says')
    default_mean = _d2c_default_rgb_mean()
    problem = check_mean_shift(sd_d, default_mean)
    if problem is None:
        file_mean, mean_note = default_mean, 'constant'
        sd_d = OrderedDict((k, v) for k, v in sd_d.items() if k not in MEAN_SHIFT_KEYS)
    elif fold:
        sd_d, file_mean = fold_mean_shift(sd_d)
        mean_note = 'folded'
    else:
        raise UserError(f'{problem}; D2CNet only subtracts rgb_mean={list(default_mean)}. The release trains these '
                        'layers (its MeanShift never sets them), so real checkpoints have such values: rerun '
                        'without --strict-mean-shift to fold them exactly into the head and output convs')
    rgb_mean = tuple(reversed(file_mean)) if channel_order == 'rgb' else tuple(file_mean)
    net_opt = official_network_options(layout, rgb_mean)
    targets = target_shapes(net_opt)
    sources = {'state_dict_D': sd_d, 'state_dict_C': sd_c}

    # the table maps D2CNet's keys to the authors' (one way for both directions), so the walk is over D2CNet's
    converted, origins = OrderedDict(), {}
    for key, shape in targets.items():
        origins[key] = official_key(key, layout['num_block'])
        section, src_key = origins[key]
        if src_key in sources[section]:
            value = sources[section][src_key]
            if len(shape) == 1 and value.shape in ((1, shape[0], 1, 1), (shape[0], )):
                value = value.reshape(shape)  # MegEngine bias (1, C, 1, 1) -> (C,)
            converted[key] = value
    used = {origins[k] for k in converted}
    leftover = [(section, k) for section, sd in sources.items() for k in sd if (section, k) not in used]
    check_mapping(
        converted,
        targets,
        origins,
        'D2CNet',
        _layout_text(layout),
        leftover=leftover,
        describe_missing=lambda k: f'{origins[k][0]}[{origins[k][1]}] (for {k})',
        sections=True)

    if channel_order == 'rgb':
        converted = _swap_rb(converted, num_branch=4)
    state_dict = OrderedDict(
        (k, torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))) for k, v in converted.items())
    return state_dict, net_opt, dict(layout=layout, mean=mean_note)


def export_official(state_dict, rgb_mean=None, channel_order='rgb'):
    """The inverse of the conversion: a D2CNet state dict -> the authors' two state dicts.

    Args:
        state_dict (dict): ``D2CNet(tree_depth=2, tree_width=2, branch_type='RCANBranch').state_dict()``
            (torch tensors or numpy arrays).
        rgb_mean (sequence[float] | None): The network's ``rgb_mean`` (in its channel order);
            written into ``sub_mean`` / ``add_mean``. None: the mean the converter gives for
            ``channel_order`` (D2CNet's default, reversed for 'rgb').
        channel_order (str): The network's channel order: 'rgb' (it is turned into the authors'
            BGR) or 'bgr' (kept).

    Returns:
        tuple[OrderedDict, OrderedDict]: ``state_dict_D`` and ``state_dict_C`` as the authors'
        code writes them: float32 numpy arrays, conv biases (1, C, 1, 1), mean-shift layers included.
    """
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f'channel_order {channel_order!r} is not one of {CHANNEL_ORDERS}')
    arrays = OrderedDict(
        (k, v.detach().cpu().numpy() if hasattr(v, 'detach') else np.asarray(v)) for k, v in state_dict.items())
    blocks = [
        int(m[1]) for m in (re.fullmatch(r'tree\.0\.0\.0\.residual_group\.(\d+)\.rcab\.0\.weight', k) for k in arrays)
        if m
    ]
    if not blocks:
        raise ValueError('state_dict has no tree.0.0.0.residual_group.*: not a D2CNet with RCAN branches')
    num_block = max(blocks) + 1
    if channel_order == 'rgb':
        arrays = _swap_rb(arrays, num_branch=4)
    if rgb_mean is None:
        file_mean = _d2c_default_rgb_mean()
    else:
        file_mean = tuple(reversed(rgb_mean)) if channel_order == 'rgb' else tuple(rgb_mean)
    file_mean = np.asarray(file_mean, dtype=np.float32)

    sd_d, sd_c = OrderedDict(), OrderedDict()
    eye = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    sd_d['sub_mean.weight'], sd_d['sub_mean.bias'] = eye.copy(), (-file_mean).reshape(1, 3, 1, 1)
    sd_d['add_mean.weight'], sd_d['add_mean.bias'] = eye.copy(), file_mean.reshape(1, 3, 1, 1).copy()
    for key, value in arrays.items():
        section, official = official_key(key, num_block)
        value = np.ascontiguousarray(value, dtype=np.float32)
        if key.endswith('.bias'):
            value = value.reshape(1, -1, 1, 1)  # MegEngine keeps conv biases as (1, C, 1, 1)
        (sd_d if section == 'state_dict_D' else sd_c)[official] = value
    return sd_d, sd_c


def _layout_text(layout):
    return (f'x{layout["upscale"]}, num_feat {layout["num_feat"]}, num_group {layout["num_group"]}, '
            f'num_block {layout["num_block"]}, reduction {layout["reduction"]}, '
            f'fusion width {layout["num_fusion_feat"]}')


# ----------------------------------------------------------------------------------------------
# Files and the command line
# ----------------------------------------------------------------------------------------------
def _test_options_from_template(template, net_opt, weights_path, channel_order):
    """A template test option file with network_g, the weights and the name replaced."""
    if not os.path.isfile(template):
        raise UserError(f'{template}: no such option file (pass e.g. options/test_D2C_RealSR_x4.yml)')
    opt = read_option_file(template, flag='--template', check=False)  # key order kept: dicts keep insertion order
    if not isinstance(opt, Mapping) or 'network_g' not in opt:
        raise UserError(f'{template}: not a BasicSR option file (no network_g)')
    if opt.get('scale') != net_opt['upscale']:
        raise UserError(f'{template} has scale {opt.get("scale")!r} but the checkpoint is x{net_opt["upscale"]}; '
                        f'use the x{net_opt["upscale"]} template')
    opt['name'] = f'{opt.get("name", "D2C")}_official'
    opt['network_g'] = OrderedDict(net_opt)
    opt.setdefault('path', OrderedDict())
    opt['path']['pretrain_network_g'] = weights_path
    opt['path']['param_key_g'] = 'params'
    opt['path']['strict_load_g'] = True
    header = (f'# Made by {PROG} from {template}: the authors\' released weights, converted\n'
              f'# ({channel_order.upper()} channel order; network_g.rgb_mean must stay as written here).\n')
    return header + dump_option_yaml(opt)


def convert_checkpoint_file(checkpoint,
                            output,
                            opt_out=None,
                            template=None,
                            channel_order='rgb',
                            fold=True,
                            scale=None,
                            force=False):
    """Convert the authors' checkpoint file into a BasicSR checkpoint (what ``d2c-convert-official`` does).

    Args:
        checkpoint (str): The authors' ``.pkl``.
        output (str): The ``.pth`` to write (atomically; nothing is written if anything fails).
        opt_out (str | None): Also write the ``network_g`` options (or, with ``template``, a whole
            test option file) here.
        template (str | None): Test option file to copy for ``opt_out``.
        channel_order, fold, scale: See :func:`convert_state_dicts`.
        force (bool): Overwrite existing output files.

    Returns:
        list[str]: lines to print for the user.
    """
    if template and not opt_out:
        raise UserError('--template needs --opt-out (where to write the test option file)')
    check_outputs({'OUTPUT': output, '--opt-out': opt_out}, {'CHECKPOINT': checkpoint, '--template': template}, force)

    sd_d, sd_c, ignored = load_official(checkpoint)
    try:
        state_dict, net_opt, notes = convert_state_dicts(sd_d, sd_c, channel_order, fold, scale)
    except UserError as err:
        raise UserError(f'{checkpoint}: {err}') from None

    num_params = sum(p.numel() for p in load_strictly(net_opt, state_dict).parameters())

    lines = [f'read {checkpoint}: state_dict_D ({len(sd_d)} arrays), state_dict_C ({len(sd_c)} arrays)']
    if ignored:
        lines.append(f'ignored top-level entries (not needed for inference): {", ".join(repr(k) for k in ignored)}')
    layout = notes['layout']
    paper = (layout['num_feat'], layout['num_group'], layout['num_block'], layout['reduction']) == (64, 2, 4, 16)
    setting = "the paper's setting" if paper else "not the paper's F=64, G=2, B=4, reduction 16"
    lines.append(f'layout: {_layout_text(layout)} ({setting})')
    if notes['mean'] == 'constant':
        lines.append('mean shift: the authors\' constant DIV2K mean, rgb_range 1 (checked, not copied)')
    else:
        lines.append('mean shift: sub_mean/add_mean are trained 1x1 convs (as in every checkpoint of the release), not '
                     'the fixed DIV2K shift; folded exactly into the head and output convs')
    if channel_order == 'rgb':
        lines.append('channels: the authors\' network works on BGR (cv2.imread); reversed to RGB for BasicSR '
                     '(head input, output convs, convergence input, rgb_mean)')

    # everything that can fail is done before the first file is written
    opt_text = None
    if opt_out:
        if template:
            opt_text = _test_options_from_template(template, net_opt, output, channel_order)
        else:
            opt_text = f'# network_g for {os.path.basename(output)} (made by {PROG})\n' + options_snippet(net_opt)

    converted_from = dict(source_record(checkpoint), channel_order=channel_order, mean_shift=notes['mean'], tool=PROG)
    # no top-level network_g: rgb_mean is not in the weights, and the option file stays the one place for it
    lines += write_converted(
        output, state_dict, net_opt, converted_from, num_params, opt_out, opt_text, carry_options=False)
    if opt_out:
        lines.append(f'wrote {opt_out}' + (' (a complete test option file)' if template else ''))
    return lines + options_lines(net_opt, ' (note rgb_mean)')
