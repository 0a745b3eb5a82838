"""Data errors that name the file: BasicSR's file client checked, LMDBs checked before use and shared.

BasicSR 1.4.2 decodes what its ``FileClient`` returns without looking: a truncated PNG becomes
``None`` and fails later as ``AttributeError: 'NoneType' ...`` without the file's name, a
truncated LMDB ``data.mdb`` is memory-mapped and read past its end (a bus error, exit 135), and
a training and a validation set in one LMDB fail with ``lmdb.Error: already open``.
:func:`apply` makes every read go through :func:`checked_get` (the file or LMDB key named in a
:class:`UserError`) and every LMDB through :func:`open_lmdb` (checked, one environment per
folder and process). d2c-train and d2c-test apply it before BasicSR's pipelines run.
"""
import os
import sys
import threading
from os import path as osp

from .errors import ImageError, UserError
from .img_util import JPEG_SIGNATURE, PNG_SIGNATURE, check_container

# one environment per (process, LMDB folder): py-lmdb refuses to open a folder twice in a process,
# and an environment must not be used across fork() (DataLoader workers open their own)
_ENVIRONMENTS = {}
_LOCK = threading.Lock()
_last_read = threading.local()


def check_lmdb(path):
    """Open an LMDB folder read-only after checking that data.mdb holds every page its header counts.

    Returns:
        lmdb.Environment

    Raises:
        UserError: not an LMDB folder, unreadable, or truncated (which would otherwise be a bus error
            on the first read past the file's end).
    """
    import lmdb
    data = osp.join(path, 'data.mdb')
    if not osp.isfile(data):
        raise UserError(f'LMDB {path}: no data.mdb there; make the LMDB with scripts/prepare_data.py or fix '
                        'dataroot_gt / dataroot_lq')
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False)
    except lmdb.Error as err:
        raise UserError(f'LMDB {path}: cannot open it ({err}); is data.mdb complete?') from None
    try:
        needed = (env.info()['last_pgno'] + 1) * env.stat()['psize']
    except lmdb.Error as err:
        env.close()
        raise UserError(f'LMDB {path}: cannot read its header ({err}); rebuild it') from None
    size = osp.getsize(data)
    if size < needed:
        env.close()
        raise UserError(f'LMDB {path}: data.mdb is truncated ({size:,} bytes; its header counts {needed:,}); copy it '
                        'again or rebuild it with scripts/prepare_data.py')
    return env


def open_lmdb(path):
    """The checked read-only environment of ``path`` for this process (shared by every data set using it)."""
    key = (os.getpid(), osp.realpath(path))
    with _LOCK:
        if key not in _ENVIRONMENTS:
            _ENVIRONMENTS[key] = check_lmdb(path)
        return _ENVIRONMENTS[key]


def _lmdb_backend_init(self, db_paths, client_keys='default', readonly=True, lock=False, readahead=False, **kwargs):
    """BasicSR's ``LmdbBackend.__init__`` through :func:`open_lmdb` (read-only, no lock, no readahead)."""
    client_keys = [client_keys] if isinstance(client_keys, str) else list(client_keys)
    self.db_paths = [str(v) for v in db_paths] if isinstance(db_paths, list) else [str(db_paths)]
    if len(client_keys) != len(self.db_paths):
        raise UserError(f'io_backend lmdb: {len(client_keys)} client keys for {len(self.db_paths)} folders')
    self._client = {client: open_lmdb(path) for client, path in zip(client_keys, self.db_paths)}


def _signature_ext(data):
    if data.startswith(PNG_SIGNATURE):
        return '.png'
    if data.startswith(JPEG_SIGNATURE):
        return '.jpg'
    return ''


def checked_get(get):
    """Wrap ``FileClient.get``: a missing LMDB key, an empty or truncated image raises UserError naming it."""

    def checked(self, filepath, client_key='default'):
        if self.backend == 'lmdb':
            client = self.client
            folder = client.db_paths[list(client._client).index(client_key)] if client_key in client._client else '?'
            where = f'LMDB {folder} key {filepath!r}'
        else:
            where = str(filepath)
        _last_read.where = where
        try:
            data = get(self, filepath, client_key)
        except OSError as err:
            raise UserError(f'{where}: cannot read it ({err.strerror or err})') from None
        if data is None:
            raise UserError(f'{where}: no such key (is meta_info.txt from another LMDB?)')
        ext = osp.splitext(str(filepath))[1].lower() if self.backend != 'lmdb' else _signature_ext(data)
        if not data:
            raise UserError(f'{where}: empty (0 bytes)')
        try:
            check_container(data, ext)
        except ImageError as err:
            raise UserError(f'{where}: {err}') from None
        return data

    checked.wrapped = get
    return checked


def checked_imfrombytes(imfrombytes):
    """Wrap BasicSR's ``imfrombytes``: an undecodable image raises UserError naming the last file read."""

    def decode(content, flag='color', float32=False):
        try:
            img = imfrombytes(content, flag, float32)
        except AttributeError:  # cv2.imdecode gave None and BasicSR called .astype on it
            img = None
        if img is None:
            where = getattr(_last_read, 'where', 'an image')
            raise UserError(f'{where}: OpenCV cannot decode it (damaged or not an image); replace or remove it')
        return img

    decode.wrapped = imfrombytes
    return decode


def apply():
    """Install the checks into BasicSR's file client, LMDB backend and the data sets' ``imfrombytes``."""
    from basicsr.utils import file_client
    if not hasattr(file_client.FileClient.get, 'wrapped'):
        file_client.FileClient.get = checked_get(file_client.FileClient.get)
    file_client.LmdbBackend.__init__ = _lmdb_backend_init
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(('basicsr.data', 'd2c_data', 'basicsr.utils')):
            continue
        original = getattr(module, 'imfrombytes', None)
        if callable(original) and not hasattr(original, 'wrapped'):
            module.imfrombytes = checked_imfrombytes(original)
