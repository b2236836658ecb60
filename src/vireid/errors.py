"""Errors raised for bad user input.

The CLI turns :class:`InputError` into one line on stderr and exit code 2; every message
names the file, key or value at fault.
"""


class InputError(ValueError):
    """Bad input from the user (file, key, value); the message says which and why."""
