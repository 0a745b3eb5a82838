"""Convert the released official SDFlow weights (github.com/sunwj/sdflow) into one BasicSR checkpoint for SDFlow.

The library behind ``d2c-convert-sdflow`` (:mod:`d2c_tools.convert_sdflow`)::

    d2c-convert-sdflow --hrnet hrnet.pth --lrencoder lrencoder.pth \\
        [--contentnet contentnet.pth --degnet degnet.pth] -o SDFlow_official.pth [--opt-out test.yml]

The official release ships one plain state dict per network (``torch.save(net.state_dict())``;
``module.`` prefixes of DataParallel / DDP are removed): ``hrnet.pth`` (``HRFlow``: the HR flow
with the HF flow), ``lrencoder.pth`` (``LRImageEncoderFM``: the LR content encoder E),
``contentnet.pth`` (``ContentFlow``: the LR flow) and ``degnet.pth`` (``DegFlow``: the
degradation flow and its mixture prior). Each is read with ``torch.load(weights_only=True)``
(:func:`d2c_inference.checkpoint_util.load_checkpoint`), so no code from the files runs. The result is
one checkpoint ``{'params': SDFlow state dict, 'network_g': ..., 'converted_from': ...}``: the
first two files alone give the SR-only network (``downscaler: false``); the last two, which
must come together, add the downscaler.

What the conversion does
------------------------
* Every official key is either mapped to exactly one SDFlow key or dropped after a check, by
  rules: a prefix table per file (``PREFIX_RULES``: which official container becomes which of
  ours) and a table per kind of layer below it (``LAYER_RULES``: flow step, transition, condition
  network); anything no rule takes, anything SDFlow needs that no file gave, and any shape
  mismatch is an error naming the keys.
* Flow steps: official ``actnorm`` / ``permute`` / ``affine_injector`` / ``affine_coulping`` (sic)
  are the indices 0 / 1 / 2 / 2 or 3 of our ``FlowStep`` (the coupling is 3 behind an injector).
  Transitions ``transitions.<j>.{actnorm,inv_conv}`` are the indices 2j / 2j + 1 of ours.
* ActNorm ``loc`` is our ``bias`` (the same map ``(z + loc) exp(log_scale)``); every ActNorm must
  have ``initialized = 1``: a 0 means the layer would set itself from the first batch it sees, so
  the file holds no trained values for it.
* The LU 1x1 convolution: ``w_p`` / ``s_sign`` / ``w_l`` / ``w_s`` / ``w_u`` are our ``perm`` /
  ``sign_s`` / ``lower`` / ``log_s`` / ``upper`` (``lower`` and ``upper`` keep only their strict
  triangles, the entries the official masks let through). The buffers ``u_mask``, ``l_mask`` and
  ``l_eye`` are dropped after checking that they are ``triu(ones, 1)``, its transpose and ``I``:
  our layer applies those masks itself, so other values would change the weight.
* Coupling / injector networks: ``conv1.conv2d`` / ``conv2.conv2d`` / ``conv3.conv`` +
  ``conv3.logs`` are our ``conv_in`` / ``conv_hidden`` / ``conv_out`` + ``conv_out.log_gain``.
* Condition networks (``ConditionNet``, BasicSR-style RRDBs): ``in_conv.1`` / ``trunk.<k>.RDB<i>``
  / ``trans.1`` / ``out_conv.1`` / ``out_conv.4`` are our ``conv_first`` / ``body.<k>.rdb<i>`` /
  ``conv_body`` / ``conv_hr`` / ``conv_last``.
* LR encoder: ``mf_conv.<3i + 1>`` (pad, conv, LReLU triples) is our ``mod_body.<2i>`` (conv,
  LReLU pairs); ``trunk.<b>.fm<j>.log_scale`` our ``body.<b>.mod<j>.log_bound``.
* The network options are read from the converted shapes (:func:`d2c_arch.infer_sdflow_options`);
  the network is built and the weights loaded strictly before anything is written. The sampling
  settings, which the weights cannot tell, are the official scripts': ``temperature: 0.8`` and,
  with the downscaler, ``mixture_sampling: image`` (one mixture component per image, as
  ``DegFlow`` samples).

Refused, with what was found: files that are not the official part they are passed as (another
SDFlow part, a D2CNet or DAN checkpoint, an already converted SDFlow checkpoint, anything else);
an LR encoder saved with its uncertainty head (``uncertain_conv.*``: that encoder was built with
``with_uncertainty=True`` and returns ``tanh`` of its content, which neither the official SR
script, whose strict load rejects such a file, nor our encoder computes); ActNorms never
initialised; 1x1-conv masks that are not the LU masks; NaN / inf weights.
"""
import os.path as osp
import re
from collections import OrderedDict

