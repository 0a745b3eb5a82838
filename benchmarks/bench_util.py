"""What the benchmarks share: the repository on ``sys.path`` and where real photos come from.

The benchmarks run from a checkout (``python benchmarks/<name>.py``), so importing this module
first puts the repository root on ``sys.path``. Real photographs (HR/ and LR/ folders of
same-named PNG pairs, e.g. DRealSR x4 test crops) are never shipped; pass their folder with the
benchmark's flag or set ``D2C_SR_DATA``.
"""
import os
import sys
from os import path as osp

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DATA_ENV = 'D2C_SR_DATA'


def photo_pairs_dir(path, flag):
    """The folder of real HR/LR pairs: ``path`` if given, else ``$D2C_SR_DATA``; exits with a message if neither.

    Args:
        path (str | None): What the user passed with ``flag``.
        flag (str): The benchmark's option, for the message.
    """
    path = path or os.environ.get(DATA_ENV)
    if not path:
        sys.exit(f'error: no real photos: pass {flag} <folder with HR/ and LR/ PNG pairs> or set {DATA_ENV} '
                 '(e.g. the DRealSR x4 test crops; see docs/benchmarks.md)')
    for sub in ('HR', 'LR'):
        if not osp.isdir(osp.join(path, sub)):
            sys.exit(f'error: {osp.join(path, sub)} is not a folder; {flag} / {DATA_ENV} needs HR/ and LR/')
    return path
