"""The one error type of matching/: bad input to a deletion request, printed as `dmm: error: <line>`."""
from attribution.errors import DmmError


class MatchingError(DmmError):
    """An unusable request, setting or input file; the message names the problem and the fix."""
