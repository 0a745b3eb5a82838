"""The plugin reaches BasicSR's own entry points from a fresh interpreter."""
import os
import shutil
import subprocess
import sys

import pytest
from conftest import make_pairs, tiny_train_opt, write_yaml

import basicsr
import d2c_compat


def run_python(code, env_extra=None, cwd=None, args=()):
    env = dict(os.environ)
    env.pop('D2C_SR_NO_AUTOLOAD', None)
    env.update(env_extra or {})
    cmd = [sys.executable] + (['-c', code] if code is not None else []) + list(args)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_fresh_interpreter_finds_plugin_through_basicsr_alone():
    result = run_python('import sys; assert "torch" not in sys.modules, "torch imported at start-up"\n'
                        'import basicsr\n'
                        'from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY\n'
                        'print("D2CNet" in ARCH_REGISTRY, "DivergenceLoss" in LOSS_REGISTRY,\n'
                        '      "ConvergenceLoss" in LOSS_REGISTRY, "D2CModel" in MODEL_REGISTRY)')
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['True', 'True', 'True', 'True']


def test_opt_out_environment_variable():
    result = run_python(
        'import basicsr\nfrom basicsr.utils.registry import ARCH_REGISTRY\n'
        'print("D2CNet" in ARCH_REGISTRY)', {'D2C_SR_NO_AUTOLOAD': '1'})
    torchvision_has_legacy = run_python(f'import importlib.util as u; '
                                        f'print(u.find_spec("{d2c_compat.LEGACY_MODULE}") is not None)')
    if torchvision_has_legacy.stdout.strip() == 'True':
        assert result.returncode == 0 and result.stdout.strip() == 'False'
    else:  # nothing of the plugin ran: stock basicsr fails as it does without the plugin
        assert result.returncode != 0 and 'functional_tensor' in result.stderr


def test_broken_plugin_warns_and_basicsr_still_works(tmp_path):
    broken = tmp_path / 'd2c_losses'
    broken.mkdir()
    (broken / '__init__.py').write_text('raise RuntimeError("simulated breakage")\n')
    result = run_python(
        'import warnings; warnings.simplefilter("always")\n'
        'import basicsr\nfrom basicsr.archs import build_network\n'
        'net = build_network({"type": "RCAN", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 16,\n'
        '                     "num_group": 1, "num_block": 1, "upscale": 2})\nprint("ok")',
        {'PYTHONPATH': str(tmp_path)},
        cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith('ok')
    assert 'could not register d2c_losses' in result.stderr and 'simulated breakage' in result.stderr


def _tiny_yaml(tmp_path, name):
    make_pairs(str(tmp_path / 'data' / 'train'), seed=0)
    make_pairs(str(tmp_path / 'data' / 'val'), seed=1)
    opt = tiny_train_opt(str(tmp_path / 'data'), name=name, phases=(('divergence', 2), ('convergence', 1)))
    opt['val']['val_freq'] = 100
    opt['logger']['save_checkpoint_freq'] = 100
    return write_yaml(tmp_path / f'{name}.yml', opt)


def test_stock_basicsr_train_script_from_a_checkout(tmp_path):
    """``python basicsr/train.py -opt ...`` run from a BasicSR checkout trains a D2CNet."""
    checkout = tmp_path / 'BasicSR'
    (checkout / 'basicsr').mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(basicsr.__file__), 'train.py'), checkout / 'basicsr' / 'train.py')
    yml = _tiny_yaml(tmp_path, 'stock_checkout_d2c')
    result = run_python(None, cwd=str(checkout), args=['basicsr/train.py', '-opt', yml])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (checkout / 'experiments' / 'stock_checkout_d2c' / 'models' / 'net_g_latest.pth').is_file()


def test_stock_python_m_basicsr_train(tmp_path):
    """``python -m basicsr.train`` (root = the installed package's parent) finds the plugin too."""
    name = 'stock_module_d2c_test'
    yml = _tiny_yaml(tmp_path, name)
    root = os.path.abspath(os.path.join(os.path.dirname(basicsr.__file__), os.pardir))
    exp_dir = os.path.join(root, 'experiments', name)
    try:
        result = run_python(None, cwd=str(tmp_path), args=['-m', 'basicsr.train', '-opt', yml])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "No object named" not in result.stderr
        assert os.path.isfile(os.path.join(exp_dir, 'models', 'net_g_latest.pth'))
    finally:
        shutil.rmtree(exp_dir, ignore_errors=True)
        if os.path.isdir(os.path.join(root, 'experiments')) and not os.listdir(os.path.join(root, 'experiments')):
            os.rmdir(os.path.join(root, 'experiments'))


def test_compat_shim_imports_nothing_and_serves_the_old_module_only_when_torchvision_lacks_it():
    """Applying costs nothing (no torch, no torchvision); BasicSR's import then gets rgb_to_grayscale either way."""
    result = run_python(
        'import sys, d2c_compat\n'
        'print(d2c_compat.apply(), "torchvision" in sys.modules, "torch" in sys.modules)\n'
        f'import {d2c_compat.LEGACY_MODULE} as legacy\n'
        'from torchvision.transforms.functional import rgb_to_grayscale\n'
        'print(legacy.rgb_to_grayscale is rgb_to_grayscale, legacy.__doc__.startswith("d2c_compat"))',
        {'D2C_SR_NO_AUTOLOAD': '1'})
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()
    assert first == '[] False False'  # applied when d2c_compat was imported: the call is a no-op
    has_legacy = run_python(f'import importlib.util as u; print(u.find_spec("{d2c_compat.LEGACY_MODULE}") is not None)')
    if has_legacy.stdout.strip() == 'True':  # torchvision < 0.17: its own module, the shim never acts
        assert second.split()[1] == 'False'
    else:
        assert second == 'True True'


def test_compat_shim_is_idempotent(monkeypatch):
    monkeypatch.setattr(sys, 'meta_path',
                        [f for f in sys.meta_path if not isinstance(f, d2c_compat._LegacyModuleFinder)])
    monkeypatch.delitem(sys.modules, d2c_compat.LEGACY_MODULE, raising=False)
    assert d2c_compat.apply() == [d2c_compat.LEGACY_MODULE]
    assert d2c_compat.apply() == []
    assert sum(isinstance(f, d2c_compat._LegacyModuleFinder) for f in sys.meta_path) == 1


@pytest.mark.parametrize('module', ['d2c_tools.train', 'd2c_tools.test', 'd2c_model.train', 'd2c_model.test'])
def test_entry_points_have_help(module):
    result = run_python(None, args=['-m', module, '--help'])
    assert result.returncode == 0 and '-opt' in result.stdout


@pytest.mark.parametrize('module', ['d2c_model.infer', 'd2c_model.summary'])
def test_old_module_spellings_of_the_tools_still_work(module):
    result = run_python(None, args=['-m', module, '--help'])
    assert result.returncode == 0 and '--model' in result.stdout and module.split('.')[1] in result.stdout


def test_every_console_script_answers_help_without_importing_torch():
    """--help parses before the library is imported (issue 24: start-up well under a second)."""
    import importlib.metadata
    scripts = [e for e in importlib.metadata.entry_points(group='console_scripts') if e.value.startswith('d2c_tools.')]
    assert len(scripts) >= 9
    for entry in scripts:
        module, func = entry.value.split(':')
        code = (f'import sys\nfrom {module} import {func} as main\ntry:\n    main(["--help"])\nexcept SystemExit:\n'
                '    pass\nprint(sorted(m for m in ("torch", "basicsr", "torchvision") if m in sys.modules))')
        result = run_python(code)
        assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == '[]', (entry.name, result)
