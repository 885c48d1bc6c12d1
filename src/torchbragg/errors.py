"""Errors that reach the user as one line, never a traceback."""


class InputError(ValueError):
    """Bad input: a flag, a file or a geometry that cannot be simulated.

    A ValueError, so API callers can catch bad input the usual way; the
    message is the same line the command line prints."""
