"""Compatibility shims that let BasicSR 1.4.2 run on today's PyTorch stack.

BasicSR 1.4.2 (the newest release on PyPI) does, in ``basicsr/data/degradations.py``::

    from torchvision.transforms.functional_tensor import rgb_to_grayscale

torchvision 0.17 removed that private module (the function now lives in
``torchvision.transforms.functional``), so ``import basicsr`` fails with
``No module named 'torchvision.transforms.functional_tensor'``.

:func:`apply` appends a finder to ``sys.meta_path`` that is asked only when no other finder has
the old module: then it supplies a stand-in that re-exports ``rgb_to_grayscale`` from its new
home. Where torchvision still ships the old module, the real one is found first and the finder
never acts. Applying costs nothing: it imports neither torch nor torchvision (importing
torchvision to look for the old module would cost seconds, and a tool answering ``--help`` needs
neither). Importing this module applies it, so a package needs one line::

    import d2c_compat  # noqa: F401  (before the first ``import basicsr``)

The start-up hook :mod:`d2c_autoload` applies it when anything imports ``basicsr``; the plugin's
packages that import basicsr import this module first, for interpreters without the hook
(``D2C_SR_NO_AUTOLOAD=1``, a source checkout). Nothing in site-packages is edited.
"""
import importlib.abc
import importlib.util
import sys

LEGACY_MODULE = 'torchvision.transforms.functional_tensor'


class _LegacyModuleLoader(importlib.abc.Loader):
    """Fills the stand-in module; runs only when BasicSR imports the old module (torchvision is being imported)."""

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        from torchvision.transforms import functional

        module.__doc__ = 'd2c_compat stand-in: re-exports rgb_to_grayscale from torchvision.transforms.functional.'
        module.rgb_to_grayscale = functional.rgb_to_grayscale


class _LegacyModuleFinder(importlib.abc.MetaPathFinder):
    """Last in ``sys.meta_path``: reached only when torchvision itself has no ``functional_tensor``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != LEGACY_MODULE:
            return None
        return importlib.util.spec_from_loader(fullname, _LegacyModuleLoader())


def apply():
    """Install the shims not installed yet; return their module names (``[]`` when there is nothing to do).

    Idempotent and free: nothing is imported until BasicSR imports the old module.
    """
    if LEGACY_MODULE in sys.modules or any(isinstance(f, _LegacyModuleFinder) for f in sys.meta_path):
        return []
    sys.meta_path.append(_LegacyModuleFinder())
    return [LEGACY_MODULE]


apply()
