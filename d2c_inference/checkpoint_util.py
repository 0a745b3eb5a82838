"""The one way d2c-sr loads a model: safe reading, network options, one mismatch message.

Used by ``d2c-infer``, ``d2c-summary``, the demo, the benchmarks and ``D2CModel.load_network``
(``path.pretrain_network_g``). Also the atomic writers every tool and model saves through.

Model files are untrusted input: they are read with ``torch.load(weights_only=True)``, which
refuses pickled Python objects (that could run code) and loads only tensors and plain containers.
``.safetensors`` files (``logger.save_format: safetensors``, or a converter's output named so) hold
no code at all; every loader here reads both kinds through :func:`load_checkpoint`.
"""
import json
import pickle
import re
from os import path as osp

import torch

from d2c_arch import BRANCH_REGISTRY, bare_key, default_options
from d2c_arch.d2cnet_arch import state_dict_differences
from d2c_utils.errors import UserError
from d2c_utils.option_check import read_option_file
from d2c_utils.output_util import atomic_write
from .registry import detect_method, method_of_options

KEYS_PER_PART = 3  # keys listed per part of the network in a mismatch message


def first_line(err):
    """The first informative line of an exception's message (at most 200 characters)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights_only messages start with boilerplate; the specific reason comes later
    specific = [
        line for line in lines
        if not line.startswith(('Weights only load failed', 'Please file an issue', 'Check the documentation'))
    ]
    return (specific or lines or [''])[0][:200]


# the metadata entry that marks a safetensors file written by save_checkpoint (its value: the layout version)
SAFETENSORS_MARK = 'd2c_sr_checkpoint'


def is_safetensors_file(path):
    """True if ``path`` starts like a safetensors file (8-byte header length, then a JSON object).

    Decided from the bytes, not the name, so a renamed file still loads the right way.
    """
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') > 1


def _json_metadata(value):
    return json.dumps(value, default=str, sort_keys=False)


def save_checkpoint(obj, path, metadata=None):
    """Write a checkpoint dict atomically: ``.safetensors`` by the file name, else ``torch.save``.

    A safetensors file holds tensors under flat names and strings as metadata, so the dict is
    laid out as: every entry that is a dict of tensors (BasicSR's ``params`` / ``params_ema``, a
    converter's ``params``) becomes tensors named ``<entry>.<key>``; every other entry (``network_g``,
    ``converted_from``, ...) and ``metadata`` (provenance) become JSON strings in the file's
    metadata. :func:`load_checkpoint` rebuilds the same dict, so both kinds load alike.

    Args:
        obj (dict): ``{'params': state_dict, ...}``.
        path (str): ``*.safetensors`` or any other name (``torch.save``).
        metadata (dict | None): More JSON-serialisable entries for a safetensors file's metadata
            (a .pth gets them as the entry ``metadata``).
    """
    if not str(path).endswith('.safetensors'):
        atomic_torch_save(dict(obj, metadata=metadata) if metadata else obj, path)
        return
    from safetensors.torch import save_file
    tensors, meta = {}, {SAFETENSORS_MARK: '1'}
    for key, value in obj.items():
        if _is_state_dict(value):
            # clone: safetensors refuses tensors that share memory (views, tied weights)
            tensors.update({f'{key}.{name}': t.detach().cpu().contiguous().clone() for name, t in value.items()})
        else:
            meta[f'entry.{key}'] = _json_metadata(value)
    meta.update({f'meta.{key}': _json_metadata(value) for key, value in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _load_safetensors(path):
    """The dict :func:`save_checkpoint` wrote; a safetensors file from elsewhere is a bare state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    try:
        with safe_open(path, 'pt') as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f'cannot read {path}: corrupt or not a safetensors file ({first_line(err)})') from None
    if SAFETENSORS_MARK not in meta:
        return tensors  # e.g. a state dict saved by another toolbox: select_state_dict takes it as is
    ckpt = {}
    for name, tensor in tensors.items():
        entry, _, key = name.partition('.')
        ckpt.setdefault(entry, {})[key] = tensor
    try:
        for key, value in meta.items():
            if key.startswith('entry.'):
                ckpt[key[len('entry.'):]] = json.loads(value)
        extra = {key[len('meta.'):]: json.loads(value) for key, value in meta.items() if key.startswith('meta.')}
    except json.JSONDecodeError as err:
        raise UserError(f'cannot read {path}: its metadata is not valid JSON ({err})') from None
    if extra:
        ckpt['metadata'] = extra
    return ckpt


