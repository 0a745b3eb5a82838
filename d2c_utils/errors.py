"""The exception types every d2c-sr tool reports the same way."""
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
