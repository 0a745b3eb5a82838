"""The GPU check runs on a CPU machine: CPU rows real and passing, CUDA rows skipped, exit 0, a table and JSON."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'gpu_check.py')


def test_help_names_the_install_command():
    out = subprocess.run([sys.executable, SCRIPT, '--help'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert 'onnxruntime-gpu' in out.stdout and '--budget-s' in out.stdout


def test_bad_budget_is_a_usage_error():
    out = subprocess.run([sys.executable, SCRIPT, '--budget-s', '0'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and '--budget-s must be positive' in out.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason='on a GPU machine run `make gpu-check` itself')
def test_cpu_run_passes_every_cpu_row_and_skips_every_cuda_row(tmp_path):
    report = tmp_path / 'gpu_check.json'
    out = subprocess.run([sys.executable, SCRIPT, '--budget-s', '400', '--json',
                          str(report)],
                         capture_output=True,
                         text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert '| step | device | precision | result | s | value |' in out.stdout
    rows = json.loads(report.read_text())['rows']
    cpu = [r for r in rows if r['device'] == 'cpu']
    cuda = [r for r in rows if r['device'] == 'cuda']
    assert len(cpu) >= 9 and len(cuda) >= 10
    assert all(r['status'] == 'pass' for r in cpu), [r for r in cpu if r['status'] != 'pass']
    assert all(r['status'] == 'skipped' and r['value'] == 'no CUDA device' for r in cuda)
    steps = {r['step'] for r in cpu}
    assert {'train D2C (phase switch)', 'train DAN', 'train SDFlow', 'distributed + SIGKILL + resume'} <= steps


def test_a_failing_step_is_a_row_not_the_end(tmp_path):
    """A step that fails (here: its time limit) is reported and the check goes on; the exit status says so."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import gpu_check
    status, value, seconds, _ = gpu_check.run_step('train DAN', 'cpu', 'fp32', 0.5, keep=False)
    assert status == 'fail' and 'timed out' in value and seconds < 30