def existing_weights_file(path):
    """``path``, or its ``.safetensors`` twin when only that exists (BasicSR's resume names ``net_g_<iter>.pth``)."""
    if path and not osp.isfile(path) and str(path).endswith('.pth'):
        twin = str(path)[:-len('.pth')] + '.safetensors'
        if osp.isfile(twin):
            return twin
    return path


def load_checkpoint(path, what='--model <a .pth written by training>'):
    """Read a model file safely: a ``torch.save`` file or a ``.safetensors`` file.

    Only tensors and plain containers are unpickled (``weights_only=True``); anything that
    would need a Python global (a class, ``os.system``, ...) is refused. safetensors files hold
    no code; the dict :func:`save_checkpoint` wrote is rebuilt from their tensor names and metadata.

    Args:
        path (str): The file.
        what (str): How the user names the file (flag or option key), for the not-found message.

    Raises:
        UserError: missing, unreadable, corrupt or refused file; the message names it.
    """
    if not osp.isfile(path):
        raise UserError(f'model file not found: {path} (pass {what})')
    if is_safetensors_file(path):
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r'GLOBAL\s+([\w.]+)', str(err))
        if match:
            raise UserError(f'refusing to load {path}: it holds a pickled Python object ({match.group(1)}) that '
                            'torch.load(weights_only=True) does not allow, because loading it could run code. '
                            'Only tensors and plain containers are accepted; re-save the weights as '
                            "torch.save({'params': net.state_dict()}, path) in a trusted environment.") from None
        raise UserError(f'cannot read {path}: corrupt or not a PyTorch checkpoint (weights_only load failed: '
                        f'{first_line(err)})') from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged files
        raise UserError(f'cannot read {path}: corrupt or not a PyTorch checkpoint ({type(err).__name__}: '
                        f'{first_line(err) or "empty or truncated file"})') from None


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(ckpt, path, param_key=None, param_key_option='--param-key'):
    """The state dict of a checkpoint.

    Args:
        ckpt: What :func:`load_checkpoint` returned: BasicSR's ``{'params': ...,
            'params_ema': ...}``, or a bare state dict.
        path (str): The file, for messages.
        param_key (str | None): Key to use; default ``params_ema`` if present, else ``params``.
        param_key_option (str): How the user sets ``param_key``, for the messages.

    Returns:
        tuple[dict, str | None]: state dict (``module.`` prefixes removed) and the key used
        (None for a bare state dict).
    """
    if not isinstance(ckpt, dict):
        raise UserError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict; expected BasicSR\'s '
                        "{'params': state_dict} or a state dict")
    if param_key is not None:
        if param_key not in ckpt:
            raise UserError(f'{param_key_option} {param_key}: {path} has no such key; it has {sorted(map(str, ckpt))}')
        key = param_key
    elif 'params_ema' in ckpt:
        key = 'params_ema'
    elif 'params' in ckpt:
        key = 'params'
    elif _is_state_dict(ckpt):
        key = None
    else:
        raise UserError(f'{path} has neither "params" nor "params_ema" (keys: {sorted(map(str, ckpt))[:10]}); '
                        f'pass {param_key_option} <key holding the state dict>')
    state = ckpt if key is None else ckpt[key]
    if not _is_state_dict(state):
        raise UserError(f'{path}: "{key}" is not a state dict of tensors; pick another {param_key_option} '
                        f'(keys: {sorted(map(str, ckpt))})')
    return {bare_key(k): v for k, v in state.items()}, key


