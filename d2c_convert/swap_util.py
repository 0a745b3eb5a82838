"""d2c-swap's library: a BasicSR training option file -> its D2C counterpart (paper Sec. 4.3).

The network becomes D2CNet with the original's basic module as branch type (each branch class
knows its original: ``original``, ``counterpart`` in d2c_arch/branch_util.py), sized to a
parameter budget; the model becomes D2CModel (or D2CRealESRNetModel for Real-ESRNet files);
the training gets D2C's two phases and divergence loss. Every other key, and every comment,
stays byte for byte as the user wrote it: the file is edited as text at the positions PyYAML's
composer reports, and the result is checked by loading both files the way BasicSR does. (A
round-tripping YAML library re-prints untouched values: ruamel.yaml turns ``!!float 1e-4``
into ``1e-4``, which BasicSR's PyYAML then reads as a string, and ``~`` into an empty value.)

Sizing rule (``size_counterpart``): every root-to-leaf path of the tree keeps the original's
depth (``ceil(depth / tree_depth)`` blocks per node) and the widest feature count that fits
the budget, down to half the original's; if none fits, fewer blocks per node; if even one
block per node at half width is too large, narrower widths again from the full depth; for
budgets below the paper's 46k-parameter convergence network, a narrower one (32, then 16).
"""
import copy
import difflib
import inspect
import math
import re
from dataclasses import dataclass, field

import torch
import yaml

from basicsr.utils.registry import ARCH_REGISTRY
from d2c_arch import BRANCH_REGISTRY, D2CNet, default_options
from d2c_arch.arch_util import accepted_options
from d2c_arch.d2cnet_arch import SUPPORTED_SCALES
from d2c_arch.upsample_util import build_tail
from d2c_utils.errors import UserError
from d2c_utils.option_check import load_option_text

# model types whose training d2c-swap knows how to keep, and what they become
MODEL_SWAPS = {'SRModel': 'D2CModel', 'SwinIRModel': 'D2CModel', 'RealESRNetModel': 'D2CRealESRNetModel'}
REFUSED_MODELS = {
    'SRGANModel': 'a GAN model',
    'ESRGANModel': 'a GAN model',
    'RealESRGANModel': 'a GAN model',
    'EDVRModel': 'a video model',
    'VideoBaseModel': 'a video model',
    'VideoGANModel': 'a video model',
    'VideoRecurrentModel': 'a video model',
    'VideoRecurrentGANModel': 'a video model',
    'HiFaceGANModel': 'a face model',
    'StyleGAN2Model': 'a face model',
    'D2CModel': 'already D2C',
    'D2CRealESRNetModel': 'already D2C'
}
DEFAULT_CONVERGENCE_FRACTION = 0.1  # as options/train_D2C_RealSR_x4.yml: 90% divergence, 10% convergence
NAME_PREFIX = 'D2C_'
FUSION_WIDTHS = (64, 32, 16)  # hidden channels of the convergence network, tried in this order


def originals():
    """``{original arch name: branch type}`` for every branch class that names its original."""
    found = {}
    for name in BRANCH_REGISTRY.keys():
        original = BRANCH_REGISTRY.get(name).original
        if original:
            found[original] = name
    return found


def parse_budget(text):
    """``--budget``: None (the original's count), 'same', or a count like 1370000, 1.37M, 500k."""
    if text is None or text == 'original':
        return None
    if text == 'same':
        return 'same'
    match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*', str(text))
    if not match:
        raise UserError(f'--budget {text!r}: give a parameter count (1370000, 1.37M, 500k), "original" or "same".')
    value = float(match.group(1)) * {'': 1, 'k': 1e3, 'm': 1e6}[match.group(2).lower()]
    return int(round(value))


