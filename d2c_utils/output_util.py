"""The one output writer of the project: whole files or nothing, never an input replaced.

Every tool and model writes through :func:`atomic_write`: the bytes go to a hidden temporary
file in the target's folder (``.<name>.d2c-<pid>-XXXX.tmp``), are flushed and fsynced, and the
file is renamed onto the target only then. A crash, a kill or a full disk leaves the previous
file (if any) untouched; a full disk is reported in one line (:class:`DiskFullError`). A
temporary file left by a killed process is removed by the next write into the same folder
(:func:`remove_stale_temps`).

:func:`check_distinct` refuses outputs that are inputs of the same command or that collide
with each other, before any work is done.
"""
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from os import path as osp

from .errors import UserError

# errnos that mean "no room": disk full and quota exceeded
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what writers that lose the errno (numpy's tofile, torch's zip writer) say
DISK_FULL_TEXT = ('No space left on device', 'Disk quot', 'requested and 0 written')
# below this many free bytes a failed write is blamed on the disk being full
NEARLY_FULL_BYTES = 64 << 10
TEMP_PATTERN = re.compile(r'^\..+\.d2c-(\d+)-[^.]+\.tmp$')
# a temporary file of a process that is still alive is left alone unless it is this old
STALE_TEMP_SECONDS = 24 * 3600
# folders this process has already cleaned (atomic_write cleans a folder once, not at every file)
_CLEANED = set()


class DiskFullError(UserError):
    """The disk (or quota) filled up while writing ``path``; nothing partial was left behind."""


def is_disk_full(err, folder=None):
    """True if ``err`` (or an exception it was raised from) says the disk or quota is full.

    Some writers lose the errno (``numpy.ndarray.tofile`` says "N requested and 0 written",
    torch's zip writer raises RuntimeError), so the message and, failing that, the free space
    of ``folder`` are consulted too.
    """
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(seen) for text in DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is not None and isinstance(err, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


def disk_full_error(path):
    """The one-line :class:`DiskFullError` for ``path``."""
    folder = osp.dirname(osp.abspath(path))
    try:
        free = f'{shutil.disk_usage(folder).free / 2**20:.1f} MiB free'
    except OSError:
        free = 'free space unknown'
    return DiskFullError(f'disk full: cannot write {path} ({free} in {folder}); nothing was written there. Free '
                         'some space or write elsewhere')


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder):
    """Remove temporary files that killed writers left in ``folder``; returns their names.

    A temporary file is stale when the process that made it (its name holds the pid) is gone,
    or when it is older than :data:`STALE_TEMP_SECONDS` (a pid reused by another process).
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = TEMP_PATTERN.match(name)
        if not match:
            continue
        path = osp.join(folder, name)
        try:
            pid = int(match.group(1))
            if (pid != os.getpid() and not _pid_alive(pid)) or now - os.path.getmtime(path) > STALE_TEMP_SECONDS:
                os.remove(path)
                removed.append(name)
        except OSError:  # removed meanwhile by another process, or not ours to remove
            continue
    return removed


def _fsync_folder(folder):
    """Make the rename durable (POSIX: fsync the directory); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """Write ``path`` through a temporary file in the same folder, fsynced, then renamed onto it.

    Args:
        path (str): The file to write.
        write (callable): ``write(temporary_path)`` writes the whole file there; it is flushed to
            disk and renamed to ``path`` only when ``write`` returns.

    Raises:
        DiskFullError: the disk or quota filled up (the temporary file is removed; an existing
            ``path`` is untouched).
        Exception: whatever ``write`` raised, after the temporary file was removed.
    """
    folder = osp.dirname(osp.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        if folder not in _CLEANED:
            remove_stale_temps(folder)
            _CLEANED.add(folder)
        fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.d2c-{os.getpid()}-', suffix='.tmp', dir=folder)
        os.close(fd)
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error(path) from None
        raise
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:  # flush what the writer wrote to the disk before the rename
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the permissions a plain open() would (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        if osp.exists(tmp):
            os.remove(tmp)
        if isinstance(err, Exception) and is_disk_full(err, folder):
            raise disk_full_error(path) from None
        raise
    _fsync_folder(folder)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes-like) to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)

    atomic_write(path, write)


def same_file(a, b):
    """True if the paths name the same file (existing or not)."""
    if osp.exists(a) and osp.exists(b):
        return osp.samefile(a, b)
    return osp.normcase(osp.realpath(a)) == osp.normcase(osp.realpath(b))


def check_distinct(outputs, inputs):
    """Refuse outputs that are inputs of the same command, or that are the same file as another output.

    Args:
        outputs (dict[str, str | None]): how the user names each output (flag) -> path (None: not written).
        inputs (dict[str, str | None]): how the user names each input -> path.

    Raises:
        UserError: naming both flags and the path.
    """
    outputs = [(flag, path) for flag, path in outputs.items() if path]
    inputs = [(flag, path) for flag, path in inputs.items() if path]
    for i, (flag, path) in enumerate(outputs):
        for in_flag, in_path in inputs:
            if same_file(path, in_path):
                raise UserError(f'{flag} {path} is the input {in_flag}: writing it would overwrite the input; '
                                'choose another output path')
        for other_flag, other in outputs[i + 1:]:
            if same_file(path, other):
                raise UserError(f'{flag} and {other_flag} are the same file {path}; give them different paths')


def atomic_write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(text)

    atomic_write(path, write)


def file_sha256(path):
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
