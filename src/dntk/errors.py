"""The package's own exception type.

Every error dntk raises for bad input is a :class:`DNTKError` whose message names the problem and
the fix, so callers can catch one type and users can read one sentence.
"""


class DNTKError(ValueError):
    """Bad input or an impossible request; the message says what was wrong and how to fix it."""


def is_int_at_least(value, minimum: int) -> bool:
    """True for a real integer (not a bool) ≥ minimum — the one range test behind every "k = 0 is
    refused, never replaced by a default" check."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


def require_int(value, what: str, minimum: int, fix: str) -> None:
    """Raise a DNTKError naming ``what``, its range and ``fix`` unless value is an integer ≥ minimum."""
    if not is_int_at_least(value, minimum):
        raise DNTKError(f"{what} must be an integer ≥ {minimum}, got {value!r}; {fix}")
