"""Shared pieces of the d2c-train / d2c-test entry points around BasicSR's pipelines."""
import os
import sys
import torch
from os import path as osp

from basicsr.utils import scandir
from basicsr.utils.misc import check_resume

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


def run_pipeline(pipeline, prog):
    """Run a BasicSR pipeline with experiments/ and results/ under the current directory.

    Configuration errors (ValueError, KeyError, FileNotFoundError) are printed as one clear
    line and exit with status 2; set D2C_SR_TRACEBACK=1 to see the traceback.
    """
    try:
        pipeline(os.getcwd())
    except (ValueError, KeyError, FileNotFoundError) as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f'{prog}: error: {message}\n(set {TRACEBACK_ENV}=1 for the full traceback)', file=sys.stderr)
        sys.exit(2)


def latest_training_state(state_dir):
    """Path of the newest complete ``<iter>.state`` in ``state_dir``, or None."""
    if not osp.isdir(state_dir):
        return None
    iters = [int(name[:-len('.state')]) for name in scandir(state_dir, suffix='.state') if name[:-6].isdigit()]
    return osp.join(state_dir, f'{max(iters)}.state') if iters else None


def load_resume_state(opt):
    """BasicSR's ``load_resume_state`` made device-agnostic.

    Stock BasicSR 1.4.2 maps the state onto ``torch.cuda.current_device()`` (fails without a
    GPU) and looks for ``experiments/<name>`` relative to the current directory; this looks in
    the run's own ``training_states`` folder and maps onto the run's device. Training states
    are written by this program itself and hold scheduler objects' counters, so they are
    loaded with ``weights_only=False``; do not resume from states of unknown origin.
    """
    if opt['auto_resume']:
        state_path = latest_training_state(opt['path']['training_states'])
        if state_path is not None:
            opt['path']['resume_state'] = state_path
    else:
        state_path = opt['path'].get('resume_state')
    if not state_path:
        return None
    if not osp.isfile(state_path):
        raise FileNotFoundError(f'path.resume_state: training state not found: {state_path}')
    if opt['num_gpu'] != 0 and torch.cuda.is_available():
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    resume_state = torch.load(state_path, map_location=device, weights_only=False)
    check_resume(opt, resume_state['iter'])
    return resume_state