import torch

from d2c_arch import infer_sdflow_options
from d2c_convert.convert_util import (
    check_mapping,
    check_outputs,
    load_strictly,
    options_lines,
    read_state_dict,
    short_list,
    source_record,
    target_shapes,
    write_converted,
)
from d2c_inference.checkpoint_util import test_option_dict
from d2c_utils.errors import UserError
from d2c_utils.option_check import dump_option_yaml

PROG = 'd2c-convert-sdflow'
REPO_URL = 'https://github.com/sunwj/sdflow'
TEMPERATURE = 0.8  # the official scripts' default --tau
MIXTURE_SAMPLING = 'image'  # official DegFlow: one component per image


class Part:
    """One official file: its flag, usual file name, official class and SDFlow's module for it."""

    def __init__(self, flag, filename, official, module):
        self.flag, self.filename, self.official, self.module = flag, filename, official, module

    def describe(self):
        return f'the official {self.filename} (the state dict of {self.official})'


PARTS = OrderedDict(
    hrnet=Part('--hrnet', 'hrnet.pth', 'HRFlow', 'hr_flow'),
    lrencoder=Part('--lrencoder', 'lrencoder.pth', 'LRImageEncoderFM', 'lr_encoder'),
    contentnet=Part('--contentnet', 'contentnet.pth', 'ContentFlow', 'lr_flow'),
    degnet=Part('--degnet', 'degnet.pth', 'DegFlow', 'deg_flow'),
)
SR_PARTS = ('hrnet', 'lrencoder')
DS_PARTS = ('contentnet', 'degnet')

# ----------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------
# A rule maps the (rest of an) official key to ours: ``(pattern, target)``, where ``target`` is a
# format string over the pattern's groups or a function of the match returning the key, DROPPED
# (a buffer consumed by a check) or None (no rule: a leftover).
DROPPED = ''
_P = r'(weight|bias)'

# leaf names: official -> ours (None: dropped after the checks of ``_check_dropped``)
ACTNORM_NAMES = {'loc': 'bias', 'log_scale': 'log_scale', 'initialized': 'initialized'}
INVCONV_NAMES = {
    'w_p': 'perm',
    's_sign': 'sign_s',
    'w_l': 'lower',
    'w_s': 'log_s',
    'w_u': 'upper',
    'u_mask': None,
    'l_mask': None,
    'l_eye': None,
}
AFFINE_NET_NAMES = {
    'conv1.conv2d.weight': 'conv_in.weight',
    'conv1.conv2d.bias': 'conv_in.bias',
    'conv2.conv2d.weight': 'conv_hidden.weight',
    'conv2.conv2d.bias': 'conv_hidden.bias',
    'conv3.conv.weight': 'conv_out.weight',
    'conv3.conv.bias': 'conv_out.bias',
    'conv3.logs': 'conv_out.log_gain',
}


def _leaf(index, names):
    """A rule target: ``<index>.<our name>`` for the official name in the last group (or DROPPED / None)."""

    def target(match):
        name = match[match.lastindex]
        if name not in names:
            return None
        mapped = names[name]
        return DROPPED if mapped is None else f'{index(match) if callable(index) else index}.{mapped}'

    return target


def _flow_step_rules(conditional):
    coupling = '3.net' if conditional else '2.net'
    rules = [
        (r'actnorm\.(\w+)', _leaf('0', ACTNORM_NAMES)),
        (r'permute\.(\w+)', _leaf('1', INVCONV_NAMES)),
        (r'affine_coulping\.net\.(.+)', _leaf(coupling, AFFINE_NET_NAMES)),
    ]
    if conditional:
        rules.append((r'affine_injector\.net\.(.+)', _leaf('2.net', AFFINE_NET_NAMES)))
    return rules