def option_file_network(opt_path):
    """``network_g`` of an option file, read by the one reader (:func:`d2c_utils.option_check.read_option_file`)."""
    opt = read_option_file(opt_path, flag='--opt', check=False)
    if not isinstance(opt, dict) or not isinstance(opt.get('network_g'), dict):
        raise UserError(f'option file {opt_path} has no network_g block; pass the option file the model was '
                        'trained with')
    return dict(opt['network_g'])


def carried_options(ckpt):
    """``network_g`` a checkpoint carries (``network_g`` or ``opt.network_g``; training's do not), or None."""
    if not isinstance(ckpt, dict):
        return None
    carried = ckpt.get('network_g')
    if carried is None and isinstance(ckpt.get('opt'), dict):
        carried = ckpt['opt'].get('network_g', ckpt['opt'] if 'type' in ckpt['opt'] else None)
    return dict(carried) if isinstance(carried, dict) else None


def network_options(ckpt, opt_path, model_path, infer_missing=None, param_key=None):
    """``network_g`` for a checkpoint, by the one precedence rule, and the method it builds.

    1. the option file ``opt_path``, if given; 2. the options the checkpoint carries (converted and
    ``.safetensors`` checkpoints; training's ``.pth`` do not); 3. the options read from the weights
    (:meth:`d2c_inference.registry.Method.options_from_weights`), with what they cannot tell assumed
    and named in a warning, where the method runs without options (or ``infer_missing``).

    Args:
        ckpt: The loaded checkpoint, or None (options only).
        opt_path (str | None): Option file whose ``network_g`` is used.
        model_path (str | None): The checkpoint file, for messages.
        infer_missing (bool | None): Read the options from the weights when neither 1 nor 2 has them;
            None: where the method allows it (DAN, SDFlow; not D2CNet, whose mean and range change
            every pixel). True is enough to count parameters, not always to run the network faithfully.
        param_key (str | None): The state dict the options are read from (see :func:`select_state_dict`).

    Returns:
        tuple[dict, str, Method, list[str]]: the network_g options (with ``type``), where they came
        from, the registry entry, and warnings.
    """
    if opt_path:
        net_opt = option_file_network(opt_path)
        return net_opt, opt_path, method_of_options(net_opt, opt_path), []
    net_opt = carried_options(ckpt)
    if net_opt is not None:
        source = f'{model_path} (carried options)'
        return net_opt, source, method_of_options(net_opt, source), []
    state = key = method = None
    if ckpt is not None:
        state, key = select_state_dict(ckpt, model_path, param_key)
        method = detect_method(state)
    allowed = method is not None and (method.runs_without_options if infer_missing is None else infer_missing)
    if not allowed:
        what = f'a {method.name}' if method else 'weights of no network d2c-sr knows'
        raise UserError(f'{model_path} holds {what} only: checkpoints written by training (d2c-train / BasicSR) '
                        'do not store the network options, so --opt is required: pass the option file the model '
                        'was trained with (BasicSR copies it into experiments/<name>/), e.g. '
                        '--opt options/train_D2C_RealSR_x4.yml')
    try:
        net_opt = method.options_from_weights(state)
    except ValueError as err:
        raise UserError(f'{model_path}: {err}') from None
    source = f'{model_path}' + (f' [{key}]' if key else '') + ' (shape inferred from the keys)'
    return net_opt, source, method, [method.assumed_note()]


