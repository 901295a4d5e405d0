"""The one exception type for user mistakes: the CLI prints its message and exits non-zero."""


class MuError(Exception):
    """A problem with user input (file, field, value) that has a clear fix; never a bug in mu."""
