"""Expected mistakes (a missing checkpoint, dataset or prepared weights; a split that is not there; a stream that
changed under a resume): the command line prints their one line, naming what is wrong and the fix, and exits with
status 2 without a traceback; code calling the library gets an exception of the usual built-in type."""


class UsageError(Exception):
    """A mistake the user can fix; the message names what is wrong and how to fix it, in one line."""


class MissingInputError(UsageError, FileNotFoundError):
    """A file or folder the run needs is not there."""


class InvalidSettingError(UsageError, ValueError):
    """A setting names something that does not exist, or cannot hold for this run."""
