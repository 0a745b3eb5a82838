"""The one pipeline the converters of other people's checkpoints share.

A converter (:mod:`.official_util`, :mod:`.dan_convert_util`, :mod:`.sdflow_convert_util`) knows
its format: how to read it, its key table and the options the weights cannot tell. Everything
after that is the same for every format and lives here:

1. reading a state dict of tensors safely (:func:`read_state_dict`: ``torch.load(weights_only=True)``,
   wrappers and ``module.`` prefixes removed, everything else refused with what was found);
2. checking the mapped result against the network the options describe (:func:`check_mapping`):
   keys that match no parameter, parameters no key gave, shape mismatches and NaN / inf values,
   in one message format that names the keys and the file they came from;
3. a strict load into the real network (:func:`load_strictly`);
4. writing the checkpoint and the ``--opt-out`` option file, both or neither
   (:func:`write_converted`), with the provenance of every input (:func:`source_record`), and the
   lines of the report (the ``network_g`` snippet: :func:`options_lines`).
"""
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from basicsr.utils.registry import ARCH_REGISTRY
from d2c_arch import bare_key
from d2c_inference.checkpoint_util import load_checkpoint, save_checkpoint
from d2c_utils.errors import UserError
from d2c_utils.option_check import dump_option_yaml
from d2c_utils.output_util import atomic_write_text, check_distinct, file_sha256

MAX_LISTED = 8  # keys listed in one error line before "... and N more"
WRAPPER_KEYS = ('params_ema', 'params', 'state_dict')  # looked for, in this order, around a state dict


def short_list(items, limit=MAX_LISTED):
    """``a, b, c, ... and N more``: at most ``limit`` items of an error line."""
    items = list(items)
    shown = ', '.join(items[:limit])
    if len(items) > limit:
        shown += f', ... and {len(items) - limit} more'
    return shown