LAYER_RULES = {
    'step':
    _flow_step_rules(False),
    'conditional_step':
    _flow_step_rules(True),
    # TransitionBlock.transitions.<j>.{actnorm, inv_conv} -> our transition's layers 2j, 2j + 1
    'transition': [
        (r'transitions\.(\d+)\.actnorm\.(\w+)', _leaf(lambda m: 2 * int(m[1]), ACTNORM_NAMES)),
        (r'transitions\.(\d+)\.inv_conv\.(\w+)', _leaf(lambda m: 2 * int(m[1]) + 1, INVCONV_NAMES)),
    ],
    # ConditionNet -> ConditionEncoder (the paddings are indices 0 and 3 of the official Sequentials)
    'condition_net': [
        (rf'in_conv\.1\.{_P}', 'conv_first.{0}'),
        (rf'trunk\.(\d+)\.RDB([123])\.conv([1-5])\.{_P}', 'body.{0}.rdb{1}.conv{2}.{3}'),
        (rf'trans\.1\.{_P}', 'conv_body.{0}'),
        (rf'out_conv\.1\.{_P}', 'conv_hr.{0}'),
        (rf'out_conv\.4\.{_P}', 'conv_last.{0}'),
    ],
}


def _mf_conv(match):
    """LRImageEncoderFM.mf_conv is (pad, conv, LReLU) x n: conv 3i + 1 -> our mod_body (conv, LReLU) index 2i."""
    index = int(match[1])
    return f'lr_encoder.mod_body.{(index - 1) // 3 * 2}.{match[2]}' if index % 3 == 1 else None


# Per file: (official prefix pattern, our prefix, layer rules for the rest) or (full pattern, target, None).
PREFIX_RULES = {
    'hrnet': [
        (r'blocks\.([01])\.squeeze_transition\.', 'hr_flow.levels.{0}.transition_in.', 'transition'),
        (r'blocks\.([01])\.steps\.(\d+)\.', 'hr_flow.levels.{0}.steps.{1}.', 'step'),
        (r'blocks\.1\.split\.conditional_flow\.cond_net\.', 'hr_flow.hf_flow.cond_net.', 'condition_net'),
        (r'blocks\.1\.split\.conditional_flow\.additional_flow_steps\.(\d+)\.', 'hr_flow.hf_flow.steps.{0}.',
         'conditional_step'),
    ],
    'lrencoder': [
        (rf'in_conv\.1\.{_P}', 'lr_encoder.conv_first.{0}', None),
        (rf'mf_conv\.(\d+)\.{_P}', _mf_conv, None),
        (r'trunk\.(\d+)\.fm([12])\.log_scale', 'lr_encoder.body.{0}.mod{1}.log_bound', None),
        (rf'trunk\.(\d+)\.fm([12])\.affine\.{_P}', 'lr_encoder.body.{0}.mod{1}.affine.{2}', None),
        (rf'trunk\.(\d+)\.conv([12])\.1\.{_P}', 'lr_encoder.body.{0}.conv{1}.{2}', None),
        (rf'out_conv\.1\.{_P}', 'lr_encoder.conv_hr.{0}', None),
        (rf'out_conv\.3\.{_P}', 'lr_encoder.conv_last.{0}', None),
    ],
    'contentnet': [
        (r'blocks\.0\.squeeze_transition\.', 'lr_flow.transition_in.', 'transition'),
        (r'blocks\.0\.steps\.(\d+)\.', 'lr_flow.steps.{0}.', 'step'),
        (r'blocks\.0\.expand_transition\.', 'lr_flow.transition_out.', 'transition'),
    ],
    'degnet': [
        (r'(means|log_stds)', 'deg_flow.prior.{0}', None),
        (r'deg_net\.cond_net\.0\.', 'deg_flow.flow.cond_net.0.', 'condition_net'),
        (rf'deg_net\.cond_net\.2\.{_P}', 'deg_flow.flow.cond_net.2.{0}', None),
        (r'deg_net\.squeeze_transition\.', 'deg_flow.flow.squeeze_layers.1.', 'transition'),
        (r'deg_net\.additional_flow_steps\.(\d+)\.', 'deg_flow.flow.steps.{0}.', 'conditional_step'),
    ],
}


