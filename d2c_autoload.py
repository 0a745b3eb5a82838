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

The same finder waits for ``import spandrel`` (the model loader of chaiNNer and ComfyUI):
once spandrel has finished importing, it adds D2C-SR to ``spandrel.MAIN_REGISTRY``
(:func:`d2c_deploy.spandrel_util.install`), so ``ModelLoader().load_from_file`` loads D2C-SR
checkpoints. Only the first D2C-SR model loaded imports ``d2c_arch`` (and with it basicsr, through
the hook above); importing spandrel imports nothing of basicsr.

Guarantees:

* Nothing heavy at start-up: this module imports only the standard library; torch is
  imported only when the program itself imports basicsr or spandrel.
* BasicSR and spandrel never break because of the plugin: any error while importing or
  registering the plugin becomes a warning and the module is returned as usual.
* Opt-out: set the environment variable ``D2C_SR_NO_AUTOLOAD=1`` (both hooks).
"""
import importlib.abc
import os
import sys
import warnings

OPT_OUT_ENV = 'D2C_SR_NO_AUTOLOAD'
PLUGIN_PACKAGES = ('d2c_arch', 'd2c_data', 'd2c_losses', 'd2c_metrics', 'd2c_model')


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


def _register_with_spandrel():
    try:
        # d2c_utils/__init__ and spandrel_util import nothing heavy: no basicsr, no d2c_arch until a D2C model loads
        from d2c_deploy.spandrel_util import install as install_in_spandrel
        install_in_spandrel()
    except Exception as err:  # never break spandrel (and the program loading models with it) because of the plugin
        warnings.warn(
            f'd2c-sr: could not register D2C-SR with spandrel ({type(err).__name__}: {err}); spandrel works as '
            f'usual without D2C-SR models. Set {OPT_OUT_ENV}=1 to silence this.', RuntimeWarning)


def _apply_compat():
    try:
        import d2c_compat
        d2c_compat.apply()
    except Exception as err:
        warnings.warn(f'd2c-sr: compatibility shims failed ({type(err).__name__}: {err}).', RuntimeWarning)


# module -> (before its code runs, after it has finished importing)
HOOKS = {
    'basicsr': (_apply_compat, _load_plugin),
    'spandrel': (None, _register_with_spandrel),
}


class _LoaderWithPlugin(importlib.abc.Loader):
    """Wraps a hooked module's own loader: its ``HOOKS`` entry before and after ``exec_module``."""

    def __init__(self, loader, before=None, after=None):
        self._loader = loader
        self._before = before
        self._after = after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._before is not None:
            self._before()
        self._loader.exec_module(module)
        if self._after is not None:
            self._after()

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Finds ``names`` (of ``HOOKS``) with the other finders and wraps their loaders."""

    def __init__(self, names):
        self.names = tuple(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _LoaderWithPlugin(spec.loader, *HOOKS[fullname])
                return spec
        return None


def install():
    """Add the finder to ``sys.meta_path``; True if it was added.

    Idempotent; a no-op if opted out. Modules already imported are not hooked again: for
    basicsr the plugin is then not registered (as before), spandrel gets D2C-SR right away.
    """
    if os.environ.get(OPT_OUT_ENV, '').strip() not in ('', '0'):
        return False
    if any(isinstance(f, _PluginFinder) for f in sys.meta_path):
        return False
    if 'spandrel' in sys.modules:
        _register_with_spandrel()
    names = [name for name in HOOKS if name not in sys.modules]
    if not names:
        return False
    sys.meta_path.insert(0, _PluginFinder(names))
    return True
