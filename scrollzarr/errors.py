"""Errors that the command-line tools report as one line on stderr."""


class ScrollzarrError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The command-line scripts print ``str(error)`` on one line and exit with
    ``exit_code``; they never show a traceback for these.
    """

    exit_code = 1


class UsageError(ScrollzarrError):
    """The command line itself is wrong (a malformed option value, an impossible combination)."""

    exit_code = 2