def test_option_dict(weights_path, model_type, scale, net_opt, dataset, **val_options):
    """A BasicSR test option dict for converted weights: one data set, Y-PSNR/SSIM with ``scale`` pixels shaved.

    ``val_options`` go into ``val`` before ``metrics`` (e.g. ``temperature=0.0``).
    """
    metric = {'crop_border': scale, 'test_y_channel': True}
    return {
        'name': f'{osp.splitext(osp.basename(weights_path))[0]}_test',
        'model_type': model_type,
        'scale': scale,
        'num_gpu': 'auto',
        'manual_seed': 0,
        'datasets': {
            'test_1': dataset
        },
        'network_g': dict(net_opt),
        'path': {
            'pretrain_network_g': weights_path,
            'param_key_g': 'params',
            'strict_load_g': True
        },
        'val': {
            'save_img': True,
            'suffix': None,
            **val_options,
            'metrics': {
                'psnr': {
                    'type': 'calculate_psnr',
                    **metric
                },
                'ssim': {
                    'type': 'calculate_ssim',
                    **metric
                },
            },
        },
    }


def build_network(net_opt, source):
    """The network of any registered method from network_g options; bad options name the source."""
    return method_of_options(net_opt, source).build(net_opt, source)


def _listed(entries, per_part=KEYS_PER_PART):
    """Sorted keys (or lines starting with a key), at most ``per_part`` per top-level part of the network.

    Every differing part (head, tree, res_convs, tails, convergence) shows up in the message,
    however many keys another part has.
    """
    parts = {}
    for entry in sorted(entries):
        parts.setdefault(entry.split('.', 1)[0], []).append(entry)
    shown = []
    for part, part_entries in parts.items():
        shown += part_entries[:per_part]
        if len(part_entries) > per_part:
            shown.append(f'... {len(part_entries) - per_part} more {part}.*')
    return ', '.join(shown)


def mismatch_message(net, state, net_opt, opt_source, model_desc, hint):
    """Why ``state`` does not fit ``net`` (built from ``net_opt``), or None when keys and shapes agree.

    The one mismatch message of the project: the differing keys, then the options that differ
    (read from the weights with :func:`d2c_arch.infer_options`), then ``hint`` (how to fix it).
    """
    expected = net.state_dict()
    missing, unexpected, resized = state_dict_differences(expected, state)
    if not (missing or unexpected or resized):
        return None
    lines = [f'{model_desc} does not fit network_g of {opt_source}:']
    if missing:
        lines.append(f'  missing in the checkpoint ({len(missing)}): {_listed(missing)}')
    if unexpected:
        lines.append(f'  not in the network ({len(unexpected)}): {_listed(unexpected)}')
    if resized:
        shown = [f'{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}' for k in resized]
        lines.append(f'  different shapes ({len(resized)}): {_listed(shown, KEYS_PER_PART - 1)}')
    method = detect_method(state) or method_of_options(net_opt, opt_source)
    try:
        inferred = method.read_options(state)
    except Exception:  # a damaged state dict can fail anywhere in the shape reading
        inferred = {}
    defaults = default_options(type(net))
    differ = []
    for key, value in inferred.items():
        configured = net_opt.get(key, defaults.get(key))
        if key == 'branch_opt':  # compare only what the weights tell, against the branch's own defaults
            branch_defaults = default_options(BRANCH_REGISTRY.get(net_opt.get('branch_type', defaults['branch_type'])))
            configured = {k: (configured or {}).get(k, branch_defaults.get(k)) for k in value}
        if configured != value:
            differ.append(f'{key}: options {configured!r}, checkpoint {value!r}')
    if differ:
        lines.append(f'  options that differ ({len(differ)}): ' + '; '.join(differ))
    lines.append(f'  {hint}')
    return '\n'.join(lines)


def constants_mismatch(ckpt, net_opt):
    """Warnings for a converted checkpoint whose non-weight constants differ from ``net_opt``.

    Converted checkpoints carry the ``network_g`` they were converted for; ``rgb_mean`` and
    ``img_range`` are not weights, so a strict load cannot notice a difference.

    Returns:
        list[str]: one line per differing constant (empty when they agree or nothing is carried).
    """
    source = ckpt.get('converted_from') if isinstance(ckpt, dict) else None
    if not isinstance(source, dict) or not isinstance(source.get('network_g'), dict):
        return []
    defaults, lines = default_options(), []
    for key in ('rgb_mean', 'img_range'):
        want = source['network_g'].get(key, defaults[key])
        have = net_opt.get(key, defaults[key])
        if not torch.allclose(torch.tensor(want, dtype=torch.float64), torch.tensor(have, dtype=torch.float64)):
            shown = list(want) if key == 'rgb_mean' else want
            lines.append(f'it was converted for network_g.{key}={shown} but the options have {have}; outputs will '
                         'be slightly off. Use the network_g block printed by the converter.')
    return lines


