"""Exceptions shared by every step of the data flow.

The command line maps :class:`InputError` to exit code 2 (bad input or usage) with its
message and no traceback; anything else is a failure of the program (exit code 1).
"""


class InputError(Exception):
    """Bad input or usage: a file, folder, option or value the user must fix.

    The message must name the file or option at fault and say what is wrong.
    """