def _apply(target, match):
    return target(match) if callable(target) else target.format(*match.groups())


def sdflow_key(part, key):
    """Our key for one official key of ``part`` ('hrnet', ...): a key, DROPPED, or None (no rule)."""
    for pattern, target, layer in PREFIX_RULES[part]:
        if layer is None:
            match = re.fullmatch(pattern, key)
            if match:
                return _apply(target, match)
            continue
        match = re.match(pattern, key)
        if not match:
            continue
        rest = key[match.end():]
        for sub_pattern, sub_target in LAYER_RULES[layer]:
            sub_match = re.fullmatch(sub_pattern, rest)
            if sub_match:
                mapped = _apply(sub_target, sub_match)
                return mapped if not mapped else _apply(target, match) + mapped
    return None


# ----------------------------------------------------------------------------------------------
# Reading and recognising the files
# ----------------------------------------------------------------------------------------------
def identify(state):
    """What a state dict (``module.`` removed) looks like: a part name, or a description of something else."""
    keys = list(state)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has('blocks.1.split.') or (has('blocks.0.squeeze_transition.') and has('blocks.1.')):
        return 'hrnet'
    if has('blocks.0.expand_transition.'):
        return 'contentnet'
    if has('mf_conv.') or (has('in_conv.1.') and has('trunk.0.fm1.')):
        return 'lrencoder'
    if has('deg_net.') or ('means' in state and 'log_stds' in state):
        return 'degnet'
    if has('hr_flow.') or has('lr_encoder.') or has('deg_flow.'):
        return ('an SDFlow checkpoint already in this project\'s layout (hr_flow, lr_encoder, ...); it needs no '
                'conversion: set path.pretrain_network_g to it')
    if has('Restorer.') or has('Estimator.') or has('restorer.') or has('estimator.'):
        return 'a DAN checkpoint (Restorer / Estimator), not SDFlow'
    if 'head.weight' in state and has('tails.'):
        return 'a D2CNet checkpoint (head, tree, tails), not SDFlow'
    return None


def check_part(state, part, path):
    """Refuse a state dict that is not the official ``part``, saying what it is instead."""
    found = identify(state)
    if found == part:
        return
    want = PARTS[part]
    if found in PARTS:
        raise UserError(f'{path} looks like {PARTS[found].describe()}, but was passed as {want.flag}; pass it as '
                        f'{PARTS[found].flag} and give {want.flag} {want.filename}')
    if found is not None:
        raise UserError(f'{path} is {found}; {want.flag} expects {want.describe()}, as released with {REPO_URL}')
    raise UserError(f'{path}: not {want.describe()}: found {len(state)} keys such as {short_list(list(state), 4)}; '
                    f'{want.flag} expects the keys saved by {REPO_URL}')


def _check_lrencoder(state, path):
    head = [k for k in state if k.startswith('uncertain_conv.')]
    if head:
        raise UserError(
            f'{path}: LRImageEncoderFM saved with its uncertainty head ({short_list(head, 2)}): that encoder was '
            'built with with_uncertainty=True and returns tanh of its content, which neither the official SR '
            'script (it builds the encoder without the head and loads strictly, so it refuses this file too) nor '
            'SDFlow\'s encoder computes. Use the released lrencoder.pth (no uncertain_conv.* keys)')


# ----------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------
def _check_dropped(state, dropped, path):
    """The LU masks (u_mask, l_mask, l_eye) must be what the official ``Inv1x1Conv2d`` makes; all three present."""
    modules = OrderedDict()
    for key in dropped:
        module, name = key.rsplit('.', 1)
        modules.setdefault(module, {})[name] = state[key]
    for module in {k.rsplit('.', 1)[0] for k in state if k.endswith('.w_l')}:
        modules.setdefault(module, {})
    for module, buffers in modules.items():
        absent = [n for n in ('u_mask', 'l_mask', 'l_eye') if n not in buffers]
        if absent:
            raise UserError(f'{path}: {module} lacks the buffer(s) {", ".join(absent)} of the official Inv1x1Conv2d '
                            '(a file saved by the official code has all three); the file is incomplete')
        channels = buffers['l_eye'].shape[0] if buffers['l_eye'].dim() == 2 else -1
        eye = torch.eye(max(channels, 0), dtype=torch.float64)
        upper = torch.triu(torch.ones_like(eye), 1)
        for name, want in (('u_mask', upper), ('l_mask', upper.T), ('l_eye', eye)):
            have = buffers[name]
            if tuple(have.shape) != tuple(want.shape) or not torch.equal(have.double(), want):
                what = {'u_mask': 'triu(ones, 1)', 'l_mask': 'the transpose of u_mask', 'l_eye': 'the identity'}[name]
                raise UserError(f'{path}: {module}.{name} {tuple(have.shape)} is not {what}, as the official '
                                'Inv1x1Conv2d makes it; SDFlow applies the LU masks itself, so these weights cannot '
                                'be converted faithfully')


