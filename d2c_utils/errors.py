"""The exception types every d2c-sr tool reports the same way."""
import functools
import sys


class UserError(ValueError):
    """A problem with what the user passed (a file, an option, a flag), not a bug.

    The message is meant for the user: it names the offending file, key or value and says
    how to fix it. Command-line tools print it as ``<prog>: error: <message>`` and exit with
    status 2 (:func:`report_user_error`); BasicSR's pipelines (d2c-train / d2c-test) do the
    same. A subclass of ValueError, so code that catches option errors as ValueError keeps working.
    """


class ImageError(Exception):
    """One input image cannot be used: tools skip it, report it and finish with status 1.

    Attributes:
        kind (str): 'unreadable', 'truncated' or 'unsupported' (data preparation groups problems by it).
    """

    def __init__(self, message, kind='unreadable'):
        super().__init__(message)
        self.kind = kind


USER_ERROR_STATUS = 2


def report_user_error(prog, err, stream=None):
    """Print ``err`` as ``<prog>: error: <message>`` on stderr and return the exit status 2."""
    print(f'{prog}: error: {err}', file=stream or sys.stderr)
    return USER_ERROR_STATUS


INTERRUPTED_STATUS = 130  # what a shell reports for a process ended by SIGINT (128 + 2)


def report_interrupt(prog, stream=None):
    """Print the one line of a Ctrl-C and return the exit status 130."""
    print(
        f'\n{prog}: interrupted (Ctrl-C); every file written is complete, nothing was left half-written',
        file=stream or sys.stderr)
    return INTERRUPTED_STATUS


def command_line_tool(prog):
    """Decorate a tool's ``main(argv=None)``: Ctrl-C, user errors and a full disk end in one line.

    ``KeyboardInterrupt`` -> status 130; :class:`UserError` (and an ``OSError`` saying the disk
    is full) -> ``<prog>: error: ...`` and status 2. Everything the tools write goes through
    :func:`d2c_utils.output_util.atomic_write`, so an interrupted run leaves whole files only.
    """

    def decorate(main):

        @functools.wraps(main)
        def run(argv=None):
            from .output_util import disk_full_error, is_disk_full  # noqa: PLC0415  (errors imports nothing)
            try:
                return main(argv)
            except KeyboardInterrupt:
                return report_interrupt(prog)
            except UserError as err:
                return report_user_error(prog, err)
            except OSError as err:
                if not is_disk_full(err):
                    raise
                return report_user_error(prog, disk_full_error(getattr(err, 'filename', None) or '.'))

        return run

    return decorate
