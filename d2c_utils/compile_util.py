"""``torch.compile`` for training (``train.compile``) and ``d2c-infer --compile``, with an eager fall-back.

``torch.compile`` is lazy: a backend that cannot compile (no C++ compiler for inductor, an
unsupported Python or platform) fails at the first call, not when ``torch.compile`` returns. A
:class:`CompiledCall` runs the compiled function and, if compiling fails, warns once and runs the
eager function from then on, so an option meant to speed things up never stops a run.
"""
import torch

from .errors import UserError

# torch.compile's modes (see torch.compile's docstring); None is its default
COMPILE_MODES = (None, 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
COMPILE_KEYS = ('mode', 'backend', 'dynamic', 'fullgraph')
# modules whose exceptions mean "could not compile" (the eager function can still run)
_COMPILER_MODULES = ('torch._dynamo', 'torch._inductor', 'torch._functorch', 'torch.fx', 'torch._subclasses')


def compile_options(value, key='train.compile'):
    """``torch.compile`` keyword arguments for an option value, or None (do not compile).

    Args:
        value: ``false`` / ``null`` (off), ``true`` (torch's defaults), a mode name, or a dict with
            ``mode``, ``backend``, ``dynamic``, ``fullgraph`` (passed to ``torch.compile``).
        key (str): How the user sets it, for the error message.

    Raises:
        UserError: an unknown key, mode or value type.
    """
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, str):
        value = {'mode': value}
    if not isinstance(value, dict):
        raise UserError(f'{key}={value!r}; use true, false or {{mode: max-autotune, backend: inductor, dynamic: '
                        'null, fullgraph: false}')
    unknown = sorted(set(value) - set(COMPILE_KEYS))
    if unknown:
        raise UserError(f'{key}: unknown keys {unknown}; known: {list(COMPILE_KEYS)}')
    if value.get('mode') not in COMPILE_MODES:
        raise UserError(f'{key}.mode={value["mode"]!r}; use one of {[m for m in COMPILE_MODES if m]}')
    for flag in ('dynamic', 'fullgraph'):
        if value.get(flag) not in (None, True, False):
            raise UserError(f'{key}.{flag}={value[flag]!r}; use true, false (or null for dynamic)')
    if 'backend' in value and not isinstance(value['backend'], str):
        raise UserError(f'{key}.backend={value["backend"]!r}; name a backend of torch._dynamo.list_backends(), '
                        'e.g. inductor')
    options = {k: v for k, v in value.items() if v is not None}
    # static shapes unless asked: D2CNet's forward sees (N, 3, h, w) images and (N, P, 3, H, W) branch stacks,
    # so automatic dynamic shapes would kick in, and inductor (torch 2.14, CPU) fails on those graphs
    options.setdefault('dynamic', False)
    return options


def is_compile_error(err):
    """True if ``err`` (or an exception it was raised from) comes from torch's compiler stack."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__module__.startswith(_COMPILER_MODULES):
            return True
        err = err.__cause__ or err.__context__
    return False


class CompiledCall:
    """``fn`` compiled with ``torch.compile(**options)``, falling back to ``fn`` with one warning.

    Args:
        fn (callable): A module (or a module's ``forward``); called as is when compiling fails.
        options (dict): ``torch.compile`` keyword arguments (see :func:`compile_options`).
        warn (callable): ``warn(message)``, called at most once.
        name (str): What is compiled, for the warning.

    Attributes:
        compiled (callable | None): The compiled function; None after a fall-back.
    """

    def __init__(self, fn, options, warn, name='the network'):
        self.eager = fn
        self.name = name
        self.warn = warn
        try:
            self.compiled = torch.compile(fn, **options)
        except Exception as err:  # e.g. "Dynamo is not supported on Python 3.x", an unknown backend
            self.compiled = None
            self._fall_back(err)

    def _fall_back(self, err):
        self.compiled = None
        first = (str(err).strip().splitlines() or [''])[0][:300]
        self.warn(f'torch.compile cannot compile {self.name} here ({type(err).__name__}: {first}); running it '
                  'eagerly (same results, no speed-up). Set train.compile: false (d2c-infer: drop --compile) to '
                  'silence this.')

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:
                if not is_compile_error(err):
                    raise
                # dynamo also wraps the network's own errors (a wrong input shape): if eager fails too, that
                # error is the one to show, and compiling stays on
                result = self.eager(*args, **kwargs)
                self._fall_back(err)
                return result
        return self.eager(*args, **kwargs)