def _check_initialised(converted, origins):
    stale = [
        f'{origins[k][0]}: {origins[k][1]}' for k, v in converted.items()
        if k.endswith('.initialized') and int(v.reshape(-1)[0]) != 1
    ]
    if stale:
        raise UserError(f'{len(stale)} ActNorm layer(s) were never initialised (initialized = 0): '
                        f'{short_list(stale, 4)}; such a layer sets itself from the first batch it sees, so the file '
                        'holds no trained values for it (not a trained checkpoint)')


def convert_state_dicts(states, paths=None):
    """Official state dicts -> an SDFlow state dict, its ``network_g`` options and notes.

    Args:
        states (dict[str, dict]): Part name ('hrnet', 'lrencoder', and optionally 'contentnet' with
            'degnet') -> official state dict (``module.`` removed, see :func:`unwrap_state_dict`).
        paths (dict[str, str] | None): Part name -> file, for messages (default: the usual file names).

    Returns:
        tuple[OrderedDict, OrderedDict, dict]: ``{SDFlow key: Tensor}`` (floats as float32) in
        SDFlow's order; ``network_g`` (``type: SDFlow`` and the options read from the shapes); notes:
        ``mapped`` / ``dropped`` per part (key counts).

    Raises:
        UserError: a part missing or not what it is passed as, keys left over or missing, shape
            mismatches, failed checks (see the module's docstring).
    """
    paths = {p: (paths or {}).get(p, PARTS[p].filename) for p in PARTS}
    missing_parts = [PARTS[p].flag for p in SR_PARTS if p not in states]
    if missing_parts:
        raise UserError(f'{" and ".join(missing_parts)} missing: the SR path needs hrnet.pth and lrencoder.pth')
    given_ds = [p for p in DS_PARTS if p in states]
    if len(given_ds) == 1:
        other = PARTS[DS_PARTS[1 - DS_PARTS.index(given_ds[0])]]
        raise UserError(f'{PARTS[given_ds[0]].flag} without {other.flag}: the downscaler needs both the LR flow '
                        '(contentnet.pth) and the degradation flow (degnet.pth); give both, or neither for the SR '
                        'path only')
    unknown = sorted(set(states) - set(PARTS))
    if unknown:
        raise ValueError(f'unknown SDFlow parts {unknown}; use {list(PARTS)}')

    converted, origins, notes = OrderedDict(), {}, {'mapped': {}, 'dropped': {}}
    for part in [p for p in PARTS if p in states]:
        state, path = states[part], paths[part]
        check_part(state, part, path)
        if part == 'lrencoder':
            _check_lrencoder(state, path)
        leftover, dropped = [], []
        for key, value in state.items():
            target = sdflow_key(part, key)
            if target is None:
                leftover.append(key)
            elif target == DROPPED:
                dropped.append(key)
            else:
                if target in converted:  # two official keys onto one of ours: a bug in the rules
                    raise AssertionError(f'{path}: {key} and {origins[target][1]} both map to {target}')
                converted[target], origins[target] = value, (path, key)
        if leftover:
            raise UserError(f'{path}: {len(leftover)} key(s) match no module of {PARTS[part].official}: '
                            f'{short_list(leftover)}; the file is not {PARTS[part].describe()} of the released code '
                            '(or it comes from a modified model)')
        _check_dropped(state, dropped, path)
        notes['mapped'][part] = len(state) - len(dropped)
        notes['dropped'][part] = len(dropped)

    if 'contentnet' in states:
        level_steps = _count(converted, 'hr_flow.levels.0.steps.')
        lr_steps = _count(converted, 'lr_flow.steps.')
        if level_steps != lr_steps:
            raise UserError(f'{paths["contentnet"]} has {lr_steps} flow steps but {paths["hrnet"]} has {level_steps} '
                            'per level; SDFlow builds both flows with one flow_steps (16 in the release): files from '
                            'different models?')
    try:
        options = infer_sdflow_options(converted)
    except (KeyError, ValueError, IndexError) as err:
        raise UserError(f'the official weights are incomplete: cannot read the layout ({type(err).__name__}: {err}); '
                        f'files: {", ".join(paths[p] for p in PARTS if p in states)}') from None
    net_opt = OrderedDict(type='SDFlow', upscale=4)
    net_opt.update(options)
    net_opt['temperature'] = TEMPERATURE
    if net_opt['downscaler']:
        net_opt['mixture_sampling'] = MIXTURE_SAMPLING

    targets = target_shapes(net_opt)
    flag_of = {PARTS[p].module: PARTS[p].flag for p in PARTS}
    check_mapping(
        converted,
        targets,
        origins,
        'SDFlow',
        layout_text(net_opt),
        describe_missing=lambda k: f'{k} ({flag_of.get(k.split(".")[0], "?")})',
        absent='key(s) no file gave')
    _check_initialised(converted, origins)

    state_dict = OrderedDict()
    for key in targets:
        value = converted[key].detach()
        if value.is_floating_point():
            value = value.to(torch.float32)
        if key.endswith('.lower'):  # only the entries the official l_mask lets through
            value = torch.tril(value, -1)
        elif key.endswith('.upper'):
            value = torch.triu(value, 1)
        state_dict[key] = value.contiguous()
    return state_dict, net_opt, notes