# ----------------------------------------------------------------------------------------------
# Before anything is read
# ----------------------------------------------------------------------------------------------
def check_outputs(outputs, inputs, force):
    """Refuse outputs that are inputs, collide, or exist (without ``force``); before any input is read.

    Args:
        outputs (dict[str, str | None]): How the user names each output (``'OUT.pth'``,
            ``'--opt-out'``) -> its path (None: not asked for).
        inputs (dict[str, str | None]): The same for the inputs.
        force (bool): Overwrite existing outputs.
    """
    check_distinct(outputs, inputs)
    for path in filter(None, outputs.values()):
        if os.path.exists(path) and not force:
            raise UserError(f'{path} exists; pass --force to overwrite it')


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def unwrap_state_dict(obj, path, expects):
    """The state dict inside what ``torch.load`` returned, ``module.`` prefixes removed.

    Args:
        obj: A bare state dict, or one wrapped in ``{'params_ema' | 'params' | 'state_dict': ...}``.
        path (str): The file, for messages.
        expects (str): What the file should be, ending every refusal (e.g. ``'--hrnet expects the
            official hrnet.pth'``).

    Returns:
        tuple[OrderedDict, str | None]: ``{key: Tensor}`` without the DataParallel / DDP prefix,
        and the wrapper key it was under (None: bare).
    """
    if not isinstance(obj, Mapping):
        raise UserError(f'{path} holds a {type(obj).__name__}, not a state dict; {expects}')
    wrapper = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    state = obj if wrapper is None else obj[wrapper]
    if not state:
        raise UserError(f'{path}: the state dict' + (f' [{wrapper}]' if wrapper else '') + f' is empty; {expects}')
    not_tensors = [str(k) for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UserError(f'{path}: not a state dict of tensors: {short_list(repr(k) for k in not_tensors)} '
                        f'(top-level keys: {short_list(repr(str(k)) for k in obj)}); {expects}, not a training '
                        'state')
    return OrderedDict((bare_key(str(k)), v) for k, v in state.items()), wrapper


def read_state_dict(path, what, expects):
    """Read a released ``torch.save`` state dict safely (no code from the file runs).

    Args:
        path (str): The file.
        what (str): How the user passes it (flag and usual name), for the not-found message.
        expects (str): What it should be, for refusals (see :func:`unwrap_state_dict`).

    Returns:
        tuple[OrderedDict, str | None]: the state dict and its wrapper key (see :func:`unwrap_state_dict`).

    Raises:
        UserError: missing, unreadable, refused (a pickled object) or not a state dict of tensors.
    """
    try:
        obj = load_checkpoint(path, what)
    except UserError as err:
        raise UserError(f'{err} ({expects})') from None
    return unwrap_state_dict(obj, path, expects)


# ----------------------------------------------------------------------------------------------
# The network the options describe
# ----------------------------------------------------------------------------------------------
def network_kwargs(net_opt):
    """``network_g`` without ``type``: the keyword arguments of the network class."""
    return {k: v for k, v in net_opt.items() if k != 'type'}


def build_network(net_opt):
    """The network ``network_g`` describes, from BasicSR's registry (as ``path.pretrain_network_g`` builds it)."""
    return ARCH_REGISTRY.get(net_opt['type'])(**network_kwargs(net_opt))


def target_shapes(net_opt):
    """``{key: shape}`` of the network's state dict, built on the meta device (no memory, no initialisation)."""
    with torch.device('meta'):
        net = build_network(net_opt)
    return OrderedDict((k, tuple(v.shape)) for k, v in net.state_dict().items())


def load_strictly(net_opt, state_dict):
    """A real strict load into the network the options describe, as ``path.pretrain_network_g`` will do."""
    net = build_network(net_opt)
    net.load_state_dict(state_dict, strict=True)
    return net


# ----------------------------------------------------------------------------------------------
# The check of a mapping
# ----------------------------------------------------------------------------------------------
def origin_text(origin, sections=False):
    """Where an official key came from: ``file: key``, ``section[key]`` (``sections``) or the bare key.

    Args:
        origin (tuple): ``(file or section or None, official key)``.
        sections (bool): The sources are sections of one file (the authors' ``state_dict_D``), not files.
    """
    source, key = origin
    if not source:
        return key
    return f'{source}[{key}]' if sections else f'{source}: {key}'


def _is_finite(value):
    if torch.is_tensor(value):
        return not value.is_floating_point() or bool(value.isfinite().all())
    value = np.asarray(value)
    return value.dtype.kind != 'f' or bool(np.isfinite(value).all())


def check_mapping(converted,
                  targets,
                  origins,
                  network,
                  layout,
                  leftover=(),
                  describe_missing=None,
                  absent='parameter(s) not in the checkpoint',
                  path=None,
                  sections=False):
    """Check mapped weights against the network they are for; one UserError naming every bad key.

    Args:
        converted (dict): Our key -> tensor (or numpy array), as the key table mapped it.
        targets (dict): Our key -> shape the network needs (:func:`target_shapes`).
        origins (dict): Our key -> ``(file or section or None, official key)`` it came from.
        network (str): The network's name for messages ('D2CNet', 'DAN', 'SDFlow').
        layout (str): One line describing the layout read from the weights, ending the message.
        leftover (iterable[tuple]): Origins of official keys that were mapped to nothing.
        describe_missing (callable | None): Our missing key -> text saying where it was expected
            (default: the key).
        absent (str): How a missing key is counted (e.g. ``'key(s) no file gave'`` for several files).
        path (str | None): The file every message is about, if there is one.
        sections (bool): The origins' sources are sections of ``path`` (see :func:`origin_text`).

    Raises:
        UserError: ``[path: ]N checkpoint key(s) match no <network> parameter: ...; N <network>
            <absent>: ...; N shape mismatch(es): <file>: <key> <shape> vs <network> <ours> <shape>
            (layout read from the weights: ...)``, or, when all fit, ``N array(s) hold NaN or inf
            values: <key> (<file>)``.
    """
    prefix = f'{path}: ' if path else ''
    describe_missing = describe_missing or str
    unexpected = [origin_text(o, sections) for o in leftover]
    unexpected += [f'{origin_text(origins[k], sections)} (-> {k})' for k in converted if k not in targets]
    missing = [describe_missing(k) for k in targets if k not in converted]
    resized = [
        f'{origin_text(origins[k], sections)} {tuple(converted[k].shape)} vs {network} {k} {shape}'
        for k, shape in targets.items() if k in converted and tuple(converted[k].shape) != shape
    ]
    errors = []
    if unexpected:
        errors.append(f'{len(unexpected)} checkpoint key(s) match no {network} parameter: {short_list(unexpected)}')
    if missing:
        errors.append(f'{len(missing)} {network} {absent}: {short_list(missing)}')
    if resized:
        errors.append(f'{len(resized)} shape mismatch(es): {short_list(resized)}')
    if errors:
        raise UserError(prefix + '; '.join(errors) + f' (layout read from the weights: {layout})')
    broken = []
    for key, value in converted.items():
        if not _is_finite(value):
            source, official = origins[key]
            broken.append(f'{official} ({source})' if source else official)
    if broken:
        raise UserError(f'{prefix}{len(broken)} array(s) hold NaN or inf values: {short_list(broken)}; the '
                        'checkpoint is damaged (or was saved after training diverged)')


# ----------------------------------------------------------------------------------------------
# Writing and the report
# ----------------------------------------------------------------------------------------------
def source_record(path):
    """Provenance of one input file: its name and SHA-256 (plain types: ``weights_only`` loads read them)."""
    return {'file': os.path.basename(path), 'sha256': file_sha256(path)}


def options_snippet(net_opt):
    """The ``network_g`` block of an option file for ``net_opt`` (YAML text)."""
    return dump_option_yaml({'network_g': OrderedDict(net_opt)})


def options_lines(net_opt, note=''):
    """The report's last lines: the ``network_g`` block the converted weights need."""
    return [f'the converted weights need these options{note}:', options_snippet(net_opt).rstrip('\n')]


def write_converted(output,
                    state_dict,
                    net_opt,
                    converted_from,
                    num_params,
                    opt_out=None,
                    opt_text=None,
                    carry_options=True):
    """Write the converted checkpoint and the option file: both or neither.

    Args:
        output (str): ``.safetensors`` by its name, else ``torch.save`` (atomically, see
            :func:`d2c_inference.checkpoint_util.save_checkpoint`).
        state_dict (dict): Our state dict (``params``).
        net_opt (dict): Its ``network_g``; also carried in the checkpoint with ``carry_options``.
        converted_from (dict): Provenance (plain types); ``network_g`` and nothing else is added.
        num_params (int): The network's parameter count, for the report.
        opt_out (str | None): Where to write ``opt_text`` (atomically too).
        opt_text (str | None): The option file, made before anything is written.
        carry_options (bool): Store ``network_g`` at the top level, where the loader looks for options.

    Returns:
        list[str]: the report's lines for what was written.
    """
    checkpoint = {'params': state_dict}
    if carry_options:
        checkpoint['network_g'] = dict(net_opt)
    checkpoint['converted_from'] = dict(converted_from, network_g=dict(net_opt))
    save_checkpoint(checkpoint, output)
    if opt_out:
        try:
            atomic_write_text(opt_out, opt_text)
        except BaseException:
            os.remove(output)  # all or nothing
            raise
    return [
        f'wrote {output}: {len(state_dict)} tensors, {num_params / 1e6:.2f}M parameters, '
        f'sha256 {file_sha256(output)}'
    ]
