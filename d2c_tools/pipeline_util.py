"""Shared pieces of the d2c-train / d2c-test entry points around BasicSR's pipelines."""
import os
import re
import shutil
import subprocess
import sys
import warnings
from os import path as osp

import torch
import torch.distributed as dist

from basicsr.utils import options as basicsr_options
from basicsr.utils.misc import check_resume
from d2c_utils import data_guard
from d2c_utils.errors import UserError, report_interrupt, report_user_error
from d2c_utils.option_check import check_options, read_option_file
from d2c_utils.output_util import is_disk_full

TRACEBACK_ENV = 'D2C_SR_TRACEBACK'
# the experiment / results folder of the run and whether it existed before (see remove_failed_start)
_RUN_FOLDER = {}


def normalise_argv(argv, prog):
    """Prepare ``sys.argv`` for BasicSR's ``parse_options`` and check the option file early.

    ``torch.distributed.launch`` on torch >= 2 passes ``--local-rank``; BasicSR's parser only
    knows ``--local_rank``. The ``-opt`` file is loaded here first with the limits of
    :func:`d2c_utils.option_check.load_option_text` (BasicSR's own loader has none): a missing,
    unparsable or unsafe file, or a bad option value, exits with status 2 and one line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [arg.replace('--local-rank', '--local_rank', 1) if arg.startswith('--local-rank') else arg for arg in argv]
    if '-opt' in argv:
        index = argv.index('-opt')
        if index + 1 < len(argv):
            try:  # the values are checked once BasicSR applied --force_yml (checked_parse_options)
                opt = read_option_file(argv[index + 1], check=False)
            except UserError as err:
                print(f'{prog}: error: {err}', file=sys.stderr)
                sys.exit(2)
            check_metric_weights(opt, prog)
    sys.argv = [prog] + argv


def check_metric_weights(opt, prog):
    """Stop now (``<prog>: error: ...``, exit 2) if a perceptual metric of ``val.metrics`` lacks its weight files.

    Without this a missing LPIPS/DISTS backbone would only show at the first validation.

    Args:
        opt (dict): The option file as read by :func:`d2c_utils.option_check.read_option_file`.
    """
    metrics = ((opt or {}).get('val') or {}).get('metrics') if isinstance(opt, dict) else None
    if not isinstance(metrics, dict):
        return
    from d2c_metrics.perceptual_metric import check_weight_files
    try:
        check_weight_files(metrics)
    except UserError as err:
        sys.exit(report_user_error(prog, err))


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


def checked_parse_options(parse_options):
    """Wrap BasicSR's ``parse_options``: option values checked (after ``--force_yml``) before any folder is made.

    Also records the run's experiment (results) folder and whether it existed, for
    :func:`remove_failed_start`.
    """

    def parse(root_path, is_train=True):
        opt, args = parse_options(root_path, is_train)
        check_options(opt, args.opt)
        folder = opt['path'].get('experiments_root' if is_train else 'results_root')
        if folder:
            _RUN_FOLDER.update(path=folder, existed=osp.exists(folder))
        return opt, args

    parse.wrapped = parse_options
    return parse


def remove_failed_start():
    """Remove the experiment (results) folder a failed run made, if it holds nothing but logs and option files."""
    folder = _RUN_FOLDER.get('path')
    if not folder or _RUN_FOLDER.get('existed') or not osp.isdir(folder):
        return
    for _, _, names in os.walk(folder):
        if any(not name.endswith(('.log', '.yml', '.yaml')) for name in names):
            return  # checkpoints, states or images: keep them
    shutil.rmtree(folder, ignore_errors=True)


def final_validation_iter():
    """Make BasicSR's validation after the last iteration report ``total_iter``, not ``total_iter + 1``.

    BasicSR's training loop leaves its counter one past the end, so the final validation logged
    "Best ... @ 5 iter" on a 4-iteration run.
    """
    from basicsr.models.base_model import BaseModel
    if hasattr(BaseModel.validation, 'wrapped'):
        return
    validation = BaseModel.validation

    def clamped(self, dataloader, current_iter, tb_logger, save_img=False):
        total = (self.opt.get('train') or {}).get('total_iter') if self.is_train else None
        if isinstance(total, int) and current_iter > total:
            current_iter = total
        return validation(self, dataloader, current_iter, tb_logger, save_img)

    clamped.wrapped = validation
    BaseModel.validation = clamped


def _one_line(err):
    """The message of ``err``; for an error re-raised from a DataLoader worker, the worker's own message."""
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if 'Original Traceback' in message:  # torch's ExceptionWrapper: the last line is "Type: message"
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(': ', 1)[1] if ': ' in last else last
    return message


def run_pipeline(pipeline, prog):
    """Run a BasicSR pipeline with experiments/ and results/ under the current directory.

    Configuration and data errors (ValueError, KeyError, FileNotFoundError, a full disk) are
    printed as one clear line and exit with status 2, a non-finite loss (FloatingPointError)
    with status 1, Ctrl-C with 130; set D2C_SR_TRACEBACK=1 to see the traceback. A run that
    failed before writing anything but logs leaves no experiments/<name>/ (results/<name>/).
    """
    names = pipeline.__globals__
    if 'parse_options' in names:  # BasicSR's train and test pipelines
        names['parse_options'] = checked_parse_options(
            getattr(names['parse_options'], 'wrapped', names['parse_options']))
    data_guard.apply()
    final_validation_iter()
    try:
        pipeline(os.getcwd())
    except KeyboardInterrupt:  # the log of an interrupted run is kept, whatever it holds
        sys.exit(report_interrupt(prog))
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and not is_disk_full(err):
            raise
        remove_failed_start()
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = _one_line(err)
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            message = f'disk full: {message}; free some space (checkpoints and states are written whole or not at all)'
        print(f'{prog}: error: {message}\n(set {TRACEBACK_ENV}=1 for the full traceback)', file=sys.stderr)
        # 1: training went wrong (non-finite loss); 2: the configuration, the data or the disk is wrong
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