def _count(state, prefix):
    return len({k[len(prefix):].split('.')[0] for k in state if k.startswith(prefix)})


def layout_text(net_opt):
    """One line describing an SDFlow layout, e.g. for messages."""
    text = (f'HR flow 2 x {net_opt["flow_steps"]} steps, HF flow {net_opt["hf_steps"]} steps / '
            f'{net_opt["hf_blocks"]} RRDBs, LR encoder {net_opt["encoder_blocks"]} blocks / '
            f'{net_opt["encoder_mod_convs"]} modulation convs, width {net_opt["num_feat"]}, coupling width '
            f'{net_opt["hidden_channels"]}')
    if net_opt['downscaler']:
        text += (f'; LR flow {net_opt["flow_steps"]} steps, degradation flow {net_opt["deg_steps"]} steps / '
                 f'{net_opt["deg_blocks"]} RRDBs, {net_opt["mixture_components"]}-component mixture')
    else:
        text += '; SR path only (no downscaler)'
    return text


# ----------------------------------------------------------------------------------------------
# Files and the command line
# ----------------------------------------------------------------------------------------------
def option_file_text(net_opt, weights_path):
    """A small BasicSR test option file for the converted weights (SDFlowModel, a placeholder data set)."""
    dataset = {
        'name': 'RealSR_x4_test',
        'type': 'PairedImageDataset',
        'dataroot_gt': 'datasets/RealSR_x4/test/HR',
        'dataroot_lq': 'datasets/RealSR_x4/test/LR',
        'io_backend': {
            'type': 'disk'
        },
    }
    opt = test_option_dict(weights_path, 'SDFlowModel', 4, net_opt, dataset, temperature=0.0)
    header = (f'# Made by {PROG}: test the converted official SDFlow weights ({layout_text(net_opt)}).\n'
              '#   d2c-test -opt <this file>\n'
              '# datasets.test_1 is a placeholder (scripts/prepare_data.py --preset realsr makes it); any folder\n'
              '# pair of LR and x4 HR images works. val.temperature 0 gives the deterministic SR (the official\n'
              '# sdflow_sr.py samples at --tau 0.8: set 0.8 for its outputs). PSNR / SSIM on Y, 4 pixels shaved.\n')
    return header + dump_option_yaml(opt)


