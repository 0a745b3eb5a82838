"""Compatibility shims that let BasicSR 1.4.2 run on today's PyTorch stack.

BasicSR 1.4.2 (the newest release on PyPI) does, in ``basicsr/data/degradations.py``::

    from torchvision.transforms.functional_tensor import rgb_to_grayscale

torchvision 0.17 removed that private module (the function now lives in
``torchvision.transforms.functional``), so ``import basicsr`` fails with
``No module named 'torchvision.transforms.functional_tensor'``.

:func:`apply` registers a tiny stand-in module under the old name that re-exports
``rgb_to_grayscale`` from its new home. It must run before ``basicsr`` is first
imported; every package of this plugin calls it at the top of its ``__init__``,
and the start-up hook in :mod:`d2c_autoload` calls it when anything imports
``basicsr``. Where torchvision still ships the old module, it does nothing.
Nothing in site-packages is edited.
"""
import importlib.util
import sys
import types

LEGACY_MODULE = 'torchvision.transforms.functional_tensor'


def apply():
    """Install the shims that are needed; return the names of those installed.

    Idempotent and cheap after the first call.
    """
    installed = []
    if LEGACY_MODULE in sys.modules:
        return installed
    try:
        has_legacy = importlib.util.find_spec(LEGACY_MODULE) is not None
    except ImportError:  # torchvision itself is missing: basicsr will report that clearly
        return installed
    if not has_legacy:
        from torchvision.transforms import functional

        shim = types.ModuleType(LEGACY_MODULE)
        shim.__doc__ = 'd2c_compat stand-in: re-exports rgb_to_grayscale from torchvision.transforms.functional.'
        shim.rgb_to_grayscale = functional.rgb_to_grayscale
        sys.modules[LEGACY_MODULE] = shim
        installed.append(LEGACY_MODULE)
    return installed
