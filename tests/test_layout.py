"""The packages import only downward (docs/development.md, Layout): no cycles, training never imports deployment."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each package and the packages of ours it may import (the table in docs/development.md)
ALLOWED = {
    'd2c_utils': set(),
    'd2c_arch': {'d2c_utils'},
    'd2c_data': {'d2c_utils'},
    'd2c_losses': {'d2c_utils'},
    'd2c_metrics': {'d2c_utils'},
    'd2c_inference': {'d2c_utils', 'd2c_arch', 'd2c_data', 'd2c_losses', 'd2c_metrics'},
    'd2c_convert': {'d2c_utils', 'd2c_arch', 'd2c_data', 'd2c_losses', 'd2c_metrics', 'd2c_inference'},
    'd2c_deploy': {'d2c_utils', 'd2c_arch', 'd2c_data', 'd2c_losses', 'd2c_metrics', 'd2c_inference'},
    'd2c_model': {'d2c_utils', 'd2c_arch', 'd2c_data', 'd2c_losses', 'd2c_metrics', 'd2c_inference'},
    'd2c_tools': set(),  # filled below: the tools sit on top
}
ALLOWED['d2c_tools'] = set(ALLOWED) - {'d2c_tools'}


def imported_packages(package):
    """{imported package of ours: [file:line, ...]} for every import statement of ``package`` (in functions too)."""
    found = {}
    folder = os.path.join(ROOT, package)
    for name in sorted(os.listdir(folder)):
        if not name.endswith('.py'):
            continue
        path = os.path.join(folder, name)
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split('.')[0]
                if top in ALLOWED and top != package:
                    found.setdefault(top, []).append(f'{package}/{name}:{node.lineno}')
    return found


def test_every_package_is_in_the_table():
    packages = {
        n
        for n in os.listdir(ROOT) if n.startswith('d2c_') and os.path.isfile(os.path.join(ROOT, n, '__init__.py'))
    }
    assert packages == set(ALLOWED), 'add the new package to ALLOWED and to docs/development.md (Layout)'


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_package_imports_only_downward(package):
    wrong = {top: where for top, where in imported_packages(package).items() if top not in ALLOWED[package]}
    assert not wrong, f'{package} imports packages above it or beside it: {wrong}'


def test_no_cycles_between_packages():
    graph = {package: set(imported_packages(package)) for package in ALLOWED}
    for package, targets in graph.items():
        for target in targets:
            assert package not in graph[target], f'{package} and {target} import each other'


def test_tests_mirror_the_packages():
    """tests/test_<role>/ for every package d2c_<role>/ (BasicSR mirrors basicsr/ in tests/ the same way)."""
    tests = os.path.join(ROOT, 'tests')
    folders = {
        name
        for name in os.listdir(tests) if name.startswith('test_') and os.path.isdir(os.path.join(tests, name))
    }
    assert {f'test_{package[4:]}' for package in ALLOWED} <= folders
    names = [name for folder in folders for name in os.listdir(os.path.join(tests, folder)) if name.endswith('.py')]
    assert len(names) == len(
        set(names)), 'test module names must be unique across tests/* (conftest puts all on sys.path)'


def test_training_never_imports_deployment():
    """Importing the models (what d2c-train runs) loads nothing of d2c_deploy, not even indirectly."""
    code = ('import sys, d2c_model, d2c_tools.pipeline_util\n'
            'print(sorted(m for m in sys.modules if m.startswith("d2c_deploy")))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'