def load_weights(net,
                 ckpt,
                 model_path,
                 net_opt,
                 opt_source,
                 param_key=None,
                 strict=True,
                 param_key_option='--param-key',
                 hint=None,
                 report_loose=None,
                 constants=True):
    """Load a checkpoint into ``net``, checking that it fits.

    Args:
        net (D2CNet): The network built from ``net_opt``.
        ckpt (dict): What :func:`load_checkpoint` read from ``model_path``.
        model_path (str): The checkpoint file (for messages).
        net_opt (dict): network_g options ``net`` was built from (for the message).
        opt_source (str): Where they came from (for the message).
        param_key (str | None): State dict to use (see :func:`select_state_dict`).
        strict (bool): False loads what fits (BasicSR's ``strict_load_g: false``).
        param_key_option (str): How the user passes ``param_key`` (for messages).
        hint (str | None): How to fix a mismatch; default: pass the right option file.
        report_loose (callable | None): With ``strict=False``, called with the state dict before
            loading; it may drop entries that cannot load (BasicSR's ``_print_different_keys_loading``).
        constants (bool): Also compare a converted D2CNet's constants (:func:`constants_mismatch`).

    Returns:
        dict: ``param_key`` (the key used) and ``warnings`` (see :func:`constants_mismatch`).
    """
    state, key = select_state_dict(ckpt, model_path, param_key, param_key_option)
    model_desc = f'checkpoint {model_path}' + (f' [{key}]' if key else '')
    if strict:
        problem = mismatch_message(
            net, state, net_opt, opt_source, model_desc, hint
            or 'pass the option file this checkpoint was trained with (--opt), or fix '
            'network_g to match')
        if problem:
            raise UserError(problem)
    elif report_loose is not None:
        report_loose(state)
    net.load_state_dict(state, strict=strict)
    return {'param_key': key, 'warnings': constants_mismatch(ckpt, net_opt) if constants else []}


def load_model(model_path, opt_path=None, param_key=None, device='cpu', infer_missing=None):
    """The one checkpoint loader: build the network of any registered method and load its weights, checked.

    Args:
        model_path (str): Checkpoint (BasicSR's ``params`` / ``params_ema``, a converted
            checkpoint, a ``.safetensors`` file, or a bare state dict).
        opt_path (str | None): Option file with ``network_g``; see :func:`network_options` for
            when it is required.
        param_key (str | None): State dict to use; default ``params_ema`` if present, else ``params``.
        device (str | torch.device): Where the network goes.
        infer_missing (bool | None): See :func:`network_options`.

    Returns:
        tuple[nn.Module, dict]: the network in eval mode on ``device``, and a description dict
        (``method``: the registry entry, ``param_key``, ``opt_source``, ``net_opt``, ``warnings``).
    """
    ckpt = load_checkpoint(model_path)
    net_opt, opt_source, method, warnings = network_options(ckpt, opt_path, model_path, infer_missing, param_key)
    net = method.build(net_opt, opt_source)
    info = load_weights(net, ckpt, model_path, net_opt, opt_source, param_key, constants=False)
    warnings += method.check_loaded(net, ckpt, net_opt, model_path)
    net.eval().to(device)
    return net, {
        'method': method,
        'param_key': info['param_key'],
        'opt_source': opt_source,
        'net_opt': net_opt,
        'warnings': warnings
    }


def atomic_torch_save(obj, save_path):
    """``torch.save`` to a temporary file, then rename: a crash never leaves a half-written file."""
    atomic_write(save_path, lambda tmp: torch.save(obj, tmp))
