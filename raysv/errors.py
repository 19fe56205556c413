"""The error raysv gives for bad input or a refused request: the CLI prints its one line and exits 2.

A malformed trial list, an audio file that cannot be used, a run directory held by another
process, a changed setting of a finished stage: the message names the input and the problem;
the traceback is for ``raysv -v``.
"""


class InputError(ValueError):
    """Bad input, named in the message."""
