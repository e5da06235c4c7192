"""One base class for every input error the CLI turns into a one-line message and exit code 2."""


class DmmError(ValueError):
    """Bad input: the message names the problem and the fix, on one line."""