def count_parameters(arch_type, kwargs):
    """Parameters of ``ARCH_REGISTRY[arch_type](**kwargs)``, built on the meta device when it can be."""
    cls = ARCH_REGISTRY.get(arch_type)
    try:
        with torch.device('meta'):
            net = cls(**copy.deepcopy(kwargs))
    except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values (SwinIR's .item())
        net = cls(**copy.deepcopy(kwargs))
    return sum(p.numel() for p in net.parameters())


def count_d2c_parameters(opt):
    """Parameters of ``D2CNet(**opt)`` from one node and one tail (the sizing search builds hundreds).

    Equal to ``sum(p.numel() for p in D2CNet(**opt).parameters())`` (a test checks it).
    """
    full = dict(default_options(), **opt)
    branch_cls = BRANCH_REGISTRY.get(full['branch_type'])
    kwargs = D2CNet._branch_kwargs(branch_cls, accepted_options(branch_cls), full['branch_opt'], full['num_feat'],
                                   full['num_group'], full['num_block'], full['reduction'])
    with torch.device('meta'):
        node = branch_cls(**kwargs)
        tail = build_tail(full['upsampler'], full['upscale'], full['num_feat'], full['num_out_ch'])
    depth, width, feat, fusion = full['tree_depth'], full['tree_width'], full['num_feat'], full['num_fusion_feat']
    leaves = width**depth
    nodes = sum(width**level for level in range(1, depth + 1))
    numel = (lambda module: sum(p.numel() for p in module.parameters()))  # noqa: E731
    head = full['num_in_ch'] * feat * 9 + feat
    res_convs = leaves * depth * (feat * feat * 9 + feat)
    convergence = 9 * fusion * (full['num_out_ch'] * leaves + fusion + leaves)  # three bias-free 3x3 convs
    return head + nodes * numel(node) + res_convs + leaves * numel(tail) + convergence


def full_options(arch_type, net_opt):
    """``net_opt`` (without ``type``) completed with the arch's constructor defaults."""
    params = inspect.signature(ARCH_REGISTRY.get(arch_type).__init__).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    full.update({k: v for k, v in net_opt.items() if k != 'type'})
    return full


def _widths(num_feat, unit, floor):
    """Feature counts from ``num_feat`` down to ``floor``, widest first: multiples of 8 (of ``unit`` if 8 is not)."""
    step = 8 if 8 % unit == 0 else unit
    widths = [num_feat] + [w for w in range(num_feat - num_feat % step, floor - 1, -step) if w % unit == 0]
    return sorted({w for w in widths if floor <= w <= num_feat and w >= unit}, reverse=True)


def _first_true(predicate, size):
    """The smallest index in ``range(size)`` where a monotone (False..., True...) ``predicate`` holds, or None."""
    low, high = 0, size
    while low < high:
        middle = (low + high) // 2
        if predicate(middle):
            high = middle
        else:
            low = middle + 1
    return low if low < size else None


def size_counterpart(base_opt, original_depth, depth_option, budget):
    """Choose ``num_feat`` and the depth option of the D2C counterpart.

    Args:
        base_opt (dict): D2CNet options (``tree_depth`` and ``tree_width`` set).
        original_depth (int): The original's depth in ``depth_option`` units (blocks, or RCAN's groups).
        depth_option (str): 'num_block' or 'num_group'.
        budget (int | 'same'): At most this many parameters; 'same' keeps the original's width and
            path depth whatever the count.

    Returns:
        tuple[dict, int]: the options and their parameter count.

    Raises:
        UserError: nothing down to half the width and one block per node fits the budget.
    """
    per_node = max(1, math.ceil(original_depth / base_opt['tree_depth']))
    unit = (base_opt.get('branch_opt') or {}).get('num_heads', 4 if base_opt['branch_type'] == 'IMDNBranch' else 1)

    def sized(width, depth):
        return dict(base_opt, num_feat=width, **{depth_option: depth})

    def count(width, depth):
        return count_d2c_parameters(sized(width, depth))

    if budget == 'same':
        opt = sized(base_opt['num_feat'], per_node)
        return opt, count(opt['num_feat'], per_node)
    num_feat = base_opt['num_feat']
    half = math.ceil(num_feat / 2)
    for fusion in FUSION_WIDTHS:  # the paper's 64 first; a narrower convergence network only for tiny budgets
        base_opt = dict(base_opt, num_fusion_feat=fusion)
        # first the widths down to half the original's, then (a small budget) narrower ones
        for widths in (_widths(num_feat, unit, half), _widths(half - 1, unit, max(8, unit))):
            if not widths:
                continue
            # the deepest path whose narrowest width fits, then the widest width that fits it: the count
            # grows with both, so two bisections (a few dozen counts, whatever the sizes) find them
            shallower = _first_true(lambda d: count(widths[-1], per_node - d) <= budget, per_node)
            if shallower is None:
                continue
            depth = per_node - shallower
            index = _first_true(lambda i: count(widths[i], depth) <= budget, len(widths))
            return sized(widths[index], depth), count(widths[index], depth)
    narrowest = max(8, unit)
    raise UserError(f'no D2C counterpart fits {budget:,} parameters: the smallest tried (num_feat={narrowest}, '
                    f'{depth_option}=1, tree {base_opt["tree_depth"]}x{base_opt["tree_width"]}) has '
                    f'{count(narrowest, 1):,}; pass a larger --budget, --budget same, or a smaller tree '
                    '(--tree-depth / --tree-width).')


@dataclass
class SwapResult:
    """What :func:`swap_options` made: the new file's text and what the user should be told."""
    text: str
    original_type: str
    original_params: int
    params: int
    network: dict
    notices: list = field(default_factory=list)


def load_options(text, source):
    """The option file's content as BasicSR reads it, and its node tree with positions (for editing the text).

    The content comes from the one option-file reader (:func:`d2c_utils.option_check.load_option_text`:
    its size and alias limits, no ``!!python`` tags); once that has parsed the text, composing it again
    for the positions cannot fail.
    """
    data = load_option_text(text, source)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise UserError(f'{source}: not a BasicSR option file (the top level is not a mapping).')
    return data, root


def _render(value):
    """A value as YAML text that PyYAML (BasicSR's reader) reads back as ``value``."""
    if value is None:
        return '~'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if 'e' in text and '.' not in text.split('e')[0]:  # PyYAML (YAML 1.1) needs a dot in the mantissa
            mantissa, exponent = text.split('e')
            text = f'{mantissa}.0e{exponent}'
        return text
    if isinstance(value, (list, tuple)):
        return '[' + ', '.join(_render(v) for v in value) + ']'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k}: {_render(v)}' for k, v in value.items()) + '}'
    text = str(value)
    if text.lower() in ('yes', 'no', 'on', 'off', 'true', 'false', 'null', '~'):
        return repr(text)
    return text if re.fullmatch(r'[A-Za-z_][A-Za-z0-9_.+\-]*', text) else repr(text)


