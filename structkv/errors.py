"""The one exception type for bad user input.

Why a dedicated class: the CLI turns exactly these into a single ``error: ...`` line and exit
code 2, while real bugs still surface as tracebacks. Every message names the problem *and* the fix.
"""


class StructKVError(ValueError):
    """Invalid input or environment; the message says what is wrong and how to fix it."""
