"""The one error type for bad input (a path, a case file, a case ID, a source tree).

``str(err)`` is one line that says what is wrong and what to do; the CLI prints it and exits 2
(``--debug`` adds the traceback). Anything else that escapes is a bug of the harness.
"""


class InputError(Exception):
    """Unusable input. ``str(err)`` is one line that says what is wrong and what to do."""
