"""Make BasicSR's own entry points find D2C-SR, with no edit to the user's code.

BasicSR only scans its own folders for ``*_arch.py`` / ``*_model.py`` / ``*_loss.py``, so a
plugin's classes are unknown to ``python -m basicsr.train`` or a BasicSR checkout's
``basicsr/train.py`` ("No object named 'D2CNet' found in 'arch' registry!").

``pip install`` puts ``d2c_sr_autoload.pth`` into site-packages. Python runs its one line
at start-up, which calls :func:`install`: it adds a finder to ``sys.meta_path`` that does
nothing until something imports ``basicsr``. Then it

1. applies :mod:`d2c_compat` (so ``import basicsr`` works on torchvision >= 0.17), and
2. once ``basicsr`` has finished importing, imports ``d2c_arch``, ``d2c_losses``,
   ``d2c_metrics`` and ``d2c_model``, whose decorators register D2CNet, the losses, the
   authors' metrics and D2CModel.

Guarantees:

* Nothing heavy at start-up: this module imports only the standard library; torch is
  imported only when the program itself imports basicsr.
* BasicSR never breaks because of the plugin: any error while importing the plugin
  becomes a warning and basicsr is returned as usual.
* Opt-out: set the environment variable ``D2C_SR_NO_AUTOLOAD=1``.
"""
import importlib.abc
import os
import sys
import warnings

OPT_OUT_ENV = 'D2C_SR_NO_AUTOLOAD'
PLUGIN_PACKAGES = ('d2c_arch', 'd2c_losses', 'd2c_metrics', 'd2c_model')


def _load_plugin():
    if any(name in sys.modules for name in PLUGIN_PACKAGES):
        # the plugin itself is importing basicsr; its packages import each other as needed
        return
    for name in PLUGIN_PACKAGES:
        try:
            __import__(name)
        except Exception as err:  # never break basicsr because of the plugin
            warnings.warn(
                f'd2c-sr: could not register {name} with BasicSR ({type(err).__name__}: {err}); '
                f'BasicSR works as usual without D2C-SR. Set {OPT_OUT_ENV}=1 to silence this.', RuntimeWarning)


class _LoaderWithPlugin(importlib.abc.Loader):
    """Wraps basicsr's own loader: shims before, plugin registration after."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            import d2c_compat
            d2c_compat.apply()
        except Exception as err:
            warnings.warn(f'd2c-sr: compatibility shims failed ({type(err).__name__}: {err}).', RuntimeWarning)
        self._loader.exec_module(module)
        _load_plugin()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _BasicSRFinder(importlib.abc.MetaPathFinder):
    """Finds ``basicsr`` with the other finders and wraps its loader once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'basicsr':
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _LoaderWithPlugin(spec.loader)
                return spec
        return None


def install():
    """Add the finder to ``sys.meta_path`` (idempotent; no-op if opted out or basicsr is loaded)."""
    if os.environ.get(OPT_OUT_ENV, '').strip() not in ('', '0'):
        return False
    if 'basicsr' in sys.modules or any(isinstance(f, _BasicSRFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _BasicSRFinder())
    return True
