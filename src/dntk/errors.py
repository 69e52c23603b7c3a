"""The package's own exception type.

Every error dntk raises for bad input is a :class:`DNTKError` whose message names the problem and
the fix, so callers can catch one type and users can read one sentence.
"""


class DNTKError(ValueError):
    """Bad input or an impossible request; the message says what was wrong and how to fix it."""
