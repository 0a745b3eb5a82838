"""Option files checked before any work: a YAML that is safe to load, and values of the right type and range.

BasicSR reads option values where it uses them, so ``total_iter: '4'`` fails after training
started and ``lr: fast`` deep inside torch. :data:`OPTION_CHECKS` is the one table of the keys
whose type and range are checked up front (BasicSR's keys and the plugin's); add a row for a new
key. :func:`check_options` raises a :class:`UserError` naming the first bad key; d2c-train,
d2c-test and d2c-swap exit with status 2 on it.

:func:`load_option_text` parses YAML with limits: the size of the file and of the data once
aliases are expanded (a "billion laughs" file of a few hundred bytes otherwise expands to
gigabytes when BasicSR copies or prints the options), plain data only (no ``!!python`` tags).
"""
import math
import numbers

import yaml

from .errors import UserError

# an option file larger than this is not an option file
MAX_OPTION_BYTES = 1 << 20
# values (scalars, lists, mappings) the options may hold once aliases are expanded
MAX_OPTION_NODES = 100_000


class Check:
    """A type-and-range rule for one option value; ``describe`` says what is expected."""

    def __init__(self, accepts, describe):
        self.accepts = accepts
        self.describe = describe


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(low=None, high=None):
    bounds = ' and '.join(text for text in (low is not None and f'>= {low}', high is not None and f'<= {high}') if text)
    return Check(lambda v: _is_int(v) and (low is None or v >= low) and (high is None or v <= high),
                 'an integer' + (f' {bounds}' if bounds else ''))


