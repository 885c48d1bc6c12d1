"""Errors that reach the user as one line, never a traceback."""


class InputError(Exception):
    """Bad input: a flag, a file or a geometry that cannot be simulated."""