def _lines(pairs, indent):
    """``key: value  # comment`` lines (``pairs``: key, value, comment), each ending in a newline."""
    out = []
    for key, value, comment in pairs:
        line = f'{" " * indent}{key}: {_render(value)}'
        if comment:
            line = f'{line:<{indent + 26}}  # {comment}'
        out.append(line + '\n')
    return ''.join(out)


def _child(node, key):
    """``(key_node, value_node)`` of ``key`` in a mapping node, or (None, None)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return key_node, value_node
    return None, None


def _line_end(text, index):
    end = text.find('\n', index)
    return len(text) if end < 0 else end


def _network_pairs(opt, original_type, original_params, params):
    notes = {
        'num_feat': 'F: feature channels (the original\'s, or narrower to fit the budget)',
        'tree_depth': 'L: depth of the divergence tree',
        'tree_width': f'C: children per node; P = C^L = {opt["tree_width"] ** opt["tree_depth"]} predictions',
        'num_group': 'residual groups per node (the original\'s groups / L)',
        'num_block': 'blocks per node (the original\'s / L, fewer if the budget needs it)',
        'reduction': 'channel-attention squeeze factor (RCAN\'s squeeze_factor)',
        'upscale': 'must equal scale',
        'img_range': f'as the original {original_type}',
        'rgb_mean': 'taken off before the head, added after each tail (zeros: the original has no mean)',
        'branch_type': f'{original_type}\'s basic module is every tree node (d2c_arch/branch_util.py)',
        'branch_opt': f'{original_type}\'s own options of that module',
        'upsampler': f'{original_type}\'s upsampler is every leaf\'s tail',
        'input_skip': f'{original_type}\'s image-level skip, added to every prediction',
        'num_fusion_feat': 'hidden channels of the convergence network',
        'fusion_logit_relu': 'ReLU before the softmax, as in the D2C-SR release',
    }
    order = ('num_in_ch', 'num_out_ch', 'num_feat', 'tree_depth', 'tree_width', 'num_group', 'num_block', 'reduction',
             'upscale', 'img_range', 'rgb_mean', 'branch_type', 'branch_opt', 'upsampler', 'input_skip',
             'num_fusion_feat', 'fusion_logit_relu')
    pairs = [('type', 'D2CNet', f'was {original_type} ({original_params:,} parameters), now {params:,}; d2c-swap')]
    return pairs + [(key, opt[key], notes.get(key)) for key in order if opt.get(key) is not None]


def swap_options(text,
                 source,
                 budget=None,
                 tree_depth=2,
                 tree_width=2,
                 convergence_fraction=None,
                 convergence_iters=None):
    """Turn a BasicSR training option file's text into its D2C counterpart's text.

    Args:
        text (str): The option file's content.
        source (str): Its path, for messages.
        budget (None | int | 'same'): Parameter budget (None: the original's count).
        tree_depth (int): L. tree_width (int): C.
        convergence_fraction (float | None): Share of ``train.total_iter`` for the convergence
            phase (default 0.1); ``convergence_iters`` gives it in iterations instead.

    Returns:
        SwapResult.

    Raises:
        UserError: the file cannot be swapped (its model or network type, a missing key); the
            message names the key and what to do.
    """
    doc, root = load_options(text, source)
    model_type = doc.get('model_type')
    if model_type in REFUSED_MODELS:
        what = REFUSED_MODELS[model_type]
        fix = ('nothing to do' if what == 'already D2C' else
               'swap the PSNR-oriented pre-training file instead (e.g. train_RRDBNet_PSNR_x4.yml for ESRGAN, '
               'train_realesrnet_x4plus.yml for Real-ESRGAN); d2c-swap handles SRModel, SwinIRModel and '
               'RealESRNetModel')
        raise UserError(f'{source}: model_type {model_type} is {what}; {fix}.')
    if model_type not in MODEL_SWAPS:
        raise UserError(f'{source}: model_type {model_type!r} is not one d2c-swap knows; it handles '
                        f'{", ".join(MODEL_SWAPS)} (single-image SR trained with pixel losses).')
    if doc.get('network_d') is not None:
        raise UserError(f'{source}: has network_d (a GAN discriminator); d2c-swap handles pixel-loss training only.')
    net_opt = doc.get('network_g')
    if not isinstance(net_opt, dict) or 'type' not in net_opt:
        raise UserError(f'{source}: no network_g.type; this does not look like a BasicSR training option file.')
    original_type = net_opt['type']
    known = originals()
    if original_type not in known:
        raise UserError(f'{source}: network_g.type {original_type!r} has no D2C branch type; d2c-swap knows '
                        f'{", ".join(sorted(known))}.')
    train_opt = doc.get('train')
    if not isinstance(train_opt, dict) or 'total_iter' not in train_opt:
        raise UserError(f'{source}: no train.total_iter; d2c-swap splits it into the two D2C phases.')
    if not train_opt.get('pixel_opt'):
        raise UserError(f'{source}: no train.pixel_opt; D2C keeps it as the loss of the fused image.')

    try:
        full = full_options(original_type, net_opt)
        original_params = count_parameters(original_type, full)
    except (TypeError, ValueError, AssertionError) as err:
        raise UserError(f'{source}: network_g does not build as {original_type}: {err}') from None
    branch_type = known[original_type]
    branch_cls = BRANCH_REGISTRY.get(branch_type)
    try:
        base, original_depth = branch_cls.counterpart(full)
    except ValueError as err:
        raise UserError(f'{source}: {err}') from None
    scale = full.get('upscale', full.get('scale', doc.get('scale')))
    if scale not in SUPPORTED_SCALES:
        raise UserError(f'{source}: scale {scale!r}; D2CNet supports {SUPPORTED_SCALES}.')
    num_ch = full.get('num_in_ch', base.get('num_in_ch', 3))
    base = dict(base, branch_type=branch_type, tree_depth=tree_depth, tree_width=tree_width, upscale=scale)
    base.setdefault('num_in_ch', num_ch)
    base.setdefault('num_out_ch', full.get('num_out_ch', num_ch))
    base.update(num_fusion_feat=64, fusion_logit_relu=True)
    d2c_opt, params = size_counterpart(base, original_depth, branch_cls.depth_option,
                                       original_params if budget is None else budget)

    total = int(train_opt['total_iter'])
    if convergence_iters is None:
        fraction = DEFAULT_CONVERGENCE_FRACTION if convergence_fraction is None else convergence_fraction
        convergence_iters = max(1, int(round(total * fraction)))
    if not 0 < convergence_iters < total:
        raise UserError(f'a convergence phase of {convergence_iters} iterations does not fit train.total_iter='
                        f'{total}; it must be between 1 and total_iter - 1.')

    edits, notices = [], []  # (start, end, replacement) in character offsets of ``text``

    def replace_value(parent, key, value):
        _, node = _child(parent, key)
        edits.append((node.start_mark.index, node.end_mark.index, _render(value)))

    name = str(doc.get('name', 'experiment'))
    if not name.startswith(NAME_PREFIX):
        replace_value(root, 'name', NAME_PREFIX + name)
    replace_value(root, 'model_type', MODEL_SWAPS[model_type])
    _, path_node = _child(root, 'path')
    for key, why in (('pretrain_network_g', f'weights of {original_type}, which do not load into D2CNet'),
                     ('resume_state', f'a training state of the {original_type} run, which cannot resume D2C')):
        if (doc.get('path') or {}).get(key):
            notices.append(f'path.{key} cleared: {doc["path"][key]} holds {why}.')
            replace_value(path_node, key, None)

    # network_g: everything from after the key to the end of the line of its last value
    net_key, net_node = _child(root, 'network_g')
    indent = net_node.value[0][0].start_mark.column if net_node.flow_style is False else net_key.start_mark.column + 2
    block = _lines(_network_pairs(d2c_opt, original_type, original_params, params), indent)
    last_value = net_node.value[-1][1]
    edits.append((net_key.end_mark.index, _line_end(text, last_value.end_mark.index), ':\n' + block.rstrip('\n')))

    _, train_node = _child(root, 'train')
    total_key, total_node = _child(train_node, 'total_iter')
    tab = total_key.start_mark.column
    pad = ' ' * tab
    phases = (f'\n{pad}phases:  # D2C: train the branches, then freeze them and train the fusion; the lengths add '
              f'up to total_iter\n{pad}  - name: divergence\n{pad}    iters: {total - convergence_iters}'
              f'\n{pad}  - name: convergence\n{pad}    iters: {convergence_iters}')
    end = _line_end(text, total_node.end_mark.index)
    edits.append((end, end, phases))
    pixel_key, _ = _child(train_node, 'pixel_opt')
    line_start = pixel_key.start_mark.index - pixel_key.start_mark.column
    divergence = [
        ('type', 'DivergenceLoss', 'L_D = sum_i MSE(branch_i, HR) + alpha * triplet term (D2C-SR Eq. 1-7)'),
        ('alpha', 2e-5, 'weight of the triplet term (the D2C-SR release\'s)'),
        ('theta', 0.8, 'related branches diverge less (Eq. 6)'),
        ('margin', [5e-5] + [2e-5] * (tree_depth - 1), 'triplet margin per tree level, root first'),
        ('variant', 'paper', 'Y channel, per-image statistics'),
        ('loss_weight', 1.0, None),
    ]
    edits.append((line_start, line_start,
                  f'{" " * tab}divergence_opt:  # D2C: the divergence phase\'s loss on every branch; pixel_opt '
                  f'(kept) is the loss of the fused image\n' + _lines(divergence, tab + 2)))

    new_text = text
    for start, stop, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
        new_text = new_text[:start] + replacement + new_text[stop:]
    _check_swapped(doc, new_text, source, d2c_opt, MODEL_SWAPS[model_type])
    return SwapResult(new_text, original_type, original_params, params, d2c_opt, notices)


def _check_swapped(old, new_text, source, d2c_opt, new_model):
    """The edited text must read (as BasicSR reads it) as the old options with only D2C's changes."""
    new = load_option_text(new_text, source)
    expected = copy.deepcopy(old)
    expected['name'] = new.get('name')
    expected['model_type'] = new_model
    expected['network_g'] = dict(d2c_opt, type='D2CNet')
    for key in ('pretrain_network_g', 'resume_state'):
        if (expected.get('path') or {}).get(key):
            expected['path'][key] = None
    expected['train']['phases'] = new['train'].get('phases')
    expected['train']['divergence_opt'] = new['train'].get('divergence_opt')
    if new != expected or not str(new['name']).startswith(NAME_PREFIX):
        changed = sorted(k for k in set(new) | set(expected) if new.get(k) != expected.get(k))
        raise UserError(f'{source}: could not edit the file in place (the keys {changed} came out different); '
                        'please report this with the file.')


def unified_diff(old_text, new_text, old_name, new_name):
    """A readable diff of the two files' text."""
    return ''.join(
        difflib.unified_diff(
            old_text.splitlines(keepends=True), new_text.splitlines(keepends=True), old_name, new_name, n=1))


def build_check(result, source):
    """Build the swapped network once on the meta device, so a swapped file never fails at training start."""
    try:
        with torch.device('meta'):
            D2CNet(**result.network)
    except (TypeError, ValueError) as err:
        raise UserError(f'{source}: the D2C network does not build: {err}') from None
