"""Shared pieces of the d2c-train / d2c-test entry points around BasicSR's pipelines."""
import os
import re
import subprocess
import sys
import warnings
from os import path as osp

import torch
import torch.distributed as dist

import d2c_compat  # noqa: I001  (must run before the first ``import basicsr``)

d2c_compat.apply()

from basicsr.utils import options as basicsr_options  # noqa: E402
from basicsr.utils.misc import check_resume  # noqa: E402

TRACEBACK_ENV = 'D2C_SR_TRACEBACK'


def normalise_argv(argv, prog):
    """Prepare ``sys.argv`` for BasicSR's ``parse_options`` and check the option file early.

    ``torch.distributed.launch`` on torch >= 2 passes ``--local-rank``; BasicSR's parser only
    knows ``--local_rank``. A missing ``-opt`` file gets a clear message instead of a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [arg.replace('--local-rank', '--local_rank', 1) if arg.startswith('--local-rank') else arg for arg in argv]
    if '-opt' in argv:
        index = argv.index('-opt')
        if index + 1 < len(argv) and not osp.isfile(argv[index + 1]):
            sys.exit(f'{prog}: error: option file not found: {argv[index + 1]!r} (pass -opt <path to a .yml>)')
    sys.argv = [prog] + argv


def init_dist(launcher, backend=None, port=None, **kwargs):
    """BasicSR's ``init_dist`` for GPU and CPU machines alike.

    Stock BasicSR 1.4.2 always uses nccl and ``torch.cuda.set_device``, so it cannot start on
    CPU-only machines. Here the backend defaults to nccl with CUDA and gloo without; an nccl
    request on a machine without CUDA falls back to gloo with a warning. The GPU of a process is
    its ``LOCAL_RANK`` (torchrun) or its rank modulo the GPU count (slurm), as in BasicSR.

    Args:
        launcher (str): 'pytorch' (torchrun / torch.distributed.launch) or 'slurm'.
        backend (str | None): 'nccl', 'gloo' or None (choose as above); from ``dist_params.backend``.
        port (int | None): slurm only: MASTER_PORT (default: $MASTER_PORT or 29500).
    """
    has_cuda = torch.cuda.is_available()
    if backend is None:
        backend = 'nccl' if has_cuda else 'gloo'
    elif backend == 'nccl' and not has_cuda:
        warnings.warn('dist_params.backend is nccl but CUDA is not available; using gloo.', RuntimeWarning)
        backend = 'gloo'
    if launcher == 'pytorch':
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ['RANK']))
    elif launcher == 'slurm':
        proc_id, ntasks = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])
        node_list = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        os.environ['MASTER_PORT'] = str(port or os.environ.get('MASTER_PORT', 29500))
        os.environ['WORLD_SIZE'], os.environ['RANK'] = str(ntasks), str(proc_id)
        local_rank = proc_id % max(1, torch.cuda.device_count())
        os.environ['LOCAL_RANK'] = str(local_rank)
    else:
        raise ValueError(f'--launcher {launcher!r} is not supported; use none, pytorch or slurm.')
    if has_cuda and backend == 'nccl':
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, **kwargs)


def use_plugin_dist_init():
    """Make BasicSR's option parser start distributed runs with :func:`init_dist`."""
    basicsr_options.init_dist = init_dist


def run_pipeline(pipeline, prog):
    """Run a BasicSR pipeline with experiments/ and results/ under the current directory.

    Configuration errors (ValueError, KeyError, FileNotFoundError) are printed as one clear
    line and exit with status 2, a non-finite loss (FloatingPointError) with status 1; set
    D2C_SR_TRACEBACK=1 to see the traceback.
    """
    try:
        pipeline(os.getcwd())
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f'{prog}: error: {message}\n(set {TRACEBACK_ENV}=1 for the full traceback)', file=sys.stderr)
        # 1: training went wrong (non-finite loss); 2: the configuration is wrong
        sys.exit(1 if isinstance(err, FloatingPointError) else 2)


def _map_location(opt):
    if opt['num_gpu'] != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def load_latest_training_state(opt):
    """The newest training state that loads and whose ``net_g_<iter>.pth`` exists, or (None, None).

    Our states and checkpoints are written atomically, but a state written by stock BasicSR
    (or a disk that filled up) may be truncated: such a state is skipped with a warning and the
    previous one is used, so an auto-resumed run loses at most one saving interval more.
    """
    state_dir, models_dir = opt['path']['training_states'], opt['path']['models']
    if not osp.isdir(state_dir):
        return None, None
    iters = sorted((int(m.group(1)) for m in map(re.compile(r'(\d+)\.state').fullmatch, os.listdir(state_dir)) if m),
                   reverse=True)
    for it in iters:
        path = osp.join(state_dir, f'{it}.state')
        # logger.save_format: safetensors writes net_g_<iter>.safetensors instead of .pth
        if not any(osp.isfile(osp.join(models_dir, f'net_g_{it}.{ext}')) for ext in ('pth', 'safetensors')):
            warnings.warn(f'auto_resume: skipping {path}: its network {models_dir}/net_g_{it}.pth is missing.')
            continue
        try:
            return path, torch.load(path, map_location=_map_location(opt), weights_only=False)
        except Exception as err:  # truncated or corrupt: fall back to the previous state
            warnings.warn(f'auto_resume: skipping unreadable {path} ({type(err).__name__}: {err}).')
    return None, None


def load_resume_state(opt):
    """BasicSR's ``load_resume_state`` made device-agnostic and crash-tolerant.

    Stock BasicSR 1.4.2 maps the state onto ``torch.cuda.current_device()`` (fails without a
    GPU) and looks for ``experiments/<name>`` relative to the current directory; this looks in
    the run's own ``training_states`` folder, skips unusable states (see
    :func:`load_latest_training_state`) and maps onto the run's device. Training states
    are written by this program itself and hold scheduler objects' counters, so they are
    loaded with ``weights_only=False``; do not resume from states of unknown origin.
    """
    if opt['auto_resume']:
        state_path, resume_state = load_latest_training_state(opt)
        if state_path is None:
            return None
        opt['path']['resume_state'] = state_path
    else:
        state_path = opt['path'].get('resume_state')
        if not state_path:
            return None
        if not osp.isfile(state_path):
            raise FileNotFoundError(f'path.resume_state: training state not found: {state_path}')
        resume_state = torch.load(state_path, map_location=_map_location(opt), weights_only=False)
    check_resume(opt, resume_state['iter'])
    return resume_state