def _parameter_counts(net):
    counts = OrderedDict((name, sum(p.numel() for p in getattr(net, name).parameters()))
                         for name in ('hr_flow', 'lr_encoder', 'lr_flow', 'deg_flow') if hasattr(net, name))
    counts['sr_path'] = counts['hr_flow'] + counts['lr_encoder']
    if 'deg_flow' in counts:
        counts['ds_path'] = counts['hr_flow'] + counts['lr_flow'] + counts['deg_flow']
    counts['total'] = sum(p.numel() for p in net.parameters())
    return counts


def convert_files(hrnet, lrencoder, output, contentnet=None, degnet=None, opt_out=None, force=False):
    """Convert the official files (what ``d2c-convert-sdflow`` does).

    Args:
        hrnet, lrencoder (str): ``hrnet.pth`` and ``lrencoder.pth`` of the release.
        output (str): The BasicSR checkpoint to write, atomically: ``{'params', 'network_g',
            'converted_from'}``; nothing is written if anything fails.
        contentnet, degnet (str | None): ``contentnet.pth`` and ``degnet.pth`` (both or neither).
        opt_out (str | None): Also write a small test option file here (:func:`option_file_text`).
        force (bool): Overwrite existing output files.

    Returns:
        list[str]: lines to print for the user.
    """
    given = OrderedDict((p, f) for p, f in zip(PARTS, (hrnet, lrencoder, contentnet, degnet)) if f is not None)
    if ('contentnet' in given) != ('degnet' in given):
        have, lack = (('--contentnet', '--degnet') if 'contentnet' in given else ('--degnet', '--contentnet'))
        raise UserError(f'{have} without {lack}: the downscaler needs both contentnet.pth (the LR flow) and '
                        'degnet.pth (the degradation flow); give both, or neither for the SR path only')
    check_outputs({
        'OUT.pth': output,
        '--opt-out': opt_out
    }, {
        PARTS[part].flag: path
        for part, path in given.items()
    }, force)
    seen = {}
    for part, path in given.items():
        real = osp.realpath(path)
        if real in seen:
            raise UserError(f'{path} is given as both {PARTS[seen[real]].flag} and {PARTS[part].flag}')
        seen[real] = part

    states, wrappers, lines = OrderedDict(), {}, []
    for part, path in given.items():
        expects = f'{PARTS[part].flag} expects {PARTS[part].describe()}, as released with {REPO_URL}'
        states[part], wrappers[part] = read_state_dict(path, f'{PARTS[part].flag} <{PARTS[part].filename}>', expects)
        lines.append(f'read {path}: {len(states[part])} tensors of {PARTS[part].official}' +
                     (f' (under {wrappers[part]!r})' if wrappers[part] else ''))
    state_dict, net_opt, notes = convert_state_dicts(states, dict(given))

    counts = _parameter_counts(load_strictly(net_opt, state_dict))

    lines.append(f'layout: {layout_text(net_opt)}')
    dropped = sum(notes['dropped'].values())
    lines.append(f'mapped {sum(notes["mapped"].values())} official tensors by rule; dropped {dropped} LU-mask '
                 'buffers (u_mask, l_mask, l_eye) after checking them')
    lines.append(f'sampling options (not in the weights): temperature {TEMPERATURE}' +
                 (f', mixture_sampling {MIXTURE_SAMPLING!r} (the official sampler)' if net_opt['downscaler'] else ''))
    opt_text = option_file_text(net_opt, output) if opt_out else None
    files = {
        part: dict(source_record(path), official=PARTS[part].official, wrapper=wrappers[part])
        for part, path in given.items()
    }
    converted_from = {'files': files, 'repository': REPO_URL, 'tool': PROG}
    parts = ', '.join(f'{name} {count / 1e6:.2f}M' for name, count in counts.items()
                      if name not in ('sr_path', 'ds_path', 'total'))
    paths = f'SR path {counts["sr_path"] / 1e6:.2f}M' + (f', downscaling path {counts["ds_path"] / 1e6:.2f}M'
                                                         if 'ds_path' in counts else '')
    lines.append(f'parameters: {parts}; {paths}; total {counts["total"] / 1e6:.2f}M ({counts["total"]:,})')
    lines += write_converted(output, state_dict, net_opt, converted_from, counts['total'], opt_out, opt_text)
    if opt_out:
        lines.append(f'wrote {opt_out} (a test option file; its data set is a placeholder)')
    return lines + options_lines(net_opt)
