"""Errors the command lines turn into one clear line and exit code 2."""


class InputError(ValueError):
    """Bad user input: a file that cannot be read, a size out of range, a bad number.

    The message is one line that says what is wrong and, where it helps, what to do instead.
    """
