"""The one exception type for bad user input.

Library code raises :class:`UsageError` with a single line that names the option and says
what is allowed; front ends turn it into that line on stderr and exit code 2.
"""


class UsageError(ValueError):
    """Bad input from the user: one clear line, exit code 2, nothing written."""