def real(low=None, high=None, low_open=False, high_open=False):

    def accepts(v):
        return (_is_real(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    parts = [
        f'{">" if low_open else ">="} {low}' if low is not None else '',
        f'{"<" if high_open else "<="} {high}' if high is not None else ''
    ]
    return Check(accepts,
                 'a number ' + ' and '.join(p for p in parts if p) + ' (write floats as 2.0e-4 or !!float 2e-4)')


def one_of(*choices):
    return Check(lambda v: v in choices, f'one of {", ".join(map(str, choices))}')


def either(*checks):
    return Check(lambda v: any(c.accepts(v) for c in checks), ' or '.join(c.describe for c in checks))


BOOL = Check(lambda v: isinstance(v, bool), 'true or false')
MAPPING = Check(lambda v: isinstance(v, dict), 'a mapping (key: value lines)')
NAME = Check(lambda v: isinstance(v, str) and v.strip() != '' and '/' not in v and v not in ('.', '..'),
             'a non-empty name without "/"')
INT_LIST = Check(lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v), 'a list of integers >= 0')
COMPILE = Check(lambda v: isinstance(v, bool) or (isinstance(v, dict) and isinstance(v.get('mode', 'default'), str)),
                'true, false or a mapping with a mode')
# a network size beyond this is a typo (100000000 features) that would exhaust memory, not a network
MAX_WIDTH = 1 << 14
MAX_DEPTH = 1 << 12

# (key, check): ``*`` matches every key of a mapping, ``[]`` every item of a list. A key that is absent
# (or null) is not checked here: BasicSR and the models say what is required.
OPTION_CHECKS = [
    ('name', NAME),
    ('scale', integer(1, 16)),
    ('num_gpu', either(integer(0), one_of('auto'))),
    ('manual_seed', integer(0)),
    ('datasets.*.gt_size', integer(1)),
    ('datasets.*.lq_size', integer(1)),
    ('datasets.*.batch_size_per_gpu', integer(1)),
    ('datasets.*.num_worker_per_gpu', integer(0)),
    ('datasets.*.dataset_enlarge_ratio', integer(1)),
    ('datasets.*.use_hflip', BOOL),
    ('datasets.*.use_rot', BOOL),
    ('network_g.upscale', integer(1, 16)),
    ('network_g.num_in_ch', integer(1, 64)),
    ('network_g.num_out_ch', integer(1, 64)),
    ('network_g.num_feat', integer(1, MAX_WIDTH)),
    ('network_g.num_fusion_feat', integer(1, MAX_WIDTH)),
    ('network_g.num_block', integer(1, MAX_DEPTH)),
    ('network_g.num_group', integer(1, MAX_DEPTH)),
    ('network_g.reduction', integer(1, MAX_WIDTH)),
    ('network_g.tree_depth', integer(1, 8)),
    ('network_g.tree_width', integer(1, 16)),
    ('network_g.img_range', real(0, low_open=True)),
    ('path.strict_load_g', BOOL),
    ('train.total_iter', integer(1)),
    ('train.warmup_iter', integer(-1)),
    ('train.ema_decay', real(0, 1, high_open=True)),
    ('train.optim_g.lr', real(0, low_open=True)),
    ('train.optim_g.weight_decay', real(0)),
    ('train.scheduler.milestones', INT_LIST),
    ('train.scheduler.gamma', real(0, low_open=True)),
    ('train.phases[].iters', integer(1)),
    ('train.accumulate', integer(1)),
    ('train.compile', COMPILE),
    ('train.nonfinite', one_of('error', 'skip', 'rollback')),
    ('train.rollback', MAPPING),
    ('val.val_freq', either(integer(1), real(1))),
    ('val.save_img', BOOL),
    ('val.metrics.*.crop_border', integer(0)),
    ('val.metrics.*.test_y_channel', BOOL),
    ('logger.print_freq', integer(1)),
    ('logger.save_checkpoint_freq', either(integer(1), real(1))),
    ('logger.use_tb_logger', BOOL),
    ('logger.save_format', one_of('pth', 'safetensors')),
]


def _values(opt, parts, prefix=''):
    """(dotted key, value) of every value ``parts`` names in ``opt`` (wildcards expanded)."""
    if not parts:
        yield prefix, opt
        return
    part, rest = parts[0], parts[1:]
    is_list = part.endswith('[]')
    name = part[:-2] if is_list else part
    if not isinstance(opt, dict):
        return
    keys = list(opt) if name == '*' else [name]
    for key in keys:
        if key not in opt or opt[key] is None:
            continue
        here = f'{prefix}.{key}' if prefix else str(key)
        if is_list:
            if isinstance(opt[key], list):
                for i, item in enumerate(opt[key]):
                    yield from _values(item, rest, f'{here}[{i}]')
        else:
            yield from _values(opt[key], rest, here)


def check_options(opt, source, checks=None):
    """Raise UserError for the first value of ``opt`` that fails its row of :data:`OPTION_CHECKS`.

    Args:
        opt (dict): The options as loaded.
        source (str): The option file, for the message.
        checks (list | None): Rows to use instead of the table.
    """
    if not isinstance(opt, dict):
        raise UserError(f'{source}: an option file is a mapping of keys (name:, network_g:, ...), not a '
                        f'{type(opt).__name__}')
    for key, check in OPTION_CHECKS if checks is None else checks:
        for name, value in _values(opt, key.split('.')):
            if not check.accepts(value):
                raise UserError(f'{source}: {name}={value!r} is not valid; it must be {check.describe}')


def _expanded_nodes(node, memo, limit):
    """Number of values ``node`` stands for once aliases are expanded (stops counting past ``limit``)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once
    total = 1
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    for child in children:
        total += _expanded_nodes(child, memo, limit)
        if total > limit:
            break
    memo[id(node)] = total
    return total


def load_option_text(text, source):
    """Parse option-file text as plain YAML data, with the limits of this module.

    Args:
        text (str | bytes): The file's content (bytes must be UTF-8).
        source (str): The file, for messages.

    Returns:
        The loaded data (usually a dict).

    Raises:
        UserError: too large, not UTF-8, not YAML, a ``!!python`` (or other unknown) tag, or
            too many values once aliases are expanded.
    """
    if len(text) > MAX_OPTION_BYTES:
        raise UserError(f'{source} is {len(text):,} bytes; option files are small text files (limit '
                        f'{MAX_OPTION_BYTES:,} bytes): is it the right file?')
    if isinstance(text, bytes):
        try:
            text = text.decode('utf-8')
        except UnicodeDecodeError as err:
            raise UserError(f'{source} is not UTF-8 text (byte {err.start}: {text[err.start:err.start + 1]!r}); '
                            'save the option file as UTF-8') from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            size = _expanded_nodes(node, {}, MAX_OPTION_NODES)
            if size > MAX_OPTION_NODES:
                raise UserError(f'{source}: its aliases (*name) expand to more than {MAX_OPTION_NODES:,} values; '
                                'an option file needs a few hundred. Remove the nested aliases')
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()
        where = getattr(err, 'problem_mark', None)
        line = f' (line {where.line + 1}, column {where.column + 1})' if where is not None else ''
        raise UserError(f'cannot parse option file {source}{line}: '
                        f'{getattr(err, "problem", None) or (first[0] if first else type(err).__name__)}') from None


def read_option_file(path, flag='-opt', check=True):
    """Load (and with ``check``, check) an option file: missing, unreadable, unsafe or bad values -> UserError."""
    try:
        with open(path, 'rb') as f:
            data = f.read(MAX_OPTION_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f'option file not found: {path!r} (pass {flag} <path to a .yml>)') from None
    except OSError as err:
        raise UserError(f'cannot read option file {path}: {err.strerror or err}') from None
    opt = load_option_text(data, path)
    if check:
        check_options(opt, path)
    return opt


def dump_option_yaml(data):
    """YAML text of an option dict in BasicSR's style (keys in insertion order, block style)."""
    from basicsr.utils.options import ordered_yaml
    return yaml.dump(data, Dumper=ordered_yaml()[1], default_flow_style=False, sort_keys=False)
